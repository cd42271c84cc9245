"""Abuse limits on real nodes: the shared posting rate limit and the frame size limit."""
from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack

import pytest
import websockets

from chatapp.models import Message
from chatapp.node import SEND_BUFFER_CHECK_SECONDS
from tests.support import SocketClient, running_daphne

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

RATE, BURST = 5, 20


async def test_rate_limit_holds_across_two_nodes(tmp_path, room, alice, bob, cookie_for):
    env = {"CHAT_RATE_LIMIT_PER_SECOND": str(RATE), "CHAT_RATE_LIMIT_BURST": str(BURST)}
    with ExitStack() as stack:
        nodes = [stack.enter_context(running_daphne(tmp_path, env, server="node")) for _ in range(2)]
        cookie = await cookie_for(alice)
        flooders = [await SocketClient.connect(node, room.slug, cookie, after=0) for node in nodes]
        bystander = await SocketClient.connect(nodes[1], room.slug, await cookie_for(bob), after=0)
        await asyncio.sleep(0.3)

        started = time.monotonic()
        for number in range(60):
            await flooders[number % 2].send(f"flood {number}", f"flood-{number}")
        for flooder in flooders:
            await flooder.wait_for(lambda client: len(client.acks) + len(client.errors) >= 30, timeout=15)
        elapsed = time.monotonic() - started
        await bystander.send("still allowed", "bystander-1")
        await bystander.wait_for(lambda client: client.acks)

        stored = await Message.objects.filter(author=alice).acount()
        rejected = [error for flooder in flooders for error in flooder.errors]
        assert BURST <= stored <= BURST + RATE * elapsed + 1
        assert len(rejected) == 60 - stored
        assert {code for code, _, _ in rejected} == {"rate_limited"}
        assert all(text.startswith("Too many messages: wait ") for _, _, text in rejected)
        assert bystander.acks[0][1] == "bystander-1"
        for socket in flooders + [bystander]:
            await socket.close()


async def test_oversized_frame_closes_with_1009(tmp_path, room, alice, bob, cookie_for):
    with running_daphne(tmp_path, server="node") as node:
        sender = await SocketClient.connect(node, room.slug, await cookie_for(alice), after=0)
        bystander = await SocketClient.connect(node, room.slug, await cookie_for(bob), after=0)
        await asyncio.sleep(0.3)

        try:
            await sender.connection.send('{"body": "' + "x" * (10 * 1024 * 1024) + '"}')
        except (websockets.ConnectionClosed, ConnectionResetError):
            pass
        await sender.reader

        assert sender.connection.close_code == 1009
        assert await Message.objects.acount() == 0
        await bystander.send("unaffected", "after-flood")
        await bystander.wait_for_seq(1)
        await bystander.close()


async def test_fragmented_oversized_message_closes_with_1009(tmp_path, room, alice, cookie_for):
    with running_daphne(tmp_path, server="node") as node:
        sender = await SocketClient.connect(node, room.slug, await cookie_for(alice), after=0)
        await asyncio.sleep(0.3)

        fragments = ("x" * 1024 for _ in range(1000))
        try:
            await sender.connection.send(fragments)
        except websockets.ConnectionClosed:
            pass
        await sender.reader

        assert sender.connection.close_code == 1009
        assert await Message.objects.acount() == 0


async def test_client_that_stops_reading_is_dropped(tmp_path, room, alice, bob, cookie_for):
    from tests.test_e2e_presence import open_silent_socket

    buffer_cap = 256 * 1024
    env = {"CHAT_SEND_BUFFER_MAX_BYTES": str(buffer_cap)}
    # Pings every 60 s, so that only the buffer cap can drop the silent client here.
    with running_daphne(tmp_path, env, server="node", extra_args=["--ping-interval", "60"]) as node:
        silent = await asyncio.to_thread(open_silent_socket, node, room.slug, await cookie_for(bob))
        reader = await SocketClient.connect(node, room.slug, await cookie_for(bob), after=0)
        sender = await SocketClient.connect(node, room.slug, await cookie_for(alice), after=0)
        await asyncio.sleep(0.3)

        body = "y" * 3900
        for number in range(1500):
            await sender.send(body, f"big-{number}")
            if number % 50 == 49:
                await reader.wait_for(lambda client, count=number + 1: len(client.messages) >= count, timeout=20)
        await reader.wait_for(lambda client: len(client.messages) >= 1500, timeout=30)
        await asyncio.sleep(SEND_BUFFER_CHECK_SECONDS + 1)

        log = node.log_path.read_text()
        assert "socket dropped:" in log
        assert f"cap {buffer_cap}" in log
        assert reader.seqs() == list(range(1, 1501))
        silent.close()
        for socket in (reader, sender):
            await socket.close()
