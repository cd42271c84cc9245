"""State-changing operations on rooms and messages.

Every entry point that posts a message (WebSocket frame, HTTP form, admin,
management command) calls message_create, so all of them get the same seq,
idempotency and broadcast guarantees.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from django.contrib.auth.models import AbstractBaseUser, Group
from django.db import IntegrityError, transaction
from django.utils import timezone

from chatapp import broadcast, metrics
from chatapp.forms import MessageForm
from chatapp.models import Message, Room

logger = logging.getLogger(__name__)

# Members of this auth group can read but not post.
MUTED_GROUP = "muted"

# Data-error codes of rejected messages, by form field and Django error code.
ERROR_CODES = {
    ("body", "required"): "body_required",
    ("body", "max_length"): "body_too_long",
    ("client_id", "max_length"): "client_id_too_long",
}


class MessageRejected(Exception):
    """A message that is not stored; `code` is the data-error code sent to the client."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(frozen=True)
class PostResult:
    message: Message
    created: bool


def message_validate(body: object, client_id: object = None) -> tuple[str, str | None]:
    """Return the cleaned body and client_id, or raise MessageRejected."""
    if not isinstance(body, str) and body is not None:
        raise MessageRejected("body_not_text", "body must be a string.")
    if not isinstance(client_id, str) and client_id is not None:
        raise MessageRejected("client_id_not_text", "client_id must be a string.")

    form = MessageForm(data={"body": body or "", "client_id": client_id or ""})
    if form.is_valid():
        return form.cleaned_data["body"], form.cleaned_data["client_id"]

    for field, errors in form.errors.as_data().items():
        error = errors[0]
        code = ERROR_CODES.get((field, error.code), f"{field}_invalid")
        raise MessageRejected(code, " ".join(error.messages))
    raise AssertionError("invalid form without errors")  # pragma: no cover


def message_create(
    *, room: Room, author: AbstractBaseUser, body: object, client_id: object = None
) -> PostResult:
    """Store a message under the next seq of its room and broadcast it after commit.

    A client_id that this author already used returns the stored message
    (created=False) and broadcasts nothing, so a retried send is stored once.
    """
    body, client_id = message_validate(body, client_id)
    if author.groups.filter(name=MUTED_GROUP).exists():
        raise MessageRejected("muted", "You are muted: you can read this room but not post to it.")

    try:
        with transaction.atomic():
            locked_room = Room.objects.select_for_update().get(pk=room.pk)
            if locked_room.is_archived:
                raise MessageRejected("room_archived", "This room is archived: it can be read but not posted to.")
            if client_id is not None:
                existing = _message_by_client_id(author, client_id)
                if existing is not None:
                    return _existing_result(existing, room)

            seq = locked_room.last_seq + 1
            message = Message.objects.create(
                room=locked_room, seq=seq, author=author, body=body, client_id=client_id
            )
            Room.objects.filter(pk=locked_room.pk).update(last_seq=seq)
            # Publish only what is committed: a rolled-back post sends nothing
            # and, because its seq was never committed, leaves no hole.
            transaction.on_commit(lambda: broadcast.publish_message(message))
    except IntegrityError:
        # A concurrent send with the same client_id into another room won the
        # insert; this one returns the stored message.
        existing = _message_by_client_id(author, client_id) if client_id is not None else None
        if existing is None:
            raise
        return _existing_result(existing, room)

    metrics.MESSAGES_POSTED.inc()
    logger.debug("message stored room=%s seq=%s author=%s", room.pk, seq, author.pk)
    return PostResult(message=message, created=True)


def _message_by_client_id(author: AbstractBaseUser, client_id: str) -> Message | None:
    return Message.objects.select_related("author").filter(author=author, client_id=client_id).first()


def _existing_result(existing: Message, room: Room) -> PostResult:
    if existing.room_id != room.pk:
        raise MessageRejected(
            "client_id_reused",
            "client_id was already used for a message in another room; send with a new client_id.",
        )
    return PostResult(message=existing, created=False)


def room_create(*, slug: str, title: str, created_by: AbstractBaseUser | None = None) -> tuple[Room, bool]:
    """Return the room with this slug, creating it when it does not exist."""
    room, created = Room.objects.get_or_create(
        slug=slug, defaults={"title": title, "created_by": created_by}
    )
    if created:
        logger.info("room created room=%s slug=%s", room.pk, room.slug)
    return room, created


def message_hide(message: Message) -> bool:
    """Hide a message from every page, live; return False when it was already hidden.

    The row stays, so the room's seq keeps no holes; pages and replays show a
    placeholder in its place.
    """
    with transaction.atomic():
        updated = Message.objects.filter(pk=message.pk, hidden_at__isnull=True).update(hidden_at=timezone.now())
        if updated:
            transaction.on_commit(lambda: broadcast.publish_removal(message))
    if updated:
        logger.info("message hidden room=%s seq=%s message=%s", message.room_id, message.seq, message.pk)
    return bool(updated)


def user_mute(user: AbstractBaseUser) -> None:
    """Let the user read but not post, on every node from the next message on."""
    group, _ = Group.objects.get_or_create(name=MUTED_GROUP)
    user.groups.add(group)
    logger.info("user muted user=%s", user.pk)


def user_unmute(user: AbstractBaseUser) -> None:
    user.groups.remove(*Group.objects.filter(name=MUTED_GROUP))
    logger.info("user unmuted user=%s", user.pk)


def user_ban(user: AbstractBaseUser) -> None:
    """Deactivate the user and close every socket of theirs on every node."""
    type(user).objects.filter(pk=user.pk).update(is_active=False)
    # An inactive user's session no longer authenticates, so pages redirect
    # to the login and new sockets close with 4401.
    transaction.on_commit(lambda: broadcast.publish_ban(user.pk))
    logger.info("user banned user=%s", user.pk)
