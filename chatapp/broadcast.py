"""Publish committed messages to the room's group on the channel layer."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from chatapp.models import Message
from chatapp.rendering import render_messages_frame, render_removal_frame

logger = logging.getLogger(__name__)

# Event types on the channel layer: a committed message, and a user's first
# connection in a room appearing or last one going.
MESSAGE_EVENT = "chat.message"
PRESENCE_EVENT = "chat.presence"
REMOVAL_EVENT = "chat.removal"
BAN_EVENT = "chat.ban"

# Group of every hub, for events that concern sockets in any room.
CONTROL_GROUP = "control"


def room_group_name(room_id: int) -> str:
    return f"room.{room_id}"


def message_event(message: Message) -> dict:
    """Build the channel-layer event for one message, with its frame rendered once."""
    return {
        "type": MESSAGE_EVENT,
        "room": message.room_id,
        "seq": message.seq,
        "frame": render_messages_frame([message]),
        # Wall-clock time of the commit, for the delivery-latency histogram.
        "committed_at": time.time(),
    }


_deferred = threading.local()


@contextmanager
def deferred_publishing() -> Iterator[list[tuple[str, dict]]]:
    """Collect the (group, event) pairs that this thread would publish, instead of publishing them.

    For callers on a database worker thread under an event loop: publishing
    from the thread would block it until the loop has sent the event, and
    every database call of the process waits for that one thread. The caller
    publishes the collected events from the loop once the thread returns.
    """
    events: list[tuple[str, dict]] = []
    _deferred.events = events
    try:
        yield events
    finally:
        _deferred.events = None


def _group_send(group: str, event: dict) -> None:
    deferred = getattr(_deferred, "events", None)
    if deferred is not None:
        deferred.append((group, event))
        return
    async_to_sync(get_channel_layer().group_send)(group, event)


def publish_message(message: Message) -> None:
    """Send the message event to every node subscribed to the room.

    Runs from transaction.on_commit. A failed publish loses nothing: the
    message is committed, and every node's gap check reads it from the
    database within two gap-check intervals.
    """
    event = message_event(message)
    try:
        _group_send(room_group_name(message.room_id), event)
    except Exception:
        logger.exception(
            "publish failed room=%s seq=%s message=%s; the gap check will deliver it",
            message.room_id,
            message.seq,
            message.pk,
        )


def publish_removal(message: Message) -> None:
    """Tell every page of the room to replace a hidden message with its placeholder."""
    event = {"type": REMOVAL_EVENT, "room": message.room_id, "frame": render_removal_frame(message.seq)}
    try:
        _group_send(room_group_name(message.room_id), event)
    except Exception:
        # Pages show the placeholder after their next load or replay.
        logger.exception("removal publish failed room=%s seq=%s", message.room_id, message.seq)


def publish_ban(user_id: int) -> None:
    """Ask every node to close the user's sockets."""
    try:
        _group_send(CONTROL_GROUP, {"type": BAN_EVENT, "user": user_id})
    except Exception:
        # The user is inactive already: their sockets cannot reconnect.
        logger.exception("ban publish failed user=%s; open sockets stay until they reconnect", user_id)
