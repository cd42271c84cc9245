#!/usr/bin/env python
"""Drive many rooms with many sockets and measure delivery, for the product or the reference chat.

Opens --connections sockets at --ramp-rate per second, spread over --rooms
rooms, from --processes generator processes (each owns whole rooms). After a
warm-up message per room, posts --rate messages a second in total, round
robin over the rooms, for --duration seconds. Every body carries
`t=<time.monotonic_ns()> r=<count>`. CLOCK_MONOTONIC is one clock for every
process of a Linux machine, so a receiver's latency is its arrival time
minus that stamp.

Checks every socket for lost, out-of-order and duplicate messages: by
data-seq for the product, by the per-room count r for the reference chat,
which has no seq. With --storm-at, every socket is dropped at once at that
second of the send phase and reconnects with the browser's backoff (full
jitter, 0.5 s doubling to 15 s), resuming with after=<last seq held>.

Samples the server's RSS and CPU every second and writes one JSON file to
loadtest/results/; loadtest/plot_loadtest.py draws the report's plots from
those files. A benchmark, not a test: it exits 0 whatever the figures are.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import multiprocessing
import os
import platform
import random
import re
import resource
import shlex
import subprocess
import sys
import threading
import time
import uuid
from array import array
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import psutil
from bench_database import prepare_database
from latency_stats import summarize_ms
from local_processes import free_port, stop_process, wait_until_serving

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "loadtest" / "results"

# Values for the variables that the environment leaves unset; the servers
# this script starts inherit them.
DEFAULT_ENV = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/chat_bench",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "SECRET_KEY": "loadtest-only-secret-key",
    "CHANNEL_PREFIX": "chatload",
    # Each generator user posts far faster than a person and has one socket in
    # each of several rooms, so both limits are raised. The server still checks them.
    "CHAT_RATE_LIMIT_PER_SECOND": "1000000",
    "CHAT_RATE_LIMIT_BURST": "1000000",
    "PRESENCE_MAX_CONNECTIONS_PER_USER": "1000",
}
# Not locustfile.py's "load" users, whose password differs.
USER_PREFIX = "loadgen"
USER_PASSWORD = "loadgen-pass-123"

# Command line of each server kind, where {app} is the ASGI application path.
SERVER_COMMANDS = {
    "node": [sys.executable, "-m", "chatapp.node", "-b", "127.0.0.1", "-p", "{port}", "{app}"],
    "daphne": [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", "{port}", "{app}"],
    "uvicorn": [
        sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--loop", "uvloop",
        "--ws", "websockets", "--no-access-log", "--log-level", "warning", "--backlog", "4096", "{app}",
    ],
    "uvicorn-wsproto": [
        sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", "{port}", "--loop", "uvloop",
        "--ws", "wsproto", "--no-access-log", "--log-level", "warning", "--backlog", "4096", "{app}",
    ],
    "hypercorn": [sys.executable, "-m", "hypercorn", "-b", "127.0.0.1:{port}", "--backlog", "4096", "{app}"],
    "granian": [
        sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{port}",
        "--backlog", "4096", "{app}",
    ],
}
APPS = {"product": "chatapp.asgi:application", "reference": "loadtest.reference.asgi:application"}

# Product frames: templates/chat/_message.html and _ack_frame.html.
PRODUCT_MESSAGE_RE = re.compile(r'data-seq="(\d+)"[^>]*>.*?<p class="body">([^<]*)</p>', re.S)
PRODUCT_ACK_RE = re.compile(r'data-ack-seq="(\d+)"')
PRODUCT_ERROR_RE = re.compile(r'data-error="([^"]+)"')
STAMP_RE = re.compile(r"t=(\d+) r=(\d+)")
# Reference frames: {"body": "..."} as its consumer sends them.
REFERENCE_BODY_RE = re.compile(r'"body": "t=(\d+) r=(\d+)"')

RECONNECT_BASE_SECONDS = 0.5
RECONNECT_CAP_SECONDS = 15.0
MAX_CONNECT_ATTEMPTS = 20

logger = logging.getLogger("loadgen")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=sorted(APPS), default="product", help="Which chat to measure (default: product).")
    parser.add_argument(
        "--server", choices=sorted(SERVER_COMMANDS), default="node",
        help="ASGI server to start: node is `python -m chatapp.node`, daphne with the drain (default: node).",
    )
    parser.add_argument("--server-processes", type=int, default=1, help="Server processes: the node's --processes on one port, other servers one port each with sockets spread round robin (default: 1).")
    parser.add_argument("--url", action="append", help="Use a running server at http://HOST:PORT instead of starting one; repeat for several.")
    parser.add_argument("--server-pid", type=int, action="append", default=[], help="PID of a running server to sample RSS and CPU from; repeatable.")
    parser.add_argument("--connections", type=int, default=1000, help="Sockets to open (default: 1000).")
    parser.add_argument("--rooms", type=int, default=10, help="Rooms to spread the sockets over (default: 10).")
    parser.add_argument("--ramp-rate", type=float, default=500.0, help="New sockets per second, all processes together (default: 500).")
    parser.add_argument("--rate", type=float, default=10.0, help="Messages per second, all rooms together (default: 10).")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds of sending (default: 60).")
    parser.add_argument("--processes", type=int, default=1, help="Generator processes (default: 1).")
    parser.add_argument("--sockets-per-user", type=int, default=10, help="Sockets that share one user, each in another room (default: 10).")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="Seconds to wait with every socket open and idle before the memory reading (default: 5).")
    parser.add_argument(
        "--no-retry", action="store_true",
        help="Count a failed first connect as final; by default it is retried with the browser's backoff.",
    )
    parser.add_argument("--storm-at", type=float, help="Second of the send phase at which every socket is dropped and reconnects (default: no storm).")
    parser.add_argument("--drain-timeout", type=float, default=60.0, help="Seconds to wait after sending for every socket to catch up (default: 60).")
    parser.add_argument("--label", default="", help="Free text stored in the JSON, such as the change being measured.")
    parser.add_argument("--output", type=Path, help="JSON file to write (default: loadtest/results/load-<target>-<stamp>.json).")
    args = parser.parse_args()
    for name in ("connections", "rooms", "processes", "sockets_per_user", "server_processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.rooms < args.processes:
        parser.error(f"--rooms ({args.rooms}) must be at least --processes ({args.processes}): each generator process owns whole rooms.")
    if args.rooms > args.connections:
        parser.error(f"--rooms ({args.rooms}) must not exceed --connections ({args.connections}).")
    if args.rate <= 0 or args.ramp_rate <= 0 or args.duration <= 0:
        parser.error("--rate, --ramp-rate and --duration must be positive.")
    return args


# ---------------------------------------------------------------- setup


def prepare_product(room_slugs: list[str], user_count: int) -> dict:
    """Migrate, create the rooms and users, and write one login session per user."""
    setup = prepare_database(room_slugs, USER_PREFIX, user_count, USER_PASSWORD)
    return {
        "cookies": [f"{setup['cookie_name']}={key}" for key in setup["session_keys"]],
        "last_seqs": setup["last_seqs"],
    }


def start_servers(args: argparse.Namespace, log_stem: Path) -> tuple[list[subprocess.Popen], list[str]]:
    """Start the server; the node shares one port among its processes, other servers get a port each."""
    processes, urls = [], []
    shared_port = args.server == "node"
    for index in range(1 if shared_port else args.server_processes):
        port = free_port()
        command = [part.format(port=port, app=APPS[args.target]) for part in SERVER_COMMANDS[args.server]]
        if shared_port and args.server_processes > 1:
            command[3:3] = ["--processes", str(args.server_processes)]
        log_path = log_stem.with_suffix(f".server{index}.log")
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        logger.info("server started pid=%s url=%s command=%s", process.pid, url, shlex.join(command))
        processes.append(process)
        urls.append(url)
    for index, (process, url) in enumerate(zip(processes, urls)):
        wait_until_ready(process, url, args.target, log_stem.with_suffix(f".server{index}.log"))
    return processes, urls


def wait_until_ready(process: subprocess.Popen, url: str, target: str, log_path: Path) -> None:
    if target == "product":
        wait_until_serving(process, url, log_path, name="server")
        return
    # The reference chat serves no pages, so wait for its port instead.
    import socket

    host, port = url.removeprefix("http://").split(":")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"server on {url} did not start listening within 30 s. See {log_path}.")


class ServerSampler(threading.Thread):
    """Record RSS and CPU of the server processes (and their children) once a second."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.processes = [psutil.Process(pid) for pid in pids]
        self.samples: list[dict] = []
        self.started = time.monotonic()
        self.stopping = threading.Event()

    def all_processes(self) -> list[psutil.Process]:
        found = []
        for process in self.processes:
            found.append(process)
            found.extend(process.children(recursive=True))
        return found

    def read(self) -> dict:
        rss = cpu = 0.0
        for process in self.all_processes():
            try:
                rss += process.memory_info().rss
                times = process.cpu_times()
                cpu += times.user + times.system
            except psutil.NoSuchProcess:
                continue
        return {"t": round(time.monotonic() - self.started, 2), "rss_mb": round(rss / 2**20, 2), "cpu_s": round(cpu, 2)}

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            self.samples.append(self.read())


# ---------------------------------------------------------------- generator side


@dataclass
class Plan:
    """The sockets, rooms and rates of one generator process, sent to it at start."""

    worker: int
    target: str
    urls: list[str]
    rooms: list[str]
    # (connection index, room position in `rooms`, cookie) for every socket this worker owns.
    sockets: list[tuple[int, int, str]]
    ramp_rate: float
    rate: float
    duration: float
    storm_at: float | None
    drain_timeout: float
    retry_connects: bool
    base_seqs: dict[str, int] = field(default_factory=dict)


class Socket:
    """One generator socket: what it received, in order, and how late."""

    def __init__(self, index: int, room: int, url: str, cookie: str, worker: "Worker") -> None:
        self.index = index
        self.room = room
        self.url = url
        self.cookie = cookie
        self.worker = worker
        self.ws = None
        self.keys = array("q")
        self.last_seq = worker.plan.base_seqs.get(worker.plan.rooms[room], 0)
        self.reader: asyncio.Task | None = None
        self.drops = 0
        self.reconnect_attempts = 0

    async def open(self) -> None:
        from websockets.asyncio.client import connect

        slug = self.worker.plan.rooms[self.room]
        ws_url = self.url.replace("http://", "ws://") + f"/ws/rooms/{slug}/"
        if self.worker.plan.target == "product":
            ws_url += f"?after={self.last_seq}"
        self.ws = await connect(
            ws_url,
            origin=self.url,
            additional_headers={"Cookie": self.cookie} if self.cookie else None,
            proxy=None,
            open_timeout=30,
            ping_interval=None,
            close_timeout=2,
            max_size=2**22,
            compression=None,
        )
        if self.worker.plan.target == "product":
            # The product's first frame is the presence list. A busy server
            # accepts and at once closes with 4503 instead, which must count
            # as a failed connect.
            self.worker.handle(self, await asyncio.wait_for(self.ws.recv(), 30), time.monotonic_ns())
        self.reader = asyncio.ensure_future(self.read(self.ws))

    async def read(self, ws) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            async for frame in ws:
                self.worker.handle(self, frame, time.monotonic_ns())
        except ConnectionClosed:
            pass
        except Exception:
            logger.exception("reader of socket %s failed", self.index)


def failure_reason(exc: Exception) -> str:
    """Name a failed connect: the exception type, with the close code or HTTP status when there is one."""
    from websockets.exceptions import ConnectionClosed

    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
        return f"closed {exc.rcvd.code}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return type(exc).__name__ + (f" {status}" if status else "")


class Worker:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.sockets: list[Socket] = []
        self.by_room: dict[int, list[Socket]] = {}
        self.latencies_ns = array("q")
        self.replayed_latencies_ns = array("q")
        self.sent: dict[int, int] = {}
        self.acked_seqs: dict[int, list[int]] = {}
        self.errors: dict[str, int] = {}
        self.connect_failures: dict[str, int] = {}
        self.retry_failures: dict[str, int] = {}
        self.all_open_at = 0.0
        self.connect_times: list[float] = []
        self.storm_started: float | None = None
        self.storm_back_at: list[float] = []
        self.warmup: dict[int, int] = {}

    def handle(self, sock: Socket, frame: str, received_ns: int) -> None:
        if self.plan.target == "reference":
            for stamp, count in REFERENCE_BODY_RE.findall(frame):
                sock.keys.append(int(count))
                self.latencies_ns.append(received_ns - int(stamp))
            return
        matches = PRODUCT_MESSAGE_RE.findall(frame)
        # A replay frame contains many messages. Their latency includes the
        # time the socket was away, so they are kept apart.
        latencies = self.latencies_ns if len(matches) == 1 else self.replayed_latencies_ns
        for seq_text, body in matches:
            seq = int(seq_text)
            sock.keys.append(seq)
            sock.last_seq = max(sock.last_seq, seq)
            stamp = STAMP_RE.match(body)
            if stamp:
                latencies.append(received_ns - int(stamp[1]))
        if matches:
            return
        ack = PRODUCT_ACK_RE.search(frame)
        if ack:
            self.acked_seqs.setdefault(sock.room, []).append(int(ack[1]))
            return
        error = PRODUCT_ERROR_RE.search(frame)
        if error:
            self.errors[error[1]] = self.errors.get(error[1], 0) + 1

    async def connect_all(self) -> None:
        plan = self.plan
        started = time.monotonic()
        interval = len(plan.urls) and 1.0 / plan.ramp_rate

        async def open_one(position: int, sock: Socket) -> None:
            await asyncio.sleep(max(0.0, started + position * interval - time.monotonic()))
            for attempt in range(MAX_CONNECT_ATTEMPTS):
                begin = time.monotonic()
                try:
                    await sock.open()
                except Exception as exc:
                    failures = self.connect_failures if attempt == 0 else self.retry_failures
                    reason = failure_reason(exc)
                    failures[reason] = failures.get(reason, 0) + 1
                    logger.debug("socket %s failed to connect: %r", sock.index, exc)
                    sock.ws = None
                    if not self.plan.retry_connects:
                        return
                    await asyncio.sleep(random.uniform(0, min(RECONNECT_CAP_SECONDS, RECONNECT_BASE_SECONDS * 2**attempt)))
                    continue
                self.connect_times.append(time.monotonic() - begin)
                self.all_open_at = max(self.all_open_at, time.monotonic() - started)
                return

        for index, room, cookie in plan.sockets:
            sock = Socket(index, room, plan.urls[index % len(plan.urls)], cookie, self)
            self.sockets.append(sock)
            self.by_room.setdefault(room, []).append(sock)
        await asyncio.gather(*(open_one(position, sock) for position, sock in enumerate(self.sockets)))
        self.ramp_seconds = time.monotonic() - started

    def open_sockets(self, room: int) -> list[Socket]:
        return [sock for sock in self.by_room[room] if sock.ws is not None and sock.reader and not sock.reader.done()]

    async def send(self, sock: Socket, room: int, body: str) -> None:
        payload = {"body": body}
        if self.plan.target == "product":
            payload["client_id"] = uuid.uuid4().hex
        try:
            await sock.ws.send(json.dumps(payload))
        except Exception as exc:
            self.errors[f"send {type(exc).__name__}"] = self.errors.get(f"send {type(exc).__name__}", 0) + 1

    async def warm_up(self) -> None:
        """Post one message per room and wait until every open socket of the room has it."""
        for room in self.by_room:
            live = self.open_sockets(room)
            if live:
                await self.send(live[0], room, "warm-up")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            waiting = [
                sock for room in self.by_room for sock in self.open_sockets(room) if not self.has_warm_up(sock)
            ]
            if not waiting:
                break
            await asyncio.sleep(0.2)
        for room, sockets in self.by_room.items():
            self.warmup[room] = max((sock.last_seq for sock in sockets), default=0)
            for sock in sockets:
                sock.keys = array("q")

    def has_warm_up(self, sock: Socket) -> bool:
        if self.plan.target == "reference":
            # The reference frames carry no seq; any frame proves membership.
            return getattr(sock, "warm", False)
        return sock.last_seq > self.plan.base_seqs.get(self.plan.rooms[sock.room], 0)

    async def send_phase(self) -> None:
        plan = self.plan
        rooms = sorted(self.by_room)
        interval = 1.0 / plan.rate
        started = time.monotonic()
        storm_task = None
        number = 0
        while True:
            due = started + number * interval
            if due - started >= plan.duration:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            if plan.storm_at is not None and storm_task is None and time.monotonic() - started >= plan.storm_at:
                storm_task = asyncio.ensure_future(self.storm())
            room = rooms[number % len(rooms)]
            number += 1
            live = self.open_sockets(room)
            if not live:
                self.errors["no open socket to send from"] = self.errors.get("no open socket to send from", 0) + 1
                continue
            count = self.sent.get(room, 0) + 1
            self.sent[room] = count
            await self.send(random.choice(live), room, f"t={time.monotonic_ns()} r={count}")
        self.send_seconds = time.monotonic() - started
        if storm_task is not None:
            await storm_task

    async def storm(self) -> None:
        """Drop every socket at once, then reconnect each with the browser's backoff."""
        self.storm_started = time.monotonic()
        for sock in self.sockets:
            if sock.ws is not None:
                sock.ws.transport.abort()
        await asyncio.sleep(0)
        await asyncio.gather(*(self.reconnect(sock) for sock in self.sockets), return_exceptions=True)

    async def reconnect(self, sock: Socket) -> None:
        if sock.reader is not None:
            try:
                await sock.reader
            except Exception:
                pass
        sock.drops += 1
        for attempt in range(20):
            await asyncio.sleep(random.uniform(0, min(RECONNECT_CAP_SECONDS, RECONNECT_BASE_SECONDS * 2**attempt)))
            sock.reconnect_attempts += 1
            try:
                await sock.open()
            except Exception as exc:
                reason = "reconnect " + failure_reason(exc)
                self.connect_failures[reason] = self.connect_failures.get(reason, 0) + 1
                continue
            self.storm_back_at.append(time.monotonic() - self.storm_started)
            return

    def expected_keys(self, room: int) -> range:
        if self.plan.target == "reference":
            return range(1, self.sent.get(room, 0) + 1)
        seen = [sock.last_seq for sock in self.by_room[room]] + self.acked_seqs.get(room, [])
        return range(self.warmup[room] + 1, max(seen, default=0) + 1)

    async def drain(self) -> None:
        deadline = time.monotonic() + self.plan.drain_timeout
        # Acks arrive after the last post; give them a moment before the target is known.
        await asyncio.sleep(1.0)
        while time.monotonic() < deadline:
            behind = 0
            for room, sockets in self.by_room.items():
                last = self.expected_keys(room)
                for sock in sockets:
                    if sock.ws is not None and last and (len(sock.keys) == 0 or max(sock.keys[-1:]) < last[-1]):
                        behind += 1
            if not behind:
                return
            await asyncio.sleep(0.5)
        logger.warning("worker %s: drain timed out with sockets still behind", self.plan.worker)

    def check_delivery(self) -> dict:
        lost = duplicates = out_of_order = received = expected_total = never_connected = not_back = 0
        for room, sockets in self.by_room.items():
            expected = self.expected_keys(room)
            for sock in sockets:
                if sock.ws is None:
                    never_connected += 1
                    continue
                if sock.reader is None or sock.reader.done():
                    # Closed at the end: it gave up reconnecting, so what it
                    # missed is counted here, not as lost.
                    not_back += 1
                    continue
                keys = [key for key in sock.keys if key in expected]
                expected_total += len(expected)
                received += len(keys)
                distinct = set(keys)
                duplicates += len(keys) - len(distinct)
                lost += len(expected) - len(distinct)
                out_of_order += sum(1 for before, after in zip(keys, keys[1:]) if after < before)
        return {
            "expected": expected_total,
            "received": received,
            "lost": lost,
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "sockets_never_connected": never_connected,
            "sockets_closed_at_end": not_back,
        }

    async def close_all(self) -> None:
        async def close(sock: Socket) -> None:
            try:
                await asyncio.wait_for(sock.ws.close(), 5)
            except Exception:
                sock.ws.transport.abort()

        await asyncio.gather(*(close(sock) for sock in self.sockets if sock.ws is not None))


def mark_reference_warm(worker: Worker) -> None:
    """Wrap the reference handler so that a socket's first frame marks it as a member."""
    original = worker.handle

    def handle(sock: Socket, frame: str, received_ns: int) -> None:
        if not getattr(sock, "warm", False):
            sock.warm = True
            if '"warm-up"' in frame:
                return
        original(sock, frame, received_ns)

    worker.handle = handle


def run_worker(plan: Plan, barrier, results) -> None:
    """Entry point of one generator process: connect, warm up, send, drain, report."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s gen{plan.worker} %(levelname)s %(message)s")
    raise_open_file_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    # Collections of many thousands of long-lived sockets stall this loop and
    # inflate every latency it measures.
    gc.disable()
    results.put(asyncio.run(worker_main(plan, barrier)))


async def wait_barrier(barrier) -> None:
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 600)


async def worker_main(plan: Plan, barrier) -> dict:
    worker = Worker(plan)
    if plan.target == "reference":
        mark_reference_warm(worker)
    cpu_start = time.process_time()
    await worker.connect_all()
    logger.info(
        "worker %s: %s sockets open, %s failed, in %.1f s",
        plan.worker, len(worker.connect_times), sum(worker.connect_failures.values()), worker.ramp_seconds,
    )
    await worker.warm_up()
    await wait_barrier(barrier)  # every socket open and warm: the parent reads idle memory
    await wait_barrier(barrier)  # the parent's idle reading is done
    cpu_send_start = time.process_time()
    await worker.send_phase()
    await worker.drain()
    cpu_send = time.process_time() - cpu_send_start
    report = {
        "worker": plan.worker,
        "sockets": len(worker.sockets),
        "connected": len(worker.connect_times),
        "connect_failures": worker.connect_failures,
        "retry_failures": worker.retry_failures,
        "ramp_seconds": round(worker.ramp_seconds, 2),
        "all_open_seconds": round(worker.all_open_at, 2),
        "connect_seconds": sorted(worker.connect_times),
        "sent": sum(worker.sent.values()),
        "send_seconds": round(worker.send_seconds, 2),
        "errors": worker.errors,
        "delivery": worker.check_delivery(),
        "latencies_ns": worker.latencies_ns.tobytes(),
        "replayed_latencies_ns": worker.replayed_latencies_ns.tobytes(),
        "storm_back_seconds": sorted(worker.storm_back_at),
        "reconnect_attempts": sum(sock.reconnect_attempts for sock in worker.sockets),
        "cpu_seconds_send_phase": round(cpu_send, 2),
        "cpu_seconds_total": round(time.process_time() - cpu_start, 2),
    }
    await worker.close_all()
    return report


# ---------------------------------------------------------------- parent side


def raise_open_file_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def build_plans(args: argparse.Namespace, urls: list[str], slugs: list[str], cookies: list[str], base_seqs: dict) -> list[Plan]:
    plans = [
        Plan(
            worker=worker, target=args.target, urls=urls, rooms=slugs, sockets=[],
            ramp_rate=args.ramp_rate / args.processes, rate=args.rate / args.processes, duration=args.duration,
            storm_at=args.storm_at, drain_timeout=args.drain_timeout, retry_connects=not args.no_retry,
            base_seqs=base_seqs,
        )
        for worker in range(args.processes)
    ]
    for index in range(args.connections):
        room = index % args.rooms
        cookie = cookies[index // args.sockets_per_user] if cookies else ""
        plans[room % args.processes].sockets.append((index, room, cookie))
    return plans


def merge_reports(reports: list[dict]) -> dict:
    latencies, replayed = array("q"), array("q")
    delivery: dict[str, int] = {}
    failures: dict[str, int] = {}
    retry_failures: dict[str, int] = {}
    errors: dict[str, int] = {}
    for report in reports:
        latencies.frombytes(report.pop("latencies_ns"))
        replayed.frombytes(report.pop("replayed_latencies_ns"))
        for key, value in report["delivery"].items():
            delivery[key] = delivery.get(key, 0) + value
        for key, value in report["connect_failures"].items():
            failures[key] = failures.get(key, 0) + value
        for key, value in report["retry_failures"].items():
            retry_failures[key] = retry_failures.get(key, 0) + value
        for key, value in report["errors"].items():
            errors[key] = errors.get(key, 0) + value
    connect_seconds = sorted(second for report in reports for second in report.pop("connect_seconds"))
    storm_back = sorted(second for report in reports for second in report.pop("storm_back_seconds"))
    return {
        "connected": sum(report["connected"] for report in reports),
        "connect_failures": failures,
        "retry_failures": retry_failures,
        "all_open_seconds": max(report["all_open_seconds"] for report in reports),
        "connect_latency_ms": summarize_ms(array("q", (int(second * 1e9) for second in connect_seconds))),
        "ramp_seconds": max(report["ramp_seconds"] for report in reports),
        "sent": sum(report["sent"] for report in reports),
        "errors": errors,
        "delivery": delivery,
        "latency_ms": summarize_ms(latencies),
        "replayed_latency_ms": summarize_ms(replayed),
        "storm": {
            "sockets_back": len(storm_back),
            "seconds_until_all_back": storm_back[-1] if storm_back else None,
            "seconds_until_half_back": storm_back[len(storm_back) // 2] if storm_back else None,
            "reconnect_attempts": sum(report["reconnect_attempts"] for report in reports),
        },
        "generator_cpu_seconds_send_phase": sum(report["cpu_seconds_send_phase"] for report in reports),
        "workers": reports,
    }


def describe_machine() -> dict:
    versions = {}
    for package in ("django", "channels", "channels-redis", "daphne", "uvicorn", "hypercorn", "granian", "websockets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True)
    return {
        "cpus": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "load_average_before": os.getloadavg(),
        "packages": versions,
        "commit": commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else ""),
    }


def summary_line(report: dict) -> str:
    run, result = report["options"], report["result"]
    latency, delivery = result["latency_ms"], result["delivery"]
    idle = report["server"]["idle_kb_per_socket"]
    return (
        f"{run['target']}/{run['server']} x{run['server_processes']}: {result['connected']}/{run['connections']} open "
        f"(first tries failed {sum(result['connect_failures'].values())}, all open after {result['all_open_seconds']} s), "
        f"{result['sent']} sent at {run['rate']}/s, "
        f"p50 {latency.get('p50')} p95 {latency.get('p95')} p99 {latency.get('p99')} max {latency.get('max')} ms, "
        f"lost {delivery.get('lost')} dup {delivery.get('duplicates')} order {delivery.get('out_of_order')}, "
        f"server CPU {report['server']['cpu_percent_send_phase']}% idle {idle} KB/socket"
    )


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name, value in DEFAULT_ENV.items():
        os.environ.setdefault(name, value)
    os.environ["DEBUG"] = "0"
    hard_limit = raise_open_file_limit()
    per_process = args.connections // args.processes + 100
    if hard_limit < per_process:
        raise SystemExit(f"The open-file limit {hard_limit} is below the {per_process} sockets per generator process; use more --processes.")

    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    output = args.output or RESULTS_DIR / f"load-{args.target}-{stamp}.json"
    machine = describe_machine()

    slugs = [f"load-{stamp}-{number}" for number in range(args.rooms)]
    cookies: list[str] = []
    base_seqs: dict[str, int] = {}
    if args.target == "product":
        setup = prepare_product(slugs, -(-args.connections // args.sockets_per_user))
        cookies, base_seqs = setup["cookies"], setup["last_seqs"]

    servers: list[subprocess.Popen] = []
    urls = args.url or []
    if not urls:
        servers, urls = start_servers(args, output.with_suffix(""))
    pids = [server.pid for server in servers] + args.server_pid
    sampler = ServerSampler(pids)
    baseline = sampler.read()
    sampler.start()

    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(args.processes + 1)
    results = context.Queue()
    plans = build_plans(args, urls, slugs, cookies, base_seqs)
    workers = [context.Process(target=run_worker, args=(plan, barrier, results)) for plan in plans]
    try:
        for process in workers:
            process.start()
        barrier.wait(timeout=args.connections / args.ramp_rate + 300)
        time.sleep(args.idle_seconds)
        idle = sampler.read()
        barrier.wait(timeout=60)
        send_started = sampler.read()
        reports = [results.get(timeout=args.duration + args.drain_timeout + 600) for _ in workers]
        send_finished = sampler.read()
        for process in workers:
            process.join(timeout=30)
    finally:
        sampler.stopping.set()
        for process in workers:
            if process.is_alive():
                process.kill()
        for server in servers:
            stop_process(server, "server")

    result = merge_reports(reports)
    send_seconds = max(report["send_seconds"] for report in result["workers"]) + 1
    opened = max(1, result["connected"])
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "started_utc": stamp,
        "options": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
        "machine": machine,
        "server": {
            "pids": pids,
            "rss_mb_before": baseline["rss_mb"],
            "rss_mb_idle": idle["rss_mb"],
            "idle_kb_per_socket": round((idle["rss_mb"] - baseline["rss_mb"]) * 1024 / opened, 1),
            "rss_mb_max": max((sample["rss_mb"] for sample in sampler.samples), default=None),
            "rss_mb_end": send_finished["rss_mb"],
            "cpu_percent_send_phase": round(100 * (send_finished["cpu_s"] - send_started["cpu_s"]) / send_seconds, 1),
            "cpu_ms_per_delivery": round(
                1000 * (send_finished["cpu_s"] - send_started["cpu_s"]) / max(1, result["delivery"]["received"]), 4
            ),
            "samples": sampler.samples,
        },
        "result": result,
    }
    report["result"]["generator_cpu_percent_send_phase"] = round(
        100 * result["generator_cpu_seconds_send_phase"] / send_seconds, 1
    )
    output.write_text(json.dumps(report, indent=1))
    print(summary_line(report))
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
