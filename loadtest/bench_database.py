"""Database setup the load tools share: migrations, rooms, users and their login sessions."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def prepare_database(room_slugs: list[str], user_prefix: str, user_count: int, password: str) -> dict:
    """Migrate, create the rooms and the users PREFIX1..PREFIXN, and write one login session per user.

    Returns the session keys in user order, the session cookie's name, each
    room's last seq by slug and the PostgreSQL version. Exits with a message
    naming the database and the fix when it cannot connect.
    """
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatapp.settings")
    sys.path.insert(0, str(REPO_ROOT))
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import OperationalError, connection, connections

    from chatapp.models import Room
    from login_sessions import session_keys

    try:
        call_command("migrate", interactive=False, verbosity=0)
    except OperationalError as exc:
        database = settings.DATABASES["default"]
        createdb = f"createdb -h {database['HOST']} -U {database['USER']} {database['NAME']}"
        raise SystemExit(
            f"Failed to connect to database {database['NAME']!r} on {database['HOST']}:{database['PORT']}: {exc}\n"
            f"Start PostgreSQL (bin/services), create the database ({createdb}) or set DATABASE_URL."
        ) from exc

    # The commands print a line each, which would bury the tools' own output.
    quiet = io.StringIO()
    for slug in room_slugs:
        call_command("create_room", slug, stdout=quiet)
    call_command("seed_users", count=user_count, prefix=user_prefix, password=password, stdout=quiet)
    keys = session_keys([f"{user_prefix}{number}" for number in range(1, user_count + 1)])

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        postgres_version = cursor.fetchone()[0]
    last_seqs = dict(Room.objects.filter(slug__in=room_slugs).values_list("slug", "last_seq"))
    connections.close_all()
    return {
        "session_keys": keys,
        "cookie_name": settings.SESSION_COOKIE_NAME,
        "last_seqs": last_seqs,
        "postgres_version": postgres_version,
    }
