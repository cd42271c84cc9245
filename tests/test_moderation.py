"""Private and archived rooms, muting, hiding and banning, on real PostgreSQL and Redis."""
from __future__ import annotations

import asyncio
import json
from contextlib import ExitStack

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from chatapp.asgi import application
from chatapp.consumers import CLOSE_ROOM_NOT_FOUND
from chatapp.models import Message
from chatapp.services import message_create, message_hide, user_ban, user_mute, user_unmute
from tests.support import SocketClient, parse_error, parse_messages, running_daphne

ORIGIN = (b"origin", b"http://127.0.0.1")
TIMEOUT = 5


@pytest.fixture
def private_room(make_room, alice):
    room = make_room("secret", "Secret")
    room.is_private = True
    room.save()
    room.members.add(alice)
    return room


@pytest.mark.django_db
class TestPrivateRoomPages:
    def test_non_member_gets_404(self, client, bob, private_room):
        client.force_login(bob)
        assert client.get("/rooms/secret/").status_code == 404
        assert client.get("/rooms/secret/messages/?before=5").status_code == 404
        assert client.post("/rooms/secret/messages/", {"body": "let me in"}).status_code == 404
        assert Message.objects.count() == 0

    def test_non_member_does_not_see_it_listed(self, client, bob, private_room, room):
        client.force_login(bob)
        content = client.get("/").content.decode()
        assert 'data-room="lobby"' in content
        assert 'data-room="secret"' not in content

    def test_member_and_staff_can_enter(self, client, alice, make_user, private_room):
        client.force_login(alice)
        assert client.get("/rooms/secret/").status_code == 200
        moderator = make_user("moderator")
        moderator.is_staff = True
        moderator.save()
        client.force_login(moderator)
        assert client.get("/rooms/secret/").status_code == 200


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("hub_cleanup")
class TestSockets:
    async def connect(self, slug: str, cookie: str) -> WebsocketCommunicator:
        communicator = WebsocketCommunicator(application, f"/ws/rooms/{slug}/?after=0", headers=[ORIGIN, (b"cookie", cookie.encode())])
        connected, _ = await communicator.connect(timeout=TIMEOUT)
        assert connected
        return communicator

    async def receive_error(self, communicator: WebsocketCommunicator):
        while True:
            error = parse_error(await communicator.receive_from(timeout=TIMEOUT))
            if error:
                return error

    async def test_non_member_socket_refused(self, bob, private_room, cookie_for):
        communicator = await self.connect("secret", await cookie_for(bob))
        closed = await communicator.receive_output(timeout=TIMEOUT)
        assert closed == {"type": "websocket.close", "code": CLOSE_ROOM_NOT_FOUND}

    async def test_member_socket_accepted(self, alice, private_room, cookie_for):
        communicator = await self.connect("secret", await cookie_for(alice))
        await communicator.send_to(text_data=json.dumps({"body": "members only"}))
        while True:
            messages = parse_messages(await communicator.receive_from(timeout=TIMEOUT))
            if messages:
                break
        assert messages[0].body == "members only"

    async def test_archived_room_rejects_posts(self, room, alice, cookie_for):
        room.is_archived = True
        await room.asave()
        communicator = await self.connect(room.slug, await cookie_for(alice))

        await communicator.send_to(text_data=json.dumps({"body": "too late", "client_id": "late-1"}))

        assert await self.receive_error(communicator) == (
            "room_archived",
            "late-1",
            "This room is archived: it can be read but not posted to.",
        )
        assert await Message.objects.acount() == 0

    async def test_muted_user_cannot_post_until_unmuted(self, room, alice, cookie_for):
        await sync_to_async(user_mute)(alice)
        communicator = await self.connect(room.slug, await cookie_for(alice))

        await communicator.send_to(text_data=json.dumps({"body": "hello?"}))
        assert await self.receive_error(communicator) == (
            "muted",
            None,
            "You are muted: you can read this room but not post to it.",
        )
        await sync_to_async(user_unmute)(alice)
        await communicator.send_to(text_data=json.dumps({"body": "back"}))
        while True:
            messages = parse_messages(await communicator.receive_from(timeout=TIMEOUT))
            if messages:
                break
        assert messages[0].body == "back"

    async def test_hidden_message_removed_live_and_on_replay(self, room, alice, bob, cookie_for):
        watcher = await self.connect(room.slug, await cookie_for(bob))
        result = await sync_to_async(message_create)(room=room, author=alice, body="something rude")
        while not parse_messages(await watcher.receive_from(timeout=TIMEOUT)):
            pass

        assert await sync_to_async(message_hide)(result.message) is True
        while True:
            frame = await watcher.receive_from(timeout=TIMEOUT)
            if "data-removed-seq" in frame:
                break
        assert 'data-removed-seq="1"' in frame
        assert await sync_to_async(message_hide)(result.message) is False

        late = await self.connect(room.slug, await cookie_for(alice))
        while True:
            frame = await late.receive_from(timeout=TIMEOUT)
            replayed = parse_messages(frame)
            if replayed:
                break
        assert [(message.seq, message.body) for message in replayed] == [(1, "This message was removed by a moderator.")]
        assert "something rude" not in frame
        assert "data-removed" in frame


@pytest.mark.django_db
def test_hidden_message_shows_placeholder_on_page(client, room, alice):
    message = message_create(room=room, author=alice, body="something rude").message
    message_hide(message)
    client.force_login(alice)

    content = client.get("/rooms/lobby/").content.decode()

    assert "something rude" not in content
    assert "This message was removed by a moderator." in content
    assert 'data-seq="1"' in content


@pytest.mark.django_db
def test_admin_cannot_delete_messages(client, django_user_model, room, alice):
    message = message_create(room=room, author=alice, body="stays").message
    admin = django_user_model.objects.create_superuser("admin", "admin@example.com", "admin-pass")
    client.force_login(admin)

    response = client.post(f"/admin/chatapp/message/{message.pk}/delete/", {"post": "yes"})

    assert response.status_code == 403
    assert Message.objects.filter(pk=message.pk).exists()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
async def test_ban_closes_every_socket_on_every_node(tmp_path, room, alice, bob, cookie_for):
    with ExitStack() as stack:
        nodes = [stack.enter_context(running_daphne(tmp_path, server="node")) for _ in range(2)]
        alice_cookie = await cookie_for(alice)
        banned = [await SocketClient.connect(node, room.slug, alice_cookie, after=0) for node in nodes]
        bystander = await SocketClient.connect(nodes[0], room.slug, await cookie_for(bob), after=0)
        await asyncio.sleep(0.5)

        await sync_to_async(user_ban)(alice)
        for socket in banned:
            await asyncio.wait_for(socket.reader, timeout=5)

        assert [socket.connection.close_code for socket in banned] == [4403, 4403]
        retry = await SocketClient.connect(nodes[1], room.slug, alice_cookie, after=0)
        await asyncio.wait_for(retry.reader, timeout=5)
        assert retry.connection.close_code == 4401
        await bystander.send("still here", "bystander")
        await bystander.wait_for_seq(1)
        await bystander.close()
