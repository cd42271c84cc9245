from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.core.validators import validate_slug

from chatapp.models import RESERVED_ROOM_SLUGS
from chatapp.services import room_create


class Command(BaseCommand):
    help = "Create a chat room; an existing room with the same slug is left as it is."

    def add_arguments(self, parser) -> None:
        parser.add_argument("slug", help="Room address: letters, digits, hyphens and underscores (at most 50).")
        parser.add_argument("--title", help="Room title shown on the pages (default: the slug).")

    def handle(self, *args, slug: str, title: str | None, **options) -> None:
        try:
            validate_slug(slug)
        except ValidationError as exc:
            raise CommandError(f"Invalid slug {slug!r}: use letters, digits, hyphens and underscores.") from exc
        if slug in RESERVED_ROOM_SLUGS:
            raise CommandError(f"Invalid slug {slug!r}: it is reserved for a page of the site; choose another.")
        if len(slug) > 50:
            raise CommandError(f"Invalid slug {slug!r}: it has {len(slug)} characters, the maximum is 50.")

        room, created = room_create(slug=slug, title=title or slug)
        verb = "Created" if created else "Room already exists:"
        self.stdout.write(f"{verb} {room.slug} ({room.title})")
