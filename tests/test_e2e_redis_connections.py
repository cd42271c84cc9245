"""Redis client connections stay bounded while thousands of sockets come and go."""
from __future__ import annotations

import asyncio
from contextlib import ExitStack

import pytest
import redis
from channels.db import database_sync_to_async

from tests.cluster import private_redis
from tests.support import SocketClient, running_daphne

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SOCKETS = 5000
USERS = 50
# Per node: the presence pool (10) and the pool it retired at the last
# heartbeat (10 more until the next one), the channel layer's pub/sub and
# publish connections (2) and the rate limiter's pool (4).
MAX_PER_NODE = 2 * 10 + 2 + 4


def connected_clients(url: str) -> int:
    client = redis.Redis.from_url(url)
    try:
        # Minus this client itself.
        return client.info("clients")["connected_clients"] - 1
    finally:
        client.close()


async def test_redis_connections_bounded_under_socket_churn(tmp_path, room, make_user, cookie_for):
    users = [await database_sync_to_async(make_user)(f"crowd{number}") for number in range(USERS)]
    cookies = [await cookie_for(user) for user in users]

    with private_redis(tmp_path) as redis_server, ExitStack() as stack:
        env = {"REDIS_URL": redis_server.url, "PRESENCE_HEARTBEAT_INTERVAL": "2", "PRESENCE_MAX_CONNECTIONS_PER_USER": "0"}
        nodes = [stack.enter_context(running_daphne(tmp_path, env, server="node")) for _ in range(2)]
        warmup = [await SocketClient.connect(node, room.slug, cookies[0]) for node in nodes]
        await asyncio.sleep(0.5)
        baseline = connected_clients(redis_server.url)

        sockets: list[SocketClient] = []
        peak = baseline
        for start in range(0, SOCKETS, 100):
            batch = [
                SocketClient.connect(nodes[number % 2], room.slug, cookies[number % USERS])
                for number in range(start, start + 100)
            ]
            sockets.extend(await asyncio.gather(*batch))
            peak = max(peak, connected_clients(redis_server.url))
        await asyncio.sleep(1)
        peak = max(peak, connected_clients(redis_server.url))

        for start in range(0, len(sockets), 500):
            await asyncio.gather(*(socket.close() for socket in sockets[start : start + 500]))
            peak = max(peak, connected_clients(redis_server.url))
        # One heartbeat (2 s here) trims the presence pool's idle connections.
        await asyncio.sleep(4.5)
        after = connected_clients(redis_server.url)

        assert len(sockets) == SOCKETS
        assert peak <= MAX_PER_NODE * len(nodes), f"baseline={baseline} peak={peak}"
        assert after <= baseline + 2, f"baseline={baseline} after={after}"
        for socket in warmup:
            await socket.close()
