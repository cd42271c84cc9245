"""Publish committed messages to the room's group on the channel layer."""
from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

from chatapp.models import Message
from chatapp.rendering import render_messages_frame

logger = logging.getLogger(__name__)

# Event types on the channel layer: a committed message, and a user's first
# connection in a room appearing or last one going.
MESSAGE_EVENT = "chat.message"
PRESENCE_EVENT = "chat.presence"


def room_group_name(room_id: int) -> str:
    return f"room.{room_id}"


def message_event(message: Message) -> dict:
    """Build the channel-layer event for one message, with its frame rendered once."""
    return {
        "type": MESSAGE_EVENT,
        "room": message.room_id,
        "seq": message.seq,
        "frame": render_messages_frame([message]),
    }


def publish_message(message: Message) -> None:
    """Send the message event to every node subscribed to the room.

    Runs from transaction.on_commit. A failed publish loses nothing: the
    message is committed, and every node's gap check reads it from the
    database within two gap-check intervals.
    """
    layer = get_channel_layer()
    event = message_event(message)
    try:
        async_to_sync(layer.group_send)(room_group_name(message.room_id), event)
    except Exception:
        logger.exception(
            "publish failed room=%s seq=%s message=%s; the gap check will deliver it",
            message.room_id,
            message.seq,
            message.pk,
        )
