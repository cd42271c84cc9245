from __future__ import annotations

import pytest

from chatapp import broadcast
from chatapp.models import Message
from chatapp.services import message_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("admin", "admin@example.com", "admin-pass")
    client.force_login(admin)
    return client


def test_admin_lists_rooms_and_messages(admin_client, room, alice):
    message_create(room=room, author=alice, body="listed in admin")

    assert "lobby" in admin_client.get("/admin/chatapp/room/").content.decode()
    assert "listed in admin" in admin_client.get("/admin/chatapp/message/").content.decode()


def test_admin_added_message_gets_next_seq_and_broadcast(
    admin_client, room, alice, django_capture_on_commit_callbacks, monkeypatch
):
    published = []
    monkeypatch.setattr(broadcast, "publish_message", published.append)
    message_create(room=room, author=alice, body="first")

    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(
            "/admin/chatapp/message/add/", {"room": room.pk, "author": alice.pk, "body": "  from admin "}
        )

    assert response.status_code == 302
    message = Message.objects.get(seq=2)
    assert message.body == "from admin"
    assert [published_message.seq for published_message in published] == [2]


def test_admin_rejects_too_long_body(admin_client, room, alice):
    response = admin_client.post("/admin/chatapp/message/add/", {"room": room.pk, "author": alice.pk, "body": "z" * 4001})
    assert response.status_code == 200
    assert "Message is longer than 4000 characters (it has 4001)." in response.content.decode()
    assert Message.objects.count() == 0


def test_admin_rejects_empty_body(admin_client, room, alice):
    response = admin_client.post("/admin/chatapp/message/add/", {"room": room.pk, "author": alice.pk, "body": "   "})
    assert response.status_code == 200
    assert "This field is required." in response.content.decode()
    assert Message.objects.count() == 0
