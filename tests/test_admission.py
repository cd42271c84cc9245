"""The handshake cap and queue in front of the room consumer, on real PostgreSQL and Redis."""
from __future__ import annotations

import asyncio

import pytest
from channels.testing import WebsocketCommunicator

from chatapp.admission import CLOSE_TRY_AGAIN_LATER, HandshakeAdmission
from chatapp.asgi import application
from tests.support import parse_presence

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("hub_cleanup")]

ORIGIN = (b"origin", b"http://127.0.0.1")
TIMEOUT = 5


def communicator(app, slug: str, cookie: str) -> WebsocketCommunicator:
    return WebsocketCommunicator(app, f"/ws/rooms/{slug}/", headers=[ORIGIN, (b"cookie", cookie.encode())])


class HeldHandshakes:
    """An app that holds the first handshake until released, then hands every one to the chat."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def __call__(self, scope, receive, send) -> None:
        self.started += 1
        if self.started == 1:
            await self.release.wait()
        await application(scope, receive, send)


async def assert_gets_presence_list(socket: WebsocketCommunicator) -> None:
    presence = parse_presence(await socket.receive_from(timeout=TIMEOUT))
    assert presence is not None
    assert presence[0] == "snapshot"


async def test_handshake_past_cap_waits_its_turn(room, alice, bob, cookie_for, settings):
    settings.CHAT_MAX_CONCURRENT_HANDSHAKES = 1
    settings.CHAT_MAX_QUEUED_HANDSHAKES = 10
    held_app = HeldHandshakes()
    admission = HandshakeAdmission(held_app)
    first = communicator(admission, room.slug, await cookie_for(alice))
    first_connect = asyncio.ensure_future(first.connect(timeout=TIMEOUT))
    await asyncio.sleep(0.1)
    second = communicator(admission, room.slug, await cookie_for(bob))
    second_connect = asyncio.ensure_future(second.connect(timeout=TIMEOUT))
    await asyncio.sleep(0.1)

    assert admission.in_progress == 1
    assert len(admission.waiting) == 1
    assert held_app.started == 1

    held_app.release.set()
    assert (await first_connect)[0]
    await assert_gets_presence_list(first)
    assert (await second_connect)[0]
    await assert_gets_presence_list(second)
    assert admission.in_progress == 0
    assert not admission.waiting
    await first.disconnect()
    await second.disconnect()


async def test_full_queue_closes_with_4503(room, alice, bob, cookie_for, settings):
    settings.CHAT_MAX_CONCURRENT_HANDSHAKES = 1
    settings.CHAT_MAX_QUEUED_HANDSHAKES = 0
    held_app = HeldHandshakes()
    admission = HandshakeAdmission(held_app)
    first = communicator(admission, room.slug, await cookie_for(alice))
    first_connect = asyncio.ensure_future(first.connect(timeout=TIMEOUT))
    await asyncio.sleep(0.1)

    second = communicator(admission, room.slug, await cookie_for(bob))
    connected, _ = await second.connect(timeout=TIMEOUT)
    closed = await second.receive_output(timeout=TIMEOUT)

    assert connected
    assert closed == {"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER}
    assert held_app.started == 1

    held_app.release.set()
    assert (await first_connect)[0]
    await assert_gets_presence_list(first)
    await first.disconnect()


async def test_slot_frees_after_first_frame(room, alice, bob, cookie_for, settings):
    settings.CHAT_MAX_CONCURRENT_HANDSHAKES = 1
    settings.CHAT_MAX_QUEUED_HANDSHAKES = 0
    admission = HandshakeAdmission(application)
    first = communicator(admission, room.slug, await cookie_for(alice))
    assert (await first.connect(timeout=TIMEOUT))[0]
    await assert_gets_presence_list(first)

    # The first socket stays open, but its handshake is over.
    second = communicator(admission, room.slug, await cookie_for(bob))
    assert (await second.connect(timeout=TIMEOUT))[0]
    await assert_gets_presence_list(second)

    assert admission.in_progress == 0
    await first.disconnect()
    await second.disconnect()


async def test_waiting_client_that_leaves_frees_its_place(room, alice, bob, cookie_for, settings):
    settings.CHAT_MAX_CONCURRENT_HANDSHAKES = 1
    settings.CHAT_MAX_QUEUED_HANDSHAKES = 10
    held_app = HeldHandshakes()
    admission = HandshakeAdmission(held_app)
    first = communicator(admission, room.slug, await cookie_for(alice))
    first_connect = asyncio.ensure_future(first.connect(timeout=TIMEOUT))
    await asyncio.sleep(0.1)
    second = communicator(admission, room.slug, await cookie_for(bob))
    second_connect = asyncio.ensure_future(second.connect(timeout=TIMEOUT))
    await asyncio.sleep(0.1)

    # Cancelling the application task is what the server does when the client goes away.
    second.future.cancel()
    second_connect.cancel()
    await asyncio.sleep(0.1)

    assert not admission.waiting
    held_app.release.set()
    assert (await first_connect)[0]
    await assert_gets_presence_list(first)
    assert admission.in_progress == 0
    await first.disconnect()
