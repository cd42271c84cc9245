"""Helpers for multi-node tests: a private Redis server and a client that follows its node's drain."""
from __future__ import annotations

import asyncio
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis

from tests.support import DaphneNode, SocketClient, free_port


@dataclass
class PrivateRedis:
    """A redis-server of the test's own, which the test may kill and restart."""

    port: int
    directory: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
            finally:
                client.close()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 10 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@contextmanager
def private_redis(directory: Path):
    server = PrivateRedis(port=free_port(), directory=directory)
    server.start()
    try:
        yield server
    finally:
        server.kill()


class FollowingClient:
    """A socket that, when its node closes it, reconnects to the next node and resumes after its last seq."""

    def __init__(self, nodes: list[DaphneNode], slug: str, cookie: str) -> None:
        self.nodes = nodes
        self.slug = slug
        self.cookie = cookie
        self.seqs: list[int] = []
        self.close_codes: list[int | None] = []
        self.current: SocketClient | None = None
        self._stopped = False
        self._task: asyncio.Task | None = None

    async def start(self, node_index: int = 0) -> None:
        self.current = await SocketClient.connect(self.nodes[node_index], self.slug, self.cookie, after=0)
        self._task = asyncio.ensure_future(self._follow(node_index))

    async def _follow(self, node_index: int) -> None:
        while not self._stopped:
            await self.current.reader
            self.seqs.extend(self.current.seqs())
            self.close_codes.append(self.current.connection.close_code)
            if self._stopped:
                return
            node_index = (node_index + 1) % len(self.nodes)
            after = self.seqs[-1] if self.seqs else 0
            for _ in range(50):
                try:
                    self.current = await SocketClient.connect(self.nodes[node_index], self.slug, self.cookie, after=after)
                    break
                except Exception:  # noqa: BLE001 - a refused or failed handshake: try the next node
                    node_index = (node_index + 1) % len(self.nodes)
                    await asyncio.sleep(0.1)

    def all_seqs(self) -> list[int]:
        return self.seqs + (self.current.seqs() if self.current and not self.current.reader.done() else [])

    async def stop(self) -> None:
        self._stopped = True
        if self.current is not None:
            await self.current.close()
        if self._task is not None:
            await self._task
