"""The per-process room hub: one subscription per room, one frame per message.

Each process has one hub per event loop. The hub subscribes one channel to
the group of every room that has a local socket, receives each message event
once and hands its pre-rendered frame to the room's local sockets in seq
order. It fills gaps from the database in two cases. One is an event that
arrives with a seq beyond the next expected one. The other is a committed
message whose event has not arrived within one gap-check interval, after a
dropped publish or a node that crashed between commit and publish.

The hub orders per room and process. Each socket still keeps its own
next_seq (see RoomConsumer), so that replay after connect and live delivery
meet without a gap or a duplicate.
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Protocol

from autobahn.exception import Disconnected
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings

from chatapp import metrics, selectors
from chatapp.broadcast import (
    BAN_EVENT,
    CONTROL_GROUP,
    MESSAGE_EVENT,
    PRESENCE_EVENT,
    REMOVAL_EVENT,
    message_event,
    room_group_name,
)
from chatapp.rendering import render_presence_changes
from presence.store import get_store

logger = logging.getLogger(__name__)


class RoomSocket(Protocol):
    """A local socket that the hub hands message frames to."""

    async def deliver(self, seq: int, frame: str) -> None: ...

    async def send_unordered(self, frame: str) -> None: ...

    def belongs_to(self, user_id: int) -> bool: ...

    async def close_banned(self) -> None: ...


@dataclass(eq=False)
class RoomFeed:
    """The hub's state for one room: its local sockets and the next seq to dispatch."""

    room_id: int
    slug: str
    sockets: set[RoomSocket] = field(default_factory=set)
    # None until the subscription is ready and the room's last_seq is read.
    next_seq: int | None = None
    # A seq the last gap check saw committed but not yet dispatched.
    suspect_seq: int | None = None
    ready: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Users whose presence changed since the last presence frame, and the
    # task that sends the next one.
    presence_pending: set[str] = field(default_factory=set)
    presence_flush: asyncio.Task | None = None
    presence_sent_at: float = float("-inf")


class RoomHub:
    def __init__(self) -> None:
        self.layer = get_channel_layer()
        self.channel: str | None = None
        self.feeds: dict[int, RoomFeed] = {}
        # Presence events name rooms by slug; while a room has a local socket
        # its id comes from here instead of a query.
        self.room_ids: dict[str, int] = {}
        self._channel_ready: asyncio.Lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []

    async def join(self, room_id: int, slug: str, socket: RoomSocket) -> None:
        """Add a socket to the room, subscribing this process to it on the first one.

        Returns once the subscription is live, so that every message committed
        after this returns reaches the socket through deliver().
        """
        feed = self.feeds.get(room_id)
        if feed is None:
            feed = RoomFeed(room_id=room_id, slug=slug)
            self.feeds[room_id] = feed
            self.room_ids[slug] = room_id
            asyncio.ensure_future(self._subscribe(feed))
        feed.sockets.add(socket)
        await asyncio.shield(feed.ready)

    def room_id_for_slug(self, slug: str) -> int | None:
        """Return the id of a room with a socket in this process, or None."""
        return self.room_ids.get(slug)

    def is_current(self, room_id: int, next_seq: int) -> bool:
        """Return True when every message from next_seq on is still to be dispatched to the room's sockets.

        A socket that joined with that next_seq then needs no replay: the hub
        dispatches every later message to it. False while a dispatch or gap
        fill runs, because that may have taken its list of sockets before the
        socket joined.
        """
        feed = self.feeds.get(room_id)
        return feed is not None and feed.next_seq == next_seq and not feed.lock.locked()

    async def leave(self, room_id: int, socket: RoomSocket) -> None:
        """Remove a socket, unsubscribing from the room after its last local socket."""
        feed = self.feeds.get(room_id)
        if feed is None:
            return
        feed.sockets.discard(socket)
        if feed.sockets:
            return

        del self.feeds[room_id]
        self.room_ids.pop(feed.slug, None)
        if feed.presence_flush is not None:
            feed.presence_flush.cancel()
        if self.channel is not None and feed.ready.done() and feed.ready.exception() is None:
            try:
                await self.layer.group_discard(room_group_name(room_id), self.channel)
            except Exception:
                logger.exception("unsubscribe failed room=%s channel=%s", room_id, self.channel)
            logger.info("room unsubscribed room=%s channel=%s", room_id, self.channel)

    async def close(self) -> None:
        """Stop the hub's tasks; used at shutdown and between tests."""
        for feed in self.feeds.values():
            if feed.presence_flush is not None:
                feed.presence_flush.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._tasks.clear()
        self.feeds.clear()
        self.room_ids.clear()
        self.channel = None

    async def _subscribe(self, feed: RoomFeed) -> None:
        try:
            await self._ensure_channel()
            await self.layer.group_add(room_group_name(feed.room_id), self.channel)
            last_seq = await database_sync_to_async(selectors.room_last_seq)(feed.room_id)
        except Exception as exc:
            logger.exception("subscribe failed room=%s", feed.room_id)
            if self.feeds.get(feed.room_id) is feed:
                del self.feeds[feed.room_id]
                self.room_ids.pop(feed.slug, None)
            feed.ready.set_exception(exc)
            return

        if self.feeds.get(feed.room_id) is not feed:
            # Every socket left while the subscription started. A newer feed
            # of the same room shares the group membership, so keep it then.
            if feed.room_id not in self.feeds:
                await self.layer.group_discard(room_group_name(feed.room_id), self.channel)
            feed.ready.set_result(None)
            return

        # Events that arrived while the subscription started may have moved
        # next_seq already; never move it back.
        feed.next_seq = max(feed.next_seq or 0, last_seq + 1)
        feed.ready.set_result(None)
        logger.info("room subscribed room=%s channel=%s next_seq=%s", feed.room_id, self.channel, feed.next_seq)

    async def _ensure_channel(self) -> None:
        async with self._channel_ready:
            if self.channel is not None:
                return
            self.channel = await self.layer.new_channel()
            await self.layer.group_add(CONTROL_GROUP, self.channel)
            self._tasks.append(asyncio.ensure_future(self._receive_loop()))
            self._tasks.append(asyncio.ensure_future(self._gap_check_loop()))
            logger.info("hub started channel=%s", self.channel)

    async def _receive_loop(self) -> None:
        while True:
            event = await self.layer.receive(self.channel)
            try:
                await self._on_event(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception(
                    "event handling failed room=%s seq=%s; the gap check will retry",
                    event.get("room"),
                    event.get("seq"),
                )

    async def _on_event(self, event: dict) -> None:
        event_type = event.get("type")
        if event_type == BAN_EVENT:
            await self._on_ban(event["user"])
            return
        if event_type not in (MESSAGE_EVENT, PRESENCE_EVENT, REMOVAL_EVENT):
            logger.warning("unknown event type=%r channel=%s", event_type, self.channel)
            return
        feed = self.feeds.get(event["room"])
        if feed is None:
            return
        if event_type == PRESENCE_EVENT:
            await self._on_presence_event(feed, event)
            return
        if event_type == REMOVAL_EVENT:
            await self._dispatch_unordered(feed, event["frame"])
            return

        seq = event["seq"]
        async with feed.lock:
            if feed.next_seq is not None and seq > feed.next_seq:
                logger.info(
                    "gap room=%s expected=%s received=%s; filling from the database",
                    feed.room_id,
                    feed.next_seq,
                    seq,
                )
                await self._fill(feed, up_to_seq=seq - 1)
            if seq >= (feed.next_seq or 0) and "committed_at" in event:
                metrics.DELIVERY_LATENCY.observe(max(0.0, time.time() - event["committed_at"]))
            # An event below next_seq still goes out: sockets drop what they
            # hold, and one that is replaying records that it exists.
            await self._dispatch(feed, seq, event["frame"])
            feed.next_seq = max(feed.next_seq or 0, seq + 1)

    async def _on_presence_event(self, feed: RoomFeed, event: dict) -> None:
        """Queue the user for the room's next presence frame.

        One frame per room carries every change of the last
        CHAT_PRESENCE_BATCH_INTERVAL. Without that, each of a room's N joins
        would go to all N sockets, N squared frames while a room fills.
        A quiet room's first change goes out at once.
        """
        feed.presence_pending.add(event["user"])
        if feed.presence_flush is None:
            delay = feed.presence_sent_at + settings.CHAT_PRESENCE_BATCH_INTERVAL - time.monotonic()
            feed.presence_flush = asyncio.ensure_future(self._flush_presence(feed, max(0.0, delay)))

    async def _flush_presence(self, feed: RoomFeed, delay: float) -> None:
        await asyncio.sleep(delay)
        users, feed.presence_pending = feed.presence_pending, set()
        try:
            # The frame states each user's state as read now, after their
            # events arrived, so it is right even when announcements from two
            # nodes crossed in Redis. Events that arrive during the read go
            # into the next frame, which reads again.
            online = await get_store().online(feed.slug)
            feed.presence_sent_at = time.monotonic()
            await self._dispatch_unordered(feed, render_presence_changes([(user, user in online) for user in sorted(users)]))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("presence frame failed room=%s users=%s", feed.room_id, len(users))
        finally:
            feed.presence_flush = None
        if feed.presence_pending and self.feeds.get(feed.room_id) is feed:
            delay = feed.presence_sent_at + settings.CHAT_PRESENCE_BATCH_INTERVAL - time.monotonic()
            feed.presence_flush = asyncio.ensure_future(self._flush_presence(feed, max(0.0, delay)))

    async def _on_ban(self, user_id: int) -> None:
        sockets = [socket for feed in self.feeds.values() for socket in feed.sockets if socket.belongs_to(user_id)]
        for socket in sockets:
            await socket.close_banned()
        logger.info("ban applied user=%s closed_sockets=%s channel=%s", user_id, len(sockets), self.channel)

    async def _gap_check_loop(self) -> None:
        interval = settings.CHAT_GAP_CHECK_INTERVAL
        while True:
            await asyncio.sleep(interval)
            try:
                await self._gap_check()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("gap check failed channel=%s rooms=%s", self.channel, list(self.feeds))

    async def _gap_check(self) -> None:
        """Deliver messages committed more than one interval ago whose event never arrived.

        A message seen committed at one check and still not dispatched at the
        next is filled from the database, so a lost event arrives within two
        intervals. An event that is merely in flight costs no query.
        """
        feeds = [feed for feed in self.feeds.values() if feed.next_seq is not None]
        if not feeds:
            return
        last_seqs = await database_sync_to_async(selectors.rooms_last_seq)([feed.room_id for feed in feeds])

        for feed in feeds:
            async with feed.lock:
                if feed.suspect_seq is not None and feed.suspect_seq >= feed.next_seq:
                    logger.info(
                        "gap check room=%s filling %s..%s", feed.room_id, feed.next_seq, feed.suspect_seq
                    )
                    await self._fill(feed, up_to_seq=feed.suspect_seq)
                last_seq = last_seqs.get(feed.room_id, 0)
                feed.suspect_seq = last_seq if last_seq >= feed.next_seq else None

    async def _fill(self, feed: RoomFeed, up_to_seq: int) -> None:
        page_size = settings.CHAT_REPLAY_PAGE_SIZE
        while feed.next_seq <= up_to_seq:
            events = await database_sync_to_async(_message_events_after)(
                feed.room_id, feed.next_seq - 1, page_size, up_to_seq
            )
            if not events:
                logger.error(
                    "gap fill found nothing room=%s after=%s up_to=%s", feed.room_id, feed.next_seq - 1, up_to_seq
                )
                return
            metrics.GAP_FILLS.inc(len(events))
            for event in events:
                await self._dispatch(feed, event["seq"], event["frame"])
                feed.next_seq = event["seq"] + 1

    async def _dispatch_unordered(self, feed: RoomFeed, frame: str) -> None:
        for socket in list(feed.sockets):
            try:
                await socket.send_unordered(frame)
            except asyncio.CancelledError:
                raise
            except Disconnected:
                # The socket closed and its disconnect has not run yet.
                logger.info("unordered send skipped: socket closed room=%s socket=%r", feed.room_id, socket)
            except Exception:
                # A socket closing meanwhile must not keep the frame from the others.
                logger.exception("unordered send failed room=%s socket=%r", feed.room_id, socket)

    async def _dispatch(self, feed: RoomFeed, seq: int, frame: str) -> None:
        for socket in list(feed.sockets):
            try:
                await socket.deliver(seq, frame)
            except asyncio.CancelledError:
                raise
            except Disconnected:
                logger.info("delivery skipped: socket closed room=%s seq=%s socket=%r", feed.room_id, seq, socket)
            except Exception:
                logger.exception("delivery failed room=%s seq=%s socket=%r", feed.room_id, seq, socket)


def _message_events_after(room_id: int, after_seq: int, limit: int, up_to_seq: int) -> list[dict]:
    messages = selectors.messages_after(room_id, after_seq, limit, up_to_seq=up_to_seq)
    return [message_event(message) for message in messages]


_hubs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, RoomHub] = weakref.WeakKeyDictionary()


def get_hub() -> RoomHub:
    """Return the hub of the running event loop, creating it on first use."""
    loop = asyncio.get_running_loop()
    hub = _hubs.get(loop)
    if hub is None:
        hub = RoomHub()
        _hubs[loop] = hub
    return hub


async def close_hub() -> None:
    """Close the running loop's hub, if it has one."""
    hub = _hubs.pop(asyncio.get_running_loop(), None)
    if hub is not None:
        await hub.close()
