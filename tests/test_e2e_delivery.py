"""Delivery, ordering and resume through a real daphne process, PostgreSQL and Redis."""
from __future__ import annotations

import asyncio
import random
import time

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from chatapp import broadcast
from chatapp.broadcast import message_event, room_group_name
from chatapp.models import Message
from chatapp.services import message_create
from tests.support import SocketClient, running_daphne

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# The nodes run with CHAT_GAP_CHECK_INTERVAL=0.5, so a lost final event must
# arrive within two intervals; the margin covers a slow machine.
LOST_EVENT_BOUND = 2 * 0.5 + 1.5


@pytest.fixture
def node(tmp_path):
    with running_daphne(tmp_path) as daphne_node:
        yield daphne_node


@pytest.fixture(params=["daphne", "runserver"])
def any_server(request, tmp_path):
    with running_daphne(tmp_path, server=request.param) as server_node:
        yield server_node


@pytest.fixture
def make_cookies(make_user, cookie_for):
    async def make(count: int, prefix: str) -> list[str]:
        users = [await database_sync_to_async(make_user)(f"{prefix}{number}") for number in range(count)]
        return [await cookie_for(user) for user in users]

    return make


async def stored_seqs(room) -> list[int]:
    return [seq async for seq in Message.objects.filter(room=room).order_by("seq").values_list("seq", flat=True)]


async def post_without_broadcast(room, author, body: str) -> Message:
    """Store a message whose publish is lost, as when a node dies between commit and publish."""

    def store() -> Message:
        original = broadcast.publish_message
        broadcast.publish_message = lambda message: None
        try:
            return message_create(room=room, author=author, body=body).message
        finally:
            broadcast.publish_message = original

    return await database_sync_to_async(store)()


async def publish(message: Message) -> None:
    event = await database_sync_to_async(message_event)(message)
    await get_channel_layer().group_send(room_group_name(message.room_id), event)


async def close_all(clients) -> None:
    await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)


class TestTwoUsers:
    async def test_two_users_chat_both_ways(self, any_server, room, alice, bob, cookie_for):
        node = any_server
        alice_socket = await SocketClient.connect(node, room.slug, await cookie_for(alice), after=0)
        bob_socket = await SocketClient.connect(node, room.slug, await cookie_for(bob), after=0)
        await asyncio.sleep(0.3)

        await alice_socket.send("hi bob", "a-1")
        await bob_socket.wait_for_seq(1)
        await bob_socket.send("hi alice", "b-1")
        await alice_socket.wait_for_seq(2)
        await bob_socket.wait_for(lambda client: 2 in client.seqs() and client.acks)

        for socket in (alice_socket, bob_socket):
            assert [(m.seq, m.author, m.client_id, m.body) for m in socket.messages] == [
                (1, "alice", "a-1", "hi bob"),
                (2, "bob", "b-1", "hi alice"),
            ]
        assert alice_socket.acks == [(1, "a-1")]
        assert bob_socket.acks == [(2, "b-1")]
        await close_all([alice_socket, bob_socket])


class TestOrderingUnderLoad:
    async def test_thousand_concurrent_sends_reach_every_receiver_in_order(self, node, room, make_cookies):
        senders_count, per_sender, receivers_count = 200, 5, 10
        total = senders_count * per_sender
        receiver_cookies = await make_cookies(receivers_count, "reader")
        sender_cookies = await make_cookies(senders_count, "writer")
        receivers = [await SocketClient.connect(node, room.slug, cookie, after=0) for cookie in receiver_cookies]
        senders = await asyncio.gather(
            *(SocketClient.connect(node, room.slug, cookie, after=0) for cookie in sender_cookies)
        )
        await asyncio.sleep(0.5)

        async def send_all(index: int, sender: SocketClient) -> None:
            for number in range(per_sender):
                await sender.send(f"sender {index} message {number}", f"s{index}-{number}")

        await asyncio.gather(*(send_all(index, sender) for index, sender in enumerate(senders)))
        for receiver in receivers:
            await receiver.wait_for(lambda client: len(client.messages) >= total, timeout=120)

        expected = list(range(1, total + 1))
        for receiver in receivers:
            assert receiver.seqs() == expected
            assert receiver.errors == []
        assert await stored_seqs(room) == expected
        stored_client_ids = [cid async for cid in Message.objects.filter(room=room).values_list("client_id", flat=True)]
        assert sorted(stored_client_ids) == sorted(f"s{i}-{n}" for i in range(senders_count) for n in range(per_sender))
        await close_all(receivers + list(senders))

    async def test_churning_sockets_do_not_disturb_steady_ones(self, node, room, make_cookies, alice, cookie_for):
        steady = [await SocketClient.connect(node, room.slug, cookie, after=0) for cookie in await make_cookies(5, "steady")]
        churn_cookies = await make_cookies(20, "churn")
        sender = await SocketClient.connect(node, room.slug, await cookie_for(alice), after=0)
        await asyncio.sleep(0.3)
        stop = asyncio.Event()

        async def churn(cookie: str) -> None:
            rng = random.Random(cookie)
            while not stop.is_set():
                client = await SocketClient.connect(node, room.slug, cookie, after=0)
                await asyncio.sleep(0.2)
                if rng.random() < 0.5:
                    await client.drop()
                else:
                    await client.close()

        async def send_steadily(seconds: float, rate: float) -> int:
            count = 0
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                count += 1
                await sender.send(f"tick {count}", f"tick-{count}")
                await asyncio.sleep(1 / rate)
            return count

        churners = [asyncio.ensure_future(churn(cookie)) for cookie in churn_cookies]
        sent = await send_steadily(seconds=6, rate=10)
        stop.set()
        await asyncio.gather(*churners)

        for socket in steady:
            await socket.wait_for(lambda client: len(client.messages) >= sent, timeout=20)
        database = await stored_seqs(room)
        assert database == list(range(1, sent + 1))
        for socket in steady:
            assert socket.seqs() == database
        await close_all(steady + [sender])


class TestForcedRaces:
    async def test_delayed_broadcast_overtaken_by_later_one(self, node, room, alice, bob, cookie_for):
        receiver = await SocketClient.connect(node, room.slug, await cookie_for(bob), after=0)
        await asyncio.sleep(0.3)
        first = await post_without_broadcast(room, alice, "first")
        second = await post_without_broadcast(room, alice, "second")

        await publish(second)
        await receiver.wait_for_seq(2, timeout=5)
        await publish(first)
        await asyncio.sleep(0.5)

        assert receiver.seqs() == [1, 2]
        assert [m.body for m in receiver.messages] == ["first", "second"]
        await receiver.close()

    async def test_dropped_event_filled_before_next_message(self, node, room, alice, bob, cookie_for):
        receiver = await SocketClient.connect(node, room.slug, await cookie_for(bob), after=0)
        await asyncio.sleep(0.3)

        await post_without_broadcast(room, alice, "dropped")
        await database_sync_to_async(message_create)(room=room, author=alice, body="after the drop")
        await receiver.wait_for_seq(2, timeout=5)

        assert receiver.seqs() == [1, 2]
        await receiver.close()

    async def test_dropped_final_event_arrives_within_bound(self, node, room, alice, bob, cookie_for):
        receiver = await SocketClient.connect(node, room.slug, await cookie_for(bob), after=0)
        await asyncio.sleep(0.3)

        await post_without_broadcast(room, alice, "last words")
        started = time.monotonic()
        await receiver.wait_for_seq(1, timeout=LOST_EVENT_BOUND)

        assert time.monotonic() - started <= LOST_EVENT_BOUND
        assert [m.body for m in receiver.messages] == ["last words"]
        await receiver.close()

    async def test_duplicate_event_delivered_once(self, node, room, alice, bob, cookie_for):
        receiver = await SocketClient.connect(node, room.slug, await cookie_for(bob), after=0)
        await asyncio.sleep(0.3)
        message = (await database_sync_to_async(message_create)(room=room, author=alice, body="once")).message
        await receiver.wait_for_seq(1)

        await publish(message)
        await publish(message)
        await asyncio.sleep(0.5)

        assert receiver.seqs() == [1]
        await receiver.close()


class TestResumeAcrossReconnect:
    async def test_client_resumes_after_last_held_seq(self, node, room, alice, bob, cookie_for):
        sender = await SocketClient.connect(node, room.slug, await cookie_for(alice), after=0)
        bob_cookie = await cookie_for(bob)
        receiver = await SocketClient.connect(node, room.slug, bob_cookie, after=0)
        await asyncio.sleep(0.3)
        for number in range(1, 11):
            await sender.send(f"m{number}", f"m{number}")
        await receiver.wait_for_seq(10)
        await receiver.drop()
        held = receiver.seqs()

        for number in range(11, 61):
            await sender.send(f"m{number}", f"m{number}")
        await sender.wait_for_seq(60)
        resumed = await SocketClient.connect(node, room.slug, bob_cookie, after=held[-1])
        await resumed.wait_for_seq(60)
        await sender.send("live", "live")
        await resumed.wait_for_seq(61)
        await asyncio.sleep(0.3)

        assert held == list(range(1, 11))
        assert resumed.seqs() == list(range(11, 62))
        await close_all([sender, resumed])

    async def test_retry_after_reconnect_stores_once(self, node, room, alice, cookie_for):
        cookie = await cookie_for(alice)
        first = await SocketClient.connect(node, room.slug, cookie, after=0)
        await first.send("sent twice", "retry-key")
        await first.wait_for(lambda client: client.acks)
        await first.drop()

        second = await SocketClient.connect(node, room.slug, cookie, after=0)
        await second.send("sent twice", "retry-key")
        await second.wait_for(lambda client: client.acks and client.messages)

        assert first.acks == [(1, "retry-key")]
        assert second.acks == [(1, "retry-key")]
        assert second.seqs() == [1]
        assert await Message.objects.acount() == 1
        await second.close()
