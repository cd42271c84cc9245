from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q
from django.utils import timezone


# Paths under /rooms/ that a room's address would shadow.
RESERVED_ROOM_SLUGS = frozenset({"new"})


def validate_room_slug(slug: str) -> None:
    if slug in RESERVED_ROOM_SLUGS:
        raise ValidationError(f"{slug!r} is reserved for a page of the site; choose another address.", code="reserved")


class Room(models.Model):
    """A chat room; `last_seq` is the seq of its newest committed message."""

    slug = models.SlugField(max_length=50, unique=True, validators=[validate_room_slug])
    title = models.CharField(max_length=100)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)
    # Only message_create changes this, under the row lock of this room.
    last_seq = models.PositiveBigIntegerField(default=0, editable=False)
    is_private = models.BooleanField(
        default=False, help_text="Only members (and staff) can see a private room or connect to it."
    )
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="private_rooms")
    is_archived = models.BooleanField(default=False, help_text="An archived room can be read but not posted to.")

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class Message(models.Model):
    """A chat message; `seq` numbers the messages of one room from 1 without holes."""

    room = models.ForeignKey(Room, on_delete=models.CASCADE, related_name="messages")
    seq = models.PositiveBigIntegerField(editable=False)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    body = models.TextField()
    # The sender's idempotency key: a retried send with the same key returns
    # the stored message instead of storing a copy.
    client_id = models.CharField(max_length=64, null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    # Moderators hide messages instead of deleting them, because a deleted
    # row would leave a hole in the room's seq that clients wait to fill.
    hidden_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["room", "seq"]
        constraints = [
            models.UniqueConstraint(fields=["room", "seq"], name="message_room_seq_unique"),
            models.UniqueConstraint(
                fields=["author", "client_id"],
                condition=Q(client_id__isnull=False),
                name="message_author_client_id_unique",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.room.slug}#{self.seq}"
