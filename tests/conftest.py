"""Shared fixtures. The suite runs on real PostgreSQL and Redis only."""
from __future__ import annotations

import itertools

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection

from chatapp.hub import close_hub
from chatapp.ratelimit import close_rate_limiter
from presence.tracker import close_tracker
from chatapp.models import Room
from tests.support import session_cookie


def pytest_configure(config: pytest.Config) -> None:
    engine = settings.DATABASES["default"]["ENGINE"]
    problems = []
    if "postgresql" not in engine:
        problems.append(f"DATABASE_URL must point at PostgreSQL (the engine is {engine})")
    if not settings.REDIS_URL:
        problems.append("REDIS_URL must point at Redis")
    if problems:
        # Exit instead of skipping: a suite that silently skips its delivery
        # tests would pass while checking nothing. bin/test sets both.
        pytest.exit("; ".join(problems) + ". Run the suite with bin/test.", returncode=2)


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """Create the test database, and at the end end the sessions that threads and daphne nodes left open.

    Without this, dropping the test database fails while any connection to it
    is still open.
    """
    yield
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(autouse=True)
def fast_password_hasher(settings):
    # The default hasher costs about 0.3 s a user; tests create hundreds.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


_numbers = itertools.count(1)


@pytest.fixture
def make_user(django_user_model):
    def make(username: str | None = None, password: str = "correct-horse-battery"):
        username = username or f"user{next(_numbers)}"
        return django_user_model.objects.create_user(username=username, password=password)

    return make


@pytest.fixture
def make_room():
    def make(slug: str | None = None, title: str | None = None) -> Room:
        slug = slug or f"room-{next(_numbers)}"
        return Room.objects.create(slug=slug, title=title or slug.title())

    return make


@pytest.fixture
def alice(make_user):
    return make_user("alice")


@pytest.fixture
def bob(make_user):
    return make_user("bob")


@pytest.fixture
def room(make_room):
    return make_room("lobby", "Lobby")


@pytest.fixture
async def hub_cleanup():
    """Close the event loop's room hub after an async test, so that no task outlives its loop."""
    yield
    await close_hub()
    await close_tracker()
    await close_rate_limiter()


@pytest.fixture(autouse=True)
def clean_presence_keys():
    """Start every test with no presence state, since rooms of different tests share slugs."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for pattern in (f"{settings.PRESENCE_KEY_PREFIX}:*", f"{settings.CHANNEL_PREFIX}:ratelimit:*"):
            for key in client.scan_iter(pattern):
                client.delete(key)
        yield
    finally:
        client.close()


@pytest.fixture
def cookie_for():
    """Return a coroutine function that logs a user in and returns its Cookie header value."""
    return sync_to_async(session_cookie)
