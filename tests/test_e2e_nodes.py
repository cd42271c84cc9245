"""Several app nodes sharing PostgreSQL and Redis: cross-node delivery, Redis restarts, drain and crash."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
from channels.db import database_sync_to_async

from chatapp.models import Message
from chatapp.services import message_create
from tests.cluster import FollowingClient, private_redis
from tests.support import REPO_ROOT, SocketClient, running_daphne, start_daphne

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

NODE_ENV = {
    "PRESENCE_HEARTBEAT_INTERVAL": "0.5",
    "PRESENCE_TTL": "2",
    "PRESENCE_LEAVE_GRACE": "1",
    "CHAT_DRAIN_TIMEOUT": "5",
}


@pytest.fixture
def two_nodes(tmp_path):
    with ExitStack() as stack:
        yield [stack.enter_context(running_daphne(tmp_path, NODE_ENV, server="node")) for _ in range(2)]


async def stored_seqs(room) -> list[int]:
    return [seq async for seq in Message.objects.filter(room=room).order_by("seq").values_list("seq", flat=True)]


async def post(room, author, body: str) -> int:
    result = await database_sync_to_async(message_create)(room=room, author=author, body=body)
    return result.message.seq


async def test_messages_cross_nodes_in_order(two_nodes, room, alice, bob, make_user, cookie_for):
    node_a, node_b = two_nodes
    alice_socket = await SocketClient.connect(node_a, room.slug, await cookie_for(alice), after=0)
    bob_socket = await SocketClient.connect(node_b, room.slug, await cookie_for(bob), after=0)
    await asyncio.sleep(0.3)

    for number in range(30):
        sender = alice_socket if number % 2 else bob_socket
        await sender.send(f"message {number}", f"cross-{number}")
    for socket in (alice_socket, bob_socket):
        await socket.wait_for(lambda client: len(client.messages) >= 30)

    expected = list(range(1, 31))
    assert alice_socket.seqs() == expected
    assert bob_socket.seqs() == expected
    assert await stored_seqs(room) == expected
    assert alice_socket.online == {"alice", "bob"}
    assert bob_socket.online == {"alice", "bob"}
    await alice_socket.close()
    await bob_socket.close()


async def test_redis_restart_loses_nothing(tmp_path, room, alice, bob, carol_cookie, cookie_for):
    with private_redis(tmp_path) as redis_server, ExitStack() as stack:
        # A long gap-check interval, so that only live pub/sub delivery can
        # meet the 2 s bound after the restart.
        env = {**NODE_ENV, "REDIS_URL": redis_server.url, "CHAT_GAP_CHECK_INTERVAL": "30"}
        nodes = [stack.enter_context(running_daphne(tmp_path, env, server="node")) for _ in range(2)]
        receivers = [
            await SocketClient.connect(nodes[0], room.slug, await cookie_for(bob), after=0),
            await SocketClient.connect(nodes[1], room.slug, carol_cookie, after=0),
        ]
        sender = await SocketClient.connect(nodes[0], room.slug, await cookie_for(alice), after=0)
        await asyncio.sleep(0.3)

        async def send_for(seconds: float, label: str) -> None:
            deadline = time.monotonic() + seconds
            number = 0
            while time.monotonic() < deadline:
                number += 1
                await sender.send(f"{label} {number}", f"{label}-{number}")
                await asyncio.sleep(0.1)

        await send_for(1.5, "before")
        redis_server.kill()
        await send_for(1.5, "during")
        redis_server.start()
        await send_for(1.5, "after")
        await sender.wait_for(lambda client: len(client.acks) >= 40, timeout=10)

        total = len(await stored_seqs(room))
        for receiver in receivers:
            await receiver.wait_for(lambda client: len(client.messages) >= total, timeout=10)
            assert receiver.seqs() == list(range(1, total + 1))

        # Live delivery works again after the restart, not only the gap check.
        started = time.monotonic()
        await sender.send("fresh", "fresh")
        for receiver in receivers:
            await receiver.wait_for_seq(total + 1, timeout=2)
        assert time.monotonic() - started < 2
        assert sender.errors == []
        for socket in receivers + [sender]:
            await socket.close()


@pytest.fixture
def carol_cookie(make_user, cookie_for):
    from asgiref.sync import async_to_sync

    return async_to_sync(cookie_for)(make_user("carol"))


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_stopped_node_clients_resume_on_other(two_nodes, room, alice, make_user, cookie_for, stop_signal):
    node_a, node_b = two_nodes
    users = [await database_sync_to_async(make_user)(f"follower{number}") for number in range(6)]
    followers = [FollowingClient(two_nodes, room.slug, await cookie_for(user)) for user in users]
    for index, follower in enumerate(followers):
        await follower.start(node_index=index % 2)
    observer = await SocketClient.connect(node_b, room.slug, await cookie_for(alice), after=0)
    await asyncio.sleep(0.5)

    async def post_steadily(count: int) -> None:
        for number in range(count):
            await post(room, alice, f"steady {number}")
            await asyncio.sleep(0.05)

    posting = asyncio.ensure_future(post_steadily(60))
    await asyncio.sleep(1)
    stopped_at = time.monotonic()
    await asyncio.to_thread(node_a.kill, stop_signal)
    stop_seconds = time.monotonic() - stopped_at
    await posting

    for follower in followers:
        deadline = time.monotonic() + 15
        while len(follower.all_seqs()) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert follower.all_seqs() == list(range(1, 61))
    moved = [follower for index, follower in enumerate(followers) if index % 2 == 0]
    if stop_signal == signal.SIGTERM:
        assert stop_seconds < 6
        assert all(follower.close_codes[0] == 1012 for follower in moved)
    # Everyone shows online once, however their connections moved.
    await asyncio.sleep(3)
    assert observer.online == {"alice", *(user.username for user in users)}
    for follower in followers:
        await follower.stop()
    await observer.close()


async def test_sharded_channel_layer_delivers_across_nodes(tmp_path, room, alice, bob, cookie_for):
    first_dir, second_dir = tmp_path / "shard1", tmp_path / "shard2"
    first_dir.mkdir()
    second_dir.mkdir()
    with private_redis(first_dir) as first, private_redis(second_dir) as second, ExitStack() as stack:
        env = {**NODE_ENV, "CHANNEL_REDIS_URLS": f"{first.url},{second.url}", "CHAT_GAP_CHECK_INTERVAL": "30"}
        nodes = [stack.enter_context(running_daphne(tmp_path, env, server="node")) for _ in range(2)]
        rooms = [room] + [await database_sync_to_async(type(room).objects.create)(slug=f"shard-{n}", title="Shard") for n in range(19)]
        pairs = []
        for each_room in rooms:
            sender = await SocketClient.connect(nodes[0], each_room.slug, await cookie_for(alice), after=0)
            receiver = await SocketClient.connect(nodes[1], each_room.slug, await cookie_for(bob), after=0)
            pairs.append((sender, receiver))
        await asyncio.sleep(0.3)

        for sender, _ in pairs:
            await sender.send("across shards")
        for _, receiver in pairs:
            await receiver.wait_for_seq(1, timeout=2)

        shard_channels = [len(redis.Redis.from_url(server.url).pubsub_channels()) for server in (first, second)]
        assert all(count > 0 for count in shard_channels), shard_channels
        for sender, receiver in pairs:
            await sender.close()
            await receiver.close()


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children]


async def test_processes_share_port_and_stop_together(tmp_path, room, alice, bob, cookie_for):
    node = start_daphne(tmp_path, NODE_ENV, server="node", extra_args=["--processes", "2"])
    try:
        await asyncio.sleep(1.5)
        workers = child_pids(node.process.pid)
        assert len(workers) == 2

        users = [alice, bob] * 3
        sockets = [await SocketClient.connect(node, room.slug, await cookie_for(user), after=0) for user in users]
        for number in range(10):
            await sockets[number % len(sockets)].send(f"message {number}", f"shared-port-{number}")
        for socket in sockets:
            await socket.wait_for(lambda client: len(client.messages) >= 10)

        for socket in sockets:
            assert socket.seqs() == list(range(1, 11))
        for socket in sockets:
            await socket.close()

        node.process.send_signal(signal.SIGTERM)
        assert node.process.wait(timeout=15) == 0
        for worker in workers:
            assert not Path(f"/proc/{worker}").exists() or "zombie" in Path(f"/proc/{worker}/status").read_text()
    finally:
        node.kill(signal.SIGKILL)


@pytest.mark.parametrize(
    ("processes", "redis_url", "expected_code", "expected_output"),
    [
        ("2", "", 2, "--processes 2 needs REDIS_URL"),
        ("0", "redis://127.0.0.1:6379/0", 1, "--processes must be at least 1, got 0."),
    ],
)
def test_processes_option_rejects_bad_setup(processes, redis_url, expected_code, expected_output):
    result = subprocess.run(
        [sys.executable, "-m", "chatapp.node", "--processes", processes, "-p", "1", "chatapp.asgi:application"],
        cwd=REPO_ROOT,
        env={**os.environ, "REDIS_URL": redis_url, "DEBUG": "1"},
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == expected_code
    assert expected_output in result.stderr
