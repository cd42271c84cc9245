from __future__ import annotations

import pytest
from django.urls import reverse

from chatapp.models import Message, Room
from chatapp.services import message_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


def post_messages(room, author, count: int) -> None:
    for number in range(1, count + 1):
        message_create(room=room, author=author, body=f"message {number}")


class TestAccess:
    @pytest.mark.parametrize("url", ["/", "/rooms/new/", "/rooms/lobby/", "/rooms/lobby/messages/?before=5"])
    def test_anonymous_redirected_to_login(self, client, room, url):
        response = client.get(url)
        assert response.status_code == 302
        assert response["Location"].startswith("/accounts/login/?next=")

    def test_signup_logs_in_and_redirects(self, client):
        response = client.post(
            "/accounts/signup/",
            {"username": "carol", "password1": "a-long-pass-phrase", "password2": "a-long-pass-phrase"},
        )
        assert response.status_code == 302
        assert response["Location"] == reverse("room_list")
        assert client.get("/").status_code == 200

    def test_signup_mismatched_passwords_show_error(self, client):
        response = client.post(
            "/accounts/signup/", {"username": "carol", "password1": "a-long-pass-phrase", "password2": "other"}
        )
        assert response.status_code == 400
        assert "The two password fields didn’t match." in response.content.decode()

    def test_login_and_logout(self, client, alice):
        response = client.post("/accounts/login/", {"username": "alice", "password": "correct-horse-battery"})
        assert response.status_code == 302
        assert client.get("/").status_code == 200

        client.post("/accounts/logout/")
        assert client.get("/").status_code == 302


class TestRoomCreate:
    def test_creates_room_and_redirects(self, alice_client, alice):
        response = alice_client.post("/rooms/new/", {"slug": "general", "title": "General"})

        assert response.status_code == 302
        assert response["Location"] == "/rooms/general/"
        room = Room.objects.get(slug="general")
        assert (room.title, room.created_by, room.last_seq) == ("General", alice, 0)

    def test_duplicate_slug_shows_error(self, alice_client, room):
        response = alice_client.post("/rooms/new/", {"slug": room.slug, "title": "Another"})

        assert response.status_code == 400
        assert "Room with this Slug already exists." in response.content.decode()
        assert Room.objects.count() == 1

    @pytest.mark.parametrize("slug", ["has space", "ümlaut!", "a/b", ""])
    def test_malformed_slug_shows_error(self, alice_client, slug):
        response = alice_client.post("/rooms/new/", {"slug": slug, "title": "Title"})

        assert response.status_code == 400
        assert 'class="errorlist' in response.content.decode()
        assert Room.objects.count() == 0

    def test_reserved_slug_shows_error(self, alice_client):
        response = alice_client.post("/rooms/new/", {"slug": "new", "title": "New"})

        assert response.status_code == 400
        assert "is reserved for a page of the site" in response.content.decode()
        assert Room.objects.count() == 0

    def test_room_list_links_rooms(self, alice_client, room):
        content = alice_client.get("/").content.decode()
        assert 'href="/rooms/lobby/"' in content


class TestRoomPage:
    def test_renders_latest_fifty_with_resume_seq(self, alice_client, room, alice):
        post_messages(room, alice, 60)

        content = alice_client.get("/rooms/lobby/").content.decode()

        assert content.count('class="message"') == 50
        assert 'data-seq="11"' in content
        assert 'data-seq="10"' not in content
        assert 'data-ws-path="/ws/rooms/lobby/" data-after="60"' in content
        assert "/rooms/lobby/messages/?before=11" in content

    def test_empty_room_resumes_from_zero(self, alice_client, room):
        content = alice_client.get("/rooms/lobby/").content.decode()
        assert 'data-after="0"' in content
        assert "Load earlier" not in content

    def test_unknown_room_is_404(self, alice_client):
        assert alice_client.get("/rooms/nope/").status_code == 404

    def test_message_elements_carry_contract_attributes(self, alice_client, room, alice):
        message_create(room=room, author=alice, body="hi", client_id="abc")
        content = alice_client.get("/rooms/lobby/").content.decode()
        assert 'data-seq="1" data-author="alice" data-client-id="abc"' in content

    def test_script_in_body_shown_as_text(self, alice_client, room, alice):
        message_create(room=room, author=alice, body="<script>alert('x')</script>")
        content = alice_client.get("/rooms/lobby/").content.decode()
        assert "<script>alert" not in content
        assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in content


class TestLoadEarlier:
    def test_htmx_pages_back_by_seq(self, alice_client, room, alice):
        post_messages(room, alice, 120)

        response = alice_client.get("/rooms/lobby/messages/?before=71", headers={"HX-Request": "true"})
        content = response.content.decode()

        assert "<html" not in content
        assert content.count('class="message"') == 50
        assert 'data-seq="21"' in content
        assert 'data-seq="70"' in content
        assert 'data-seq="71"' not in content
        assert 'data-seq="20"' not in content
        assert "?before=21" in content

    def test_first_page_has_no_further_link(self, alice_client, room, alice):
        post_messages(room, alice, 30)
        content = alice_client.get("/rooms/lobby/messages/?before=11", headers={"HX-Request": "true"}).content.decode()
        assert content.count('class="message"') == 10
        assert "Load earlier" not in content

    def test_without_htmx_renders_full_page(self, alice_client, room, alice):
        post_messages(room, alice, 5)
        content = alice_client.get("/rooms/lobby/messages/?before=3").content.decode()
        assert "<html" in content
        assert content.count('class="message"') == 2

    @pytest.mark.parametrize("before", ["", "abc", "-3"])
    def test_invalid_before_is_400(self, alice_client, room, before):
        response = alice_client.get(f"/rooms/lobby/messages/?before={before}")
        assert response.status_code == 400
        assert response.content.decode() == "before must be a non-negative integer seq."


class TestFormFallback:
    def test_post_stores_and_redirects(self, alice_client, room, alice):
        response = alice_client.post("/rooms/lobby/messages/", {"body": "  without js  ", "client_id": "f-1"})

        assert response.status_code == 302
        assert response["Location"] == "/rooms/lobby/#composer"
        message = Message.objects.get()
        assert (message.seq, message.body, message.author, message.client_id) == (1, "without js", alice, "f-1")

    def test_resubmitted_form_stores_once(self, alice_client, room):
        alice_client.post("/rooms/lobby/messages/", {"body": "hi", "client_id": "f-1"})
        alice_client.post("/rooms/lobby/messages/", {"body": "hi", "client_id": "f-1"})
        assert Message.objects.count() == 1

    def test_empty_body_shows_field_error(self, alice_client, room):
        response = alice_client.post("/rooms/lobby/messages/", {"body": "   "})

        assert response.status_code == 400
        assert "Message is empty." in response.content.decode()
        assert Message.objects.count() == 0

    def test_too_long_body_shows_error(self, alice_client, room):
        response = alice_client.post("/rooms/lobby/messages/", {"body": "y" * 4001})

        content = response.content.decode()
        assert response.status_code == 400
        assert "Message is longer than 4000 characters (it has 4001)." in content
        assert "y" * 4001 in content
        assert Message.objects.count() == 0

    def test_missing_csrf_token_rejected(self, room, alice):
        from django.test import Client

        csrf_client = Client(enforce_csrf_checks=True)
        csrf_client.force_login(alice)

        response = csrf_client.post("/rooms/lobby/messages/", {"body": "forged"})

        assert response.status_code == 403
        assert Message.objects.count() == 0
