"""Presence settings, each with a default; all durations are in seconds."""
from __future__ import annotations

from django.conf import settings


def heartbeat_interval() -> float:
    """Seconds between a node's refreshes of its own connections and reaps of expired ones."""
    return float(getattr(settings, "PRESENCE_HEARTBEAT_INTERVAL", 5.0))


def ttl() -> float:
    """Seconds a connection stays listed without a refresh, for example after its node crashed."""
    return float(getattr(settings, "PRESENCE_TTL", 15.0))


def leave_grace() -> float:
    """Seconds a closed connection stays listed, so that a quick reconnect shows no leave and join."""
    return float(getattr(settings, "PRESENCE_LEAVE_GRACE", 3.0))


def redis_pool_size() -> int:
    """Maximum Redis connections of one process's presence store."""
    return int(getattr(settings, "PRESENCE_REDIS_POOL_SIZE", 10))


def max_connections_per_user() -> int:
    """Most unexpired connections one user may hold in all rooms together; 0 means no maximum."""
    return int(getattr(settings, "PRESENCE_MAX_CONNECTIONS_PER_USER", 20))


def key_prefix() -> str:
    return getattr(settings, "PRESENCE_KEY_PREFIX", "presence")


def redis_url() -> str:
    return getattr(settings, "REDIS_URL", "")
