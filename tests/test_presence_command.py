from __future__ import annotations

import asyncio
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from presence.store import Connection, RedisPresenceStore


def seed(settings, *connections: Connection, ttl: float = 30.0) -> None:
    settings.PRESENCE_TTL = ttl

    async def join_all() -> None:
        store = RedisPresenceStore(settings.REDIS_URL, settings.PRESENCE_KEY_PREFIX)
        try:
            for connection in connections:
                await store.join(connection)
        finally:
            await store.close()

    asyncio.run(join_all())


def run_presence(*args) -> str:
    output = StringIO()
    call_command("presence", *args, stdout=output)
    return output.getvalue()


def test_lists_every_room_with_counts(settings):
    seed(
        settings,
        Connection("lobby", "c1", "alice"),
        Connection("lobby", "c2", "alice"),
        Connection("lobby", "c3", "bob"),
        Connection("games", "c4", "carol"),
    )
    assert run_presence() == "games: carol (1)\nlobby: alice (2), bob (1)\n"


def test_lists_one_room(settings):
    seed(settings, Connection("lobby", "c1", "alice"), Connection("games", "c2", "carol"))
    assert run_presence("--room", "games") == "games: carol (1)\n"


def test_empty_store(settings):
    assert run_presence() == "Nobody is online.\n"


@pytest.mark.django_db(transaction=True)
def test_reap_removes_expired_connections(settings):
    seed(settings, Connection("lobby", "c1", "alice"), ttl=0.05)
    import time

    time.sleep(0.2)
    assert run_presence("--reap") == "Reaped 1 users.\nNobody is online.\n"


@pytest.mark.django_db
def test_admin_room_page_shows_online_users(settings, client, django_user_model, room):
    seed(settings, Connection("lobby", "c1", "alice"), Connection("lobby", "c2", "alice"))
    admin = django_user_model.objects.create_superuser("admin", "admin@example.com", "admin-pass")
    client.force_login(admin)

    content = client.get(f"/admin/chatapp/room/{room.pk}/change/").content.decode()

    assert "alice (2 connections)" in content


def test_without_redis_is_an_error(settings):
    settings.REDIS_URL = ""
    with pytest.raises(CommandError, match="REDIS_URL is not set"):
        run_presence()


def test_marks_expired_connections(settings):
    seed(settings, Connection("lobby", "c1", "alice"), ttl=0.05)
    import time

    time.sleep(0.2)
    assert run_presence() == "lobby: alice (1) [1 expired connections; --reap removes them]\n"
