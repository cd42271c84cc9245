#!/usr/bin/env python
"""Soak one daphne node with presence churn and record its memory over time.

Starts a private redis-server and one daphne node on free ports of 127.0.0.1
and keeps about --connections sockets open in --rooms rooms. For at least
--duration wall seconds, and until --min-events Redis script calls are
counted, it replaces sockets at --churn-rate lifecycles per second (some
closed cleanly, some aborted without a close handshake). Every
--storm-interval seconds it aborts --storm-size sockets at once and
reconnects them with jittered exponential backoff. Meanwhile the node's
heartbeat, with the presence timings scaled down, refreshes every live
connection and reaps every room.

Every --sample-interval seconds it records the node's RSS, Redis used_memory
and the size of the presence keys. The churn is mapped onto
--simulated-hours hours, and memory slopes are reported per simulated hour.
At the end it closes every socket and waits for the presence keys to empty.

Writes JSON samples and a PNG plot; see docs/soak.md.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis
import websockets
from local_processes import free_port, own_cpu_seconds, process_cpu_seconds, stop_process, wait_until_serving
from websockets.asyncio.client import ClientConnection, connect

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "loadtest" / "results"

CHANNEL_PREFIX = "chatsoak"
# settings.PRESENCE_KEY_PREFIX is derived from CHANNEL_PREFIX this way.
PRESENCE_PREFIX = f"{CHANNEL_PREFIX}:presence"
USER_PREFIX = "soak"
USER_PASSWORD = "soak-pass-123"
ROOM_PREFIX = "soak-room-"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# The production presence timings in chatapp/settings.py, used to state the
# compression of the scaled-down timings.
PRODUCTION_HEARTBEAT_INTERVAL = 5.0
PRODUCTION_TTL = 15.0
PRODUCTION_LEAVE_GRACE = 3.0

# How often the heartbeat probe reads the sentinel connection's expiry. It
# must be well below the heartbeat period, or two refreshes count as one.
HEARTBEAT_PROBE_INTERVAL = 0.02

# Samples whose median gives the memory right after warm-up and at the end.
EDGE_SAMPLES = 5

# CLIENT SETNAME of this script's own Redis connections, which node_redis_clients() leaves out.
PROBE_CLIENT_NAME = "soak-probe"

logger = logging.getLogger("soak_presence")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add(
        "--duration",
        type=float,
        default=540.0,
        help="Minimum wall seconds of churn, warm-up included; the churn goes on past it until --min-events "
        "script calls are counted (default: 540).",
    )
    add(
        "--min-events",
        type=int,
        default=1_000_000,
        help="Redis script calls (presence events) to count before the churn may end (default: 1000000).",
    )
    add(
        "--max-duration",
        type=float,
        default=660.0,
        help="Wall seconds after which the churn ends even if --min-events is not reached (default: 660).",
    )
    add(
        "--simulated-hours",
        type=float,
        default=72.0,
        help="Simulated hours that the churn stands for, whatever its wall length; sets the x axis and the "
        "slope unit (default: 72).",
    )
    add(
        "--warmup",
        type=float,
        default=60.0,
        help="Wall seconds at the start that the slopes leave out, while sockets connect and caches fill "
        "(default: 60).",
    )
    add("--connections", type=int, default=1000, help="Sockets held open at a time (default: 1000).")
    add("--rooms", type=int, default=20, help="Rooms the sockets are spread over (default: 20).")
    add(
        "--users",
        type=int,
        default=600,
        help="Users the sockets log in as; socket i uses user i mod USERS, so with fewer users than sockets "
        "some users hold two tabs in one room (default: 600).",
    )
    add(
        "--churn-rate",
        type=float,
        default=30.0,
        help="Socket lifecycles (one close and one connect) per wall second; a socket's lifetime is drawn "
        "from an exponential distribution with mean CONNECTIONS / CHURN_RATE seconds (default: 30).",
    )
    add(
        "--abort-fraction",
        type=float,
        default=0.3,
        help="Fraction of voluntary leaves that abort the TCP connection without a WebSocket close handshake "
        "(default: 0.3).",
    )
    add("--storm-interval", type=float, default=60.0, help="Wall seconds between reconnect storms (default: 60).")
    add("--storm-size", type=int, default=200, help="Sockets aborted at once in each storm (default: 200).")
    add(
        "--backoff-base",
        type=float,
        default=0.5,
        help="Wall seconds of the first reconnect backoff after a storm or a failed connect; attempt n waits "
        "a uniform random time up to min(BACKOFF_MAX, BACKOFF_BASE * 2**n), as static/chat/room.js does "
        "(default: 0.5).",
    )
    add("--backoff-max", type=float, default=15.0, help="Maximum reconnect backoff in wall seconds (default: 15).")
    add("--sample-interval", type=float, default=3.0, help="Wall seconds between memory samples (default: 3).")
    add(
        "--heartbeat-interval",
        type=float,
        default=0.1,
        help=f"PRESENCE_HEARTBEAT_INTERVAL of the node in seconds (default: 0.1; production: "
        f"{PRODUCTION_HEARTBEAT_INTERVAL:g}).",
    )
    add(
        "--ttl",
        type=float,
        default=2.0,
        help=f"PRESENCE_TTL of the node in seconds (default: 2; production: {PRODUCTION_TTL:g}). The node reaps its "
        "own live connections when one heartbeat round takes longer than the TTL. A round over 1000 sockets "
        "took about 0.25 s (median) and up to several seconds on a shared 2-core machine, so a shorter TTL "
        "adds presence flapping to the churn.",
    )
    add(
        "--leave-grace",
        type=float,
        default=0.2,
        help=f"PRESENCE_LEAVE_GRACE of the node in seconds (default: 0.2; production: {PRODUCTION_LEAVE_GRACE:g}).",
    )
    add(
        "--database-url",
        default="postgres://postgres@127.0.0.1:5432/chat_soak",
        help="PostgreSQL database of the node, created when missing (default: postgres://postgres@127.0.0.1:5432/chat_soak).",
    )
    add(
        "--redis-url",
        help="Redis of the node. Without it the script starts a private redis-server on a free port, so that "
        "used_memory and the script call count cover this run only. A shared server also counts other "
        "clients' memory and EVALSHA calls.",
    )
    add("--redis-server", default="redis-server", help="redis-server executable for the private Redis (default: redis-server).")
    add(
        "--output",
        type=Path,
        help="Path of the JSON result; the PNG plot and the logs go beside it "
        "(default: loadtest/results/soak-<UTC date>-<time>.json).",
    )
    add(
        "--app-dir",
        type=Path,
        default=REPO_ROOT,
        help="Directory of the app source that daphne runs and that migrates the database, such as an export "
        "of one commit made with `git archive` (default: this repository's working tree).",
    )
    add("--seed", type=int, default=1, help="Seed of the random lifetimes, leave kinds and backoffs (default: 1).")
    args = parser.parse_args()

    for name in ("connections", "rooms", "users", "storm_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    for name in ("duration", "simulated_hours", "churn_rate", "sample_interval", "heartbeat_interval", "ttl"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be greater than 0, got {getattr(args, name)}.")
    if args.max_duration < args.duration:
        parser.error(f"--max-duration ({args.max_duration}) must be at least --duration ({args.duration}).")
    if not 0 <= args.warmup < args.duration:
        parser.error(f"--warmup must be at least 0 and less than --duration ({args.duration}), got {args.warmup}.")
    if not 0 <= args.abort_fraction <= 1:
        parser.error(f"--abort-fraction must be between 0 and 1, got {args.abort_fraction}.")
    if args.storm_size > args.connections:
        parser.error(f"--storm-size ({args.storm_size}) must not exceed --connections ({args.connections}).")
    for name in ("database_url", "redis_url"):
        url = getattr(args, name)
        if url and urlsplit(url).hostname not in LOOPBACK_HOSTS:
            parser.error(f"--{name.replace('_', '-')} must name a loopback host such as 127.0.0.1, got {url!r}.")
    return args


def raise_open_file_limit() -> int:
    """Raise the soft limit on open files to the hard limit, for this process and the servers it starts."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- Servers -----------------------------------------------------------------


def start_redis(executable: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start a redis-server without persistence on a free port of 127.0.0.1 and return it with its URL."""
    port = free_port()
    command = [
        executable,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--logfile", str(log_path),
        "--dir", str(log_path.parent),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with code {process.returncode}. See {log_path}.")
        try:
            client.ping()
            client.close()
            logger.info("redis-server started pid=%s url=%s", process.pid, url)
            return process, url
        except redis.ConnectionError:
            time.sleep(0.1)
    stop_process(process, "redis-server")
    raise RuntimeError(f"Timed out after 10 s waiting for redis-server on port {port}. See {log_path}.")


def start_daphne(env: dict[str, str], app_dir: Path, log_path: Path) -> tuple[subprocess.Popen, int]:
    """Start daphne on a free port of 127.0.0.1 and return it with its port once the login page returns 200."""
    port = free_port()
    command = [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "chatapp.asgi:application"]
    with open(log_path, "wb") as log:
        # `python -m` puts the working directory first on sys.path, ahead of
        # the editable install, so daphne imports the app from app_dir.
        process = subprocess.Popen(command, cwd=app_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
    logger.info("daphne started pid=%s port=%s log=%s", process.pid, port, log_path)

    wait_until_serving(process, f"http://127.0.0.1:{port}", log_path)
    return process, port


# --- Database ----------------------------------------------------------------


def create_database_if_missing(database_url: str) -> None:
    import psycopg

    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    admin_url = urlunsplit(parts._replace(path="/postgres"))
    try:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone() is None:
                admin.execute(f'CREATE DATABASE "{name}"')
                logger.info("created database %s", name)
    except psycopg.OperationalError as exc:
        raise SystemExit(f"Failed to connect to PostgreSQL at {parts.hostname}:{parts.port}: {exc}") from exc


def prepare_database(args: argparse.Namespace, rooms: list[str]) -> dict:
    """Migrate, create the rooms and users, and write one login session per user.

    Runs the migrate, create_room and seed_users management commands in this
    process. Sessions are written through Django's session store, as a login
    would write them, which skips hashing the password once per user.
    """
    sys.path.insert(0, str(args.app_dir))
    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection, connections

    output = io.StringIO()
    call_command("migrate", interactive=False, verbosity=0, stdout=output)
    for slug in rooms:
        call_command("create_room", slug, stdout=output)
    # One more user than --users: the sentinel that the heartbeat probe watches.
    user_count = args.users + 1
    call_command("seed_users", count=user_count, prefix=USER_PREFIX, password=USER_PASSWORD, stdout=output)
    logger.info("database ready: %s", " ".join(output.getvalue().split("\n")[-2:]).strip())

    usernames = [f"{USER_PREFIX}{number}" for number in range(1, user_count + 1)]
    from login_sessions import session_keys

    cookies = [f"{settings.SESSION_COOKIE_NAME}={key}" for key in session_keys(usernames)]

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        postgres_version = cursor.fetchone()[0]
    connections.close_all()
    return {"usernames": usernames, "cookies": cookies, "postgres_version": postgres_version}


# --- Client sockets ------------------------------------------------------------


@dataclass
class ClientStats:
    """Counts kept by the client side; the sampler thread reads them while the loop writes them."""

    live: int = 0
    connects: int = 0
    closes_clean: int = 0
    closes_aborted: int = 0
    storm_drops: int = 0
    storms: int = 0
    frames: int = 0
    connect_failures: Counter = field(default_factory=Counter)
    # Closes that the server started, by close code.
    server_closes: Counter = field(default_factory=Counter)

    def leaves(self) -> int:
        return self.closes_clean + self.closes_aborted + self.storm_drops + sum(self.server_closes.values())


@dataclass
class SocketTarget:
    url: str
    origin: str
    cookie: str


async def read_frames(ws: ClientConnection, stats: ClientStats) -> None:
    """Read and count frames until the socket closes, so that the client's receive buffer cannot fill and stall the server."""
    try:
        async for _ in ws:
            stats.frames += 1
    except websockets.ConnectionClosed:
        pass


async def sleep_unless_stopped(seconds: float, stop: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except asyncio.TimeoutError:
        pass


class Slot:
    """One place for a socket: connects, keeps the socket open for a random lifetime, leaves, and connects again."""

    def __init__(
        self,
        index: int,
        target: SocketTarget,
        args: argparse.Namespace,
        stats: ClientStats,
        rng: random.Random,
        stop: asyncio.Event,
    ) -> None:
        self.index = index
        self.stop = stop
        self.target = target
        self.args = args
        self.stats = stats
        self.rng = rng
        self.mean_lifetime = args.connections / args.churn_rate
        self.ws: ClientConnection | None = None
        self.reader: asyncio.Task | None = None
        # True while the socket is open and not yet leaving, the only time a storm may drop it.
        self.holding = False
        self.dropped_by_storm = False

    def backoff(self, attempt: int) -> float:
        """Return a full-jitter backoff in seconds for the given attempt, counted from 0."""
        return self.rng.uniform(0, min(self.args.backoff_max, self.args.backoff_base * 2**attempt))

    async def connect(self) -> bool:
        """Connect, retrying with backoff until it succeeds or the churn stops."""
        attempt = 0
        while not self.stop.is_set():
            try:
                ws = await connect(
                    self.target.url,
                    origin=self.target.origin,
                    additional_headers={"Cookie": self.target.cookie},
                    proxy=None,
                    open_timeout=10,
                    close_timeout=5,
                    ping_interval=None,
                    max_size=2**20,
                )
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as exc:
                self.stats.connect_failures[type(exc).__name__] += 1
                # Log the first failure and every hundredth after it; the JSON has the counts by type.
                if sum(self.stats.connect_failures.values()) % 100 == 1:
                    logger.warning("connect failed slot=%s attempt=%s: %r", self.index, attempt, exc)
                await sleep_unless_stopped(self.backoff(attempt), self.stop)
                attempt += 1
                continue
            self.ws = ws
            self.reader = asyncio.ensure_future(read_frames(ws, self.stats))
            self.stats.connects += 1
            self.stats.live += 1
            return True
        return False

    async def hold(self, seconds: float) -> str:
        """Keep the socket open for `seconds`; return "expired", "closed" when it closed earlier, or "stopped"."""
        self.holding = True
        stopped = asyncio.ensure_future(self.stop.wait())
        try:
            done, _ = await asyncio.wait({self.reader, stopped}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.holding = False
            stopped.cancel()
        if self.reader in done:
            return "closed"
        if stopped in done:
            return "stopped"
        return "expired"

    async def leave(self) -> None:
        """Close the socket cleanly, or abort it without a close handshake for --abort-fraction of leaves."""
        if self.rng.random() < self.args.abort_fraction:
            self.ws.transport.abort()
            self.stats.closes_aborted += 1
        else:
            await self.ws.close()
            self.stats.closes_clean += 1
        await self.forget()

    async def forget(self) -> None:
        await self.reader
        self.ws = None
        self.reader = None
        self.dropped_by_storm = False
        self.stats.live -= 1

    def drop_for_storm(self) -> bool:
        """Abort the socket as part of a reconnect storm; return False when no socket is open."""
        if not self.holding or self.dropped_by_storm:
            return False
        self.dropped_by_storm = True
        self.ws.transport.abort()
        return True

    async def run(self, start_delay: float) -> None:
        """Cycle through connect, hold and leave until the churn stops, leaving the last socket open."""
        await sleep_unless_stopped(start_delay, self.stop)
        if not await self.connect():
            return
        while True:
            lifetime = min(self.rng.expovariate(1 / self.mean_lifetime), 10 * self.mean_lifetime)
            outcome = await self.hold(lifetime)
            if outcome == "stopped":
                return
            if outcome == "expired":
                await self.leave()
                # A gap shorter than the leave grace is a quick reconnect that
                # announces no leave and no join; a longer one announces both.
                await sleep_unless_stopped(self.rng.uniform(0, 2 * self.args.leave_grace), self.stop)
            elif self.dropped_by_storm:
                self.stats.storm_drops += 1
                await self.forget()
                await sleep_unless_stopped(self.backoff(0), self.stop)
            else:
                self.stats.server_closes[str(self.ws.close_code)] += 1
                logger.warning("server closed slot=%s code=%s reason=%r", self.index, self.ws.close_code, self.ws.close_reason)
                await self.forget()
                await sleep_unless_stopped(self.backoff(0), self.stop)
            if not await self.connect():
                return

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.stats.closes_clean += 1
            await self.forget()


async def run_storms(
    slots: list[Slot], args: argparse.Namespace, stats: ClientStats, started: float, stop: asyncio.Event, rng: random.Random
) -> list[float]:
    """Abort --storm-size open sockets at once every --storm-interval seconds; return the storm times."""
    times = []
    next_storm = started + args.storm_interval
    while True:
        await sleep_unless_stopped(max(0.0, next_storm - time.monotonic()), stop)
        if stop.is_set():
            return times
        open_slots = [slot for slot in slots if slot.holding and not slot.dropped_by_storm]
        victims = rng.sample(open_slots, min(args.storm_size, len(open_slots)))
        dropped = sum(slot.drop_for_storm() for slot in victims)
        stats.storms += 1
        times.append(time.monotonic() - started)
        logger.info("storm %s: aborted %s sockets at once", stats.storms, dropped)
        next_storm += args.storm_interval


async def stop_churn(args: argparse.Namespace, client: redis.Redis, calls_before: int, started: float, stop: asyncio.Event) -> None:
    """Set `stop` once --duration has passed and --min-events script calls are counted, or at --max-duration."""
    while True:
        await asyncio.sleep(1.0)
        elapsed = time.monotonic() - started
        events = script_calls(client) - calls_before
        if elapsed >= args.duration and events >= args.min_events:
            logger.info("churn stops after %.0f s with %s script calls", elapsed, events)
            break
        if elapsed >= args.max_duration:
            logger.warning(
                "churn stops at --max-duration %.0f s with %s script calls, fewer than --min-events %s",
                args.max_duration,
                events,
                args.min_events,
            )
            break
    stop.set()


# --- Measurements ----------------------------------------------------------------


def read_proc_status(pid: int) -> dict:
    """Return VmRSS and VmHWM in bytes and the thread count from /proc/PID/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            values[key] = int(value)
    return values


def script_calls(client: redis.Redis) -> int:
    """Return the server's EVALSHA plus EVAL calls since its start, from INFO commandstats."""
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def presence_state(client: redis.Redis) -> dict:
    """Count the presence keys and their entries, and sum MEMORY USAGE over them."""
    keys = sorted(client.scan_iter(match=f"{PRESENCE_PREFIX}:*", count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
        pipe.type(key)
    replies = pipe.execute()
    state = {"keys": len(keys), "bytes": 0, "listed_connections": 0, "online_users": 0, "rooms_listed": 0}
    sizes = client.pipeline(transaction=False)
    kinds = []
    for index, key in enumerate(keys):
        state["bytes"] += replies[2 * index] or 0
        kind = replies[2 * index + 1]
        if key.endswith(":conns"):
            sizes.zcard(key)
            kinds.append("listed_connections")
        elif key.endswith(":users"):
            sizes.hlen(key)
            kinds.append("online_users")
        elif key == f"{PRESENCE_PREFIX}:rooms" and kind == "set":
            sizes.scard(key)
            kinds.append("rooms_listed")
    for kind, size in zip(kinds, sizes.execute()):
        state[kind] += size
    return state


def node_redis_clients(client: redis.Redis) -> dict[str, int]:
    """Count the Redis connections that are not this script's, by the last command each one ran.

    EVALSHA marks the node's presence store and PUBLISH or SUBSCRIBE its
    channel layer. This script names its own connections PROBE_CLIENT_NAME.
    """
    counts = Counter(entry["cmd"] for entry in client.client_list() if entry.get("name") != PROBE_CLIENT_NAME)
    return dict(counts)


class HeartbeatProbe(threading.Thread):
    """Count the node's heartbeats by watching one connection that never closes.

    Each refresh sets the sentinel connection's score in the room's conns
    sorted set to the Redis clock plus the TTL. So every change of the score
    is one heartbeat, and the difference of two scores is the heartbeat period.
    """

    def __init__(self, client: redis.Redis, conns_key: str, conn_id: str, stats: ClientStats) -> None:
        super().__init__(name="heartbeat-probe", daemon=True)
        self.client = client
        self.conns_key = conns_key
        self.conn_id = conn_id
        self.stats = stats
        self.stop_event = threading.Event()
        self.heartbeats = 0
        # Live client sockets summed over the heartbeats seen: an estimate of refreshes.
        self.live_sum = 0
        self.periods_ms: list[float] = []
        # (time.monotonic(), period in ms) of each heartbeat seen.
        self.timeline: list[tuple[float, float]] = []
        # [first, last] time.monotonic() of each stretch in which the sentinel
        # was not listed, because the node had reaped its own live connection.
        self.missing: list[list[float]] = []

    def run(self) -> None:
        last_score = None
        while not self.stop_event.wait(HEARTBEAT_PROBE_INTERVAL):
            score = self.client.zscore(self.conns_key, self.conn_id)
            now = time.monotonic()
            if score is None:
                if self.missing and self.missing[-1][1] is None:
                    continue
                self.missing.append([now, None])
                continue
            if self.missing and self.missing[-1][1] is None:
                self.missing[-1][1] = now
            if last_score is not None and score != last_score:
                self.heartbeats += 1
                self.live_sum += self.stats.live
                self.periods_ms.append(score - last_score)
                self.timeline.append((now, score - last_score))
            last_score = score


class Sampler(threading.Thread):
    """Record memory, presence state and counters every --sample-interval seconds."""

    def __init__(self, interval: float, daphne_pid: int, redis_pid: int | None, client: redis.Redis, stats: ClientStats, started: float) -> None:
        super().__init__(name="sampler", daemon=True)
        self.interval = interval
        self.daphne_pid = daphne_pid
        self.redis_pid = redis_pid
        self.client = client
        self.stats = stats
        self.started = started
        self.phase = "churn"
        self.samples: list[dict] = []
        self.errors = 0
        self.stop_event = threading.Event()
        self.lock = threading.Lock()

    def take(self) -> dict:
        status = read_proc_status(self.daphne_pid)
        memory = self.client.info("memory")
        clients = self.client.info("clients")
        sample = {
            "t": round(time.monotonic() - self.started, 3),
            "phase": self.phase,
            "daphne_rss": status["VmRSS"],
            "daphne_hwm": status["VmHWM"],
            "daphne_threads": status["Threads"],
            "daphne_fds": len(os.listdir(f"/proc/{self.daphne_pid}/fd")),
            "daphne_cpu_s": process_cpu_seconds(self.daphne_pid),
            "client_rss": read_proc_status(os.getpid())["VmRSS"],
            "client_cpu_s": own_cpu_seconds(),
            "redis_used_memory": memory["used_memory"],
            "redis_used_memory_rss": memory["used_memory_rss"],
            "redis_clients_memory": memory.get("mem_clients_normal"),
            "redis_connected_clients": clients["connected_clients"],
            "node_redis_clients": node_redis_clients(self.client),
            "redis_script_calls": script_calls(self.client),
            "presence": presence_state(self.client),
            "live": self.stats.live,
            "connects": self.stats.connects,
            "leaves": self.stats.leaves(),
            "frames": self.stats.frames,
        }
        if self.redis_pid is not None:
            sample["redis_cpu_s"] = process_cpu_seconds(self.redis_pid)
        with self.lock:
            self.samples.append(sample)
        return sample

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            try:
                self.take()
            except (OSError, redis.RedisError, KeyError) as exc:
                self.errors += 1
                logger.error("sample failed: %r", exc)


# --- Summary -----------------------------------------------------------------------


def least_squares_slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mean_x = sum(xs) / len(xs)
    mean_y = sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarize_memory(samples: list[dict], warmup: float, seconds_per_hour: float) -> dict:
    """Compare memory after warm-up with the end of the churn, and fit a slope in MB per simulated hour.

    The start and end figures are medians of EDGE_SAMPLES samples, so that one
    sample taken during a reconnect storm does not stand for the whole start or end.
    """
    churn = [sample for sample in samples if sample["phase"] == "churn"]
    measured = [sample for sample in churn if sample["t"] >= warmup]
    if not measured:
        return {"note": "no samples after the warm-up"}
    hours = [sample["t"] / seconds_per_hour for sample in measured]
    summary = {"samples_after_warmup": len(measured), "simulated_hours_fitted": round(hours[-1] - hours[0], 2)}
    series = {
        "daphne_rss": lambda sample: sample["daphne_rss"],
        "redis_used_memory": lambda sample: sample["redis_used_memory"],
        "presence_bytes": lambda sample: sample["presence"]["bytes"],
    }
    for name, value in series.items():
        values_mb = [value(sample) / 2**20 for sample in measured]
        slope = least_squares_slope(hours, values_mb)
        half = len(values_mb) // 2
        summary[name] = {
            "after_warmup_mb": round(median(values_mb[:EDGE_SAMPLES]), 3),
            "end_mb": round(median(values_mb[-EDGE_SAMPLES:]), 3),
            "min_mb": round(min(values_mb), 3),
            "max_mb": round(max(values_mb), 3),
            "slope_mb_per_simulated_hour": None if slope is None else round(slope, 5),
            "fitted_change_mb": None if slope is None else round(slope * (hours[-1] - hours[0]), 3),
            "first_half_mean_mb": round(sum(values_mb[:half]) / max(half, 1), 3),
            "second_half_mean_mb": round(sum(values_mb[half:]) / max(len(values_mb) - half, 1), 3),
        }
    return summary


def count_log_lines(log_path: Path) -> dict:
    """Count the node's log lines that show errors, tracebacks and presence anomalies."""
    patterns = {
        "error": " ERROR ",
        "warning": " WARNING ",
        "traceback": "Traceback",
        "presence_restored": "presence restored",
        "presence_reaped": "presence reaped",
        "heartbeat_failed": "presence heartbeat failed",
        "presence_join_failed": "presence join failed",
        "presence_release_failed": "presence release failed",
        "hub_event_failed": "event handling failed",
        "send_on_closed_protocol": "Attempt to send on a closed protocol",
        "application_killed": "took too long to shut down",
        "socket_connected": "socket connected",
        "socket_disconnected": "socket disconnected",
    }
    counts = Counter()
    with open(log_path, errors="replace") as log:
        for line in log:
            for name, pattern in patterns.items():
                if pattern in line:
                    counts[name] += 1
    return {name: counts[name] for name in patterns}


def describe_source(app_dir: Path) -> dict:
    """Return the commit of app_dir and its uncommitted changes, when app_dir is a git checkout."""
    def git(*arguments: str) -> str | None:
        completed = subprocess.run(["git", *arguments], cwd=app_dir, capture_output=True, text=True)
        return completed.stdout.strip() if completed.returncode == 0 else None

    return {
        "app_dir": str(app_dir),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted": git("status", "--porcelain", "--", "chatapp", "presence"),
    }


def describe_machine(redis_client: redis.Redis, postgres_version: str) -> dict:
    cpu_model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")),
        platform.processor(),
    )
    mem_total_kb = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    packages = {}
    for name in ("django", "channels", "channels-redis", "daphne", "twisted", "redis", "websockets"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(mem_total_kb / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis_server": redis_client.info("server")["redis_version"],
        "postgres": postgres_version,
        "packages": packages,
    }


# --- The run -------------------------------------------------------------------------


async def find_sentinel(client: redis.Redis, room: str, username: str, timeout: float = 10.0) -> str:
    """Return the connection id that the presence store lists for the sentinel user."""
    owners_key = f"{PRESENCE_PREFIX}:{{{room}}}:owners"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for conn_id, owner in client.hgetall(owners_key).items():
            if owner == username:
                return conn_id
        await asyncio.sleep(0.05)
    raise RuntimeError(f"Sentinel user {username} not listed in {owners_key} after {timeout} s; see the daphne log.")


async def drive(args: argparse.Namespace, port: int, setup: dict, rooms: list[str], client: redis.Redis, daphne_pid: int, redis_pid: int | None) -> dict:
    """Run the churn, the storms and the sampling, then close every socket and wait for presence to empty."""
    rng = random.Random(args.seed)
    stats = ClientStats()
    stop = asyncio.Event()
    origin = f"http://127.0.0.1:{port}"

    sentinel_user = setup["usernames"][-1]
    sentinel = await connect(
        f"ws://127.0.0.1:{port}/ws/rooms/{rooms[0]}/",
        origin=origin,
        additional_headers={"Cookie": setup["cookies"][-1]},
        proxy=None,
        ping_interval=None,
    )
    sentinel_reader = asyncio.ensure_future(read_frames(sentinel, ClientStats()))
    sentinel_conn = await find_sentinel(client, rooms[0], sentinel_user)
    probe = HeartbeatProbe(client, f"{PRESENCE_PREFIX}:{{{rooms[0]}}}:conns", sentinel_conn, stats)

    slots = []
    for index in range(args.connections):
        user = index % args.users
        room = rooms[user % args.rooms]
        target = SocketTarget(f"ws://127.0.0.1:{port}/ws/rooms/{room}/", origin, setup["cookies"][user])
        slots.append(Slot(index, target, args, stats, random.Random(rng.random()), stop))

    calls_before = script_calls(client)
    started_wall_clock = datetime.now(timezone.utc).isoformat(timespec="seconds")
    started = time.monotonic()
    sampler = Sampler(args.sample_interval, daphne_pid, redis_pid, client, stats, started)
    sampler.take()
    sampler.start()
    probe.start()

    # Connect the first sockets over half the warm-up, at most 30 s: all at
    # once they would exceed the node's connect rate and time out in the handshake.
    ramp = min(args.warmup / 2, 30.0)
    tasks = [asyncio.ensure_future(slot.run(rng.uniform(0, ramp))) for slot in slots]
    storms = asyncio.ensure_future(run_storms(slots, args, stats, started, stop, rng))
    progress = asyncio.ensure_future(log_progress(stats, sampler, probe, started, args))
    await stop_churn(args, client, calls_before, started, stop)
    await asyncio.gather(*tasks)
    storm_times = await storms
    progress.cancel()
    churn_seconds = time.monotonic() - started
    calls_churn = script_calls(client) - calls_before
    heartbeats_churn = probe.heartbeats
    live_sum_churn = probe.live_sum
    end_of_churn = sampler.take()
    logger.info("churn ended after %.1f s; closing %s sockets", churn_seconds, stats.live)

    sampler.phase = "drain"
    await asyncio.gather(*(slot.close() for slot in slots))
    await sentinel.close()
    await sentinel_reader
    drain = await wait_for_empty_presence(client, args)
    probe.stop_event.set()
    sampler.stop_event.set()
    probe.join()
    sampler.join()
    final = sampler.take()
    calls_total = script_calls(client) - calls_before

    return {
        "started_wall_clock": started_wall_clock,
        "churn_seconds": round(churn_seconds, 1),
        "storm_times_s": [round(value, 1) for value in storm_times],
        "client": {
            "connects": stats.connects + 1,
            "leaves": stats.leaves() + 1,
            "closes_clean": stats.closes_clean + 1,
            "closes_aborted": stats.closes_aborted,
            "storm_drops": stats.storm_drops,
            "storms": stats.storms,
            "server_closes": dict(stats.server_closes),
            "connect_failures": dict(stats.connect_failures),
            "frames_received": stats.frames,
            "note": "connects, leaves and closes_clean include the sentinel socket",
        },
        "heartbeat": {
            "heartbeats_during_churn": heartbeats_churn,
            "estimated_refreshes_during_churn": live_sum_churn,
            "period_ms": describe_periods(probe.periods_ms),
            "sentinel_unlisted_s": [
                [round(first - started, 2), None if last is None else round(last - started, 2)] for first, last in probe.missing
            ],
            "timeline": [[round(moment - started, 2), period] for moment, period in probe.timeline],
            "note": "timeline holds [seconds since start, period in ms]; a period that spans a stretch in "
            "sentinel_unlisted_s is the length of that stretch, not of one heartbeat",
        },
        "redis_script_calls": {"during_churn": calls_churn, "total": calls_total},
        "end_of_churn": end_of_churn,
        "drain": drain,
        "final": final,
        "samples": sampler.samples,
        "sample_errors": sampler.errors,
    }


def describe_periods(periods_ms: list[float]) -> dict:
    if not periods_ms:
        return {"count": 0}
    ordered = sorted(periods_ms)
    return {
        "count": len(ordered),
        "mean": round(sum(ordered) / len(ordered), 1),
        "p50": ordered[len(ordered) // 2],
        "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "max": ordered[-1],
    }


async def wait_for_empty_presence(client: redis.Redis, args: argparse.Namespace) -> dict:
    """Wait until no presence key is left, up to the grace plus the TTL plus 20 heartbeats (at least 10 s)."""
    timeout = max(10.0, args.leave_grace + args.ttl + 20 * args.heartbeat_interval)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        state = presence_state(client)
        if state["keys"] == 0:
            return {"emptied": True, "seconds": round(time.monotonic() - started, 2), "state": state}
        await asyncio.sleep(0.1)
    state = presence_state(client)
    leftovers = listed_connections(client)
    logger.error("presence keys left %s s after the last socket closed: %s; listed: %s", timeout, state, leftovers[:20])
    return {
        "emptied": state["keys"] == 0,
        "seconds": round(time.monotonic() - started, 2),
        "state": state,
        "listed": leftovers,
    }


def listed_connections(client: redis.Redis) -> list[dict]:
    """Return every listed connection with its room, user and seconds until expiry on the Redis clock."""
    seconds, microseconds = client.time()
    now_ms = seconds * 1000 + microseconds // 1000
    entries = []
    for conns_key in client.scan_iter(match=f"{PRESENCE_PREFIX}:*:conns", count=1000):
        owners_key = conns_key[: -len(":conns")] + ":owners"
        room = conns_key[len(PRESENCE_PREFIX) + 2 : -len("}:conns")]
        for conn_id, expiry_ms in client.zrange(conns_key, 0, -1, withscores=True):
            entries.append(
                {
                    "room": room,
                    "conn_id": conn_id,
                    "user": client.hget(owners_key, conn_id),
                    "expires_in_s": round((expiry_ms - now_ms) / 1000, 2),
                }
            )
    return entries


async def log_progress(stats: ClientStats, sampler: Sampler, probe: HeartbeatProbe, started: float, args: argparse.Namespace) -> None:
    """Log the counters every 30 s; simulated hours are estimated from --duration until the churn ends."""
    seconds_per_hour = args.duration / args.simulated_hours
    while True:
        await asyncio.sleep(30)
        with sampler.lock:
            last = sampler.samples[-1] if sampler.samples else None
        if last is None:
            continue
        elapsed = time.monotonic() - started
        logger.info(
            "t=%.0fs simulated=%.1fh live=%s connects=%s heartbeats=%s script_calls=%s rss=%.1fMB redis=%.2fMB listed=%s",
            elapsed,
            elapsed / seconds_per_hour,
            stats.live,
            stats.connects,
            probe.heartbeats,
            last["redis_script_calls"] - sampler.samples[0]["redis_script_calls"],
            last["daphne_rss"] / 2**20,
            last["redis_used_memory"] / 2**20,
            last["presence"]["listed_connections"],
        )


def count_events(result: dict, rooms: int) -> dict:
    """Split the Redis script calls into joins, releases, reaps and refreshes.

    Joins and releases are the sockets that the client opened and closed (the
    node runs JOIN on connect and RELEASE on disconnect). Reaps are one REAP
    per room and heartbeat. Refreshes are the rest, checked against the live
    sockets summed over the heartbeats that the probe saw.
    """
    client = result["client"]
    heartbeats = result["heartbeat"]["heartbeats_during_churn"]
    calls = result["redis_script_calls"]["total"]
    reaps = heartbeats * rooms
    return {
        "redis_script_calls": calls,
        "joins": client["connects"],
        "leaves": client["leaves"],
        "estimated_reaps": reaps,
        "derived_refreshes": calls - client["connects"] - client["leaves"] - reaps,
        "estimated_refreshes_from_probe": result["heartbeat"]["estimated_refreshes_during_churn"],
        "note": "reaps count only heartbeats during the churn; the drain's few heartbeats fall into derived_refreshes",
    }


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    # Absolute, because redis-server changes into the output folder before it opens its log file.
    output = (args.output or RESULTS_DIR / f"soak-{stamp}.json").resolve()
    output.parent.mkdir(parents=True, exist_ok=True)
    base = output.with_suffix("")
    daphne_log = Path(f"{base}.daphne.log")
    redis_log = Path(f"{base}.redis.log")
    plot_path = output.with_suffix(".png")

    open_files = raise_open_file_limit()
    if open_files < args.connections + 200:
        raise SystemExit(f"Open file limit {open_files} is too low for {args.connections} sockets; raise the hard limit (ulimit -Hn).")

    rooms = [f"{ROOM_PREFIX}{number}" for number in range(1, args.rooms + 1)]
    redis_process = None
    daphne = None
    try:
        redis_url = args.redis_url
        if redis_url is None:
            redis_process, redis_url = start_redis(args.redis_server, redis_log)
        client = redis.Redis.from_url(redis_url, decode_responses=True, client_name=PROBE_CLIENT_NAME)
        stale = list(client.scan_iter(match=f"{PRESENCE_PREFIX}:*", count=1000))
        if stale:
            client.delete(*stale)
            logger.info("deleted %s presence keys left by an earlier run", len(stale))

        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "chatapp.settings",
            "DATABASE_URL": args.database_url,
            "REDIS_URL": redis_url,
            "SECRET_KEY": "x",
            "CHANNEL_PREFIX": CHANNEL_PREFIX,
            "DEBUG": "0",
            "PRESENCE_HEARTBEAT_INTERVAL": str(args.heartbeat_interval),
            "PRESENCE_TTL": str(args.ttl),
            "PRESENCE_LEAVE_GRACE": str(args.leave_grace),
        }
        os.environ.update(env)
        create_database_if_missing(args.database_url)
        source = describe_source(args.app_dir)
        setup = prepare_database(args, rooms)
        machine = describe_machine(client, setup["postgres_version"])
        load_before = os.getloadavg()

        daphne, port = start_daphne(env, args.app_dir, daphne_log)
        result = asyncio.run(drive(args, port, setup, rooms, client, daphne.pid, redis_process.pid if redis_process else None))
        load_after = os.getloadavg()
    finally:
        if daphne is not None:
            stop_process(daphne, "daphne")
        if redis_process is not None:
            stop_process(redis_process, "redis-server")

    seconds_per_hour = result["churn_seconds"] / args.simulated_hours
    result.update(
        {
            "command": shlex.join([sys.executable, *sys.argv]),
            "options": {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()},
            "machine": {**machine, "load_before": load_before, "load_after": load_after},
            "source": source,
            "mapping": describe_mapping(args, result),
            "events": count_events(result, args.rooms),
            "memory": summarize_memory(result["samples"], args.warmup, seconds_per_hour),
            "daphne_log": {"path": str(daphne_log), **count_log_lines(daphne_log)},
            "files": {"json": str(output), "plot": str(plot_path), "daphne_log": str(daphne_log)},
        }
    )
    output.write_text(json.dumps(result, indent=2))
    logger.info("wrote %s", output)

    try:
        from plot_soak import plot_result
    except ImportError as exc:
        logger.error("plot skipped: %s; install matplotlib into the venv and run loadtest/plot_soak.py %s", exc, output)
    else:
        plot_result(result, plot_path)
        logger.info("wrote %s", plot_path)
    print_summary(result)
    return 0


def describe_mapping(args: argparse.Namespace, result: dict) -> dict:
    """State how the churn's wall seconds and events map onto simulated hours."""
    seconds_per_hour = result["churn_seconds"] / args.simulated_hours
    events = result["redis_script_calls"]["during_churn"]
    return {
        "simulated_hours": args.simulated_hours,
        "wall_seconds_per_simulated_hour": round(seconds_per_hour, 3),
        "script_calls_per_simulated_hour": round(events / args.simulated_hours),
        "connects_per_simulated_hour": round(result["client"]["connects"] / args.simulated_hours),
        "heartbeats_per_simulated_hour": round(result["heartbeat"]["heartbeats_during_churn"] / args.simulated_hours, 1),
        "production_heartbeats_per_hour": round(3600 / PRODUCTION_HEARTBEAT_INTERVAL),
        "timing_compression": {
            "heartbeat": round(PRODUCTION_HEARTBEAT_INTERVAL / args.heartbeat_interval, 1),
            "ttl": round(PRODUCTION_TTL / args.ttl, 1),
            "leave_grace": round(PRODUCTION_LEAVE_GRACE / args.leave_grace, 1),
        },
    }


def print_summary(result: dict) -> None:
    events = result["events"]
    memory = result["memory"]
    print()
    print(f"churn: {result['churn_seconds']} s wall = {result['mapping']['simulated_hours']:g} simulated hours")
    print(
        f"events: {events['redis_script_calls']:,} Redis script calls = {events['joins']:,} joins + "
        f"{events['leaves']:,} leaves + ~{events['estimated_reaps']:,} reaps + {events['derived_refreshes']:,} refreshes "
        f"(probe estimate {events['estimated_refreshes_from_probe']:,})"
    )
    for name in ("daphne_rss", "redis_used_memory", "presence_bytes"):
        figures = memory.get(name)
        if figures:
            print(
                f"{name}: {figures['after_warmup_mb']} MB after warm-up, {figures['end_mb']} MB at the end, "
                f"slope {figures['slope_mb_per_simulated_hour']} MB per simulated hour"
            )
    print(f"end of churn: {result['end_of_churn']['presence']} with {result['end_of_churn']['live']} live client sockets")
    drain = result["drain"]
    print(f"after drain: emptied={drain['emptied']} after {drain['seconds']} s, {drain['state']}")
    print(f"daphne log: {result['daphne_log']}")


if __name__ == "__main__":
    sys.exit(main())
