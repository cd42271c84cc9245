"""Announce presence changes to the room's sockets on every node."""
from __future__ import annotations

import logging

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer

from chatapp.broadcast import PRESENCE_EVENT, room_group_name
from chatapp.hub import get_hub
from chatapp.models import Room

logger = logging.getLogger(__name__)


async def room_id_for_slug(slug: str) -> int | None:
    """Return the room's id: from the hub while this process has a socket in the room, else from the database."""
    room_id = get_hub().room_id_for_slug(slug)
    if room_id is None:
        room_id = await database_sync_to_async(
            lambda: Room.objects.filter(slug=slug).values_list("pk", flat=True).first()
        )()
    return room_id


async def broadcast_presence_change(sender, *, room: str, user: str, online: bool, **kwargs) -> None:
    """Receive presence_changed (room is the slug, user the username) and publish it to the room's group."""
    room_id = await room_id_for_slug(room)
    if room_id is None:
        logger.warning("presence change for unknown room=%s user=%s online=%s", room, user, online)
        return
    # The event names the user but not the change: announcements from two
    # nodes can cross in Redis, so each receiving node reads the user's
    # current state when it applies the event (see RoomHub).
    event = {"type": PRESENCE_EVENT, "room": room_id, "slug": room, "user": user}
    await get_channel_layer().group_send(room_group_name(room_id), event)
