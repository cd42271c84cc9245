"""Helpers for tests: sessions, frame parsing, real daphne processes and socket clients."""
from __future__ import annotations

import asyncio
import html
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.contrib.sessions.backends.db import SessionStore
from django.db import connection

REPO_ROOT = Path(__file__).resolve().parent.parent

MESSAGE_RE = re.compile(
    r'<article class="message(?: removed)?" data-seq="(?P<seq>\d+)" data-author="(?P<author>[^"]*)"'
    r'(?: data-client-id="(?P<client_id>[^"]*)")?(?: data-removed)?>.*?<p class="body">(?P<body>.*?)</p></article>',
    re.S,
)
ERROR_RE = re.compile(r'data-error="(?P<code>[^"]+)"(?: data-client-id="(?P<client_id>[^"]*)")?>(?P<text>[^<]*)<')
PRESENCE_USER_RE = re.compile(r'<li data-presence-user="(?P<user>[^"]*)"(?: data-presence-change="(?P<change>join|leave)")?')
ACK_RE = re.compile(r'data-ack-seq="(?P<seq>\d+)"(?: data-client-id="(?P<client_id>[^"]*)")?')


@dataclass(frozen=True)
class ReceivedMessage:
    seq: int
    author: str
    client_id: str | None
    body: str


def parse_messages(frame: str) -> list[ReceivedMessage]:
    return [
        ReceivedMessage(
            seq=int(match["seq"]),
            author=match["author"],
            client_id=match["client_id"],
            body=html.unescape(match["body"]),
        )
        for match in MESSAGE_RE.finditer(frame)
    ]


def parse_error(frame: str) -> tuple[str, str | None, str] | None:
    match = ERROR_RE.search(frame)
    if match is None:
        return None
    return match["code"], match["client_id"], html.unescape(match["text"])


def parse_ack(frame: str) -> tuple[int, str | None] | None:
    match = ACK_RE.search(frame)
    if match is None:
        return None
    return int(match["seq"]), match["client_id"]


def parse_presence(frame: str) -> tuple[str, list[tuple[str, str | None]]] | None:
    """Return ("snapshot", [(user, None)...]) or ("change", [(user, "join"|"leave")...]) for a presence frame."""
    if 'id="presence"' not in frame:
        return None
    kind = "snapshot" if 'hx-swap-oob="innerHTML"' in frame else "change"
    return kind, [(match["user"], match["change"]) for match in PRESENCE_USER_RE.finditer(frame)]


def session_cookie(user) -> str:
    """Store a logged-in session for the user and return the Cookie header value."""
    session = SessionStore()
    session[SESSION_KEY] = str(user.pk)
    session[BACKEND_SESSION_KEY] = "django.contrib.auth.backends.ModelBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    return f"{settings.SESSION_COOKIE_NAME}={session.session_key}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def current_database_url() -> str:
    """Return the URL of the test database that pytest-django created."""
    db = connection.settings_dict
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{credentials}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@dataclass
class DaphneNode:
    """A real daphne process serving the app on a free port."""

    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ws_url(self, slug: str, after: int | None = None) -> str:
        query = "" if after is None else f"?after={after}"
        return f"ws://127.0.0.1:{self.port}/ws/rooms/{slug}/{query}"

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


SERVER_COMMANDS = {
    "daphne": ["-m", "daphne", "-b", "127.0.0.1", "-p", "{port}", "chatapp.asgi:application"],
    "runserver": ["manage.py", "runserver", "--noreload", "127.0.0.1:{port}"],
    "node": ["-m", "chatapp.node", "-b", "127.0.0.1", "-p", "{port}", "chatapp.asgi:application"],
}


def start_daphne(
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    server: str = "daphne",
    extra_args: list[str] | None = None,
    port: int | None = None,
) -> DaphneNode:
    """Start the app under daphne, or under `manage.py runserver` (which runs daphne too)."""
    port = port or free_port()
    env = {
        **os.environ,
        "DATABASE_URL": current_database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "CHANNEL_PREFIX": settings.CHANNEL_PREFIX,
        "SECRET_KEY": settings.SECRET_KEY,
        "DEBUG": "0",
        "CHAT_GAP_CHECK_INTERVAL": "0.5",
        # Load tests post faster than a person; the rate-limit tests lower these.
        "CHAT_RATE_LIMIT_PER_SECOND": "1000",
        "CHAT_RATE_LIMIT_BURST": "1000",
        **(extra_env or {}),
    }
    log_path = log_dir / f"daphne-{port}.log"
    log_file = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, *(part.format(port=port) for part in SERVER_COMMANDS[server]), *(extra_args or [])],
        cwd=REPO_ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    node = DaphneNode(port=port, process=process, log_path=log_path)

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"daphne exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return node
        except OSError:
            time.sleep(0.1)
    node.kill(signal.SIGKILL)
    raise RuntimeError(f"daphne did not listen on port {port} within 20 s:\n{log_path.read_text()}")


@contextmanager
def running_daphne(
    log_dir: Path,
    extra_env: dict[str, str] | None = None,
    server: str = "daphne",
    extra_args: list[str] | None = None,
    port: int | None = None,
):
    node = start_daphne(log_dir, extra_env, server, extra_args, port=port)
    try:
        yield node
    finally:
        node.kill(signal.SIGKILL)


@dataclass
class SocketClient:
    """A real WebSocket client that collects every message it receives, in arrival order."""

    connection: object
    messages: list[ReceivedMessage] = field(default_factory=list)
    acks: list[tuple[int, str | None]] = field(default_factory=list)
    errors: list[tuple[str, str | None, str]] = field(default_factory=list)
    # Presence as this client would show it, and every change it was sent.
    online: set[str] = field(default_factory=set)
    presence_changes: list[tuple[str, str]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task | None = None

    @classmethod
    async def connect(cls, node: DaphneNode, slug: str, cookie: str, after: int | None = None) -> "SocketClient":
        import websockets

        connection = await websockets.connect(
            node.ws_url(slug, after),
            additional_headers={"Cookie": cookie},
            origin=node.http_url,
            open_timeout=10,
            max_size=None,
        )
        client = cls(connection=connection)
        client.reader = asyncio.ensure_future(client._read())
        return client

    async def _read(self) -> None:
        import websockets

        try:
            async for frame in self.connection:
                self.messages.extend(parse_messages(frame))
                ack = parse_ack(frame)
                if ack:
                    self.acks.append(ack)
                error = parse_error(frame)
                if error:
                    self.errors.append(error)
                self._apply_presence(frame)
                self.arrived.set()
        except websockets.ConnectionClosed:
            pass

    def _apply_presence(self, frame: str) -> None:
        presence = parse_presence(frame)
        if presence is None:
            return
        kind, users = presence
        if kind == "snapshot":
            self.online = {user for user, _ in users}
            return
        for user, change in users:
            self.presence_changes.append((user, change))
            if change == "join":
                self.online.add(user)
            else:
                self.online.discard(user)

    async def send(self, body: str, client_id: str | None = None) -> None:
        import json

        await self.connection.send(json.dumps({"body": body, "client_id": client_id}))

    def seqs(self) -> list[int]:
        return [message.seq for message in self.messages]

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        """Wait until predicate(self) is true; fail with the state seen after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"timed out after {timeout} s; seqs={self.seqs()[-20:]} errors={self.errors} acks={self.acks[-5:]}"
                )
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout=min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    async def wait_for_seq(self, seq: int, timeout: float = 10.0) -> None:
        await self.wait_for(lambda client: seq in client.seqs(), timeout)

    async def close(self) -> None:
        await self.connection.close()
        if self.reader is not None:
            await self.reader

    async def drop(self) -> None:
        """Close the TCP connection without a WebSocket close handshake."""
        self.connection.transport.abort()
        if self.reader is not None:
            await self.reader
