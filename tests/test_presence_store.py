"""The presence stores: the Redis one against real Redis, and the in-memory one with the same behaviour."""
from __future__ import annotations

import asyncio

import pytest

from presence.store import Connection, ConnectionLimitReached, MemoryPresenceStore, RedisPresenceStore


@pytest.fixture(params=["redis", "memory"])
async def store(request, settings):
    settings.PRESENCE_TTL = 0.6
    settings.PRESENCE_LEAVE_GRACE = 0.2
    if request.param == "memory":
        yield MemoryPresenceStore()
        return
    redis_store = RedisPresenceStore(settings.REDIS_URL, settings.PRESENCE_KEY_PREFIX)
    yield redis_store
    await redis_store.close()


def connection(user: str, number: int = 1, room: str = "lobby") -> Connection:
    return Connection(room=room, conn_id=f"{user}-{number}", user=user)


class TestJoin:
    async def test_first_connection_announced(self, store):
        assert await store.join(connection("alice")) is True
        assert await store.online("lobby") == {"alice": 1}

    async def test_second_tab_not_announced(self, store):
        await store.join(connection("alice", 1))
        assert await store.join(connection("alice", 2)) is False
        assert await store.online("lobby") == {"alice": 2}

    async def test_refresh_not_announced(self, store):
        await store.join(connection("alice"))
        assert await store.join(connection("alice")) is False
        assert await store.online("lobby") == {"alice": 1}

    async def test_rooms_listed_separately(self, store):
        await store.join(connection("alice", room="lobby"))
        await store.join(connection("bob", room="games"))
        assert await store.rooms() == ["games", "lobby"]
        assert await store.online("games") == {"bob": 1}


class TestLeave:
    async def test_release_keeps_user_listed_during_grace(self, store):
        await store.join(connection("alice"))
        await store.release(connection("alice"))

        assert await store.reap() == []
        assert await store.online("lobby") == {"alice": 1}

    async def test_release_then_reap_announces_one_leave(self, store):
        await store.join(connection("alice"))
        await store.release(connection("alice"))
        await asyncio.sleep(0.3)

        assert await store.reap() == [("lobby", "alice")]
        assert await store.reap() == []
        assert await store.online("lobby") == {}
        assert await store.rooms() == []

    async def test_closing_one_of_two_tabs_keeps_user_online(self, store):
        await store.join(connection("alice", 1))
        await store.join(connection("alice", 2))
        await store.release(connection("alice", 1))
        await asyncio.sleep(0.3)

        assert await store.reap() == []
        assert await store.online("lobby") == {"alice": 1}

    async def test_reconnect_within_grace_shows_no_leave(self, store):
        await store.join(connection("alice", 1))
        await store.release(connection("alice", 1))
        assert await store.join(connection("alice", 2)) is False
        await asyncio.sleep(0.3)

        assert await store.reap() == []
        assert await store.online("lobby") == {"alice": 1}

    async def test_unrefreshed_connection_expires_after_ttl(self, store):
        await store.join(connection("alice"))
        await asyncio.sleep(0.2)
        assert await store.reap() == []

        await asyncio.sleep(0.5)
        assert await store.reap() == [("lobby", "alice")]

    async def test_release_of_unknown_connection_is_harmless(self, store):
        await store.release(connection("ghost"))
        assert await store.reap() == []
        assert await store.rooms() == []


async def test_concurrent_reapers_announce_each_leave_once(settings):
    settings.PRESENCE_TTL = 0.3
    nodes = [RedisPresenceStore(settings.REDIS_URL, settings.PRESENCE_KEY_PREFIX) for _ in range(4)]
    try:
        for user_number in range(50):
            for tab in range(3):
                await nodes[tab % 4].join(connection(f"user{user_number}", tab))
        await asyncio.sleep(0.4)

        results = await asyncio.gather(*(node.reap() for node in nodes))

        announced = [leave for result in results for leave in result]
        assert sorted(announced) == sorted(("lobby", f"user{number}") for number in range(50))
        assert await nodes[0].online("lobby") == {}
    finally:
        for node in nodes:
            await node.close()


async def test_redis_state_returns_to_empty_after_churn(settings):
    """Nothing grows with the number of events: after churn ends, no presence key remains."""
    import redis.asyncio as redis

    settings.PRESENCE_LEAVE_GRACE = 0
    store = RedisPresenceStore(settings.REDIS_URL, settings.PRESENCE_KEY_PREFIX)
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for cycle in range(300):
            member = connection(f"user{cycle % 20}", cycle, room=f"room{cycle % 5}")
            await store.join(member)
            await store.release(member)
        await asyncio.sleep(0.05)
        await store.reap()

        keys = [key async for key in client.scan_iter(f"{settings.PRESENCE_KEY_PREFIX}:*")]
        assert keys == []
    finally:
        await store.close()
        await client.aclose()


class TestConnectionLimit:
    async def test_new_connection_over_limit_rejected(self, store, settings):
        settings.PRESENCE_MAX_CONNECTIONS_PER_USER = 2
        await store.join(connection("alice", 1, room="lobby"))
        await store.join(connection("alice", 2, room="games"))

        with pytest.raises(ConnectionLimitReached, match="user alice already has 2 connections open"):
            await store.join(connection("alice", 3, room="lobby"))

        assert await store.online("lobby") == {"alice": 1}
        assert await store.join(connection("bob", 1)) is True

    async def test_refresh_of_known_connection_allowed_at_limit(self, store, settings):
        settings.PRESENCE_MAX_CONNECTIONS_PER_USER = 1
        await store.join(connection("alice", 1))
        assert await store.join(connection("alice", 1)) is False

    async def test_reaped_connection_frees_a_place(self, store, settings):
        settings.PRESENCE_MAX_CONNECTIONS_PER_USER = 1
        await store.join(connection("alice", 1))
        await store.release(connection("alice", 1))
        await asyncio.sleep(0.3)
        await store.reap()

        assert await store.join(connection("alice", 2)) is True

    async def test_zero_means_no_limit(self, store, settings):
        settings.PRESENCE_MAX_CONNECTIONS_PER_USER = 0
        for number in range(30):
            await store.join(connection("alice", number))
        assert await store.online("lobby") == {"alice": 30}
