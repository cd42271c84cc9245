"""A per-user token bucket for posting, shared by every node through Redis."""
from __future__ import annotations

import logging
import math
import time

import redis.asyncio as redis
from django.conf import settings

from presence.loop_local import LoopLocal

logger = logging.getLogger(__name__)

# KEYS[1]: the user's bucket. ARGV: refill rate in tokens a second, burst size.
# Returns -1 when a token was taken, else the milliseconds until one is free.
# The clock is the Redis server's, so nodes whose clocks disagree share one bucket.
TAKE_TOKEN = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(bucket[1]) or burst
local at = tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + (now - at) * rate)
local wait_ms = -1
if tokens >= 1 then
  tokens = tokens - 1
else
  wait_ms = math.ceil((1 - tokens) / rate * 1000)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return wait_ms
"""


class RedisRateLimiter:
    def __init__(self, url: str, prefix: str) -> None:
        # Each take is one short script call, so a few connections serve a node.
        pool = redis.BlockingConnectionPool.from_url(url, max_connections=4, timeout=10)
        self.client = redis.Redis(connection_pool=pool)
        self.prefix = prefix
        self._take = self.client.register_script(TAKE_TOKEN)

    async def take(self, user_id: int) -> float:
        """Take a token for the user; return 0 when allowed, else the seconds until a token is free."""
        try:
            wait_ms = await self._take(
                keys=[f"{self.prefix}:{user_id}"],
                args=[settings.CHAT_RATE_LIMIT_PER_SECOND, settings.CHAT_RATE_LIMIT_BURST],
            )
        except redis.RedisError as exc:
            # Fail open: while Redis is down, posts are stored in PostgreSQL
            # and delivered by the gap check, so refusing them would lose more.
            logger.warning("rate limit check failed user=%s: %s; allowing the post", user_id, exc)
            return 0.0
        return 0.0 if wait_ms < 0 else wait_ms / 1000

    async def close(self) -> None:
        await self.client.aclose()
        await self.client.connection_pool.disconnect()


class MemoryRateLimiter:
    """The same bucket for one process, used while REDIS_URL is unset."""

    def __init__(self) -> None:
        self._buckets: dict[int, tuple[float, float]] = {}

    async def take(self, user_id: int) -> float:
        rate, burst = settings.CHAT_RATE_LIMIT_PER_SECOND, settings.CHAT_RATE_LIMIT_BURST
        now = time.monotonic()
        tokens, at = self._buckets.get(user_id, (burst, now))
        tokens = min(burst, tokens + (now - at) * rate)
        if tokens >= 1:
            self._buckets[user_id] = (tokens - 1, now)
            return 0.0
        self._buckets[user_id] = (tokens, now)
        return math.ceil((1 - tokens) / rate * 1000) / 1000

    async def close(self) -> None:
        return None


def _make_limiter() -> RedisRateLimiter | MemoryRateLimiter:
    if settings.REDIS_URL:
        return RedisRateLimiter(settings.REDIS_URL, f"{settings.CHANNEL_PREFIX}:ratelimit")
    return MemoryRateLimiter()


_limiters: LoopLocal[RedisRateLimiter | MemoryRateLimiter] = LoopLocal(_make_limiter)


def get_rate_limiter() -> RedisRateLimiter | MemoryRateLimiter:
    """Return the running event loop's rate limiter."""
    return _limiters.get()


async def close_rate_limiter() -> None:
    limiter = _limiters.pop()
    if limiter is not None:
        await limiter.close()
