#!/usr/bin/env python
"""Measure post throughput and post-to-delivery latency in one chat room.

Starts daphne on a free port of 127.0.0.1 (unless --url names a running
server), opens --receivers and --senders sockets in one room, and has
each sender post --messages-per-sender messages, each after the ack of its
previous one. Every body carries its send time as `t=<time.monotonic_ns()>`,
and all sockets live in this process, so a receiver's latency is its own
monotonic clock on arrival minus that time. Every socket's seqs are then
checked for lost, out-of-order and duplicate messages.

Writes a JSON file and a Markdown table of the figures; see loadtest/README.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit

import websockets
from bench_database import prepare_database as prepare_rooms_and_users
from latency_stats import summarize_ms
from local_processes import free_port, own_cpu_seconds, process_cpu_seconds, stop_process, wait_until_serving
from websockets.asyncio.client import ClientConnection, connect

REPO_ROOT = Path(__file__).resolve().parent.parent

# Values for the variables that the environment leaves unset. The server that
# this script starts inherits the same environment.
DEFAULT_ENV = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/chat_bench",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "SECRET_KEY": "loadtest-only-secret-key",
    "CHANNEL_PREFIX": "chatbench",
    # The per-user posting limit (a token bucket, see chatapp/settings.py)
    # would cap each sender, so the benchmark raises it far above any rate one
    # sender reaches. The server still checks the limit on every post.
    "CHAT_RATE_LIMIT_PER_SECOND": "1000000",
    "CHAT_RATE_LIMIT_BURST": "1000000",
}
USER_PREFIX = "bench"
USER_PASSWORD = "bench-pass-123"

# The server renders each message as templates/chat/_message.html, acks as
# _ack_frame.html and rejections as _error_frame.html.
ARTICLE_RE = re.compile(r'<article class="message[^"]*" data-seq="(\d+)".*?<p class="body">(.*?)</p></article>', re.S)
SEND_TIME_RE = re.compile(r"\bt=(\d+)")
ACK_RE = re.compile(r'data-ack-seq="(\d+)" data-client-id="([^"]*)"')
ERROR_RE = re.compile(r'data-error="([^"]+)"(?: data-client-id="([^"]*)")?')

logger = logging.getLogger("bench_delivery")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--receivers", type=int, default=100, help="Sockets that only receive (default: 100).")
    parser.add_argument(
        "--senders", type=int, default=20, help="Sockets that post, one message in flight each (default: 20)."
    )
    parser.add_argument(
        "--messages-per-sender", type=int, default=100, help="Messages each sender posts (default: 100)."
    )
    parser.add_argument(
        "--room", help="Slug of the room, created when missing (default: bench-<UTC date>-<time>, a new room per run)."
    )
    parser.add_argument(
        "--url",
        help="Base URL of a running server, such as http://127.0.0.1:8000. That server must use the same "
        "DATABASE_URL as this script and a posting limit above each sender's rate. Without --url the script "
        "starts daphne on a free port of 127.0.0.1 and stops it at the end.",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="Path of the JSON result; the Markdown table goes beside it with the suffix .md "
        "(default: loadtest/results/delivery-<UTC date>-<time>.json).",
    )
    parser.add_argument(
        "--send-time-limit",
        type=float,
        default=60.0,
        help="Seconds after which senders stop posting even if messages remain (default: 60).",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=20.0,
        help="Seconds to wait after the last ack for every socket to receive the last message (default: 20).",
    )
    parser.add_argument(
        "--ack-timeout", type=float, default=10.0, help="Seconds a sender waits for one ack (default: 10)."
    )
    args = parser.parse_args()

    for name in ("receivers", "senders", "messages_per_sender"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    return args


def prepare_database(slug: str, user_count: int) -> dict:
    """Migrate, create the room and the users bench1..benchN, and write one login session per user.

    Sessions are written through Django's session store, as a login would
    write them, which skips hashing the password once per user.
    """
    setup = prepare_rooms_and_users([slug], USER_PREFIX, user_count, USER_PASSWORD)
    return {
        "session_keys": setup["session_keys"],
        "cookie_name": setup["cookie_name"],
        "last_seq": setup["last_seqs"][slug],
        "postgres_version": setup["postgres_version"],
    }


def start_server(log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start daphne on a free port of 127.0.0.1 and return it with its URL once the login page returns 200."""
    port = free_port()
    daphne = Path(sys.executable).parent / "daphne"
    command = [str(daphne), "-b", "127.0.0.1", "-p", str(port), "chatapp.asgi:application"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    logger.info("daphne started pid=%s url=%s log=%s", process.pid, base_url, log_path)
    wait_until_serving(process, base_url, log_path)
    return process, base_url


class Client:
    """A socket in the room that records every message seq in arrival order."""

    def __init__(self, name: str, ws: ClientConnection, is_receiver: bool) -> None:
        self.name = name
        self.ws = ws
        self.is_receiver = is_receiver
        self.seqs: list[int] = []
        self.max_seq = 0
        self.latencies_ns: list[int] = []
        self.errors: Counter[str] = Counter()
        # Acks this socket waits for, by client_id.
        self.pending: dict[str, asyncio.Future[int]] = {}
        self.reader = asyncio.ensure_future(self.read())

    async def read(self) -> None:
        """Handle frames until the socket closes, which measure() does for every socket at the end."""
        try:
            async for frame in self.ws:
                self.handle(frame, time.monotonic_ns())
        except websockets.ConnectionClosedError as exc:
            logger.warning("socket %s closed with an error: %s", self.name, exc)
        finally:
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ConnectionError(f"socket {self.name} closed before the ack arrived"))

    def handle(self, frame: str, received_ns: int) -> None:
        # NOTE: received_ns is taken when this process reads the frame, and one
        # event loop serves every socket, so latencies include this client's delay.
        for seq_text, body in ARTICLE_RE.findall(frame):
            seq = int(seq_text)
            self.seqs.append(seq)
            self.max_seq = max(self.max_seq, seq)
            sent = SEND_TIME_RE.search(body)
            if self.is_receiver and sent:
                self.latencies_ns.append(received_ns - int(sent[1]))
        for seq_text, client_id in ACK_RE.findall(frame):
            future = self.pending.pop(client_id, None)
            if future is not None and not future.done():
                future.set_result(int(seq_text))
        for code, client_id in ERROR_RE.findall(frame):
            self.errors[code] += 1
            future = self.pending.pop(client_id, None)
            if future is not None and not future.done():
                future.set_exception(RuntimeError(f"server rejected client_id={client_id}: {code}"))

    async def post(self, body: str, client_id: str, timeout: float) -> int:
        """Send one message and return the seq from its ack."""
        future = asyncio.get_running_loop().create_future()
        self.pending[client_id] = future
        await self.ws.send(json.dumps({"body": body, "client_id": client_id}))
        return await asyncio.wait_for(future, timeout)


async def open_client(ws_url: str, origin: str, cookie: str, name: str, is_receiver: bool) -> Client:
    ws = await connect(
        ws_url,
        origin=origin,
        additional_headers={"Cookie": cookie},
        proxy=None,
        open_timeout=30,
        ping_interval=None,
        max_size=2**22,
    )
    return Client(name, ws, is_receiver)


async def run_sender(client: Client, index: int, args: argparse.Namespace, token: str, deadline: float, stats: dict) -> None:
    """Post messages one after another until the count or the send deadline is reached."""
    for number in range(args.messages_per_sender):
        if time.monotonic() > deadline:
            stats["stopped_by_time_limit"] = True
            return
        client_id = f"{token}-{index}-{number}"
        sent_ns = time.monotonic_ns()
        try:
            seq = await client.post(f"t={sent_ns} sender={index} n={number}", client_id, args.ack_timeout)
        except (asyncio.TimeoutError, RuntimeError, ConnectionError, websockets.ConnectionClosed) as exc:
            logger.error("sender %s stopped: post client_id=%s failed: %r", index, client_id, exc)
            stats["failed"] += 1
            return
        acked_ns = time.monotonic_ns()
        stats["ack_latencies_ns"].append(acked_ns - sent_ns)
        stats["ack_times_ns"].append(acked_ns)
        stats["acked_seqs"].append(seq)


async def wait_for_seq(clients: list[Client], seq: int, timeout: float) -> list[Client]:
    """Wait until every client has received `seq`, and return the clients that had not when the timeout passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        behind = [client for client in clients if client.max_seq < seq]
        if not behind:
            return []
        await asyncio.sleep(0.02)
    return [client for client in clients if client.max_seq < seq]


def acks_per_second(ack_times_ns: list[int], started_ns: int) -> list[int]:
    seconds = Counter((ack_ns - started_ns) // 1_000_000_000 for ack_ns in ack_times_ns)
    return [seconds[second] for second in range(max(seconds, default=-1) + 1)]


def check_delivery(clients: list[Client], first_seq: int, last_seq: int) -> dict:
    """Count, over all clients, messages lost, arrived after a higher seq, or received twice."""
    expected = set(range(first_seq, last_seq + 1))
    totals = Counter()
    for client in clients:
        seen: set[int] = set()
        highest = 0
        problems = Counter()
        for seq in client.seqs:
            if seq in seen:
                problems["duplicates"] += 1
                continue
            if seq < highest:
                problems["out_of_order"] += 1
            seen.add(seq)
            highest = max(highest, seq)
        problems["lost"] = len(expected - seen)
        problems["unexpected"] = len(seen - expected)
        if +problems:
            totals["sockets_with_problems"] += 1
            logger.warning("socket %s: %s", client.name, dict(+problems))
        totals.update(problems)
        totals["messages_received"] += len(client.seqs)
    return {
        "sockets": len(clients),
        "expected_per_socket": len(expected),
        **{key: totals[key] for key in ("messages_received", "lost", "out_of_order", "duplicates", "unexpected")},
        "sockets_with_problems": totals["sockets_with_problems"],
    }


def count_log_lines(log_path: Path) -> dict:
    """Count server log lines that show gaps filled from the database, errors and tracebacks."""
    patterns = {
        "socket_gap": "socket gap",
        "hub_gap": " gap room=",
        "gap_check_fill": "gap check room=",
        "error": " ERROR ",
        "traceback": "Traceback",
    }
    text = log_path.read_text(errors="replace")
    return {name: text.count(pattern) for name, pattern in patterns.items()}


async def open_clients(args: argparse.Namespace, base_url: str, setup: dict) -> list[Client]:
    """Open the receiver sockets, then the sender sockets, each with its own user's session."""
    parts = urlsplit(base_url)
    ws_scheme = "wss" if parts.scheme == "https" else "ws"
    ws_url = f"{ws_scheme}://{parts.netloc}/ws/rooms/{args.room}/?after={setup['last_seq']}"
    origin = f"{parts.scheme}://{parts.netloc}"
    cookies = [f"{setup['cookie_name']}={key}" for key in setup["session_keys"]]
    logger.info("connecting %s receivers and %s senders to %s", args.receivers, args.senders, ws_url)

    openings = [
        open_client(ws_url, origin, cookies[index], f"receiver{index}", True) for index in range(args.receivers)
    ]
    openings += [
        open_client(ws_url, origin, cookies[args.receivers + index], f"sender{index}", False)
        for index in range(args.senders)
    ]
    return list(await asyncio.gather(*openings))


async def run_load(args: argparse.Namespace, clients: list[Client], server_pid: int | None) -> dict:
    """Post the warm-up message, then every sender's messages, and wait until each socket has the last one."""
    senders = clients[args.receivers :]
    token = uuid.uuid4().hex[:12]

    # Every socket must receive this first message before the clock starts,
    # so that each one has finished its replay and is live.
    warmup_seq = await senders[0].post("warm-up", f"{token}-warmup", args.ack_timeout)
    behind = await wait_for_seq(clients, warmup_seq, 30)
    if behind:
        raise RuntimeError(
            f"Timed out after 30 s: {len(behind)} sockets did not receive the warm-up message seq={warmup_seq}. "
            "See the daphne log."
        )
    logger.info("all %s sockets received the warm-up message seq=%s; sending", len(clients), warmup_seq)

    stats = {"ack_latencies_ns": [], "ack_times_ns": [], "acked_seqs": [], "failed": 0, "stopped_by_time_limit": False}
    server_cpu_before = process_cpu_seconds(server_pid) if server_pid else None
    own_cpu_before = own_cpu_seconds()
    started = time.monotonic()
    stats["started_ns"] = time.monotonic_ns()
    deadline = started + args.send_time_limit
    await asyncio.gather(
        *(run_sender(client, index, args, token, deadline, stats) for index, client in enumerate(senders))
    )
    stats["send_seconds"] = time.monotonic() - started

    stats["warmup_seq"] = warmup_seq
    stats["last_seq"] = max(stats["acked_seqs"], default=warmup_seq)
    behind = await wait_for_seq(clients, stats["last_seq"], args.drain_timeout)
    if behind:
        logger.warning(
            "%s sockets had not received seq=%s after %s s", len(behind), stats["last_seq"], args.drain_timeout
        )
    stats["drain_seconds"] = time.monotonic() - started - stats["send_seconds"]
    stats["server_cpu"] = process_cpu_seconds(server_pid) - server_cpu_before if server_pid else None
    stats["own_cpu"] = own_cpu_seconds() - own_cpu_before
    return stats


def summarize_run(args: argparse.Namespace, clients: list[Client], stats: dict, first_seq: int) -> dict:
    receivers, senders = clients[: args.receivers], clients[args.receivers :]
    acked = sorted(stats["acked_seqs"])
    posts = len(acked)
    warmup_seq, last_seq = stats["warmup_seq"], stats["last_seq"]
    send_seconds, server_cpu, own_cpu = stats["send_seconds"], stats["server_cpu"], stats["own_cpu"]
    busy_seconds = send_seconds + stats["drain_seconds"]
    return {
        "posts": {
            "count": posts,
            "failed": stats["failed"],
            "stopped_by_time_limit": stats["stopped_by_time_limit"],
            "seconds": round(send_seconds, 3),
            "per_second": round(posts / send_seconds, 1),
            "acked_seqs_contiguous": acked == list(range(warmup_seq + 1, warmup_seq + 1 + posts)),
            "ack_latency_ms": summarize_ms(stats["ack_latencies_ns"]),
            # Acks in each whole second after the first send. A falling count
            # shows the server slowing down during the run.
            "acks_per_second_timeline": acks_per_second(stats["ack_times_ns"], stats["started_ns"]),
        },
        "delivery": {
            "latency_ms": summarize_ms([value for client in receivers for value in client.latencies_ns]),
            "drain_seconds_after_last_ack": round(stats["drain_seconds"], 3),
            "frames_per_second": round(sum(len(client.seqs) for client in clients) / busy_seconds, 1),
            "receivers": check_delivery(receivers, first_seq, last_seq),
            "senders": check_delivery(senders, first_seq, last_seq),
            "error_frames": dict(sum((client.errors for client in clients), Counter())),
        },
        "cpu": {
            "window_seconds": round(busy_seconds, 3),
            "server_seconds": round(server_cpu, 2) if server_cpu is not None else None,
            "server_percent_of_one_core": round(100 * server_cpu / busy_seconds, 1) if server_cpu is not None else None,
            "client_seconds": round(own_cpu, 2),
            "client_percent_of_one_core": round(100 * own_cpu / busy_seconds, 1),
        },
    }


async def measure(args: argparse.Namespace, base_url: str, setup: dict, server_pid: int | None) -> dict:
    started = time.monotonic()
    clients = await open_clients(args, base_url, setup)
    connect_seconds = time.monotonic() - started
    try:
        stats = await run_load(args, clients, server_pid)
    finally:
        await asyncio.wait_for(asyncio.gather(*(client.ws.close() for client in clients)), 15)
        await asyncio.wait_for(asyncio.gather(*(client.reader for client in clients)), 15)
    return {"connect_seconds": round(connect_seconds, 2), **summarize_run(args, clients, stats, setup["last_seq"] + 1)}


def describe_machine() -> dict:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    cpu_models = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    packages = ("django", "channels", "channels-redis", "daphne", "psycopg", "redis", "websockets")
    return {
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_models[0] if cpu_models else None,
        "mem_total": meminfo["MemTotal"].strip(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": {name: metadata.version(name) for name in packages},
    }


def describe_code() -> dict:
    """Return the checked-out commit and the files that differ from it, because the run measures the working tree."""

    def git(*arguments: str) -> str:
        result = subprocess.run(["git", *arguments], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
        return result.stdout if result.returncode == 0 else ""

    # Each porcelain line is a two-letter status, a space and the path.
    changed = [line[3:] for line in git("status", "--porcelain").splitlines()]
    return {"commit": git("rev-parse", "HEAD").strip() or None, "uncommitted_files": changed}


def markdown_table(report: dict) -> str:
    posts, delivery, cpu = report["result"]["posts"], report["result"]["delivery"], report["result"]["cpu"]
    latency, ack = delivery["latency_ms"], posts["ack_latency_ms"]
    receivers, senders = delivery["receivers"], delivery["senders"]
    config = report["config"]
    stopped = " (stopped by --send-time-limit)" if posts["stopped_by_time_limit"] else ""
    if cpu["server_seconds"] is None:
        server_cpu = "not measured: the server was started outside this script"
    else:
        server_cpu = f"{cpu['server_percent_of_one_core']} % of one core"
    rows = [
        ("Sockets", f"{config['receivers']} receivers + {config['senders']} senders, room `{config['room']}`"),
        ("Posts acked", f"{posts['count']} in {posts['seconds']} s ({posts['failed']} failed){stopped}"),
        ("Posts per second", f"{posts['per_second']}"),
        ("Ack latency p50 / p95 / p99 / max", f"{ack['p50']} / {ack['p95']} / {ack['p99']} / {ack['max']} ms"),
        (
            "Delivery latency p50 / p95 / p99 / max",
            f"{latency.get('p50')} / {latency.get('p95')} / {latency.get('p99')} / {latency.get('max')} ms "
            f"({latency['count']} deliveries)",
        ),
        ("Frames delivered per second", f"{delivery['frames_per_second']}"),
        ("Drain after last ack", f"{delivery['drain_seconds_after_last_ack']} s"),
        (
            "Receivers: lost / out of order / duplicates",
            f"{receivers['lost']} / {receivers['out_of_order']} / {receivers['duplicates']}",
        ),
        (
            "Senders: lost / out of order / duplicates",
            f"{senders['lost']} / {senders['out_of_order']} / {senders['duplicates']}",
        ),
        ("Server CPU (daphne)", server_cpu),
        ("Client CPU (this script)", f"{cpu['client_percent_of_one_core']} % of one core"),
        ("Load average (1 min) before the run", f"{report['machine']['load_average_at_start'][0]:.2f}"),
    ]
    lines = ["| Figure | Value |", "| --- | --- |"] + [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"


def raise_open_file_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new_soft = hard if hard == resource.RLIM_INFINITY else min(hard, max(needed, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
        logger.info("raised the open file limit from %s to %s", soft, new_soft)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args = parse_args()
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.room = args.room or f"bench-{stamp}"
    args.output = args.output or REPO_ROOT / "loadtest" / "results" / f"delivery-{stamp}.json"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    for name, value in DEFAULT_ENV.items():
        os.environ.setdefault(name, value)
    # With DEBUG on, Django records every query in memory, which a production server does not.
    os.environ["DEBUG"] = "0"
    raise_open_file_limit(2 * (args.receivers + args.senders) + 256)

    # Other busy processes on the machine slow the run down, and the load
    # average before the run shows whether there were any.
    load_at_start = os.getloadavg()
    code = describe_code()
    setup = prepare_database(args.room, args.receivers + args.senders)
    server, log_path = None, args.output.with_suffix(".daphne.log")
    base_url = args.url
    if base_url is None:
        server, base_url = start_server(log_path)
    try:
        result = asyncio.run(measure(args, base_url, setup, server.pid if server else None))
    finally:
        if server is not None:
            stop_process(server, "daphne")

    report = {
        "started_at": stamp,
        "command": shlex.join([os.path.relpath(sys.executable), *sys.argv]),
        "server_url": base_url,
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "code": code,
        "machine": {
            **describe_machine(),
            "postgres": setup["postgres_version"],
            "load_average_at_start": load_at_start,
        },
        "result": result,
        "server_log": {"path": str(log_path), **count_log_lines(log_path)} if server is not None else None,
    }
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_table(report)
    args.output.with_suffix(".md").write_text(table)
    print(table)
    logger.info("wrote %s and %s", args.output, args.output.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
