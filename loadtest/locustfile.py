"""Locust load test: chat users who log in, open a room socket, post and read.

Each locust user logs in over HTTP like a browser, opens the room page for the
room's last seq, then keeps one WebSocket open on `/ws/rooms/<slug>/?after=<seq>`.
It posts every `--message-interval` seconds with its send time in the body and
reports these rows (request type `WS`) besides the HTTP ones:

- `ack`: send to acknowledgement, where rejected frames and missing acks fail;
- `deliver own`: send to the arrival of the socket's own message, failing when it is missing;
- `deliver others`: send to the arrival of other sockets' messages;
- `connect`: WebSocket handshakes;
- `drop`, `order`, `duplicate`, `send`: failures only.

Send times are wall-clock (`time.time_ns()`), because with `--processes` the
sender and the receiver may be different processes. They must run on one
machine, or on machines with synchronised clocks.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import random
import re
import struct
import time
import uuid
from collections import deque
from urllib.parse import urlsplit

import gevent
import websocket
from locust import FastHttpUser, events, task
from locust.exception import StopUser

logger = logging.getLogger(__name__)

MESSAGE_RE = re.compile(
    r'<article class="message[^"]*" data-seq="(\d+)" data-author="[^"]*"(?: data-client-id="([^"]*)")?[^>]*>'
    r'.*?<p class="body">(.*?)</p></article>',
    re.S,
)
SEND_TIME_RE = re.compile(r"\bt=(\d+)\b")
ACK_RE = re.compile(r'data-ack-seq="(\d+)" data-client-id="([^"]*)"')
ERROR_RE = re.compile(r'data-error="([^"]+)"(?: data-client-id="([^"]*)")?')
CSRF_TOKEN_RE = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')
ROOM_LAST_SEQ_RE = re.compile(r'id="messages"[^>]*data-after="(\d+)"')

# Close codes after which a reconnect cannot succeed, because `after` is
# invalid, the user is not logged in, deactivated or banned, or the room does not exist.
FINAL_CLOSE_CODES = frozenset({4400, 4401, 4403, 4404})
RECONNECT_BASE_DELAY_SECONDS = 0.5
RECONNECT_MAX_DELAY_SECONDS = 30.0
# A connection that stayed up this long resets the backoff, so a server that
# accepts and closes at once (1011 while Redis is down) still backs off.
STABLE_CONNECTION_SECONDS = 10.0
# Seq ranges kept to tell a repeated seq from a late one.
MAX_SEQ_RANGES = 64
SEQ_PROBLEM_MESSAGES = {
    "duplicate": "seq received a second time",
    "order": "seq below the last one received",
}
# Task period of a receive-only user (`--message-interval 0`).
IDLE_TASK_SECONDS = 5.0
# Each kind of warning is logged at most this many times per process, and the stats count the rest.
MAX_WARNINGS_PER_KIND = 10

user_counter = itertools.count()
warning_counts: dict[str, int] = {}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


@events.init_command_line_parser.add_listener
def add_chat_arguments(parser) -> None:
    group = parser.add_argument_group(
        "chat users", "Users come from `manage.py seed_users`, rooms from `manage.py create_room`."
    )
    group.add_argument("--user-prefix", default="load", help="Username prefix given to seed_users (default: load).")
    group.add_argument(
        "--user-password", default="load-password", help="Password given to seed_users (default: load-password)."
    )
    group.add_argument(
        "--user-count",
        type=positive_int,
        default=10000,
        help="Number of seeded users; locust users take PREFIX1..PREFIXN in turn and wrap around (default: 10000).",
    )
    group.add_argument(
        "--rooms", type=positive_int, default=1, help="Number of rooms; users spread over them in turn (default: 1)."
    )
    group.add_argument(
        "--room-prefix", default="load-", help="Room slug prefix; rooms are PREFIX1..PREFIXN (default: load-)."
    )
    group.add_argument(
        "--message-interval",
        type=non_negative_float,
        default=5.0,
        help="Seconds between one user's messages; 0 means the user only receives (default: 5).",
    )
    group.add_argument(
        "--message-timeout",
        type=positive_float,
        default=30.0,
        help="Seconds after which an own message without ack or delivery counts as failed (default: 30).",
    )
    group.add_argument(
        "--socket-timeout",
        type=positive_float,
        default=60.0,
        help="Seconds without any frame or ping after which a socket counts as dropped; "
        "keep it above the server's --ping-interval (default: 60).",
    )
    group.add_argument(
        "--max-reconnect-attempts",
        type=positive_int,
        default=10,
        help="Failed connects in a row after which a user stops (default: 10).",
    )


class SeqHistory:
    """Seqs one user has received in one room, as ascending ranges of consecutive seqs."""

    def __init__(self) -> None:
        self.ranges: deque[list[int]] = deque(maxlen=MAX_SEQ_RANGES)

    @property
    def last_seq(self) -> int | None:
        return self.ranges[-1][1] if self.ranges else None

    def add(self, seq: int) -> str | None:
        """Record a seq; return "duplicate" or "order" when it is not above the last one.

        A jump forward is no error, because the room is shared and a reconnect
        resumes where the socket stopped. Seqs older than the kept ranges count as "order".
        """
        if not self.ranges or seq > self.ranges[-1][1] + 1:
            self.ranges.append([seq, seq])
            return None
        if seq == self.ranges[-1][1] + 1:
            self.ranges[-1][1] = seq
            return None
        for first, last in self.ranges:
            if first <= seq <= last:
                return "duplicate"
        return "order"


class SocketDropped(Exception):
    pass


class FrameRejected(Exception):
    pass


class DeliveryError(Exception):
    pass


def warn_limited(kind: str, message: str, *args) -> None:
    """Log a warning, at most MAX_WARNINGS_PER_KIND times per kind in this process."""
    count = warning_counts.get(kind, 0) + 1
    warning_counts[kind] = count
    if count <= MAX_WARNINGS_PER_KIND:
        logger.warning(message, *args)
    if count == MAX_WARNINGS_PER_KIND:
        logger.warning("further %s warnings are not logged; the locust stats count them", kind)


def close_code(frame_data: bytes) -> int | None:
    """Return the status code of a close frame's payload, or None when it has none."""
    if len(frame_data) < 2:
        return None
    return struct.unpack("!H", frame_data[:2])[0]


def pick_user_number(environment, user_count: int) -> int:
    """Return the next seeded user's number, from 1, spread over local worker processes.

    Each `--processes` worker takes every P-th number from its own index. Workers
    started on other machines may pick the same numbers, which only means that
    one account has several sockets open.
    """
    options = environment.parsed_options
    processes = max(getattr(options, "processes", 0) or 0, 1)
    worker_index = getattr(environment.runner, "worker_index", 0) or 0
    return (worker_index + processes * next(user_counter)) % user_count + 1


class ChatUser(FastHttpUser):
    """One browser tab: a logged-in user with one socket in one room."""

    def wait_time(self) -> float:
        return self.message_interval if self.message_interval > 0 else IDLE_TASK_SECONDS

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.message_interval = options.message_interval
        self.message_timeout = options.message_timeout
        self.socket_timeout = options.socket_timeout
        self.max_reconnect_attempts = options.max_reconnect_attempts

        user_number = pick_user_number(self.environment, options.user_count)
        self.username = f"{options.user_prefix}{user_number}"
        self.room_slug = f"{options.room_prefix}{(user_number - 1) % options.rooms + 1}"
        logger.debug("locust user logs in as %s for room %s", self.username, self.room_slug)

        self.running = True
        self.socket: websocket.WebSocket | None = None
        self.seqs = SeqHistory()
        # client_id -> send time in ns, for messages this socket sent.
        self.unacked: dict[str, int] = {}
        self.undelivered: dict[str, int] = {}
        self.stopped_reason: str | None = None

        self.origin = self.host.rstrip("/")
        split_host = urlsplit(self.origin)
        scheme = "wss" if split_host.scheme == "https" else "ws"
        self.socket_url = f"{scheme}://{split_host.netloc}/ws/rooms/{self.room_slug}/"

        # A failure here makes the first task stop the user, because StopUser
        # raised in on_start makes locust log a traceback for every user.
        if not self.log_in(options.user_password):
            self.stopped_reason = "login failed"
            return
        after = self.fetch_room_last_seq()
        if after is None:
            self.stopped_reason = "room page failed"
            return
        # From here on only the socket stays open, as in a browser tab whose page
        # has loaded. An idle keep-alive connection per user would double the
        # file descriptors on both sides.
        self.client.client.close()
        self.seqs.add(after)
        self.receiver = gevent.spawn(self.receive_loop)
        # Spread the first posts so that users spawned together do not post in step.
        if self.message_interval > 0:
            gevent.sleep(random.uniform(0, self.message_interval))

    def log_in(self, password: str) -> bool:
        """Log in through the login form and keep the session cookie in the client. Return whether it worked."""
        with self.client.get("/accounts/login/", name="login page", catch_response=True) as response:
            match = CSRF_TOKEN_RE.search(response.text or "")
            if response.status_code != 200 or match is None:
                response.failure(f"login page returned {response.status_code} without a CSRF token")
                logger.error(
                    "login page failed for %s with status %s: %s",
                    self.username,
                    response.status_code,
                    getattr(response, "error", None),
                )
                return False

        form = {"username": self.username, "password": password, "csrfmiddlewaretoken": match[1]}
        headers = {"Origin": self.origin, "Referer": f"{self.origin}/accounts/login/"}
        with self.client.post(
            "/accounts/login/", data=form, headers=headers, name="login", allow_redirects=False, catch_response=True
        ) as response:
            if response.status_code != 302 or self.session_cookie() is None:
                response.failure(f"login rejected with status {response.status_code}")
                logger.error(
                    "login failed for %s with status %s; check that seed_users used this prefix and password",
                    self.username,
                    response.status_code,
                )
                return False
        return True

    def fetch_room_last_seq(self) -> int | None:
        """Open the room page like a browser and return the last seq it shows, or None if that fails."""
        with self.client.get(f"/rooms/{self.room_slug}/", name="room page", catch_response=True) as response:
            match = ROOM_LAST_SEQ_RE.search(response.text or "")
            if response.status_code != 200 or match is None:
                response.failure(f"room page returned {response.status_code} without data-after")
                logger.error(
                    "room page %s failed with status %s; create the room with manage.py create_room",
                    self.room_slug,
                    response.status_code,
                )
                return None
        return int(match[1])

    def session_cookie(self) -> str | None:
        for cookie in self.client.cookiejar:
            if cookie.name == "sessionid":
                return cookie.value
        return None

    def cookie_header(self) -> str:
        return "; ".join(f"{cookie.name}={cookie.value}" for cookie in self.client.cookiejar)

    @task
    def post_message(self) -> None:
        if self.stopped_reason is not None:
            raise StopUser()
        self.expire_pending()
        if self.message_interval <= 0 or self.socket is None:
            return

        client_id = f"{self.username}-{uuid.uuid4().hex[:16]}"
        sent_ns = time.time_ns()
        frame = json.dumps({"body": f"t={sent_ns} from {self.username}", "client_id": client_id})
        try:
            self.socket.send(frame)
        except (websocket.WebSocketException, OSError) as exc:
            # The receive loop notices the dead socket and reconnects.
            self.fire_failure("send", exc)
            return
        self.unacked[client_id] = sent_ns
        self.undelivered[client_id] = sent_ns

    def expire_pending(self) -> None:
        """Fail own messages whose ack or delivery is older than --message-timeout."""
        deadline_ns = time.time_ns() - int(self.message_timeout * 1e9)
        for name, pending in (("ack", self.unacked), ("deliver own", self.undelivered)):
            expired = [client_id for client_id, sent_ns in pending.items() if sent_ns < deadline_ns]
            for client_id in expired:
                del pending[client_id]
                self.fire_failure(name, DeliveryError(f"timed out after {self.message_timeout:g} s"))

    def receive_loop(self) -> None:
        """Hold the socket open: read frames, reconnect with backoff after a drop."""
        failed_attempts = 0
        connected_at = time.monotonic()
        while self.running:
            if self.socket is None:
                if failed_attempts >= self.max_reconnect_attempts:
                    self.stop_reconnecting(f"{failed_attempts} connects in a row failed")
                    return
                if failed_attempts:
                    gevent.sleep(self.reconnect_delay(failed_attempts))
                if not self.connect():
                    failed_attempts += 1
                    continue
                connected_at = time.monotonic()

            try:
                opcode, data = self.socket.recv_data()
            except (websocket.WebSocketException, OSError) as exc:
                if not self.running:
                    return
                self.handle_drop(f"{type(exc).__name__}: {exc}")
            else:
                if opcode == websocket.ABNF.OPCODE_TEXT:
                    self.handle_frame(data.decode("utf-8"), time.time_ns())
                    continue
                if opcode != websocket.ABNF.OPCODE_CLOSE or not self.running:
                    continue
                code = close_code(data)
                self.handle_drop(f"closed with code {code}")
                if code in FINAL_CLOSE_CODES:
                    self.stop_reconnecting(f"socket closed with code {code}")
                    return

            if time.monotonic() - connected_at >= STABLE_CONNECTION_SECONDS:
                failed_attempts = 0
            failed_attempts += 1

    def connect(self) -> bool:
        """Open the room socket from the last seq. Return False, after firing a failure, when that fails."""
        after = self.seqs.last_seq
        url = self.socket_url if after is None else f"{self.socket_url}?after={after}"
        started = time.perf_counter()
        try:
            socket = websocket.create_connection(
                url, timeout=self.socket_timeout, origin=self.origin, cookie=self.cookie_header()
            )
        except websocket.WebSocketBadStatusException as exc:
            self.fire_failure("connect", exc, (time.perf_counter() - started) * 1000)
            if exc.status_code == 403:
                # The server rejects the Origin or the path, and a retry gets the same response.
                self.stop_reconnecting(f"handshake rejected with 403 for origin {self.origin}")
            return False
        except (websocket.WebSocketException, OSError) as exc:
            self.fire_failure("connect", exc, (time.perf_counter() - started) * 1000)
            return False

        # on_stop ran during the handshake, so it did not see this socket.
        if not self.running:
            socket.close()
            return False
        self.socket = socket
        self.environment.events.request.fire(
            request_type="WS",
            name="connect",
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=None,
            context={},
        )
        return True

    def reconnect_delay(self, failed_attempts: int) -> float:
        """Capped exponential backoff with full jitter, in seconds."""
        ceiling = min(RECONNECT_MAX_DELAY_SECONDS, RECONNECT_BASE_DELAY_SECONDS * 2 ** (failed_attempts - 1))
        return random.uniform(0, ceiling)

    def handle_drop(self, reason: str) -> None:
        warn_limited(
            "drop",
            "socket of %s in room %s dropped (%s); resuming after seq %s",
            self.username,
            self.room_slug,
            reason,
            self.seqs.last_seq,
        )
        self.fire_failure("drop", SocketDropped(reason))
        self.close_socket()
        # Acks go only to the socket that sent the frame, so these never come.
        # The messages themselves still arrive by replay after the reconnect.
        self.unacked.clear()

    def stop_reconnecting(self, reason: str) -> None:
        logger.error("user %s stops in room %s: %s", self.username, self.room_slug, reason)
        self.stopped_reason = reason
        self.close_socket()

    def close_socket(self) -> None:
        socket, self.socket = self.socket, None
        if socket is None:
            return
        try:
            socket.close(timeout=1)
        except (websocket.WebSocketException, OSError) as exc:
            logger.debug("closing the socket of %s failed: %s", self.username, exc)

    def handle_frame(self, frame: str, received_ns: int) -> None:
        for seq_text, client_id, body in MESSAGE_RE.findall(frame):
            self.handle_message(int(seq_text), client_id, body, received_ns, len(frame))
        for _seq_text, client_id in ACK_RE.findall(frame):
            sent_ns = self.unacked.pop(client_id, None)
            if sent_ns is not None:
                self.fire_latency("ack", sent_ns, received_ns, len(frame))
        for code, client_id in ERROR_RE.findall(frame):
            sent_ns = self.unacked.pop(client_id, None)
            self.undelivered.pop(client_id, None)
            response_time = 0.0 if sent_ns is None else (received_ns - sent_ns) / 1e6
            self.fire_failure("ack", FrameRejected(f"rejected: {code}"), response_time)
            warn_limited(
                f"rejected {code}", "frame of %s in room %s rejected with %s", self.username, self.room_slug, code
            )

    def handle_message(self, seq: int, client_id: str, body: str, received_ns: int, frame_length: int) -> None:
        previous_seq = self.seqs.last_seq
        problem = self.seqs.add(seq)
        if problem is not None:
            self.fire_failure(problem, DeliveryError(SEQ_PROBLEM_MESSAGES[problem]))
            warn_limited(
                problem,
                "%s seq %s after seq %s for %s in room %s",
                problem,
                seq,
                previous_seq,
                self.username,
                self.room_slug,
            )
            return

        send_time = SEND_TIME_RE.search(body)
        if send_time is None:
            # Posted by someone other than this load test.
            return
        if client_id and self.undelivered.pop(client_id, None) is not None:
            name = "deliver own"
        else:
            name = "deliver others"
        self.fire_latency(name, int(send_time[1]), received_ns, frame_length)

    def fire_latency(self, name: str, sent_ns: int, received_ns: int, response_length: int) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=(received_ns - sent_ns) / 1e6,
            response_length=response_length,
            exception=None,
            context={},
        )

    def fire_failure(self, name: str, exception: Exception, response_time: float = 0.0) -> None:
        """Fire a failed WS request. `response_time` is in ms, and 0 for failures without a duration."""
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=response_time,
            response_length=0,
            exception=exception,
            context={},
        )

    def on_stop(self) -> None:
        self.running = False
        # Kill the receiver first, because close() reads the close reply and
        # gevent raises when two greenlets read one socket.
        receiver = getattr(self, "receiver", None)
        if receiver is not None:
            receiver.kill(block=True, timeout=2)
        self.close_socket()
