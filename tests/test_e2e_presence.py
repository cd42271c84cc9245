"""Presence through real daphne processes on shared PostgreSQL and Redis."""
from __future__ import annotations

import asyncio
import random
import signal
import time
from contextlib import ExitStack

import pytest
from channels.db import database_sync_to_async
from django.conf import settings

from presence.store import RedisPresenceStore
from tests.support import SocketClient, running_daphne

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

HEARTBEAT, TTL, GRACE = 0.5, 2.0, 1.0
NODE_ENV = {
    "PRESENCE_HEARTBEAT_INTERVAL": str(HEARTBEAT),
    "PRESENCE_TTL": str(TTL),
    "PRESENCE_LEAVE_GRACE": str(GRACE),
}
# Time for a closed connection to be reaped: the grace, one heartbeat, and a
# margin for a busy machine.
LEAVE_DELAY = GRACE + HEARTBEAT + 1.5


@pytest.fixture
def nodes(tmp_path):
    with ExitStack() as stack:
        yield [stack.enter_context(running_daphne(tmp_path, NODE_ENV)) for _ in range(2)]


@pytest.fixture
async def store():
    redis_store = RedisPresenceStore(settings.REDIS_URL, settings.PRESENCE_KEY_PREFIX)
    yield redis_store
    await redis_store.close()


def changes_of(client: SocketClient, user: str) -> list[str]:
    return [change for changed_user, change in client.presence_changes if changed_user == user]


async def test_reconnecting_user_listed_once_without_flicker(nodes, room, alice, bob, cookie_for, store):
    node = nodes[0]
    observer = await SocketClient.connect(node, room.slug, await cookie_for(bob))
    alice_cookie = await cookie_for(alice)
    alice_socket = await SocketClient.connect(node, room.slug, alice_cookie)
    await observer.wait_for(lambda client: "alice" in client.online)

    for _ in range(3):
        await alice_socket.drop()
        alice_socket = await SocketClient.connect(node, room.slug, alice_cookie)
    await asyncio.sleep(LEAVE_DELAY)

    assert observer.online == {"alice", "bob"}
    assert changes_of(observer, "alice") == ["join"]
    assert await store.online(room.slug) == {"alice": 1, "bob": 1}
    await alice_socket.close()
    await observer.close()


async def test_two_tabs_one_leave_after_both_close(nodes, room, alice, bob, cookie_for, store):
    node = nodes[0]
    observer = await SocketClient.connect(node, room.slug, await cookie_for(bob))
    alice_cookie = await cookie_for(alice)
    first_tab = await SocketClient.connect(node, room.slug, alice_cookie)
    second_tab = await SocketClient.connect(nodes[1], room.slug, alice_cookie)
    await observer.wait_for(lambda client: "alice" in client.online)

    await first_tab.close()
    await asyncio.sleep(LEAVE_DELAY)
    assert "alice" in observer.online
    assert await store.online(room.slug) == {"alice": 1, "bob": 1}

    await second_tab.close()
    await observer.wait_for(lambda client: "alice" not in client.online, timeout=LEAVE_DELAY + 2)
    await asyncio.sleep(HEARTBEAT * 2)

    assert changes_of(observer, "alice") == ["join", "leave"]
    assert await store.online(room.slug) == {"bob": 1}
    await observer.close()


async def test_killed_node_users_reaped_and_reconnect_once(nodes, room, alice, bob, cookie_for, store):
    doomed, survivor = nodes
    observer = await SocketClient.connect(survivor, room.slug, await cookie_for(bob))
    alice_cookie = await cookie_for(alice)
    alice_socket = await SocketClient.connect(doomed, room.slug, alice_cookie)
    await observer.wait_for(lambda client: "alice" in client.online)

    doomed.kill(signal.SIGKILL)
    killed_at = time.monotonic()
    await observer.wait_for(lambda client: "alice" not in client.online, timeout=TTL + HEARTBEAT + 2)
    reaped_after = time.monotonic() - killed_at

    assert reaped_after <= TTL + HEARTBEAT + 2
    assert changes_of(observer, "alice") == ["join", "leave"]

    alice_again = await SocketClient.connect(survivor, room.slug, alice_cookie)
    await observer.wait_for(lambda client: "alice" in client.online)
    await asyncio.sleep(HEARTBEAT * 2)
    assert changes_of(observer, "alice") == ["join", "leave", "join"]
    assert await store.online(room.slug) == {"alice": 1, "bob": 1}
    await alice_again.close()
    await observer.close()
    await alice_socket.reader


async def test_random_churn_across_two_nodes_ends_with_right_set(nodes, room, make_user, cookie_for, store):
    users = [await database_sync_to_async(make_user)(f"churner{number}") for number in range(50)]
    cookies = [await cookie_for(user) for user in users]
    rng = random.Random(7)
    open_sockets: dict[int, tuple[int, SocketClient]] = {}

    for step in range(400):
        connection_number = rng.randrange(200)
        if connection_number in open_sockets:
            user_number, client = open_sockets.pop(connection_number)
            await (client.drop() if rng.random() < 0.3 else client.close())
        else:
            user_number = connection_number % 50
            node = nodes[rng.randrange(2)]
            open_sockets[connection_number] = (
                user_number,
                await SocketClient.connect(node, room.slug, cookies[user_number]),
            )
    await asyncio.sleep(LEAVE_DELAY + HEARTBEAT)

    expected = {f"churner{user_number}" for user_number, _ in open_sockets.values()}
    online = await store.online(room.slug)
    assert set(online) == expected
    for user in expected:
        assert online[user] == sum(1 for number, _ in open_sockets.values() if f"churner{number}" == user)
    for _, client in open_sockets.values():
        assert client.online == expected
    await asyncio.gather(*(client.close() for _, client in open_sockets.values()))
