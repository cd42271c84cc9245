from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from chatapp.models import Message, Room

pytestmark = pytest.mark.django_db


def run(*args) -> str:
    from io import StringIO

    output = StringIO()
    call_command(*args, stdout=output)
    return output.getvalue()


class TestCreateRoom:
    def test_creates_room_once(self):
        assert run("create_room", "lobby", "--title", "Lobby") == "Created lobby (Lobby)\n"
        assert run("create_room", "lobby", "--title", "Other") == "Room already exists: lobby (Lobby)\n"
        assert Room.objects.get().title == "Lobby"

    def test_title_defaults_to_slug(self):
        run("create_room", "general")
        assert Room.objects.get().title == "general"

    def test_invalid_slug_rejected(self):
        with pytest.raises(CommandError, match="Invalid slug 'bad slug': use letters, digits, hyphens and underscores."):
            run("create_room", "bad slug")
        assert Room.objects.count() == 0

    def test_reserved_slug_rejected(self):
        with pytest.raises(CommandError, match="Invalid slug 'new': it is reserved"):
            run("create_room", "new")
        assert Room.objects.count() == 0

    def test_too_long_slug_rejected(self):
        with pytest.raises(CommandError, match="it has 51 characters, the maximum is 50"):
            run("create_room", "s" * 51)


class TestSeedUsers:
    def test_creates_numbered_users_idempotently(self):
        assert run("seed_users", "--count", "3", "--prefix", "load", "--password", "pw-123") == (
            "Created 3 users, 0 already existed (load1..load3).\n"
        )
        assert run("seed_users", "--count", "5", "--prefix", "load", "--password", "pw-123") == (
            "Created 2 users, 3 already existed (load1..load5).\n"
        )
        users = get_user_model().objects.order_by("username")
        assert [user.username for user in users] == ["load1", "load2", "load3", "load4", "load5"]
        assert users[0].check_password("pw-123")

    def test_zero_count_rejected(self):
        with pytest.raises(CommandError, match="--count must be at least 1, got 0."):
            run("seed_users", "--count", "0", "--password", "x")


class TestPostMessage:
    def test_posts_with_next_seq(self, room, alice):
        assert run("post_message", "lobby", "alice", "from the shell") == "Posted lobby#1\n"
        assert run("post_message", "lobby", "alice", "again", "--client-id", "k") == "Posted lobby#2\n"
        assert run("post_message", "lobby", "alice", "again", "--client-id", "k") == "Already posted lobby#2\n"
        assert Message.objects.count() == 2

    def test_unknown_room_rejected(self, alice):
        with pytest.raises(CommandError, match="Room 'nope' not found"):
            run("post_message", "nope", "alice", "hi")

    def test_empty_body_rejected(self, room, alice):
        with pytest.raises(CommandError, match=r"Message rejected \(body_required\): Message is empty."):
            run("post_message", "lobby", "alice", "  ")


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("create_room", ["--title", "Room title shown on the pages"]),
        ("seed_users", ["--count", "--prefix", "--password", "Number of users"]),
        ("post_message", ["--client-id", "Idempotency key"]),
    ],
)
def test_help_describes_every_option(command, expected, capsys):
    with pytest.raises(SystemExit):
        call_command(command, "--help")
    output = capsys.readouterr().out
    for text in expected:
        assert text in output
