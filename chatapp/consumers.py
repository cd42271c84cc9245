"""The room WebSocket: replay after `after=`, then live frames from the hub."""
from __future__ import annotations

import asyncio
import json
import logging
import uuid
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.layers import get_channel_layer
from django.conf import settings

from chatapp import metrics, selectors
from chatapp.hub import get_hub
from chatapp.models import Room
from chatapp.ratelimit import get_rate_limiter
from chatapp.rendering import render_ack_frame, render_error_frame, render_messages_frame, render_presence_list
from chatapp.broadcast import deferred_publishing
from chatapp.services import MessageRejected, PostResult, message_create
from presence.store import Connection, ConnectionLimitReached, get_store
from presence.tracker import get_tracker

logger = logging.getLogger(__name__)

# Close codes sent after the handshake, documented in the README.
CLOSE_BAD_AFTER = 4400
CLOSE_UNAUTHENTICATED = 4401
CLOSE_BANNED = 4403
CLOSE_ROOM_NOT_FOUND = 4404
CLOSE_TOO_MANY_SOCKETS = 4429
CLOSE_SERVER_ERROR = 1011


class InvalidAfter(ValueError):
    pass


def parse_after(query_string: bytes) -> int | None:
    """Return the `after` seq from a socket query string; None when it is absent."""
    values = parse_qs(query_string.decode("latin-1")).get("after")
    if not values or values[-1] == "":
        return None
    raw = values[-1]
    if not raw.isdigit():
        raise InvalidAfter(f"after={raw!r} is not a non-negative integer.")
    return int(raw)


class RoomConsumer(AsyncWebsocketConsumer):
    """One browser tab in one room.

    `next_seq` is the next seq this socket must receive. Until the socket is
    live, it reads from the database and only records the highest seq the hub
    offered (`max_seen`). It goes live once a read finds nothing newer and the
    hub offered nothing newer. Both checks run without an await in between, so
    no message falls between replay and live delivery.
    """

    # The hub has the only channel-layer subscription, shared by all sockets.
    channel_layer_alias = None

    async def connect(self) -> None:
        self.room: Room | None = None
        self.counted_open = False
        # Short id that ties this socket's log lines together.
        self.socket_id = uuid.uuid4().hex[:12]
        self.live = False
        self.next_seq = 1
        self.max_seen = 0
        self.catch_up_task: asyncio.Task | None = None
        self.presence: Connection | None = None
        # Unordered frames (presence changes, removals) wait here until the
        # presence list is sent, so that a client gets the list first.
        self.held_frames: list[str] | None = []
        user = self.scope["user"]
        slug = self.scope["url_route"]["kwargs"]["slug"]

        if not user.is_authenticated:
            logger.info("socket rejected: not logged in room=%s", slug)
            await self.reject(CLOSE_UNAUTHENTICATED)
            return
        self.room = await database_sync_to_async(lambda: selectors.rooms_visible_to(user).filter(slug=slug).first())()
        if self.room is None:
            logger.info("socket rejected: room not found room=%s user=%s", slug, user.pk)
            await self.reject(CLOSE_ROOM_NOT_FOUND)
            return
        try:
            after = parse_after(self.scope["query_string"])
        except InvalidAfter as exc:
            logger.info("socket rejected: %s room=%s user=%s", exc, self.room.pk, user.pk)
            await self.reject(CLOSE_BAD_AFTER)
            self.room = None
            return

        # An absent after, or one beyond the last message, means "from now on".
        if after is None or after > self.room.last_seq:
            after = self.room.last_seq
        self.next_seq = after + 1
        await self.accept()
        metrics.SOCKETS_OPEN.inc()
        self.counted_open = True

        try:
            await get_hub().join(self.room.pk, self.room.slug, self)
        except Exception:
            logger.exception("socket closed: hub join failed room=%s user=%s", self.room.pk, user.pk)
            await self.close(CLOSE_SERVER_ERROR)
            return
        logger.info(
            "socket connected room=%s user=%s channel=%s after=%s", self.room.pk, user.pk, self.socket_id, after
        )
        if get_hub().is_current(self.room.pk, self.next_seq):
            # Nothing was committed since the room was read: skip the replay query.
            self.live = True
        else:
            self.start_catch_up()

        self.presence = Connection(room=self.room.slug, conn_id=self.socket_id, user=user.get_username())
        try:
            await get_tracker().track(self.presence)
            await self.send(text_data=render_presence_list(await get_store().online(self.room.slug)))
        except ConnectionLimitReached as exc:
            logger.info("socket rejected: %s room=%s user=%s channel=%s", exc, self.room.pk, user.pk, self.socket_id)
            self.presence = None
            await self.close(CLOSE_TOO_MANY_SOCKETS)
            return
        except Exception:
            # Presence is secondary: the socket keeps its messages, and the
            # next heartbeat lists the connection again.
            logger.exception("presence join failed room=%s user=%s channel=%s", self.room.pk, user.pk, self.socket_id)
        frames_to_send, self.held_frames = self.held_frames, None
        for frame in frames_to_send:
            await self.send(text_data=frame)

    async def reject(self, code: int) -> None:
        # Accept first: a close before accept becomes an HTTP 403 and the
        # client would never see the code.
        await self.accept()
        await self.close(code)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Daphne cancels a consumer that is still busy (in connect, say)
            # when application_close_timeout passes after the client left.
            # Then disconnect() never runs, so release the socket's state here too.
            await self.release()

    async def disconnect(self, code: int) -> None:
        await self.release(code)

    async def release(self, code: int | None = None) -> None:
        """Leave the hub and presence; safe to call more than once."""
        room = getattr(self, "room", None)
        if room is None:
            return
        self.room = None
        if self.counted_open:
            metrics.SOCKETS_OPEN.dec()
            self.counted_open = False
        if self.catch_up_task is not None:
            self.catch_up_task.cancel()
        try:
            await get_hub().leave(room.pk, self)
            if self.presence is not None:
                await get_tracker().untrack(self.presence)
        except Exception:
            logger.exception(
                "socket release failed room=%s channel=%s; presence expires after the TTL", room.pk, self.socket_id
            )
        logger.info(
            "socket disconnected room=%s user=%s channel=%s code=%s", room.pk, self.scope["user"].pk, self.socket_id, code
        )

    async def deliver(self, seq: int, frame: str) -> None:
        """Send one message frame, keeping this socket's order gap-free and duplicate-free."""
        if not self.live:
            self.max_seen = max(self.max_seen, seq)
            return
        if seq < self.next_seq:
            return
        if seq > self.next_seq:
            logger.info(
                "socket gap room=%s channel=%s expected=%s received=%s", self.room.pk, self.socket_id, self.next_seq, seq
            )
            self.max_seen = seq
            self.start_catch_up()
            return
        self.next_seq = seq + 1
        metrics.DELIVERIES.inc()
        await self.send(text_data=frame)

    def belongs_to(self, user_id: int) -> bool:
        return self.scope["user"].pk == user_id

    async def close_banned(self) -> None:
        logger.info("socket closed: user banned room=%s user=%s channel=%s", self.room.pk, self.scope["user"].pk, self.socket_id)
        await self.close(CLOSE_BANNED)

    async def send_unordered(self, frame: str) -> None:
        """Send a frame that carries no seq, such as a presence change."""
        if self.held_frames is not None:
            self.held_frames.append(frame)
            return
        await self.send(text_data=frame)

    def start_catch_up(self) -> None:
        self.live = False
        if self.catch_up_task is None or self.catch_up_task.done():
            self.catch_up_task = asyncio.ensure_future(self.catch_up())

    async def catch_up(self) -> None:
        """Send stored messages from next_seq on, in pages, then go live."""
        page_size = settings.CHAT_REPLAY_PAGE_SIZE
        try:
            while True:
                last_seq, count, frame = await database_sync_to_async(_replay_page)(
                    self.room.pk, self.next_seq - 1, page_size
                )
                if count:
                    metrics.REPLAYED.inc(count)
                    self.next_seq = last_seq + 1
                    await self.send(text_data=frame)
                if count < page_size and self.max_seen < self.next_seq:
                    self.live = True
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("replay failed room=%s channel=%s next_seq=%s", self.room.pk, self.socket_id, self.next_seq)
            await self.close(CLOSE_SERVER_ERROR)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.room is None:
            return
        user = self.scope["user"]

        if text_data is None:
            await self.send_error("not_text", "Frames must be JSON text, not binary.")
            return
        try:
            payload = json.loads(text_data)
        except ValueError:
            await self.send_error("invalid_json", "Frame is not valid JSON.")
            return
        if not isinstance(payload, dict):
            await self.send_error("not_object", "Frame must be a JSON object with a body field.")
            return

        client_id = payload.get("client_id")
        echoed_client_id = client_id if isinstance(client_id, str) and len(client_id) <= 64 else None
        wait_seconds = await get_rate_limiter().take(user.pk)
        if wait_seconds:
            logger.info("frame rejected room=%s user=%s channel=%s code=rate_limited", self.room.pk, user.pk, self.socket_id)
            await self.send_error(
                "rate_limited", f"Too many messages: wait {wait_seconds:.1f} s, then send again.", echoed_client_id
            )
            return
        try:
            result, events = await database_sync_to_async(_post)(self.room, user, payload.get("body"), client_id)
        except MessageRejected as exc:
            logger.info(
                "frame rejected room=%s user=%s channel=%s code=%s", self.room.pk, user.pk, self.socket_id, exc.code
            )
            await self.send_error(exc.code, exc.text, echoed_client_id)
            return
        for group, event in events:
            try:
                await get_channel_layer().group_send(group, event)
            except Exception:
                # The message is committed: the gap check of every node delivers it.
                logger.exception("publish failed room=%s seq=%s channel=%s", self.room.pk, event.get("seq"), self.socket_id)
        await self.send(text_data=render_ack_frame(result.message))

    async def send_error(self, code: str, text: str, client_id: str | None = None) -> None:
        metrics.REJECTED_FRAMES.labels(code=code).inc()
        await self.send(text_data=render_error_frame(code, text, client_id))


def _post(room: Room, author, body: object, client_id: object) -> tuple[PostResult, list[tuple[str, dict]]]:
    # The events are published by the caller on the event loop, after commit,
    # so that this database thread does not wait for Redis.
    with deferred_publishing() as events:
        result = message_create(room=room, author=author, body=body, client_id=client_id)
    return result, events


def _replay_page(room_id: int, after_seq: int, limit: int) -> tuple[int, int, str]:
    messages = selectors.messages_after(room_id, after_seq, limit)
    if not messages:
        return after_seq, 0, ""
    return messages[-1].seq, len(messages), render_messages_frame(messages)
