"""Run one app node: daphne's command line, plus a graceful drain on SIGTERM.

It also drops any socket whose unsent output passes CHAT_SEND_BUFFER_MAX_BYTES
(1 MiB by default), checked every second; the client resumes on reconnect.

On SIGTERM the node stops accepting connections and closes every WebSocket
with code 1012 (service restart), so that clients reconnect to another node
and resume from their last seq. It waits up to CHAT_DRAIN_TIMEOUT seconds
for the consumers to finish their disconnect work (presence release,
unsubscribe), then exits. Daphne itself would cancel the consumers at once, so clients
would see an abnormal close and presence would wait for the TTL.

With --processes N (N > 1) it binds the -b/-p address once and starts N
node processes that accept on that one listening socket, one per core,
because one Python process uses one core. They share nothing but Redis and
PostgreSQL, as separate nodes do. SIGTERM and SIGINT are passed on to them.

Usage: python -m chatapp.node [--processes N] [daphne options] chatapp.asgi:application
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time

from daphne.cli import CommandLineInterface
from daphne.server import Server
from daphne.ws_protocol import WebSocketProtocol
from twisted.internet import reactor

logger = logging.getLogger("chatapp.node")

CLOSE_SERVICE_RESTART = 1012
# Below this many open files a node logs a warning: each socket needs one,
# and a busy node has thousands open.
OPEN_FILES_RECOMMENDED = 20_000
# Young-generation collections every 50,000 allocations instead of Python's
# 700, and a full collection at most every 100 of the middle ones. A node with
# thousands of sockets has millions of objects, and each full collection
# walks them all while no frame is sent.
GC_THRESHOLDS = (50_000, 20, 100)
DRAIN_POLL_SECONDS = 0.1
SEND_BUFFER_CHECK_SECONDS = 1.0


def unsent_bytes(transport) -> int:
    """Return the bytes buffered in a Twisted TCP transport that the kernel has not taken yet."""
    # These are attributes of twisted.internet.abstract.FileDescriptor, which
    # the asyncio reactor's TCP connections are; other transports count 0.
    data_buffer = getattr(transport, "dataBuffer", b"")
    return len(data_buffer) - getattr(transport, "offset", 0) + getattr(transport, "_tempDataLen", 0)


def raise_open_file_limit() -> None:
    """Raise the soft open-file limit to the hard one, and warn when that is low for many sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        logger.info("open-file limit raised from %s to %s", soft, hard)
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < OPEN_FILES_RECOMMENDED:
        logger.warning(
            "open-file limit is %s, so this node fails sockets beyond about that many; "
            "raise the hard limit (ulimit -Hn, LimitNOFILE=, or nofile in compose) to %s or more",
            soft,
            OPEN_FILES_RECOMMENDED,
        )


def tune_garbage_collector() -> None:
    """Move what startup loaded out of the collector's reach and make collections rarer."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    logger.info("garbage collector: %s startup objects frozen, thresholds %s", gc.get_freeze_count(), GC_THRESHOLDS)


# NOTE: under the same load, uvicorn with wsproto spent 30 % less CPU per
# delivered frame than daphne (docs/loadtest.md). The drain and the send-buffer
# cap here are written against daphne and Twisted and would need porting.
class DrainingServer(Server):
    def run(self) -> None:
        raise_open_file_limit()
        self.listening_ports = []
        self.drain_started: float | None = None
        self.drain_timeout = float(os.environ.get("CHAT_DRAIN_TIMEOUT", "10"))
        self.send_buffer_max = int(os.environ.get("CHAT_SEND_BUFFER_MAX_BYTES", str(1024 * 1024)))
        reactor.callWhenRunning(self._configure_when_running)
        super().run()

    def listen_success(self, port) -> None:
        super().listen_success(port)
        self.listening_ports.append(port)

    def _configure_when_running(self) -> None:
        # By default autobahn drops the TCP connection on a protocol violation
        # such as an oversized message. Send the close frame (1009) instead,
        # so that the client learns why.
        self.ws_factory.setProtocolOptions(failByDrop=False)
        # This runs after the reactor installed its own handlers, so it
        # replaces the reactor's immediate stop on SIGTERM. SIGINT still stops at once.
        signal.signal(signal.SIGTERM, lambda signum, frame: reactor.callFromThread(self.drain))
        reactor.callLater(SEND_BUFFER_CHECK_SECONDS, self._check_send_buffers)
        tune_garbage_collector()

    def _check_send_buffers(self) -> None:
        """Drop sockets whose unsent output passed the cap: a client that stops
        reading must not grow this node's memory or hold up its room."""
        try:
            for protocol in self._open_sockets():
                buffered = unsent_bytes(protocol.transport)
                if buffered > self.send_buffer_max:
                    logger.warning(
                        "socket dropped: %s bytes unsent, cap %s peer=%s", buffered, self.send_buffer_max, protocol.client_addr
                    )
                    # The client reads nothing, so a close frame would never
                    # arrive; abort, and the consumer's disconnect runs as usual.
                    protocol.transport.abortConnection()
        except Exception:
            logger.exception("send buffer check failed")
        reactor.callLater(SEND_BUFFER_CHECK_SECONDS, self._check_send_buffers)

    def _open_sockets(self) -> list[WebSocketProtocol]:
        return [
            protocol
            for protocol, details in self.connections.items()
            if isinstance(protocol, WebSocketProtocol)
            and not (details.get("application_instance") and details["application_instance"].done())
        ]

    def drain(self) -> None:
        if self.drain_started is not None:
            return
        self.drain_started = time.monotonic()
        for port in self.listening_ports:
            port.stopListening()
        sockets = self._open_sockets()
        logger.info("drain started: closing %s sockets with code %s", len(sockets), CLOSE_SERVICE_RESTART)
        for protocol in sockets:
            try:
                # Autobahn's sendClose() accepts only 1000 and 3000-4999 from
                # applications, so send the 1012 frame one level lower.
                protocol.sendCloseFrame(code=CLOSE_SERVICE_RESTART, isReply=False)
            except Exception:
                logger.exception("drain could not close socket %r", protocol)
        self._wait_for_sockets()

    def _wait_for_sockets(self) -> None:
        remaining = self._open_sockets()
        elapsed = time.monotonic() - self.drain_started
        if remaining and elapsed < self.drain_timeout:
            reactor.callLater(DRAIN_POLL_SECONDS, self._wait_for_sockets)
            return
        if remaining:
            logger.warning(
                "drain timed out after %.1f s with %s sockets open; stopping anyway", elapsed, len(remaining)
            )
        else:
            logger.info("drain finished in %.2f s", elapsed)
        self.stop()


# Defaults that differ from daphne's. A message body has at most 4,000
# characters, so 64 KiB leaves room for JSON escaping and htmx's extra
# fields. Autobahn closes larger frames with 1009 before the consumer sees
# them. Daphne drops a handshake not finished within 5 s, which
# fails connects on a busy node during a reconnect storm, so allow 20 s.
DEFAULT_OPTIONS = {
    "--websocket-max-message-size": "65536",
    "--websocket-max-frame-size": "65536",
    "--websocket_connect_timeout": "20",
}


class NodeCommandLineInterface(CommandLineInterface):
    server_class = DrainingServer

    def run(self, args: list[str]) -> None:
        for option, value in DEFAULT_OPTIONS.items():
            if not any(arg.startswith(option) for arg in args):
                args = [option, value, *args]
        super().run(args)


def split_process_options(args: list[str]) -> tuple[int, str, int, list[str]]:
    """Return --processes, the -b host, the -p port and the remaining daphne arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("-b", "--bind", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, default=8000)
    known, rest = parser.parse_known_args(args)
    return known.processes, known.bind, known.port, rest


def without_processes_option(args: list[str]) -> list[str]:
    remaining, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg == "--processes":
            skip_next = True
        elif not arg.startswith("--processes="):
            remaining.append(arg)
    return remaining


def run_processes(count: int, host: str, port: int, daphne_args: list[str]) -> int:
    """Start count node processes on one shared listening socket and wait for them."""
    if count > 1 and not os.environ.get("REDIS_URL"):
        logger.error("--processes %s needs REDIS_URL: without Redis each process would only reach its own sockets", count)
        return 2
    listener = socket.create_server((host, port), backlog=4096)
    listener.set_inheritable(True)
    command = [sys.executable, "-m", "chatapp.node", "--fd", str(listener.fileno()), *daphne_args]
    children = [subprocess.Popen(command, pass_fds=(listener.fileno(),)) for _ in range(count)]
    # Only the children accept. Closing this copy lets the kernel refuse
    # connections once they stop listening during a drain.
    listener.close()
    logger.info("started %s node processes on %s:%s pids=%s", count, host, port, [child.pid for child in children])

    def forward(signum, frame) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # When one process exits, stop the others, so that a supervisor finds
    # the node failed and restarts it whole.
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    failed = next(child for child in children if child.returncode is not None)
    logger.info("node process pid=%s exited with code %s; stopping the others", failed.pid, failed.returncode)
    forward(signal.SIGTERM, None)
    codes = [child.wait() for child in children]
    return next((code for code in codes if code), 0)


def main() -> None:
    count, host, port, rest = split_process_options(sys.argv[1:])
    if count < 1:
        sys.exit(f"--processes must be at least 1, got {count}.")
    if count == 1:
        sys.argv = [sys.argv[0], *without_processes_option(sys.argv[1:])]
        NodeCommandLineInterface.entrypoint()
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    sys.exit(run_processes(count, host, port, rest))


if __name__ == "__main__":
    main()
