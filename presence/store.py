"""Presence stores: Redis for many nodes, memory for the single-process default.

Both stores list connections, not users: a user is online in a room while
at least one of their connections is listed, so many tabs or an overlapping
reconnect still show them once. State is proportional to live connections
and keeps no history.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as redis

from presence import conf, scripts
from presence.loop_local import LoopLocal

logger = logging.getLogger(__name__)

# Connections removed per room and reap call, so that one reap of a room
# with a huge backlog cannot hold Redis for long.
REAP_BATCH = 1000
# Connections refreshed per pipeline round trip.
REFRESH_BATCH = 500


class ConnectionLimitReached(Exception):
    """The user already has the maximum number of connections open."""


@dataclass(frozen=True)
class Connection:
    room: str
    conn_id: str
    user: str


class PresenceStore(Protocol):
    async def join(self, connection: Connection) -> bool:
        """List or refresh a connection; return True when it is the user's first in the room.

        Raise ConnectionLimitReached for a new connection of a user who has
        PRESENCE_MAX_CONNECTIONS_PER_USER unexpired ones in all rooms.
        """

    async def refresh(self, connections: list[Connection]) -> list[Connection]:
        """Extend the expiry of live connections; return those that had been reaped and are listed again."""

    async def release(self, connection: Connection) -> None:
        """Let a closed connection expire after the leave grace period."""

    async def reap(self) -> list[tuple[str, str]]:
        """Remove expired connections; return (room, user) for each user who went offline."""

    async def online(self, room: str) -> dict[str, int]:
        """Return the room's online users with their connection counts."""

    async def trim_idle(self) -> None:
        """Release resources that a burst left idle."""

    async def is_online(self, room: str, user: str) -> bool:
        """Return whether the user has a listed connection in the room."""

    async def expired_count(self, room: str) -> int:
        """Return how many of the room's connections have expired but are not reaped yet."""

    async def rooms(self) -> list[str]:
        """Return the rooms that have listed connections."""

    async def close(self) -> None: ...


class RedisPresenceStore:
    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.client = redis.Redis(connection_pool=self._new_pool())
        self._retired_pool: redis.ConnectionPool | None = None
        self.prefix = prefix
        self._join = self.client.register_script(scripts.JOIN)
        self._release = self.client.register_script(scripts.RELEASE)
        self._reap = self.client.register_script(scripts.REAP)

    def _new_pool(self) -> redis.BlockingConnectionPool:
        # A bounded pool: a burst of connects waits for a free Redis
        # connection instead of opening one per socket.
        return redis.BlockingConnectionPool.from_url(
            self.url, max_connections=conf.redis_pool_size(), timeout=10, decode_responses=True
        )

    def _keys(self, room: str) -> list[str]:
        base = f"{self.prefix}:{{{room}}}"
        return [f"{base}:conns", f"{base}:owners", f"{base}:users", f"{self.prefix}:rooms"]

    @property
    def _user_key_prefix(self) -> str:
        return f"{self.prefix}:user:"

    def _join_call(self, connection: Connection) -> dict:
        return {
            "keys": [*self._keys(connection.room), self._user_key_prefix + connection.user],
            "args": [
                connection.conn_id,
                connection.user,
                int(conf.ttl() * 1000),
                connection.room,
                conf.max_connections_per_user(),
            ],
        }

    async def join(self, connection: Connection) -> bool:
        result = await self._join(**self._join_call(connection))
        if result == -1:
            raise ConnectionLimitReached(
                f"user {connection.user} already has {conf.max_connections_per_user()} connections open"
            )
        return result == 1

    async def refresh(self, connections: list[Connection]) -> list[Connection]:
        # One pipeline per batch: a node with thousands of sockets refreshes
        # them in a few round trips instead of one each.
        restored = []
        for start in range(0, len(connections), REFRESH_BATCH):
            batch = connections[start : start + REFRESH_BATCH]
            async with self.client.pipeline(transaction=False) as pipe:
                for connection in batch:
                    await self._join(**self._join_call(connection), client=pipe)
                results = await pipe.execute()
            restored.extend(connection for connection, first in zip(batch, results) if first == 1)
        return restored

    async def release(self, connection: Connection) -> None:
        grace_ms = int(conf.leave_grace() * 1000)
        keys = [*self._keys(connection.room), self._user_key_prefix + connection.user]
        await self._release(keys=keys, args=[connection.conn_id, grace_ms])

    async def reap(self) -> list[tuple[str, str]]:
        left = []
        for room in await self.rooms():
            users = await self._reap(keys=self._keys(room), args=[room, REAP_BATCH, self._user_key_prefix])
            left.extend((room, user) for user in users)
        return left

    async def online(self, room: str) -> dict[str, int]:
        counts = await self.client.hgetall(self._keys(room)[2])
        return {user: int(count) for user, count in sorted(counts.items())}

    async def is_online(self, room: str, user: str) -> bool:
        return bool(await self.client.hexists(self._keys(room)[2], user))

    async def expired_count(self, room: str) -> int:
        seconds, microseconds = await self.client.time()
        now_ms = seconds * 1000 + microseconds // 1000
        return await self.client.zcount(self._keys(room)[0], "-inf", now_ms)

    async def rooms(self) -> list[str]:
        return sorted(await self.client.smembers(f"{self.prefix}:rooms"))

    async def trim_idle(self) -> None:
        """Swap in a fresh pool and close the one retired at the previous call.

        After a burst, the connections it opened close within two calls. A
        retired pool gets no new work, so by the next call (one heartbeat
        later) nothing uses its connections. Closing idle connections of a
        live pool instead could close one that a task was just handed.
        """
        if self._retired_pool is not None:
            await self._retired_pool.disconnect()
        self._retired_pool = self.client.connection_pool
        self.client.connection_pool = self._new_pool()

    async def close(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()
        if self._retired_pool is not None:
            await self._retired_pool.disconnect()


@dataclass
class _MemoryRoom:
    expiries: dict[str, float] = field(default_factory=dict)
    owners: dict[str, str] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)


class MemoryPresenceStore:
    """The Redis store's behaviour for one process, used while REDIS_URL is unset."""

    def __init__(self) -> None:
        self._rooms: dict[str, _MemoryRoom] = {}

    async def join(self, connection: Connection) -> bool:
        room = self._rooms.setdefault(connection.room, _MemoryRoom())
        known = connection.conn_id in room.expiries
        maximum = conf.max_connections_per_user()
        if not known and maximum > 0 and self._open_connections(connection.user) >= maximum:
            if not room.expiries:
                del self._rooms[connection.room]
            raise ConnectionLimitReached(f"user {connection.user} already has {maximum} connections open")
        room.expiries[connection.conn_id] = time.monotonic() + conf.ttl()
        if known:
            return False
        room.owners[connection.conn_id] = connection.user
        room.users[connection.user] = room.users.get(connection.user, 0) + 1
        return room.users[connection.user] == 1

    async def refresh(self, connections: list[Connection]) -> list[Connection]:
        return [connection for connection in connections if await self.join(connection)]

    def _open_connections(self, user: str) -> int:
        now = time.monotonic()
        return sum(
            1
            for room in self._rooms.values()
            for conn_id, owner in room.owners.items()
            if owner == user and room.expiries[conn_id] > now
        )

    async def release(self, connection: Connection) -> None:
        room = self._rooms.get(connection.room)
        if room is None or connection.conn_id not in room.expiries:
            return
        grace_expiry = time.monotonic() + conf.leave_grace()
        room.expiries[connection.conn_id] = min(room.expiries[connection.conn_id], grace_expiry)

    async def reap(self) -> list[tuple[str, str]]:
        now = time.monotonic()
        left = []
        for room_key, room in list(self._rooms.items()):
            for conn_id in [conn for conn, expiry in room.expiries.items() if expiry <= now][:REAP_BATCH]:
                del room.expiries[conn_id]
                user = room.owners.pop(conn_id)
                room.users[user] -= 1
                if room.users[user] <= 0:
                    del room.users[user]
                    left.append((room_key, user))
            if not room.expiries:
                del self._rooms[room_key]
        return left

    async def online(self, room: str) -> dict[str, int]:
        memory_room = self._rooms.get(room)
        return dict(sorted(memory_room.users.items())) if memory_room else {}

    async def is_online(self, room: str, user: str) -> bool:
        memory_room = self._rooms.get(room)
        return memory_room is not None and user in memory_room.users

    async def expired_count(self, room: str) -> int:
        memory_room = self._rooms.get(room)
        now = time.monotonic()
        return sum(1 for expiry in memory_room.expiries.values() if expiry <= now) if memory_room else 0

    async def rooms(self) -> list[str]:
        return sorted(self._rooms)

    async def trim_idle(self) -> None:
        return None

    async def close(self) -> None:
        return None


def _make_store() -> PresenceStore:
    url = conf.redis_url()
    if url:
        return RedisPresenceStore(url, conf.key_prefix())
    logger.info("presence store in memory: REDIS_URL is unset, so presence covers this process only")
    return MemoryPresenceStore()


_stores: LoopLocal[PresenceStore] = LoopLocal(_make_store)


async def online_now(room: str) -> dict[str, int]:
    """Return the room's online users through a store of its own, for callers outside the server loop."""
    store = _make_store()
    try:
        return await store.online(room)
    finally:
        await store.close()


def get_store() -> PresenceStore:
    """Return the running event loop's presence store."""
    return _stores.get()
