from __future__ import annotations

import asyncio

from django.core.management.base import BaseCommand, CommandError

from presence import conf

from presence.store import get_store
from presence.tracker import announce


class Command(BaseCommand):
    help = (
        "List who is online in each room with their connection counts, and optionally reap expired "
        "connections now. Needs REDIS_URL: the in-memory store lives inside the server process."
    )

    def add_arguments(self, parser) -> None:
        parser.add_argument("--room", help="Only this room (its slug); default: every room with someone online.")
        parser.add_argument(
            "--reap", action="store_true", help="Remove expired connections first and announce the leaves."
        )

    def handle(self, *args, room: str | None, reap: bool, **options) -> None:
        if not conf.redis_url():
            raise CommandError(
                "REDIS_URL is not set: presence then lives in the server process's memory, "
                "which this command cannot read. Set REDIS_URL to the server's Redis."
            )
        asyncio.run(self._run(room, reap))

    async def _run(self, room: str | None, reap: bool) -> None:
        store = get_store()
        try:
            if reap:
                left = await store.reap()
                for room_key, user in left:
                    await announce(room_key, user, online=False)
                self.stdout.write(f"Reaped {len(left)} users.")

            rooms = [room] if room else await store.rooms()
            if not rooms:
                self.stdout.write("Nobody is online.")
            for room_key in rooms:
                online = await store.online(room_key)
                listing = ", ".join(f"{user} ({count})" for user, count in online.items()) or "nobody"
                expired = await store.expired_count(room_key)
                note = f" [{expired} expired connections; --reap removes them]" if expired else ""
                self.stdout.write(f"{room_key}: {listing}{note}")
        finally:
            await store.close()
