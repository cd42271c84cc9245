"""Cap the WebSocket handshakes one process works on at once, and queue the rest.

A socket's connect costs database queries (session, user, room) on the one
database thread of the process. When sockets arrive faster than that thread
runs their queries, every handshake waits behind all earlier ones, and past the
server's handshake timeout they all fail with their work wasted. So at most
CHAT_MAX_CONCURRENT_HANDSHAKES run at once, and later ones wait in a FIFO
queue. A waiting socket costs no query and no CPU. Past
CHAT_MAX_QUEUED_HANDSHAKES waiting, a socket is accepted and closed with 4503
(try again later) at once, and the client backs off. Autobahn lets
applications send only 1000 and 3000-4999, so the code is not the standard 1013.

A handshake counts from admission until the application sends its first
frame or closes the socket. Hand-written because Channels and Django have no
admission control.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from django.conf import settings

from chatapp import metrics

logger = logging.getLogger(__name__)

CLOSE_TRY_AGAIN_LATER = 4503
# At most one log line per this many seconds while handshakes are shed.
SHED_LOG_INTERVAL = 5.0


class HandshakeAdmission:
    def __init__(self, app) -> None:
        self.app = app
        self.in_progress = 0
        self.waiting: deque[asyncio.Future] = deque()
        self.shed_since_log = 0
        self.last_shed_log = float("-inf")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "websocket" or not settings.CHAT_MAX_CONCURRENT_HANDSHAKES:
            await self.app(scope, receive, send)
            return
        if (
            self.in_progress >= settings.CHAT_MAX_CONCURRENT_HANDSHAKES
            and len(self.waiting) >= settings.CHAT_MAX_QUEUED_HANDSHAKES
        ):
            await self.shed(receive, send)
            return

        await self.admit()
        admitted = True

        def finish() -> None:
            nonlocal admitted
            if admitted:
                admitted = False
                self.release()

        async def send_and_count(message: dict) -> None:
            # Every later frame of the socket passes here too, so test the flag first.
            if admitted and message["type"] in ("websocket.send", "websocket.close"):
                finish()
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            finish()

    async def admit(self) -> None:
        """Take a handshake slot, waiting in line when all are taken."""
        if self.in_progress < settings.CHAT_MAX_CONCURRENT_HANDSHAKES and not self.waiting:
            self.in_progress += 1
            return
        turn = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            # The client left while waiting. If its turn came meanwhile, the
            # slot it was handed goes to the next in line.
            if turn.done() and not turn.cancelled():
                self.release()
            else:
                self.waiting.remove(turn)
            raise

    def release(self) -> None:
        """Hand the slot to the first waiting handshake, or free it."""
        while self.waiting:
            turn = self.waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.in_progress -= 1

    async def shed(self, receive, send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        # Accept first: a close before accept becomes an HTTP 403, and the
        # client would not learn that it may retry.
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": CLOSE_TRY_AGAIN_LATER})
        metrics.HANDSHAKES_SHED.inc()
        self.shed_since_log += 1
        now = time.monotonic()
        if now - self.last_shed_log >= SHED_LOG_INTERVAL:
            logger.warning(
                "handshakes shed: %s sockets closed with %s since the last report; %s in progress, %s waiting",
                self.shed_since_log,
                CLOSE_TRY_AGAIN_LATER,
                self.in_progress,
                len(self.waiting),
            )
            self.shed_since_log = 0
            self.last_shed_log = now
