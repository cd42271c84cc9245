"""A node's heartbeat: refresh its own connections and reap everyone's expired ones.

Each node refreshes only the connections it holds, so a crashed node's
connections stop being refreshed and expire after the TTL; the next
heartbeat of any node reaps them and announces the leaves. Reaping is
idempotent and safe on every node at once (see presence.scripts).
"""
from __future__ import annotations

import asyncio
import logging

from prometheus_client import Counter, Gauge

from presence import conf
from presence.loop_local import LoopLocal
from presence.signals import presence_changed
from presence.store import Connection, ConnectionLimitReached, get_store

logger = logging.getLogger(__name__)

TRACKED = Gauge("presence_connections_tracked", "Connections this node lists and refreshes.")
REAPED = Counter("presence_users_reaped_total", "Users this node announced as gone after their last connection expired.")


class PresenceTracker:
    def __init__(self) -> None:
        self.connections: dict[str, Connection] = {}
        self._heartbeat: asyncio.Task | None = None

    async def track(self, connection: Connection) -> None:
        """List a new local connection, announcing the user when it is their first in the room."""
        self.connections[connection.conn_id] = connection
        TRACKED.set(len(self.connections))
        if self._heartbeat is None:
            self._heartbeat = asyncio.ensure_future(self._heartbeat_loop())
            logger.info(
                "presence heartbeat started interval=%ss ttl=%ss", conf.heartbeat_interval(), conf.ttl()
            )
        try:
            first = await get_store().join(connection)
        except ConnectionLimitReached:
            del self.connections[connection.conn_id]
            TRACKED.set(len(self.connections))
            raise
        if first:
            await announce(connection.room, connection.user, online=True)

    async def untrack(self, connection: Connection) -> None:
        """Stop refreshing a closed connection; the reaper announces the leave after the grace period."""
        self.connections.pop(connection.conn_id, None)
        TRACKED.set(len(self.connections))
        await get_store().release(connection)

    async def heartbeat(self) -> None:
        """Refresh this node's connections, then reap expired ones on every node's behalf."""
        store = get_store()
        # A connection reaped while this node was stalled (or lost with a
        # Redis restart) comes back here, and its user is announced again.
        for connection in await store.refresh(list(self.connections.values())):
            logger.info("presence restored room=%s user=%s conn=%s", connection.room, connection.user, connection.conn_id)
            await announce(connection.room, connection.user, online=True)
        for room, user in await store.reap():
            logger.info("presence reaped room=%s user=%s", room, user)
            REAPED.inc()
            await announce(room, user, online=False)
        await store.trim_idle()

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            try:
                await self._heartbeat
            except asyncio.CancelledError:
                pass
            self._heartbeat = None
        self.connections.clear()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(conf.heartbeat_interval())
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("presence heartbeat failed connections=%s; retrying next interval", len(self.connections))


async def announce(room: str, user: str, online: bool) -> None:
    results = await presence_changed.asend_robust(sender=PresenceTracker, room=room, user=user, online=online)
    for receiver, result in results:
        if isinstance(result, Exception):
            logger.error(
                "presence receiver %r failed room=%s user=%s online=%s",
                receiver,
                room,
                user,
                online,
                exc_info=result,
            )


_trackers: LoopLocal[PresenceTracker] = LoopLocal(PresenceTracker)


def get_tracker() -> PresenceTracker:
    """Return the running event loop's tracker."""
    return _trackers.get()


async def close_tracker() -> None:
    """Stop the running loop's heartbeat and close its store; used at shutdown and between tests."""
    tracker = _trackers.pop()
    if tracker is not None:
        await tracker.close()
    from presence.store import _stores

    store = _stores.pop()
    if store is not None:
        await store.close()
