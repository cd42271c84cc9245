"""Presence through real daphne processes on shared PostgreSQL and Redis."""
from __future__ import annotations

import asyncio
import base64
import os
import random
import signal
import socket
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


async def test_random_churn_ends_with_right_set(nodes, room, make_user, cookie_for, store):
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


def open_silent_socket(node, slug: str, cookie: str) -> "socket.socket":
    """Complete a WebSocket handshake over a plain TCP socket that then never reads again.

    To the server this is a client whose network vanished: frames pile up
    unread and pings go unanswered.
    """
    sock = socket.create_connection(("127.0.0.1", node.port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws/rooms/{slug}/?after=0 HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{node.port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Origin: {node.http_url}\r\nCookie: {cookie}\r\n\r\n"
    )
    sock.sendall(request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(1)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


async def group_subscribers(room_id: int) -> int:
    import redis.asyncio as redis

    from chatapp.broadcast import room_group_name

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        channel = f"{settings.CHANNEL_PREFIX}__group__{room_group_name(room_id)}"
        [(_, count)] = await client.pubsub_numsub(channel)
        return count
    finally:
        await client.aclose()


async def test_vanished_client_during_history_push_is_dropped(tmp_path, room, alice, bob, cookie_for, store):
    ping_interval, ping_timeout = 1, 2

    def store_history() -> None:
        from chatapp.models import Message, Room

        Message.objects.bulk_create(
            Message(room=room, seq=seq, author=alice, body=f"history {seq} " + "x" * 400) for seq in range(1, 3001)
        )
        Room.objects.filter(pk=room.pk).update(last_seq=3000)

    await database_sync_to_async(store_history)()
    with running_daphne(
        tmp_path, NODE_ENV, extra_args=["--ping-interval", str(ping_interval), "--ping-timeout", str(ping_timeout)]
    ) as node:
        silent = await asyncio.to_thread(open_silent_socket, node, room.slug, await cookie_for(bob))
        try:
            await asyncio.sleep(1)
            assert await store.online(room.slug) == {"bob": 1}
            assert await group_subscribers(room.pk) == 1

            # Unanswered pings close the socket; the leave grace and one
            # heartbeat later the entry is reaped.
            deadline = time.monotonic() + ping_interval + ping_timeout + LEAVE_DELAY + 2
            while time.monotonic() < deadline and await store.online(room.slug):
                await asyncio.sleep(0.2)

            assert await store.online(room.slug) == {}
            assert await group_subscribers(room.pk) == 0
        finally:
            silent.close()
