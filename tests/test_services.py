from __future__ import annotations

import threading

import pytest
from django.db import connection, transaction

from chatapp import broadcast
from chatapp.models import Message, Room
from chatapp.services import MessageRejected, message_create

pytestmark = pytest.mark.django_db


class TestMessageCreate:
    def test_numbers_messages_from_one(self, room, alice):
        first = message_create(room=room, author=alice, body="one")
        second = message_create(room=room, author=alice, body="two")

        assert (first.message.seq, second.message.seq) == (1, 2)
        room.refresh_from_db()
        assert room.last_seq == 2

    def test_strips_body(self, room, alice):
        result = message_create(room=room, author=alice, body="  hello \n")
        assert result.message.body == "hello"

    def test_rooms_have_separate_seqs(self, make_room, alice):
        first_room, second_room = make_room(), make_room()
        message_create(room=first_room, author=alice, body="a")
        message_create(room=first_room, author=alice, body="b")

        result = message_create(room=second_room, author=alice, body="c")

        assert result.message.seq == 1

    def test_retried_client_id_returns_stored_message(self, room, alice):
        first = message_create(room=room, author=alice, body="hi", client_id="key-1")
        retry = message_create(room=room, author=alice, body="hi", client_id="key-1")

        assert first.created is True
        assert retry.created is False
        assert retry.message.pk == first.message.pk
        assert Message.objects.count() == 1

    def test_same_client_id_of_two_authors_stores_both(self, room, alice, bob):
        message_create(room=room, author=alice, body="hi", client_id="same")
        message_create(room=room, author=bob, body="hi", client_id="same")
        assert Message.objects.count() == 2

    def test_client_id_reused_in_other_room_rejected(self, make_room, alice):
        message_create(room=make_room(), author=alice, body="hi", client_id="key-1")

        with pytest.raises(MessageRejected) as info:
            message_create(room=make_room(), author=alice, body="hi", client_id="key-1")

        assert info.value.code == "client_id_reused"
        assert Message.objects.count() == 1

    @pytest.mark.parametrize(
        ("body", "client_id", "code", "text"),
        [
            ("", None, "body_required", "Message is empty."),
            ("   \n ", None, "body_required", "Message is empty."),
            (None, None, "body_required", "Message is empty."),
            ("x" * 4001, None, "body_too_long", "Message is longer than 4000 characters (it has 4001)."),
            ("hi", "k" * 65, "client_id_too_long", "client_id is longer than 64 characters."),
            (42, None, "body_not_text", "body must be a string."),
            ("hi", 7, "client_id_not_text", "client_id must be a string."),
        ],
    )
    def test_invalid_input_rejected(self, room, alice, body, client_id, code, text):
        with pytest.raises(MessageRejected) as info:
            message_create(room=room, author=alice, body=body, client_id=client_id)

        assert info.value.code == code
        assert info.value.text == text
        assert Message.objects.count() == 0
        room.refresh_from_db()
        assert room.last_seq == 0

    def test_max_length_body_accepted(self, room, alice):
        result = message_create(room=room, author=alice, body="x" * 4000)
        assert len(result.message.body) == 4000

    def test_broadcasts_on_commit(self, room, alice, django_capture_on_commit_callbacks, monkeypatch):
        published = []
        monkeypatch.setattr(broadcast, "publish_message", published.append)

        with django_capture_on_commit_callbacks(execute=True):
            result = message_create(room=room, author=alice, body="hi")

        assert published == [result.message]

    def test_rolled_back_post_leaves_no_trace(
        self, room, alice, django_capture_on_commit_callbacks, monkeypatch
    ):
        published = []
        monkeypatch.setattr(broadcast, "publish_message", published.append)

        with django_capture_on_commit_callbacks(execute=True):
            with pytest.raises(RuntimeError):
                with transaction.atomic():
                    message_create(room=room, author=alice, body="lost")
                    raise RuntimeError("abort the outer transaction")
            result = message_create(room=room, author=alice, body="kept")

        assert published == [result.message]
        assert result.message.seq == 1
        assert list(Message.objects.values_list("body", flat=True)) == ["kept"]

    def test_retry_broadcasts_nothing(self, room, alice, django_capture_on_commit_callbacks, monkeypatch):
        published = []
        monkeypatch.setattr(broadcast, "publish_message", published.append)

        with django_capture_on_commit_callbacks(execute=True):
            message_create(room=room, author=alice, body="hi", client_id="k")
            message_create(room=room, author=alice, body="hi", client_id="k")

        assert len(published) == 1


@pytest.mark.django_db(transaction=True)
class TestConcurrentPosting:
    def test_concurrent_posts_get_gap_free_seqs(self, make_room, make_user, monkeypatch):
        monkeypatch.setattr(broadcast, "publish_message", lambda message: None)
        room = make_room()
        authors = [make_user() for _ in range(8)]
        errors: list[BaseException] = []

        def post_many(author):
            try:
                for number in range(25):
                    message_create(room=room, author=author, body=f"{author.username} {number}")
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread below
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=post_many, args=(author,)) for author in authors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)

        assert errors == []
        seqs = list(Message.objects.filter(room=room).order_by("seq").values_list("seq", flat=True))
        assert seqs == list(range(1, 201))
        assert Room.objects.get(pk=room.pk).last_seq == 200

    def test_concurrent_retries_store_one_message(self, room, alice, monkeypatch):
        monkeypatch.setattr(broadcast, "publish_message", lambda message: None)
        results = []

        def post():
            try:
                results.append(message_create(room=room, author=alice, body="once", client_id="retry-key"))
            finally:
                connection.close()

        threads = [threading.Thread(target=post) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        assert Message.objects.count() == 1
        assert {result.message.seq for result in results} == {1}
        assert sum(result.created for result in results) == 1
