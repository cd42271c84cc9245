"""The room consumer through Channels' WebsocketCommunicator, on real PostgreSQL and Redis."""
from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from chatapp.asgi import application
from chatapp.consumers import CLOSE_BAD_AFTER, CLOSE_ROOM_NOT_FOUND, CLOSE_UNAUTHENTICATED
from chatapp.models import Message
from chatapp.services import message_create
from tests.support import parse_ack, parse_error, parse_messages

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("hub_cleanup")]

ORIGIN = (b"origin", b"http://127.0.0.1")
TIMEOUT = 5


async def connect(slug: str, cookie: str | None, after: int | None = None) -> WebsocketCommunicator:
    path = f"/ws/rooms/{slug}/" + ("" if after is None else f"?after={after}")
    headers = [ORIGIN] + ([(b"cookie", cookie.encode())] if cookie else [])
    communicator = WebsocketCommunicator(application, path, headers=headers)
    connected, _ = await communicator.connect(timeout=TIMEOUT)
    assert connected
    return communicator


async def receive_messages(communicator: WebsocketCommunicator, count: int) -> list:
    messages = []
    while len(messages) < count:
        messages.extend(parse_messages(await communicator.receive_from(timeout=TIMEOUT)))
    return messages


async def receive_frame(communicator: WebsocketCommunicator, kind) -> str:
    """Return the next frame for which kind(frame) is true, skipping others such as presence frames."""
    while True:
        frame = await communicator.receive_from(timeout=TIMEOUT)
        if kind(frame):
            return frame


async def receive_error(communicator: WebsocketCommunicator):
    return parse_error(await receive_frame(communicator, parse_error))


async def assert_no_more_messages(communicator: WebsocketCommunicator, timeout: float = 0.3) -> None:
    """Fail if a message frame arrives within `timeout` seconds; other frames are ignored."""
    while True:
        try:
            frame = await communicator.receive_from(timeout=timeout)
        except asyncio.TimeoutError:
            return
        assert parse_messages(frame) == [], f"unexpected message frame: {frame}"


async def post(room, author, body: str, client_id: str | None = None):
    return await sync_to_async(message_create)(room=room, author=author, body=body, client_id=client_id)


async def connected_and_caught_up(slug: str, cookie: str, after: int | None = None) -> WebsocketCommunicator:
    """Connect and wait until the socket has finished its replay and is live."""
    communicator = await connect(slug, cookie, after)
    for _ in range(100):
        consumer_live = await _any_live_socket()
        if consumer_live:
            break
        await asyncio.sleep(0.02)
    return communicator


async def _any_live_socket() -> bool:
    from chatapp.hub import get_hub

    return any(socket.live for feed in get_hub().feeds.values() for socket in feed.sockets)


class TestHandshake:
    async def test_anonymous_socket_closed_with_4401(self, room):
        communicator = await connect(room.slug, cookie=None)
        closed = await communicator.receive_output(timeout=TIMEOUT)
        assert closed == {"type": "websocket.close", "code": CLOSE_UNAUTHENTICATED}

    async def test_unknown_room_closed_with_4404(self, alice, cookie_for):
        communicator = await connect("no-such-room", await cookie_for(alice))
        closed = await communicator.receive_output(timeout=TIMEOUT)
        assert closed == {"type": "websocket.close", "code": CLOSE_ROOM_NOT_FOUND}

    @pytest.mark.parametrize("after", ["-1", "abc", "1.5", "%20"])
    async def test_invalid_after_closed_with_4400(self, room, alice, cookie_for, after):
        communicator = WebsocketCommunicator(
            application,
            f"/ws/rooms/{room.slug}/?after={after}",
            headers=[ORIGIN, (b"cookie", (await cookie_for(alice)).encode())],
        )
        connected, _ = await communicator.connect(timeout=TIMEOUT)
        assert connected
        closed = await communicator.receive_output(timeout=TIMEOUT)
        assert closed == {"type": "websocket.close", "code": CLOSE_BAD_AFTER}

    async def test_foreign_origin_rejected(self, room, alice, cookie_for):
        communicator = WebsocketCommunicator(
            application,
            f"/ws/rooms/{room.slug}/",
            headers=[(b"origin", b"http://evil.example"), (b"cookie", (await cookie_for(alice)).encode())],
        )
        connected, _ = await communicator.connect(timeout=TIMEOUT)
        assert not connected


class TestLiveDelivery:
    async def test_message_reaches_every_socket_once(self, room, alice, bob, cookie_for):
        sender = await connected_and_caught_up(room.slug, await cookie_for(alice), after=0)
        receiver = await connected_and_caught_up(room.slug, await cookie_for(bob), after=0)

        await sender.send_to(text_data=json.dumps({"body": "hello <b>bob</b>", "client_id": "c-1"}))

        [received] = await receive_messages(receiver, 1)
        assert (received.seq, received.author, received.client_id) == (1, "alice", "c-1")
        assert received.body == "hello <b>bob</b>"
        own, acks = [], []
        while not (own and acks):
            frame = await sender.receive_from(timeout=TIMEOUT)
            own.extend(parse_messages(frame))
            acks.extend([parse_ack(frame)] if parse_ack(frame) else [])
        assert [message.seq for message in own] == [1]
        assert acks == [(1, "c-1")]
        await assert_no_more_messages(receiver)
        await assert_no_more_messages(sender)

    async def test_body_is_escaped_in_fragment(self, room, alice, cookie_for):
        socket = await connected_and_caught_up(room.slug, await cookie_for(alice), after=0)
        await socket.send_to(text_data=json.dumps({"body": "<script>alert(1)</script>"}))

        frame = await receive_frame(socket, parse_messages)
        assert "<script>" not in frame
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in frame

    async def test_messages_from_service_arrive_in_seq_order(self, room, alice, cookie_for):
        socket = await connected_and_caught_up(room.slug, await cookie_for(alice), after=0)

        for number in range(20):
            await post(room, alice, f"m{number}")

        received = await receive_messages(socket, 20)
        assert [message.seq for message in received] == list(range(1, 21))

    async def test_two_rooms_do_not_share_messages(self, make_room, alice, bob, cookie_for):
        first, second = await sync_to_async(make_room)(), await sync_to_async(make_room)()
        in_first = await connected_and_caught_up(first.slug, await cookie_for(alice), after=0)
        in_second = await connected_and_caught_up(second.slug, await cookie_for(bob), after=0)

        await post(first, alice, "first room")
        await post(second, bob, "second room")

        [only_first] = await receive_messages(in_first, 1)
        [only_second] = await receive_messages(in_second, 1)
        assert (only_first.seq, only_first.body) == (1, "first room")
        assert (only_second.seq, only_second.body) == (1, "second room")
        await assert_no_more_messages(in_first)
        await assert_no_more_messages(in_second)


class TestRejectedFrames:
    @pytest.mark.parametrize(
        ("frame", "code"),
        [
            ("not json", "invalid_json"),
            ("[1, 2]", "not_object"),
            ('"text"', "not_object"),
            ("{}", "body_required"),
            ('{"body": "   "}', "body_required"),
            (json.dumps({"body": "x" * 4001}), "body_too_long"),
            (json.dumps({"body": "hi", "client_id": "k" * 65}), "client_id_too_long"),
            (json.dumps({"body": ["list"]}), "body_not_text"),
        ],
    )
    async def test_bad_frame_gets_error_and_socket_stays_open(self, room, alice, cookie_for, frame, code):
        socket = await connected_and_caught_up(room.slug, await cookie_for(alice), after=0)

        await socket.send_to(text_data=frame)
        error = await receive_error(socket)

        assert error is not None
        assert error[0] == code
        assert await Message.objects.acount() == 0
        await socket.send_to(text_data=json.dumps({"body": "still open"}))
        [message] = await receive_messages(socket, 1)
        assert message.body == "still open"

    async def test_binary_frame_rejected(self, room, alice, cookie_for):
        socket = await connected_and_caught_up(room.slug, await cookie_for(alice), after=0)
        await socket.send_to(bytes_data=b'{"body": "hi"}')
        error = await receive_error(socket)
        assert error == ("not_text", None, "Frames must be JSON text, not binary.")

    async def test_error_names_client_id(self, room, alice, cookie_for):
        socket = await connected_and_caught_up(room.slug, await cookie_for(alice), after=0)
        await socket.send_to(text_data=json.dumps({"body": "", "client_id": "draft-7"}))
        error = await receive_error(socket)
        assert error == ("body_required", "draft-7", "Message is empty.")

    async def test_extra_fields_ignored(self, room, alice, cookie_for):
        socket = await connected_and_caught_up(room.slug, await cookie_for(alice), after=0)
        await socket.send_to(text_data=json.dumps({"body": "hi", "HEADERS": {"HX-Request": "true"}}))
        [message] = await receive_messages(socket, 1)
        assert message.body == "hi"


class TestIdempotentSend:
    async def test_retried_send_acked_with_same_seq(self, room, alice, cookie_for):
        socket = await connected_and_caught_up(room.slug, await cookie_for(alice), after=0)
        frame = json.dumps({"body": "once", "client_id": "retry-1"})

        await socket.send_to(text_data=frame)
        await socket.send_to(text_data=frame)
        acks, messages = [], []
        while len(acks) < 2 or not messages:
            received = await socket.receive_from(timeout=TIMEOUT)
            messages.extend(parse_messages(received))
            if parse_ack(received):
                acks.append(parse_ack(received))

        assert acks == [(1, "retry-1"), (1, "retry-1")]
        assert [message.seq for message in messages] == [1]
        assert await Message.objects.acount() == 1
        await assert_no_more_messages(socket)


class TestResume:
    async def test_after_replays_missed_messages_then_goes_live(self, room, alice, bob, cookie_for):
        for number in range(1, 61):
            await post(room, alice, f"m{number}")

        socket = await connect(room.slug, await cookie_for(bob), after=10)
        replayed = await receive_messages(socket, 50)
        await post(room, alice, "live")
        [live] = await receive_messages(socket, 1)

        assert [message.seq for message in replayed] == list(range(11, 61))
        assert (live.seq, live.body) == (61, "live")
        await assert_no_more_messages(socket)

    async def test_replay_is_paged(self, room, alice, bob, cookie_for, settings):
        settings.CHAT_REPLAY_PAGE_SIZE = 7
        for number in range(1, 24):
            await post(room, alice, f"m{number}")

        socket = await connect(room.slug, await cookie_for(bob), after=0)
        frames = []
        while sum(len(parse_messages(frame)) for frame in frames) < 23:
            frames.append(await receive_frame(socket, parse_messages))

        assert [len(parse_messages(frame)) for frame in frames] == [7, 7, 7, 2]
        assert [message.seq for frame in frames for message in parse_messages(frame)] == list(range(1, 24))

    async def test_after_beyond_last_seq_treated_as_current(self, room, alice, bob, cookie_for):
        await post(room, alice, "old")

        socket = await connected_and_caught_up(room.slug, await cookie_for(bob), after=999)
        await post(room, alice, "new")

        [message] = await receive_messages(socket, 1)
        assert (message.seq, message.body) == (2, "new")

    async def test_missing_after_starts_live(self, room, alice, bob, cookie_for):
        await post(room, alice, "old")

        socket = await connected_and_caught_up(room.slug, await cookie_for(bob))
        await post(room, alice, "new")

        [message] = await receive_messages(socket, 1)
        assert message.seq == 2
        await assert_no_more_messages(socket)

    async def test_posts_during_replay_arrive_once_in_order(self, room, alice, bob, cookie_for, settings):
        settings.CHAT_REPLAY_PAGE_SIZE = 5
        for number in range(1, 41):
            await post(room, alice, f"m{number}")

        socket = await connect(room.slug, await cookie_for(bob), after=0)
        for number in range(41, 61):
            await post(room, alice, f"m{number}")
        received = await receive_messages(socket, 60)

        assert [message.seq for message in received] == list(range(1, 61))
        await assert_no_more_messages(socket, timeout=0.5)


class TestPresenceFrames:
    async def test_list_comes_before_any_change(self, room, alice, bob, cookie_for):
        from tests.support import parse_presence

        first = await connect(room.slug, await cookie_for(alice))
        second = await connect(room.slug, await cookie_for(bob))

        # The first socket's list may already name bob, who joined meanwhile.
        for socket, expected in ((first, {"alice"}), (second, {"alice", "bob"})):
            presence = None
            while presence is None:
                presence = parse_presence(await socket.receive_from(timeout=TIMEOUT))
            kind, users = presence
            assert kind == "snapshot"
            assert expected <= {user for user, _ in users}


    async def test_changes_in_one_interval_share_a_frame(self, room, alice, bob, make_user, cookie_for, settings):
        from tests.support import parse_presence

        settings.CHAT_PRESENCE_BATCH_INTERVAL = 2.0
        carol = await sync_to_async(make_user)("carol")
        dave = await sync_to_async(make_user)("dave")
        sockets = [await connect(room.slug, await cookie_for(user)) for user in (alice, bob, carol, dave)]

        watcher = sockets[0]
        change_frames = []
        while {"bob", "carol", "dave"} - {user for frame in change_frames for user, _ in frame}:
            presence = parse_presence(await watcher.receive_from(timeout=TIMEOUT))
            if presence is not None and presence[0] == "change":
                change_frames.append(presence[1])

        # The first change in a quiet room goes out at once; the joins that
        # follow within the interval share the next frame.
        assert len(change_frames) <= 2
        assert max(len(frame) for frame in change_frames) >= 2
        assert all(change == "join" for frame in change_frames for _, change in frame)
        for socket in sockets:
            await socket.disconnect()


class TestCancelledConsumer:
    async def test_cancelled_consumer_releases_hub_and_presence(self, room, alice, cookie_for, settings):
        """Daphne cancels a consumer that outlives application_close_timeout; its state must still go."""
        from chatapp.hub import get_hub
        from presence.tracker import get_tracker

        settings.PRESENCE_LEAVE_GRACE = 0
        socket = await connected_and_caught_up(room.slug, await cookie_for(alice), after=0)
        assert sum(len(feed.sockets) for feed in get_hub().feeds.values()) == 1
        assert len(get_tracker().connections) == 1

        socket.future.cancel()
        with pytest.raises(asyncio.CancelledError):
            await socket.future

        assert get_hub().feeds == {}
        assert get_tracker().connections == {}


class TestSocketLimit:
    async def test_socket_over_per_user_limit_closed_with_4429(self, make_room, alice, cookie_for, settings):
        from chatapp.consumers import CLOSE_TOO_MANY_SOCKETS

        settings.PRESENCE_MAX_CONNECTIONS_PER_USER = 2
        cookie = await cookie_for(alice)
        first_room, second_room = await sync_to_async(make_room)(), await sync_to_async(make_room)()
        await connected_and_caught_up(first_room.slug, cookie)
        await connected_and_caught_up(second_room.slug, cookie)

        third = await connect(first_room.slug, cookie)
        while True:
            output = await third.receive_output(timeout=TIMEOUT)
            if output["type"] == "websocket.close":
                break

        assert output == {"type": "websocket.close", "code": CLOSE_TOO_MANY_SOCKETS}
