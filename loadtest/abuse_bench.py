#!/usr/bin/env python
"""Measure how one chat node copes with abusive clients: a socket that stops reading, and oversized messages.

Scenario "slow-consumer": one room with --receivers sockets that read
everything and --stalled-sockets sockets that stop reading after the warm-up
message. Their client sockets get a small SO_RCVBUF before connecting, so that
little of their backlog fits in the client's kernel buffer. One sender posts --rate messages a
second for --duration seconds, each body carrying `t=<time.monotonic_ns()>`.
The script measures the receivers' delivery latency, checks that they lost
nothing and got everything in order, records when the server dropped each
stalled socket, and samples the server's RSS and CPU time every second.

Scenario "big-frames": a few bystander sockets receive a steady trickle of
messages. One client sends one --big-frame-bytes text frame. Later another
client sends a --fragmented-bytes message in --fragments fragments. The
script records each abusive client's close code, samples the server's RSS
every 0.2 s, and checks the bystanders' deliveries and latency.

Each scenario starts its own `python -m chatapp.node` on a free port of
127.0.0.1 and stops it by PID at the end. Results go to a JSON file with a
Markdown table beside it. This is a benchmark: it checks no target and
exits 0 whatever the figures are, and non-zero only when it could not run.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import psutil
import websockets
from bench_database import prepare_database as prepare_rooms_and_users
from latency_stats import summarize_ms
from local_processes import free_port, own_cpu_seconds, process_cpu_seconds, stop_process, wait_until_serving
from websockets.asyncio.client import ClientConnection, connect

logger = logging.getLogger("abuse_bench")

REPO_ROOT = Path(__file__).resolve().parent.parent

# Values for the variables that the environment leaves unset. The node inherits them.
DEFAULT_ENV = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/chat_abuse",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "SECRET_KEY": "abuse-bench-only-secret-key",
}
# Always set. The channel prefix keeps this run's pub/sub traffic apart from
# other benchmarks on the same Redis. The posting limit is raised so that it
# never rejects the sender, although the node still checks it on every post.
FORCED_ENV = {
    "CHANNEL_PREFIX": "chatabuse",
    "DEBUG": "0",
    "CHAT_RATE_LIMIT_PER_SECOND": "1000000",
    "CHAT_RATE_LIMIT_BURST": "1000000",
}
USER_PREFIX = "abuse"
USER_PASSWORD = "abuse-pass-123"

# Message frames are templates/chat/_message.html inside a wrapper div, acks
# are _ack_frame.html and rejections _error_frame.html.
MESSAGE_RE = re.compile(r'<article class="message[^"]*" data-seq="(\d+)"(.*?)</article>', re.S)
SENT_AT_RE = re.compile(r"\bt=(\d+)\b")
ACK_RE = re.compile(r'data-ack-seq="(\d+)" data-client-id="([^"]*)"')
ERROR_RE = re.compile(r'data-error="([^"]+)"')

# Linux TCP states from include/net/tcp_states.h.
TCP_ESTABLISHED = 1
# RFC 6455 frame header of a server frame (not masked) with a payload of
# 126 to 65,535 bytes: 2 bytes plus a 16-bit length.
SERVER_FRAME_HEADER_BYTES = 4
# A non-JSON text frame that a stalled socket sends now and then. The node
# rejects it with an `invalid_json` error frame and stores nothing.
KEEPALIVE_FRAME = "stalled-client-keepalive"
DEFAULT_SEND_BUFFER_MAX_BYTES = 1024 * 1024


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        nargs="+",
        choices=("slow-consumer", "big-frames"),
        default=["slow-consumer", "big-frames"],
        help="Scenarios to run, in this order (default: slow-consumer big-frames).",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="Path of the JSON result; the Markdown table goes beside it with the suffix .md and the node logs "
        "with .<scenario>.node.log (default: loadtest/results/abuse-<UTC date>-<time>.json).",
    )

    slow = parser.add_argument_group("slow-consumer scenario")
    slow.add_argument("--receivers", type=int, default=50, help="Sockets that read every frame (default: 50).")
    slow.add_argument(
        "--stalled-sockets", type=int, default=1, help="Sockets that stop reading; 0 makes a control run (default: 1)."
    )
    slow.add_argument("--rate", type=float, default=50.0, help="Messages the sender posts per second (default: 50).")
    slow.add_argument("--duration", type=float, default=120.0, help="Seconds the sender posts (default: 120).")
    slow.add_argument(
        "--body-bytes", type=int, default=300, help="Length of each ASCII message body in bytes (default: 300)."
    )
    slow.add_argument(
        "--stalled-rcvbuf",
        type=int,
        default=4096,
        help="SO_RCVBUF in bytes set on each stalled client socket before it connects; Linux doubles it "
        "(default: 4096).",
    )
    slow.add_argument(
        "--stalled-keepalive",
        type=float,
        default=10.0,
        help="Seconds between the non-JSON frames a stalled socket sends (default: 10). A frame from the client "
        "keeps daphne from pinging it, so only the send buffer cap can drop it. 0 sends none, and daphne's ping "
        "timeout (--ping-interval plus --ping-timeout after connect, 50 s by default) may drop the socket first.",
    )
    slow.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="Seconds to wait after the last post for every reading socket to receive it (default: 30).",
    )

    big = parser.add_argument_group("big-frames scenario")
    big.add_argument("--bystanders", type=int, default=5, help="Sockets that read the trickle (default: 5).")
    big.add_argument(
        "--trickle-rate", type=float, default=5.0, help="Messages per second posted for the bystanders (default: 5)."
    )
    big.add_argument(
        "--big-frame-bytes",
        type=int,
        default=10_000_000,
        help="Size of the single text frame in bytes (default: 10000000).",
    )
    big.add_argument(
        "--fragmented-bytes",
        type=int,
        default=1_000_000,
        help="Size of the fragmented message in bytes (default: 1000000).",
    )
    big.add_argument(
        "--fragments", type=int, default=1000, help="Fragments the fragmented message is split into (default: 1000)."
    )
    big.add_argument(
        "--quiet-seconds",
        type=float,
        default=5.0,
        help="Seconds of trickle before, between and after the two events (default: 5).",
    )
    big.add_argument(
        "--close-timeout",
        type=float,
        default=30.0,
        help="Seconds to wait for the node to close an abusive socket (default: 30).",
    )

    phases = parser.add_argument_group("timeouts of the other phases")
    phases.add_argument(
        "--connect-timeout", type=float, default=30.0, help="Seconds for opening all sockets (default: 30)."
    )
    phases.add_argument(
        "--warmup-timeout",
        type=float,
        default=30.0,
        help="Seconds for the warm-up message to reach every socket (default: 30).",
    )
    args = parser.parse_args()

    positive = ("receivers", "rate", "duration", "body_bytes", "stalled_rcvbuf", "bystanders", "trickle_rate",
                "big_frame_bytes", "fragmented_bytes", "fragments")
    for name in positive:
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    for name in ("stalled_sockets", "stalled_keepalive", "quiet_seconds"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}.")
    if args.body_bytes < 40:
        parser.error(f"--body-bytes must be at least 40, to hold the send time and counter, got {args.body_bytes}.")
    if args.body_bytes > 4000:
        parser.error(f"--body-bytes must be at most 4000, the server's body limit, got {args.body_bytes}.")
    if args.fragments > args.fragmented_bytes:
        parser.error(f"--fragments ({args.fragments}) must not exceed --fragmented-bytes ({args.fragmented_bytes}).")
    return args


# Setup: database, users, sessions and the node process.


def prepare_database(rooms: list[str], user_count: int) -> dict:
    """Migrate, create the rooms and users abuse1..abuseN, and write one login session per user."""
    setup = prepare_rooms_and_users(rooms, USER_PREFIX, user_count, USER_PASSWORD)
    return {
        "cookies": [f"{setup['cookie_name']}={key}" for key in setup["session_keys"]],
        "postgres_version": setup["postgres_version"],
    }


def start_node(log_path: Path) -> tuple[subprocess.Popen, int]:
    """Start `python -m chatapp.node` on a free port of 127.0.0.1 and return it once it serves pages."""
    port = free_port()
    command = [sys.executable, "-m", "chatapp.node", "-b", "127.0.0.1", "-p", str(port), "chatapp.asgi:application"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    logger.info("node started pid=%s port=%s log=%s", process.pid, port, log_path)
    wait_until_serving(process, f"http://127.0.0.1:{port}", log_path)
    return process, port


class Endpoint:
    """The socket URL and Origin of one scenario's room, and the session cookies of the users."""

    def __init__(self, port: int, room: str, cookies: list[str]) -> None:
        self.port = port
        self.url = f"ws://127.0.0.1:{port}/ws/rooms/{room}/?after=0"
        self.origin = f"http://127.0.0.1:{port}"
        self.cookies = cookies

    async def open(self, user_index: int, sock: socket.socket | None = None) -> ClientConnection:
        # Client pings are off, so that a stalled socket sends nothing but
        # its keepalive frames. Compression is off, so that the sizes on the
        # wire are the sizes sent.
        options = {"sock": sock} if sock is not None else {}
        return await connect(
            self.url,
            origin=self.origin,
            additional_headers={"Cookie": self.cookies[user_index]},
            proxy=None,
            open_timeout=30,
            ping_interval=None,
            compression=None,
            max_size=2**20,
            **options,
        )


# Clients.


class RoomReader:
    """A socket that reads every frame and records each message's seq and send-to-arrival latency."""

    def __init__(self, name: str, ws: ClientConnection) -> None:
        self.name = name
        self.ws = ws
        self.seqs: list[int] = []
        self.max_seq = 0
        # (send time, arrival time) in time.monotonic_ns() of this process.
        self.timings: list[tuple[int, int]] = []
        self.message_bytes = 0
        self.message_frames = 0
        self.errors: dict[str, int] = {}
        # Send time of each post that waits for its ack, by client_id.
        self.awaiting_ack: dict[str, int] = {}
        # (seq, ack latency in ns) of each acked post, by client_id.
        self.acked: dict[str, tuple[int, int]] = {}
        self.closed_with: str | None = None
        self.task = asyncio.ensure_future(self.read())

    async def read(self) -> None:
        try:
            async for frame in self.ws:
                self.handle(frame, time.monotonic_ns())
        except websockets.ConnectionClosedError as exc:
            self.closed_with = f"code={exc.rcvd.code if exc.rcvd else None} ({exc})"
            logger.warning("socket %s closed with an error: %s", self.name, exc)

    def handle(self, frame: str, arrived_ns: int) -> None:
        found = False
        for match in MESSAGE_RE.finditer(frame):
            found = True
            seq = int(match[1])
            self.seqs.append(seq)
            self.max_seq = max(self.max_seq, seq)
            sent = SENT_AT_RE.search(match[2])
            if sent:
                self.timings.append((int(sent[1]), arrived_ns))
        if found:
            self.message_frames += 1
            self.message_bytes += len(frame.encode()) + SERVER_FRAME_HEADER_BYTES
        for seq_text, client_id in ACK_RE.findall(frame):
            sent_ns = self.awaiting_ack.pop(client_id, None)
            if sent_ns is not None:
                self.acked[client_id] = (int(seq_text), arrived_ns - sent_ns)
        for code in ERROR_RE.findall(frame):
            self.errors[code] = self.errors.get(code, 0) + 1

    async def post(self, text: str, client_id: str, body_bytes: int = 0) -> None:
        """Send one message without waiting for its ack.

        The body starts with `t=<time.monotonic_ns()>` and is padded with `x`
        to body_bytes characters.
        """
        sent_ns = time.monotonic_ns()
        body = f"t={sent_ns} {text} "
        body += "x" * max(0, body_bytes - len(body))
        self.awaiting_ack[client_id] = sent_ns
        await self.ws.send(json.dumps({"body": body, "client_id": client_id}))

    async def post_and_wait(self, text: str, client_id: str, timeout: float) -> int:
        """Send one message and return its seq once the ack arrives."""
        await self.post(text, client_id)
        deadline = time.monotonic() + timeout
        while client_id not in self.acked:
            if time.monotonic() > deadline:
                raise TimeoutError(f"No ack for client_id={client_id} within {timeout:.0f} s on socket {self.name}.")
            await asyncio.sleep(0.01)
        return self.acked[client_id][0]


class StalledSocket:
    """A socket that reads until the warm-up message and then stops reading, while the node keeps sending."""

    def __init__(self, name: str, sock: socket.socket, ws: ClientConnection) -> None:
        self.name = name
        self.sock = sock
        self.ws = ws
        self.local_port = sock.getsockname()[1]
        self.rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        self.paused_at: float | None = None
        self.dropped_at: float | None = None
        self.keepalives_sent = 0

    @classmethod
    async def open(cls, endpoint: Endpoint, user_index: int, name: str, rcvbuf: int) -> StalledSocket:
        # SO_RCVBUF must be set before connect: it fixes the window scale
        # that the handshake announces.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", endpoint.port))
        ws = await endpoint.open(user_index, sock=sock)
        return cls(name, sock, ws)

    async def read_until(self, seq: int) -> None:
        while True:
            frame = await self.ws.recv()
            if any(int(match[1]) >= seq for match in MESSAGE_RE.finditer(frame)):
                return

    def stop_reading(self) -> None:
        self.ws.transport.pause_reading()
        self.paused_at = time.monotonic()

    def is_established(self) -> bool:
        """Return whether the kernel still has the TCP connection open, which works while reading is paused."""
        try:
            # tcpi_state is the first byte of struct tcp_info.
            return self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED
        except OSError:
            return False

    async def send_keepalives(self, interval: float, deadline: float) -> None:
        while self.dropped_at is None and time.monotonic() < deadline:
            await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
            if self.dropped_at is not None or time.monotonic() >= deadline:
                return
            try:
                await asyncio.wait_for(self.ws.send(KEEPALIVE_FRAME), 5)
            except (websockets.ConnectionClosed, OSError, TimeoutError) as exc:
                logger.info("stalled socket %s: keepalive failed, the connection is gone: %r", self.name, exc)
                return
            self.keepalives_sent += 1

    def abort(self) -> None:
        self.ws.transport.abort()


async def watch_drops(stalled: list[StalledSocket], stop: asyncio.Event) -> None:
    """Record when the kernel reports each stalled connection closed, checking every 0.1 s."""
    while not stop.is_set():
        for client in stalled:
            if client.dropped_at is None and not client.is_established():
                client.dropped_at = time.monotonic()
                logger.info(
                    "stalled socket %s closed %.1f s after it stopped reading",
                    client.name,
                    client.dropped_at - client.paused_at,
                )
        if all(client.dropped_at is not None for client in stalled):
            return
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except TimeoutError:
            pass


async def post_at_rate(sender: RoomReader, rate: float, duration: float, body_bytes: int, token: str) -> dict:
    """Post at a fixed schedule, not waiting for acks, so that a slow node shows as latency and not as a lower rate."""
    started = time.monotonic()
    count = round(rate * duration)
    max_lag = 0.0
    sent = 0
    for number in range(count):
        scheduled = started + number / rate
        delay = scheduled - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        max_lag = max(max_lag, time.monotonic() - scheduled)
        try:
            await sender.post(f"n={number}", f"{token}-{number}", body_bytes)
        except websockets.ConnectionClosed as exc:
            logger.error("sender %s stopped after %s posts: the socket closed: %s", sender.name, sent, exc)
            break
        sent += 1
    return {"sent": sent, "planned": count, "seconds": time.monotonic() - started, "max_lag_seconds": max_lag}


async def wait_for_seq(readers: list[RoomReader], seq: int, timeout: float) -> list[RoomReader]:
    """Wait until every open reader has `seq`, and return those that had not when the timeout passed.

    A reader whose socket closed is not waited for, because check_order() counts it.
    """
    deadline = time.monotonic() + timeout
    while True:
        behind = [reader for reader in readers if reader.max_seq < seq and reader.closed_with is None]
        if not behind or time.monotonic() > deadline:
            return behind
        await asyncio.sleep(0.02)


async def wait_for_acks(sender: RoomReader, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while sender.awaiting_ack and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


async def open_readers(endpoint: Endpoint, first_user: int, count: int, name: str) -> list[RoomReader]:
    sockets = await asyncio.gather(*(endpoint.open(first_user + index) for index in range(count)))
    return [RoomReader(f"{name}{index}", ws) for index, ws in enumerate(sockets)]


async def warm_up(sender: RoomReader, readers: list[RoomReader], token: str, timeout: float) -> int:
    """Post one message and wait until every reader has it, so that each socket finished its replay and is live."""
    seq = await sender.post_and_wait("warm-up", f"{token}-warmup", timeout)
    # The figures count only the posts after the warm-up.
    sender.acked.clear()
    behind = await wait_for_seq(readers, seq, timeout)
    if behind:
        raise RuntimeError(
            f"Timed out after {timeout:.0f} s: {len(behind)} sockets did not receive the warm-up message seq={seq}."
        )
    return seq


async def close_readers(readers: list[RoomReader]) -> None:
    await asyncio.wait_for(asyncio.gather(*(reader.ws.close() for reader in readers), return_exceptions=True), 15)
    await asyncio.wait_for(asyncio.gather(*(reader.task for reader in readers), return_exceptions=True), 15)


# Server sampling.


def tcp_queues(server_port: int, client_port: int) -> dict:
    """Return the kernel's unsent-or-unacked bytes on the node's side and unread bytes on the client's side.

    Reads /proc/net/tcp, whose tx_queue and rx_queue columns are those counts
    in hex. A side whose entry is gone reads as None.
    """
    server_tx = client_rx = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        tx_queue, rx_queue = (int(value, 16) for value in fields[4].split(":"))
        if local_port == server_port and remote_port == client_port:
            server_tx = tx_queue
        elif local_port == client_port and remote_port == server_port:
            client_rx = rx_queue
    return {"server_tx_queue_bytes": server_tx, "client_rx_queue_bytes": client_rx}


class ServerSampler(threading.Thread):
    """Sample the node's RSS and CPU time at a fixed interval.

    It runs in a thread, so that a busy event loop delays no sample.
    """

    def __init__(self, pid: int, interval: float, origin: float, extra: Callable[[], dict] | None = None) -> None:
        super().__init__(name="server-sampler", daemon=True)
        self.process = psutil.Process(pid)
        self.pid = pid
        self.interval = interval
        self.origin = origin
        self.extra = extra
        self.samples: list[dict] = []
        self.stopped = threading.Event()

    def sample(self) -> None:
        try:
            row = {
                "t": round(time.monotonic() - self.origin, 3),
                "rss_bytes": self.process.memory_info().rss,
                "cpu_seconds": process_cpu_seconds(self.pid),
            }
        except (psutil.Error, OSError) as exc:
            logger.warning("sampling the node pid=%s failed: %r", self.pid, exc)
            return
        if self.extra is not None:
            row.update(self.extra())
        self.samples.append(row)

    def run(self) -> None:
        self.sample()
        while not self.stopped.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=10)
        self.sample()

    def at(self, t: float) -> dict:
        """Return the last sample taken at or before t seconds after the origin."""
        earlier = [row for row in self.samples if row["t"] <= t]
        return earlier[-1] if earlier else self.samples[0]

    def between(self, start: float, end: float) -> list[dict]:
        return [row for row in self.samples if start <= row["t"] <= end]


# Figures.


def check_order(readers: list[RoomReader], first_seq: int, last_seq: int) -> dict:
    """Count over all readers the messages lost, received after a higher seq, or received twice."""
    expected = set(range(first_seq, last_seq + 1))
    totals = {"lost": 0, "out_of_order": 0, "duplicates": 0, "sockets_with_problems": 0, "sockets_closed": 0}
    for reader in readers:
        seen: set[int] = set()
        highest = 0
        problems = {"lost": 0, "out_of_order": 0, "duplicates": 0}
        for seq in reader.seqs:
            if seq < first_seq:
                continue
            if seq in seen:
                problems["duplicates"] += 1
                continue
            if seq < highest:
                problems["out_of_order"] += 1
            seen.add(seq)
            highest = max(highest, seq)
        problems["lost"] = len(expected - seen)
        if any(problems.values()):
            totals["sockets_with_problems"] += 1
            logger.warning("socket %s: %s", reader.name, problems)
        if reader.closed_with is not None:
            totals["sockets_closed"] += 1
        for key, value in problems.items():
            totals[key] += value
    return {"sockets": len(readers), "expected_per_socket": len(expected), **totals}


def latencies_ns(readers: list[RoomReader], from_ns: int | None = None, to_ns: int | None = None) -> list[int]:
    """Return every delivery's latency, for messages sent in [from_ns, to_ns)."""
    return [
        arrived - sent
        for reader in readers
        for sent, arrived in reader.timings
        if (from_ns is None or sent >= from_ns) and (to_ns is None or sent < to_ns)
    ]


def rss_figures(samples: list[dict]) -> dict:
    values = [row["rss_bytes"] for row in samples]
    return {
        "start_mib": mib(values[0]),
        "max_mib": mib(max(values)),
        "end_mib": mib(values[-1]),
    }


def mib(value: float) -> float:
    return round(value / 2**20, 1)


def rss_slope_mib_per_minute(samples: list[dict]) -> float | None:
    """Return the least-squares slope of RSS over the samples, in MiB per minute."""
    if len(samples) < 2:
        return None
    times = [row["t"] for row in samples]
    values = [row["rss_bytes"] / 2**20 for row in samples]
    mean_t, mean_v = sum(times) / len(times), sum(values) / len(values)
    spread = sum((t - mean_t) ** 2 for t in times)
    if spread == 0:
        return None
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values)) / spread
    return round(slope * 60, 2)


def cpu_percent(samples: list[dict]) -> float | None:
    if len(samples) < 2 or samples[-1]["t"] == samples[0]["t"]:
        return None
    used = samples[-1]["cpu_seconds"] - samples[0]["cpu_seconds"]
    return round(100 * used / (samples[-1]["t"] - samples[0]["t"]), 1)


def find_drop_log_lines(log_path: Path, ports: list[int]) -> dict[int, int]:
    """Return the unsent bytes that the node logged when it dropped a socket for its send buffer, by client port."""
    found = {}
    pattern = re.compile(r"socket dropped: (\d+) bytes unsent, cap \d+ peer=\['127\.0\.0\.1', (\d+)\]")
    for match in pattern.finditer(log_path.read_text(errors="replace")):
        port = int(match[2])
        if port in ports:
            found[port] = int(match[1])
    return found


def count_log_lines(log_path: Path) -> dict:
    text = log_path.read_text(errors="replace")
    patterns = {"socket_dropped": "socket dropped:", "error": " ERROR ", "traceback": "Traceback"}
    return {name: text.count(pattern) for name, pattern in patterns.items()}


# Scenario 1: a socket that stops reading.


async def slow_consumer(args: argparse.Namespace, endpoint: Endpoint, pid: int) -> dict:
    token = uuid.uuid4().hex[:12]
    opening = time.monotonic()
    receivers = await asyncio.wait_for(open_readers(endpoint, 0, args.receivers, "receiver"), args.connect_timeout)
    stalled = list(
        await asyncio.wait_for(
            asyncio.gather(
                *(
                    StalledSocket.open(endpoint, args.receivers + index, f"stalled{index}", args.stalled_rcvbuf)
                    for index in range(args.stalled_sockets)
                )
            ),
            args.connect_timeout,
        )
    )
    sender = (await open_readers(endpoint, args.receivers + args.stalled_sockets, 1, "sender"))[0]
    connect_seconds = time.monotonic() - opening
    readers = [*receivers, sender]
    try:
        warmup_seq = await warm_up(sender, readers, token, args.warmup_timeout)
        await asyncio.wait_for(
            asyncio.gather(*(client.read_until(warmup_seq) for client in stalled)), args.warmup_timeout
        )
        logger.info("%s sockets live at seq=%s; %s sockets stop reading", len(readers), warmup_seq, len(stalled))
        return await slow_consumer_load(args, endpoint, pid, receivers, sender, stalled, warmup_seq, token) | {
            "connect_seconds": round(connect_seconds, 2)
        }
    finally:
        for client in stalled:
            client.abort()
        await close_readers(readers)


async def slow_consumer_load(
    args: argparse.Namespace,
    endpoint: Endpoint,
    pid: int,
    receivers: list[RoomReader],
    sender: RoomReader,
    stalled: list[StalledSocket],
    warmup_seq: int,
    token: str,
) -> dict:
    bytes_at_pause = receivers[0].message_bytes

    def stalled_backlog() -> dict:
        # Only the first stalled socket is traced. Frame bytes that the node
        # produced for it and that are in neither kernel queue wait in the
        # node's process, in Twisted's send buffer.
        if not stalled:
            return {}
        queues = tcp_queues(endpoint.port, stalled[0].local_port)
        produced = receivers[0].message_bytes - bytes_at_pause
        if None in queues.values():
            return {**queues, "produced_bytes": produced, "estimated_in_process_bytes": None}
        in_kernel = queues["server_tx_queue_bytes"] + queues["client_rx_queue_bytes"]
        return {**queues, "produced_bytes": produced, "estimated_in_process_bytes": max(0, produced - in_kernel)}

    origin = time.monotonic()
    sampler = ServerSampler(pid, 1.0, origin, stalled_backlog)
    for client in stalled:
        client.stop_reading()
    sampler.start()
    own_cpu_before = own_cpu_seconds()
    stop_watching = asyncio.Event()
    watcher = asyncio.ensure_future(watch_drops(stalled, stop_watching))
    send_deadline = origin + args.duration
    keepalives = [
        asyncio.ensure_future(client.send_keepalives(args.stalled_keepalive, send_deadline + args.drain_timeout))
        for client in stalled
        if args.stalled_keepalive > 0
    ]
    sent_from_ns = time.monotonic_ns()
    try:
        posting = await asyncio.wait_for(
            post_at_rate(sender, args.rate, args.duration, args.body_bytes, token), args.duration + 60
        )
        send_end = time.monotonic() - origin
        await wait_for_acks(sender, args.drain_timeout)
        last_seq = max((seq for seq, _ in sender.acked.values()), default=warmup_seq)
        behind = await wait_for_seq([*receivers, sender], last_seq, args.drain_timeout)
        if behind:
            logger.warning("%s sockets had not received seq=%s after %s s", len(behind), last_seq, args.drain_timeout)
        drained_at = time.monotonic() - origin
    finally:
        stop_watching.set()
        await asyncio.wait_for(watcher, 5)
        for task in keepalives:
            task.cancel()
        await asyncio.gather(*keepalives, return_exceptions=True)
        sampler.stop()
    own_cpu = own_cpu_seconds() - own_cpu_before

    send_samples = sampler.between(0, send_end)
    second_half = sampler.between(send_end / 2, send_end)
    # RSS after the last drop shows whether memory still grows once no
    # socket has a backlog. It is missing when a stalled socket was never dropped.
    drop_times = [client.dropped_at - origin for client in stalled if client.dropped_at is not None]
    all_dropped = bool(stalled) and len(drop_times) == len(stalled)
    after_drops = sampler.between(max(drop_times), send_end) if all_dropped else []
    message_frames = sum(reader.message_frames for reader in receivers)
    return {
        "posts": {
            **posting,
            "acked": len(sender.acked),
            "awaiting_ack_at_end": len(sender.awaiting_ack),
            "errors": sender.errors,
            "per_second": round(posting["sent"] / posting["seconds"], 1),
            "ack_latency_ms": summarize_ms([latency for _, latency in sender.acked.values()]),
        },
        "delivery": {
            "latency_ms": summarize_ms(latencies_ns(receivers, sent_from_ns)),
            "p95_ms_per_10_s": latency_windows(receivers, sent_from_ns, args.duration, 10.0),
            "mean_message_frame_bytes": round(
                sum(reader.message_bytes for reader in receivers) / message_frames if message_frames else 0
            ),
            "receivers": check_order(receivers, warmup_seq + 1, last_seq),
            "sender": check_order([sender], warmup_seq + 1, last_seq),
            "drain_seconds_after_last_post": round(drained_at - send_end, 2),
        },
        "stalled": [describe_stalled(client) for client in stalled],
        "server": {
            "rss": rss_figures(send_samples),
            "rss_after_drain_mib": mib(sampler.samples[-1]["rss_bytes"]),
            "rss_slope_second_half_mib_per_minute": rss_slope_mib_per_minute(second_half),
            "rss_slope_after_drops_mib_per_minute": rss_slope_mib_per_minute(after_drops),
            "seconds_after_drops": round(send_end - max(drop_times), 1) if after_drops else None,
            "cpu_percent_of_one_core": cpu_percent(send_samples),
        },
        "client_cpu_percent_of_one_core": round(100 * own_cpu / drained_at, 1),
        "send_seconds": round(send_end, 2),
        "samples": sampler.samples,
    }


def latency_windows(readers: list[RoomReader], from_ns: int, duration: float, window: float) -> list[float | None]:
    """Return the p95 delivery latency in ms of the messages sent in each window of `window` seconds."""
    result = []
    for index in range(math.ceil(duration / window)):
        start = from_ns + int(index * window * 1e9)
        summary = summarize_ms(latencies_ns(readers, start, start + int(window * 1e9)))
        result.append(summary.get("p95"))
    return result


def describe_stalled(client: StalledSocket) -> dict:
    return {
        "name": client.name,
        "client_port": client.local_port,
        "so_rcvbuf_bytes": client.rcvbuf,
        "keepalive_frames_sent": client.keepalives_sent,
        "dropped_after_seconds": round(client.dropped_at - client.paused_at, 1) if client.dropped_at else None,
    }


def add_drop_causes(result: dict, log_path: Path, cap: int) -> None:
    """Add to each stalled socket's entry whether the node's send buffer check dropped it, read from the node's log."""
    logged = find_drop_log_lines(log_path, [entry["client_port"] for entry in result["stalled"]])
    for entry in result["stalled"]:
        unsent = logged.get(entry["client_port"])
        entry["dropped_by_send_buffer_cap"] = unsent is not None
        entry["unsent_bytes_logged_at_drop"] = unsent
        entry["send_buffer_cap_bytes"] = cap
        traced = [row for row in result["samples"] if row.get("estimated_in_process_bytes") is not None]
        if entry["name"] == "stalled0" and traced:
            entry["max_server_kernel_queue_bytes"] = max(row["server_tx_queue_bytes"] for row in traced)
            entry["max_estimated_in_process_bytes"] = max(row["estimated_in_process_bytes"] for row in traced)


def run_slow_consumer(args: argparse.Namespace, room: str, cookies: list[str], log_path: Path) -> dict:
    process, port = start_node(log_path)
    try:
        endpoint = Endpoint(port, room, cookies)
        result = asyncio.run(
            asyncio.wait_for(slow_consumer(args, endpoint, process.pid), args.duration + 4 * args.drain_timeout + 120)
        )
    finally:
        stop_process(process, "node")
    cap = int(os.environ.get("CHAT_SEND_BUFFER_MAX_BYTES", DEFAULT_SEND_BUFFER_MAX_BYTES))
    add_drop_causes(result, log_path, cap)
    result["room"] = room
    result["server_log"] = {"path": str(log_path), **count_log_lines(log_path)}
    return result


# Scenario 2: oversized messages.


def padded_json(size: int) -> str:
    """Return a JSON post of exactly `size` ASCII characters."""
    prefix = '{"body": "'
    return prefix + "x" * (size - len(prefix) - 2) + '"}'


async def send_and_wait_close(ws: ClientConnection, message, close_timeout: float) -> dict:
    """Send one message, then wait for the node to close the socket, and return how it closed."""
    started = time.monotonic()
    send_error = None
    try:
        await asyncio.wait_for(ws.send(message), close_timeout)
    except websockets.ConnectionClosed as exc:
        send_error = f"{type(exc).__name__}: {exc}"
    except TimeoutError:
        send_error = f"send timed out after {close_timeout:.0f} s"
    send_seconds = time.monotonic() - started
    try:
        await asyncio.wait_for(ws.wait_closed(), close_timeout)
    except TimeoutError:
        logger.error("the node did not close the socket within %s s, so the client aborts it", close_timeout)
        ws.transport.abort()
        return {"close_code": None, "closed": False, "send_seconds": round(send_seconds, 2), "send_error": send_error}
    return {
        "close_code": ws.close_code,
        "close_reason": ws.close_reason,
        # Without a close frame from the node, websockets reports 1006.
        "close_frame_received": ws.protocol.close_rcvd is not None,
        "closed": True,
        "seconds_to_close": round(time.monotonic() - started, 2),
        "send_seconds": round(send_seconds, 2),
        "send_error": send_error,
    }


async def fragments_of(message: str, count: int, progress: dict) -> AsyncIterator[str]:
    """Yield the message in `count` fragments, yielding to the event loop between them as a network sender would."""
    size = math.ceil(len(message) / count)
    for index in range(count):
        yield message[index * size : (index + 1) * size]
        progress["fragments_sent"] = index + 1
        await asyncio.sleep(0)


async def trickle(sender: RoomReader, rate: float, stop: asyncio.Event, token: str) -> int:
    started = time.monotonic()
    number = 0
    while not stop.is_set():
        delay = started + number / rate - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(stop.wait(), delay)
                break
            except TimeoutError:
                pass
        try:
            await sender.post(f"trickle n={number}", f"{token}-trickle-{number}")
        except websockets.ConnectionClosed as exc:
            logger.error("trickle sender stopped after %s posts: %s", number, exc)
            break
        number += 1
    return number


async def big_frames(args: argparse.Namespace, endpoint: Endpoint, pid: int) -> dict:
    token = uuid.uuid4().hex[:12]
    bystanders = await asyncio.wait_for(open_readers(endpoint, 0, args.bystanders, "bystander"), args.connect_timeout)
    sender, big_client, fragment_client = await asyncio.wait_for(
        open_readers(endpoint, args.bystanders, 3, "client"), args.connect_timeout
    )
    sender.name, big_client.name, fragment_client.name = "trickle-sender", "big-frame", "fragmented"
    # The abusive clients read too, so that the node's close frame is not
    # stuck behind unread messages.
    readers = [*bystanders, sender, big_client, fragment_client]
    try:
        warmup_seq = await warm_up(sender, readers, token, args.warmup_timeout)
        return await big_frames_events(args, pid, bystanders, sender, big_client, fragment_client, warmup_seq, token)
    finally:
        await close_readers(readers)


async def big_frames_events(
    args: argparse.Namespace,
    pid: int,
    bystanders: list[RoomReader],
    sender: RoomReader,
    big_client: RoomReader,
    fragment_client: RoomReader,
    warmup_seq: int,
    token: str,
) -> dict:
    origin = time.monotonic()
    sampler = ServerSampler(pid, 0.2, origin)
    sampler.start()
    stop_trickle = asyncio.Event()
    trickling = asyncio.ensure_future(trickle(sender, args.trickle_rate, stop_trickle, token))
    phase_starts_ns = {"before": time.monotonic_ns()}
    events = []
    try:
        await asyncio.sleep(args.quiet_seconds)
        attacks = [
            ("big_frame", big_client, padded_json(args.big_frame_bytes), {}),
            ("fragmented", fragment_client, None, {"fragments_sent": 0}),
        ]
        for name, client, message, progress in attacks:
            phase_starts_ns[name] = time.monotonic_ns()
            start = time.monotonic() - origin
            if message is None:
                message = fragments_of(padded_json(args.fragmented_bytes), args.fragments, progress)
            logger.info("%s: sending", name)
            outcome = await send_and_wait_close(client.ws, message, args.close_timeout)
            logger.info("%s: %s", name, outcome)
            await asyncio.sleep(args.quiet_seconds)
            events.append({"name": name, "start": start, "end": time.monotonic() - origin, **outcome, **progress})
        phase_starts_ns["after"] = time.monotonic_ns()
        await asyncio.sleep(args.quiet_seconds)
    finally:
        stop_trickle.set()
        trickle_posts = await asyncio.wait_for(trickling, 10)
        await wait_for_acks(sender, args.close_timeout)
        last_seq = max((seq for seq, _ in sender.acked.values()), default=warmup_seq)
        behind = await wait_for_seq(bystanders, last_seq, args.close_timeout)
        if behind:
            logger.warning("%s bystanders had not received seq=%s", len(behind), last_seq)
        sampler.stop()

    for event in events:
        window = sampler.between(event["start"], event["end"])
        event["rss_before_mib"] = mib(sampler.at(event["start"])["rss_bytes"])
        event["rss_max_mib"] = mib(max(row["rss_bytes"] for row in window)) if window else None
        event["rss_after_mib"] = mib(window[-1]["rss_bytes"]) if window else None
        event["server_cpu_seconds"] = (
            round(window[-1]["cpu_seconds"] - sampler.at(event["start"])["cpu_seconds"], 2) if window else None
        )
        event["bytes"] = {"big_frame": args.big_frame_bytes, "fragmented": args.fragmented_bytes}[event["name"]]

    phases = list(phase_starts_ns.items())
    latency_by_phase = {}
    for index, (name, start_ns) in enumerate(phases):
        end_ns = phases[index + 1][1] if index + 1 < len(phases) else None
        latency_by_phase[name] = summarize_ms(latencies_ns(bystanders, start_ns, end_ns))
    return {
        "trickle_posts": trickle_posts,
        "trickle_acked": len(sender.acked),
        "trickle_errors": sender.errors,
        "events": events,
        "bystanders": {
            "latency_ms": summarize_ms(latencies_ns(bystanders, phase_starts_ns["before"])),
            "latency_ms_by_phase": latency_by_phase,
            "order": check_order(bystanders, warmup_seq + 1, last_seq),
        },
        "server": {"rss": rss_figures(sampler.samples), "cpu_percent_of_one_core": cpu_percent(sampler.samples)},
        "samples": sampler.samples,
    }


def run_big_frames(args: argparse.Namespace, room: str, cookies: list[str], log_path: Path) -> dict:
    process, port = start_node(log_path)
    try:
        endpoint = Endpoint(port, room, cookies)
        bound = 4 * args.quiet_seconds + 6 * args.close_timeout + 120
        result = asyncio.run(asyncio.wait_for(big_frames(args, endpoint, process.pid), bound))
    finally:
        stop_process(process, "node")
    result["room"] = room
    result["server_log"] = {"path": str(log_path), **count_log_lines(log_path)}
    return result


# Report.


def describe_machine() -> dict:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    cpu_models = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    packages = ("django", "channels", "channels-redis", "daphne", "autobahn", "twisted", "websockets", "psutil")
    return {
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_models[0] if cpu_models else None,
        "mem_total": meminfo["MemTotal"].strip(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: metadata.version(name) for name in packages},
        "tcp_wmem": Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split(),
    }


def describe_code() -> dict:
    """Return the commit, the changed files and a hash of their changes, because the run measures the working tree."""

    def git(*arguments: str) -> str:
        # --no-optional-locks keeps `git status` from rewriting the index.
        command = ["git", "--no-optional-locks", *arguments]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        return result.stdout if result.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {
        "commit": git("rev-parse", "HEAD").strip() or None,
        "uncommitted_files": changed,
        # Untracked files are not in the diff, so a change to one of them
        # leaves this hash unchanged.
        "diff_sha256": hashlib.sha256(git("diff", "HEAD").encode()).hexdigest(),
    }


def latency_text(summary: dict, percentiles: tuple[str, ...] = ("p50", "p95", "p99", "max")) -> str:
    values = " / ".join(str(summary.get(name)) for name in percentiles)
    return f"{values} ms ({summary['count']} deliveries)"


def order_text(order: dict) -> str:
    return " / ".join(str(order[name]) for name in ("lost", "out_of_order", "duplicates", "sockets_closed"))


def stalled_text(stalled: dict) -> str:
    if stalled["dropped_after_seconds"] is None:
        return "not dropped during the run"
    if stalled["dropped_by_send_buffer_cap"]:
        cause = f"by the send buffer cap with {stalled['unsent_bytes_logged_at_drop']} bytes unsent"
    else:
        cause = "not by the send buffer cap (the node logged no drop for it)"
    return f"{stalled['dropped_after_seconds']} s after it stopped reading, {cause}"


def slow_consumer_table(result: dict) -> list[tuple[str, str]]:
    posts, delivery, server, rss = result["posts"], result["delivery"], result["server"], result["server"]["rss"]
    per_window = ", ".join(str(value) for value in delivery["p95_ms_per_10_s"])
    rows = [
        ("Posts sent / acked", f"{posts['sent']} / {posts['acked']} in {posts['seconds']:.1f} s"),
        ("Receivers' delivery latency p50 / p95 / p99 / max", latency_text(delivery["latency_ms"])),
        ("Receivers' p95 in each 10 s of sending", f"{per_window} ms"),
        ("Ack latency p50 / p95 / p99 / max", latency_text(posts["ack_latency_ms"]).replace("deliveries", "acks")),
        ("Receivers: lost / out of order / duplicates / sockets closed", order_text(delivery["receivers"])),
        ("Mean message frame", f"{delivery['mean_message_frame_bytes']} bytes"),
    ]
    for stalled in result["stalled"]:
        label = f"{stalled['name']} (SO_RCVBUF {stalled['so_rcvbuf_bytes']} bytes) dropped"
        rows.append((label, stalled_text(stalled)))
        if "max_server_kernel_queue_bytes" in stalled:
            rows.append(
                (
                    f"{stalled['name']}: max bytes queued in the node's kernel / in the node process (estimate)",
                    f"{stalled['max_server_kernel_queue_bytes']} / {stalled['max_estimated_in_process_bytes']}",
                )
            )
    rows += [
        ("Node RSS start / max / end of sending", f"{rss['start_mib']} / {rss['max_mib']} / {rss['end_mib']} MiB"),
        ("Node RSS slope, second half of sending", f"{server['rss_slope_second_half_mib_per_minute']} MiB/min"),
    ]
    if server["seconds_after_drops"] is not None:
        rows.append(
            (
                "Node RSS slope from the last drop to the end of sending",
                f"{server['rss_slope_after_drops_mib_per_minute']} MiB/min over {server['seconds_after_drops']} s",
            )
        )
    rows += [
        ("Node CPU while sending", f"{server['cpu_percent_of_one_core']} % of one core"),
        ("Client CPU (this script)", f"{result['client_cpu_percent_of_one_core']} % of one core"),
    ]
    return rows


def big_frames_table(result: dict) -> list[tuple[str, str]]:
    rows = []
    for event in result["events"]:
        label = f"{event['name']} ({event['bytes']} bytes)"
        frame = "close frame received" if event.get("close_frame_received") else "no close frame"
        fragments = f", {event['fragments_sent']} fragments sent" if "fragments_sent" in event else ""
        closed = f"{event['close_code']} ({frame}) after {event.get('seconds_to_close')} s{fragments}"
        rss = f"{event['rss_before_mib']} / {event['rss_max_mib']} / {event['rss_after_mib']} MiB"
        rows += [(f"{label}: close code", closed), (f"{label}: node RSS before / max / after", rss)]
    bystanders = result["bystanders"]
    rows.append(("Bystanders: lost / out of order / duplicates / sockets closed", order_text(bystanders["order"])))
    for phase, latency in bystanders["latency_ms_by_phase"].items():
        label = f"Bystander latency p50 / max, messages sent in phase {phase}"
        rows.append((label, latency_text(latency, ("p50", "max"))))
    rows.append(("Trickle posts sent / acked", f"{result['trickle_posts']} / {result['trickle_acked']}"))
    return rows


def without_password(value: str) -> str:
    """Return a setting for the report, with the password of a URL and the secret key replaced by ***."""
    if value == os.environ.get("SECRET_KEY"):
        return "***"
    parts = urlsplit(value)
    if parts.password:
        return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))
    return value


def markdown_tables(report: dict) -> str:
    sections = []
    titles = {"slow-consumer": ("Slow consumer", slow_consumer_table), "big-frames": ("Big frames", big_frames_table)}
    for name, result in report["results"].items():
        title, table = titles[name]
        if "error" in result:
            rows = [("Error", result["error"])]
        else:
            rows = table(result)
            if result["code_at_start"] != report["code"]:
                rows.append(("Code", "the working tree changed between the start of the run and this scenario"))
        lines = [f"### {title}", "", "| Figure | Value |", "| --- | --- |"]
        lines += [f"| {figure} | {value} |" for figure, value in rows]
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    output = args.output or REPO_ROOT / "loadtest" / "results" / f"abuse-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    for name, value in DEFAULT_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.update(FORCED_ENV)

    load_at_start = os.getloadavg()
    code = describe_code()
    rooms = {name: f"abuse-{name}-{stamp}" for name in args.scenarios}
    user_count = max(args.receivers + args.stalled_sockets + 1, args.bystanders + 3)
    setup = prepare_database(list(rooms.values()), user_count)

    runners = {"slow-consumer": run_slow_consumer, "big-frames": run_big_frames}
    results = {}
    failed = False
    for name in args.scenarios:
        log_path = output.with_suffix(f".{name}.node.log")
        logger.info("scenario %s: room %s", name, rooms[name])
        # Others may edit the tree during a run, and each scenario starts
        # its own node from the files as they are then.
        scenario_code = describe_code()
        if scenario_code != code:
            logger.warning("the working tree changed after the run started, see code_at_start of %s in the JSON", name)
        try:
            results[name] = runners[name](args, rooms[name], setup["cookies"], log_path)
            results[name]["code_at_start"] = scenario_code
        except Exception as exc:
            logger.exception("scenario %s could not run", name)
            results[name] = {"error": f"{type(exc).__name__}: {exc}", "server_log": str(log_path)}
            failed = True

    report = {
        "started_at": stamp,
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "environment": {name: without_password(os.environ[name]) for name in [*DEFAULT_ENV, *FORCED_ENV]},
        "code": code,
        "machine": {
            **describe_machine(),
            "postgres": setup["postgres_version"],
            "load_average_at_start": load_at_start,
        },
        "results": results,
    }
    output.write_text(json.dumps(report, indent=2) + "\n")
    tables = markdown_tables(report)
    output.with_suffix(".md").write_text(tables)
    print(tables)
    logger.info("wrote %s and %s", output, output.with_suffix(".md"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
