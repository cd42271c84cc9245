from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from chatapp.models import Room
from chatapp.services import MessageRejected, message_create


class Command(BaseCommand):
    help = "Post a message to a room as a user, with the same ordering and broadcast as a message sent from a page."

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="Slug of the room to post to.")
        parser.add_argument("username", help="Username of the author.")
        parser.add_argument("body", help="Message text (at most 4000 characters after stripping).")
        parser.add_argument("--client-id", help="Idempotency key: posting again with the same key stores nothing new.")

    def handle(self, *args, slug: str, username: str, body: str, client_id: str | None, **options) -> None:
        room = Room.objects.filter(slug=slug).first()
        if room is None:
            raise CommandError(f"Room {slug!r} not found; create it with `manage.py create_room {slug}`.")
        author = get_user_model().objects.filter(username=username).first()
        if author is None:
            raise CommandError(f"User {username!r} not found.")

        try:
            result = message_create(room=room, author=author, body=body, client_id=client_id)
        except MessageRejected as exc:
            raise CommandError(f"Message rejected ({exc.code}): {exc.text}") from exc
        state = "Posted" if result.created else "Already posted"
        self.stdout.write(f"{state} {room.slug}#{result.message.seq}")
