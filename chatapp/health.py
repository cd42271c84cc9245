"""Probes for load balancers: /healthz reports that the process serves, /readyz that its stores respond."""
from __future__ import annotations

import logging

from asgiref.sync import async_to_sync
from django.conf import settings
from django.contrib.auth.decorators import login_not_required
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from redis import asyncio as redis

logger = logging.getLogger(__name__)


@login_not_required
@never_cache
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@login_not_required
@never_cache
def readyz(request: HttpRequest) -> JsonResponse:
    """Return 200 when the database and Redis respond, else 503 naming the failed check."""
    checks = {"database": _check_database(), "redis": _check_redis()}
    ready = all(result in ("ok", "not used") for result in checks.values())
    return JsonResponse({"status": "ok" if ready else "unavailable", "checks": checks}, status=200 if ready else 503)


def _check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        logger.warning("readiness check failed: database: %s", exc)
        return f"failed: {type(exc).__name__}"
    return "ok"


def _check_redis() -> str:
    if not settings.REDIS_URL:
        return "not used"  # the in-memory layer has nothing to reach

    async def ping() -> None:
        client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        async_to_sync(ping)()
    except Exception as exc:
        logger.warning("readiness check failed: redis: %s", exc)
        return f"failed: {type(exc).__name__}"
    return "ok"
