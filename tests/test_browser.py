"""Room pages in Debian's Chromium, driven by Playwright, against a real daphne process.

Each test saves screenshots into SCREENSHOT_DIR (test-artifacts/screenshots/ unless set).
The tests need Playwright (in the `test` extra) and Debian's Chromium at
/usr/bin/chromium, which bin/test installs when it is missing. They use the
system Chromium only, so `playwright install` is never needed.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.hashers import PBKDF2PasswordHasher, make_password

from chatapp.models import Message, Room
from chatapp.services import message_create, message_hide
from presence.store import RedisPresenceStore
from tests.support import REPO_ROOT, DaphneNode, current_database_url, free_port, running_daphne, start_daphne

from playwright.async_api import BrowserContext, Error as PlaywrightError, Page, async_playwright, expect

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CHROMIUM_PATH = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Screenshots go to test-artifacts/ (ignored by git); to refresh the ones the
# docs show, run with SCREENSHOT_DIR=docs/screenshots.
SCREENSHOT_DIR = Path(os.environ.get("SCREENSHOT_DIR") or REPO_ROOT / "test-artifacts" / "screenshots")
VIEWPORT = {"width": 1000, "height": 700}
# Upper bound in milliseconds for every wait on the page. Delivery in these
# tests usually takes well under a second, so the margin covers a slow machine.
WAIT_MS = 10_000
# Upper bound in milliseconds for a page to reconnect after its server comes
# back: room.js waits at most 15 s between attempts (RECONNECT_CAP_MS), plus
# the same margin as WAIT_MS.
RECONNECT_WAIT_MS = 25_000
# The password that the `alice` and `bob` fixtures set (see make_user in conftest.py).
FIXTURE_PASSWORD = "correct-horse-battery"
SIGNUP_PASSWORD = "plum-orbit-lantern-74"
DAPHNE_LOG_TAIL_CHARS = 4000

if shutil.which(CHROMIUM_PATH) is None:
    # Fail rather than skip: a skipped browser suite would pass while checking nothing.
    pytest.fail(
        f"Chromium not found at {CHROMIUM_PATH}; install Debian's package (apt-get install chromium) or run bin/test",
        pytrace=False,
    )


@dataclass
class BrowserSession:
    """One browser context (its own cookies and network state) with one page."""

    context: BrowserContext
    page: Page
    base_url: str
    requested_urls: list[str] = field(default_factory=list)
    blocked_urls: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    # Console messages of the page, including the browser's own, such as CSP violation reports.
    console_messages: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path


def print_log_tail(daphne_node: DaphneNode) -> None:
    # pytest shows this output only for a failing test, next to the failure.
    log = daphne_node.log_path.read_text(errors="replace")
    print(f"--- last {DAPHNE_LOG_TAIL_CHARS} characters of {daphne_node.log_path} ---")
    print(log[-DAPHNE_LOG_TAIL_CHARS:])


@pytest.fixture
def node_env() -> dict[str, str]:
    """Extra environment variables for the `node` fixture's daphne; a test class can override this fixture."""
    return {}


@pytest.fixture
def node(tmp_path, node_env):
    with running_daphne(tmp_path, node_env) as daphne_node:
        yield daphne_node
        print_log_tail(daphne_node)


def set_server_password(user) -> None:
    """Store the fixture password as a PBKDF2 hash, which the daphne process can check.

    The autouse fast_password_hasher fixture makes the test process store MD5
    hashes, but the daphne process runs with the default PASSWORD_HASHERS, which
    do not include MD5, so its login form would reject the password.
    """
    user.password = make_password(FIXTURE_PASSWORD, hasher=PBKDF2PasswordHasher())
    user.save(update_fields=["password"])


@pytest.fixture
def alice(alice):
    set_server_password(alice)
    return alice


@pytest.fixture
def bob(bob):
    set_server_password(bob)
    return bob


@pytest.fixture
async def browser():
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=CHROMIUM_PATH, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


def session_opener(browser, base_url: str):
    """Return a coroutine function that opens a new browser context on the server at base_url.

    The context aborts every request that does not go to that server, so a
    page that loads anything from another host fails `assert_clean`.
    """

    async def open_browser_session(**context_options) -> BrowserSession:
        context = await browser.new_context(viewport=VIEWPORT, **context_options)
        context.set_default_timeout(WAIT_MS)
        context.set_default_navigation_timeout(WAIT_MS)
        page = await context.new_page()
        session = BrowserSession(context=context, page=page, base_url=base_url)

        async def allow_only_node(route) -> None:
            if route.request.url.startswith(base_url + "/"):
                await route.continue_()
            else:
                session.blocked_urls.append(route.request.url)
                await route.abort()

        await context.route("**/*", allow_only_node)
        context.on("request", lambda request: session.requested_urls.append(request.url))
        page.on("pageerror", lambda error: session.page_errors.append(str(error)))
        page.on("console", lambda message: session.console_messages.append(f"{message.type}: {message.text}"))
        return session

    return open_browser_session


@pytest.fixture
def open_session(browser, node):
    """Return a coroutine function that opens a new browser context on the node."""
    return session_opener(browser, node.http_url)


def unique_username(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def screenshot_path(name: str):
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR / name


async def sign_up(session: BrowserSession, username: str) -> None:
    page = session.page
    await page.goto(session.url("/accounts/signup/"), timeout=WAIT_MS)
    await page.fill("#id_username", username, timeout=WAIT_MS)
    await page.fill("#id_password1", SIGNUP_PASSWORD, timeout=WAIT_MS)
    await page.fill("#id_password2", SIGNUP_PASSWORD, timeout=WAIT_MS)
    await page.get_by_role("button", name="Sign up").click(timeout=WAIT_MS)

    await expect(page).to_have_url(session.url("/"), timeout=WAIT_MS)
    await expect(page.locator("nav.top .who strong")).to_have_text(username, timeout=WAIT_MS)


async def log_in(session: BrowserSession, username: str) -> None:
    page = session.page
    await page.goto(session.url("/accounts/login/"), timeout=WAIT_MS)
    await page.fill("#id_username", username, timeout=WAIT_MS)
    await page.fill("#id_password", FIXTURE_PASSWORD, timeout=WAIT_MS)
    await page.locator("main").get_by_role("button", name="Log in").click(timeout=WAIT_MS)

    await expect(page).to_have_url(session.url("/"), timeout=WAIT_MS)
    await expect(page.locator("nav.top .who strong")).to_have_text(username, timeout=WAIT_MS)


async def open_room_from_list(session: BrowserSession, slug: str, wait_connected: bool = True) -> None:
    """Click the room's link on the room list and wait until the page's socket is open."""
    page = session.page
    await page.locator(f'a[data-room="{slug}"]').click(timeout=WAIT_MS)
    await expect(page).to_have_url(session.url(f"/rooms/{slug}/"), timeout=WAIT_MS)
    if wait_connected:
        await expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected", timeout=WAIT_MS)


async def send_with_enter(page: Page, text: str) -> None:
    textarea = page.locator("form#composer textarea[name=body]")
    await textarea.fill(text, timeout=WAIT_MS)
    await textarea.press("Enter", timeout=WAIT_MS)


async def send_with_button(page: Page, text: str) -> None:
    await page.locator("form#composer textarea[name=body]").fill(text, timeout=WAIT_MS)
    await page.locator("form#composer").get_by_role("button", name="Send").click(timeout=WAIT_MS)


def shown_message(page: Page, text: str):
    """Locate the messages in #messages whose body contains `text`."""
    return page.locator("#messages article.message").filter(has=page.locator("p.body", has_text=text))


async def shown_seqs(page: Page) -> list[int]:
    return await page.locator("#messages article.message").evaluate_all(
        "elements => elements.map(element => Number(element.dataset.seq))"
    )


async def shown_bodies(page: Page) -> list[str]:
    return await page.locator("#messages article.message p.body").evaluate_all(
        "elements => elements.map(element => element.textContent)"
    )


async def mark_page_load(page: Page) -> None:
    """Set a marker on the window. A reload or a navigation removes it."""
    await page.evaluate("window.__loadMarker = 'still the same page load'")


async def assert_same_page_load(page: Page) -> None:
    assert await page.evaluate("window.__loadMarker") == "still the same page load"


def csp_violations(session: BrowserSession) -> list[str]:
    """Return the console messages in which Chromium reports a Content-Security-Policy violation."""
    return [text for text in session.console_messages if "Content Security Policy" in text]


def assert_clean(session: BrowserSession) -> None:
    """Assert that the page raised no uncaught errors, broke no CSP rule and requested nothing outside the node."""
    assert session.page_errors == []
    assert session.blocked_urls == []
    assert csp_violations(session) == []


def outbox_key(slug: str, username: str) -> str:
    """Return the localStorage key under which room.js keeps a user's unacknowledged messages for a room."""
    return f"chat:outbox:{slug}:{username}"


async def read_outbox(page: Page, slug: str, username: str) -> list[dict]:
    return await page.evaluate("key => JSON.parse(localStorage.getItem(key) || '[]')", outbox_key(slug, username))


def pending_messages(page: Page):
    return page.locator("#pending article.message.pending")


async def message_client_ids(page: Page) -> list[str | None]:
    return await page.locator("#messages article.message").evaluate_all(
        "elements => elements.map(element => element.dataset.clientId || null)"
    )


@database_sync_to_async
def stored_messages(room) -> list[tuple[int, str, str | None]]:
    """Return (seq, body, client_id) of every message stored in the room, in seq order."""
    return list(Message.objects.filter(room=room).order_by("seq").values_list("seq", "body", "client_id"))


@database_sync_to_async
def post_through_service(room, author, body: str) -> int:
    """Post like the admin or a management command does, and return the new seq."""
    return message_create(room=room, author=author, body=body).message.seq


@database_sync_to_async
def hide_message(room, seq: int) -> None:
    message_hide(Message.objects.get(room=room, seq=seq))


@contextlib.asynccontextmanager
async def room_row_locked(room):
    """Hold the room's row lock from another database session until the block ends.

    message_create locks the same row, so every message posted to the room
    meanwhile waits, and is stored when the block ends.
    """
    connection = await asyncio.to_thread(psycopg.connect, current_database_url())
    try:
        query = f"SELECT id FROM {Room._meta.db_table} WHERE id = %s FOR UPDATE"
        await asyncio.to_thread(connection.execute, query, [room.pk])
        yield
    finally:
        await asyncio.to_thread(connection.rollback)
        await asyncio.to_thread(connection.close)


# The lines that chatapp.consumers logs when a socket opens and closes.
SOCKET_LOG_RE = re.compile(r"socket (?P<event>connected|disconnected) room=(?P<room>\d+) user=\d+ channel=(?P<socket_id>\w+)")


def open_sockets_by_room(daphne_node: DaphneNode) -> dict[int, int]:
    """Count the sockets that the node's log shows as connected and not yet disconnected, by room id."""
    rooms: dict[str, int] = {}
    for match in SOCKET_LOG_RE.finditer(daphne_node.log_path.read_text(errors="replace")):
        if match["event"] == "connected":
            rooms[match["socket_id"]] = int(match["room"])
        else:
            rooms.pop(match["socket_id"], None)
    counts: dict[int, int] = {}
    for room_id in rooms.values():
        counts[room_id] = counts.get(room_id, 0) + 1
    return counts


async def wait_for_open_sockets(daphne_node: DaphneNode, expected: dict[int, int], timeout_s: float) -> dict[int, int]:
    """Poll the node's log until its open sockets per room equal `expected`; return the last count."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = open_sockets_by_room(daphne_node)
        if counts == expected or time.monotonic() >= deadline:
            return counts
        await asyncio.sleep(0.2)


async def wait_for_presence(slug: str, expected: dict[str, int], timeout_s: float) -> dict[str, int]:
    """Poll the Redis presence store until the room lists `expected`; return what it listed last."""
    store = RedisPresenceStore(settings.REDIS_URL, settings.PRESENCE_KEY_PREFIX)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            online = await store.online(slug)
            if online == expected or time.monotonic() >= deadline:
                return online
            await asyncio.sleep(0.2)
    finally:
        await store.close()


class TestTwoUsers:
    async def test_messages_appear_live_in_same_order(self, open_session, room):
        first = await open_session()
        second = await open_session()
        first_name = unique_username("ann")
        second_name = unique_username("ben")

        await sign_up(first, first_name)
        await sign_up(second, second_name)
        await open_room_from_list(first, room.slug)
        await open_room_from_list(second, room.slug)
        await mark_page_load(first.page)
        await mark_page_load(second.page)

        await expect(first.page.locator("#connection-state")).to_have_text("Connected", timeout=WAIT_MS)
        await first.page.screenshot(path=screenshot_path("chat-connected.png"))

        first_text = f"Hello from {first_name}, sent with Enter"
        await send_with_enter(first.page, first_text)
        for session in (first, second):
            await expect(shown_message(session.page, first_text)).to_have_count(1, timeout=WAIT_MS)

        second_text = f"Hi {first_name}, {second_name} here, sent with the Send button"
        await send_with_button(second.page, second_text)
        for session in (first, second):
            await expect(shown_message(session.page, second_text)).to_have_count(1, timeout=WAIT_MS)

        for session in (first, second):
            page = session.page
            await expect(page.locator("#pending article.message.pending")).to_have_count(0, timeout=WAIT_MS)
            await expect(shown_message(page, first_text)).to_have_attribute("data-author", first_name)
            await expect(shown_message(page, second_text)).to_have_attribute("data-author", second_name)
            assert await shown_bodies(page) == [first_text, second_text]
            await assert_same_page_load(page)

        first_seqs = await shown_seqs(first.page)
        second_seqs = await shown_seqs(second.page)
        assert first_seqs == second_seqs
        assert len(first_seqs) == 2
        assert first_seqs[0] < first_seqs[1]
        # The sender's own copy carries the client id that its page generated.
        await expect(shown_message(first.page, first_text)).to_have_attribute("data-client-id", re.compile(r".+"))
        await expect(shown_message(second.page, second_text)).to_have_attribute("data-client-id", re.compile(r".+"))

        await first.page.screenshot(path=screenshot_path("chat-two-users-a.png"))
        await second.page.screenshot(path=screenshot_path("chat-two-users-b.png"))
        assert_clean(first)
        assert_clean(second)


class TestEscaping:
    async def test_html_in_message_shows_as_text(self, open_session, room, alice, bob):
        payload = '<img src=x onerror="window.__xss=1"><script>window.__xss=1</script> <b>bold?</b>'
        sender = await open_session()
        reader = await open_session()
        await log_in(sender, alice.username)
        await log_in(reader, bob.username)
        await open_room_from_list(sender, room.slug)
        await open_room_from_list(reader, room.slug)

        await send_with_enter(sender.page, payload)

        # The sender's page shows the server's copy, and the reader's page the live broadcast.
        for session in (sender, reader):
            await expect(shown_message(session.page, "bold?")).to_have_count(1, timeout=WAIT_MS)

        # After a reload the message comes from the server-rendered history.
        await reader.page.reload(timeout=WAIT_MS)
        await expect(reader.page.locator("#connection-state")).to_have_attribute(
            "data-state", "connected", timeout=WAIT_MS
        )
        await expect(shown_message(reader.page, "bold?")).to_have_count(1, timeout=WAIT_MS)

        for session in (sender, reader):
            page = session.page
            await expect(page.locator("#messages article.message p.body")).to_have_text([payload], timeout=WAIT_MS)
            await expect(page.locator("#messages img")).to_have_count(0, timeout=WAIT_MS)
            await expect(page.locator("#messages script")).to_have_count(0, timeout=WAIT_MS)
            await expect(page.locator("#messages b")).to_have_count(0, timeout=WAIT_MS)
            assert await page.evaluate("typeof window.__xss") == "undefined"
            assert [url for url in session.requested_urls if url.endswith("/x")] == []
            assert_clean(session)

        await reader.page.screenshot(path=screenshot_path("escaped-html.png"))


class TestReconnect:
    async def test_offline_page_catches_up_once(self, open_session, room, alice, bob):
        """Take one page offline, post from both sides, and check that everything arrives once.

        Playwright's set_offline (checked with Playwright 1.65 and Chromium 156)
        fires the window's `offline` event and blocks new WebSocket connections,
        but leaves an open WebSocket open. The room page closes its socket on
        `offline` itself, so this test exercises the page's reconnect path and
        not a dropped TCP connection.
        """
        offline = await open_session()
        online = await open_session()
        await log_in(offline, alice.username)
        await log_in(online, bob.username)
        await open_room_from_list(offline, room.slug)
        await open_room_from_list(online, room.slug)
        await mark_page_load(offline.page)
        state = offline.page.locator("#connection-state")

        before_text = "Before the outage"
        await send_with_enter(online.page, before_text)
        await expect(shown_message(offline.page, before_text)).to_have_count(1, timeout=WAIT_MS)

        await offline.context.set_offline(True)
        await expect(state).not_to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        await expect(state).to_have_attribute("data-state", "offline", timeout=WAIT_MS)
        await expect(state).to_have_text(re.compile(r"^Offline, retrying in \d+ s$"), timeout=WAIT_MS)

        missed_text = "Posted while the other page was offline"
        await send_with_enter(online.page, missed_text)
        await expect(shown_message(online.page, missed_text)).to_have_count(1, timeout=WAIT_MS)
        # The online page already shows the server's copy, so a live socket on
        # the offline page would have received it by now.
        await expect(shown_message(offline.page, missed_text)).to_have_count(0, timeout=WAIT_MS)

        queued_text = "Written while offline, sent on reconnect"
        await send_with_enter(offline.page, queued_text)
        queued = offline.page.locator("#pending article.message.pending")
        await expect(queued).to_have_count(1, timeout=WAIT_MS)
        await expect(queued).to_have_attribute("data-state", "pending", timeout=WAIT_MS)
        await expect(queued.locator("p.body")).to_have_text(queued_text, timeout=WAIT_MS)
        await offline.page.screenshot(path=screenshot_path("offline.png"))

        await offline.context.set_offline(False)
        await expect(state).to_have_attribute("data-state", "connected", timeout=WAIT_MS)

        for session in (offline, online):
            page = session.page
            for text in (before_text, missed_text, queued_text):
                await expect(shown_message(page, text)).to_have_count(1, timeout=WAIT_MS)
            await expect(page.locator("#pending article.message")).to_have_count(0, timeout=WAIT_MS)
            assert await shown_bodies(page) == [before_text, missed_text, queued_text]

        assert await shown_seqs(offline.page) == await shown_seqs(online.page)
        await assert_same_page_load(offline.page)
        await offline.page.screenshot(path=screenshot_path("reconnected.png"))
        assert_clean(offline)
        assert_clean(online)


class TestWithoutJavaScript:
    async def test_form_post_redirects_to_room(self, open_session, room, alice, bob):
        plain = await open_session(java_script_enabled=False)
        live = await open_session()
        await log_in(plain, alice.username)
        await log_in(live, bob.username)
        await open_room_from_list(plain, room.slug, wait_connected=False)
        await open_room_from_list(live, room.slug)

        text = "Sent through the plain form, without JavaScript"
        page = plain.page
        await page.locator("form#composer textarea[name=body]").fill(text, timeout=WAIT_MS)
        async with page.expect_navigation(timeout=WAIT_MS) as navigation:
            await page.locator("form#composer").get_by_role("button", name="Send").click(timeout=WAIT_MS)
        response = await navigation.value

        assert response.status == 200
        post = response.request.redirected_from
        assert post is not None
        assert post.method == "POST"
        assert post.url == plain.url(f"/rooms/{room.slug}/messages/")
        assert page.url.split("#")[0] == plain.url(f"/rooms/{room.slug}/")

        await expect(shown_message(page, text)).to_have_count(1, timeout=WAIT_MS)
        await expect(shown_message(page, text)).to_have_attribute("data-author", alice.username, timeout=WAIT_MS)
        await expect(page.locator("form#composer textarea[name=body]")).to_have_value("", timeout=WAIT_MS)
        # The form post goes through the same broadcast as a socket message.
        await expect(shown_message(live.page, text)).to_have_count(1, timeout=WAIT_MS)

        await page.screenshot(path=screenshot_path("no-javascript-post.png"))
        assert_clean(plain)
        assert_clean(live)


class TestOfflineQueue:
    async def test_queued_messages_arrive_once_in_order(self, open_session, room, alice, bob):
        sender = await open_session()
        reader = await open_session()
        await log_in(sender, alice.username)
        await log_in(reader, bob.username)
        await open_room_from_list(sender, room.slug)
        await open_room_from_list(reader, room.slug)
        await mark_page_load(sender.page)
        state = sender.page.locator("#connection-state")

        await sender.context.set_offline(True)
        await expect(state).to_have_attribute("data-state", "offline", timeout=WAIT_MS)
        await expect(state).to_have_text(re.compile(r"^Offline, retrying in \d+ s$"), timeout=WAIT_MS)

        texts = ["First while offline", "Second while offline", "Third while offline"]
        for text in texts:
            await send_with_enter(sender.page, text)
        queued = pending_messages(sender.page)
        await expect(queued).to_have_count(3, timeout=WAIT_MS)
        await expect(queued.locator("p.body")).to_have_text(texts, timeout=WAIT_MS)
        for index in range(3):
            await expect(queued.nth(index)).to_have_attribute("data-state", "pending", timeout=WAIT_MS)
        await expect(queued.locator(".status")).to_have_text(["Waiting for the connection…"] * 3, timeout=WAIT_MS)
        outbox = await read_outbox(sender.page, room.slug, alice.username)
        assert [entry["body"] for entry in outbox] == texts
        queued_ids = [entry["client_id"] for entry in outbox]
        assert queued_ids == await queued.evaluate_all("items => items.map(item => item.dataset.clientId)")
        assert await stored_messages(room) == []
        await sender.page.screenshot(path=screenshot_path("pending.png"))

        await sender.context.set_offline(False)
        await expect(state).to_have_attribute("data-state", "connected", timeout=WAIT_MS)

        for session in (sender, reader):
            page = session.page
            for text in texts:
                await expect(shown_message(page, text)).to_have_count(1, timeout=WAIT_MS)
            assert await shown_bodies(page) == texts
            assert await message_client_ids(page) == queued_ids
        await expect(pending_messages(sender.page)).to_have_count(0, timeout=WAIT_MS)
        assert await read_outbox(sender.page, room.slug, alice.username) == []
        stored = await stored_messages(room)
        assert [body for _, body, _ in stored] == texts
        assert [client_id for _, _, client_id in stored] == queued_ids
        assert await shown_seqs(reader.page) == [seq for seq, _, _ in stored]
        await assert_same_page_load(sender.page)
        assert_clean(sender)
        assert_clean(reader)

    async def test_reload_keeps_queued_messages(self, open_session, room, alice, bob):
        """Queue messages offline, reload, and check that a later page load sends them once.

        A reload while offline fails (Chromium shows its offline error page),
        so the room is loaded again once the network is back. Another database
        session holds the room's row lock from before the reload until the new
        page load shows the queued messages, so the server cannot store them
        earlier. The lock also covers a quirk of the emulation: during the
        failed reload Chromium 156 can fire `online` on the old page, which
        then sends its queue too. Those frames wait for the lock as well, and
        the same client_ids make the server store each message once.
        """
        sender = await open_session()
        reader = await open_session()
        await log_in(sender, alice.username)
        await log_in(reader, bob.username)
        await open_room_from_list(sender, room.slug)
        await open_room_from_list(reader, room.slug)
        page = sender.page
        state = page.locator("#connection-state")

        await sender.context.set_offline(True)
        await expect(state).to_have_attribute("data-state", "offline", timeout=WAIT_MS)
        texts = ["Queued before the reload 1", "Queued before the reload 2", "Queued before the reload 3"]
        for text in texts:
            await send_with_enter(page, text)
        await expect(pending_messages(page)).to_have_count(3, timeout=WAIT_MS)
        outbox = await read_outbox(page, room.slug, alice.username)
        assert [entry["body"] for entry in outbox] == texts
        queued_ids = [entry["client_id"] for entry in outbox]

        async with room_row_locked(room):
            with pytest.raises(PlaywrightError, match="ERR_INTERNET_DISCONNECTED"):
                await page.reload(timeout=WAIT_MS)

            await sender.context.set_offline(False)
            await page.goto(sender.url(f"/rooms/{room.slug}/"), timeout=WAIT_MS)
            restored = pending_messages(page)
            await expect(restored.locator("p.body")).to_have_text(texts, timeout=WAIT_MS)
            assert await restored.evaluate_all("items => items.map(item => item.dataset.clientId)") == queued_ids
            for index in range(3):
                await expect(restored.nth(index)).to_have_attribute("data-state", "pending", timeout=WAIT_MS)
            assert await read_outbox(page, room.slug, alice.username) == outbox
            assert await stored_messages(room) == []

        # A socket that the lock kept from opening gives up after daphne's
        # handshake timeout, so the page may need a reconnect or two.
        await expect(state).to_have_attribute("data-state", "connected", timeout=RECONNECT_WAIT_MS)
        for session in (sender, reader):
            for text in texts:
                await expect(shown_message(session.page, text)).to_have_count(1, timeout=WAIT_MS)
            assert await shown_bodies(session.page) == texts
        await expect(pending_messages(page)).to_have_count(0, timeout=WAIT_MS)
        assert await read_outbox(page, room.slug, alice.username) == []
        stored = await stored_messages(room)
        assert [body for _, body, _ in stored] == texts
        assert [client_id for _, _, client_id in stored] == queued_ids
        assert await shown_seqs(page) == [seq for seq, _, _ in stored]
        assert_clean(sender)
        assert_clean(reader)


class TestServerRestart:
    @pytest.mark.parametrize(
        ("server", "stop_signal"),
        [
            # chatapp.node drains on SIGTERM: it closes every socket with 1012, then exits.
            pytest.param("node", signal.SIGTERM, id="drain"),
            # A crash: the kernel closes the connections without a WebSocket close frame.
            pytest.param("daphne", signal.SIGKILL, id="crash"),
        ],
    )
    async def test_page_resumes_without_gaps_or_duplicates(
        self, browser, tmp_path, room, alice, bob, server, stop_signal
    ):
        """Stop the node, post while it is down, start a new node on the same port, and check the page's seqs."""
        port = free_port()
        open_session = session_opener(browser, f"http://127.0.0.1:{port}")
        nodes = []
        try:
            nodes.append(start_node(tmp_path / "first", port, server))
            session = await open_session()
            page = session.page
            state = page.locator("#connection-state")
            await log_in(session, alice.username)
            await open_room_from_list(session, room.slug)
            await mark_page_load(page)

            before = ["Before the restart 1", "Before the restart 2", "Before the restart 3"]
            for text in before:
                await send_with_enter(page, text)
                await expect(shown_message(page, text)).to_have_count(1, timeout=WAIT_MS)

            nodes[0].kill(stop_signal)
            await expect(state).to_have_text(re.compile(r"^Reconnecting in \d+ s$"), timeout=WAIT_MS)
            await page.screenshot(path=screenshot_path("reconnecting.png"))

            during = ["Posted while the node was down 1", "Posted while the node was down 2"]
            for text in during:
                await post_through_service(room, bob, text)
            typed = "Typed while the node was down"
            await send_with_enter(page, typed)
            await expect(pending_messages(page)).to_have_count(1, timeout=WAIT_MS)

            nodes.append(start_node(tmp_path / "second", port, server))
            await expect(state).to_have_attribute("data-state", "connected", timeout=RECONNECT_WAIT_MS)
            expected = [*before, *during, typed]
            await expect(page.locator("#messages article.message p.body")).to_have_text(expected, timeout=WAIT_MS)
            await expect(pending_messages(page)).to_have_count(0, timeout=WAIT_MS)

            assert await shown_seqs(page) == list(range(1, len(expected) + 1))
            stored = await stored_messages(room)
            assert [(seq, body) for seq, body, _ in stored] == list(enumerate(expected, start=1))
            await assert_same_page_load(page)
            assert_clean(session)
        finally:
            for daphne_node in nodes:
                daphne_node.kill(signal.SIGKILL)
                print_log_tail(daphne_node)


def start_node(log_dir, port: int, server: str) -> DaphneNode:
    log_dir.mkdir()
    return start_daphne(log_dir, server=server, port=port)


class TestRateLimit:
    @pytest.fixture
    def node_env(self) -> dict[str, str]:
        # A burst of 3 and 5 messages a second, so that a queue of 8 runs into the limit.
        return {"CHAT_RATE_LIMIT_PER_SECOND": "5", "CHAT_RATE_LIMIT_BURST": "3"}

    async def test_queue_waits_out_rate_limit(self, open_session, node, room, alice, bob):
        sender = await open_session()
        reader = await open_session()
        await log_in(sender, alice.username)
        await log_in(reader, bob.username)
        await open_room_from_list(sender, room.slug)
        await open_room_from_list(reader, room.slug)
        state = sender.page.locator("#connection-state")

        await sender.context.set_offline(True)
        await expect(state).to_have_attribute("data-state", "offline", timeout=WAIT_MS)
        texts = [f"Queued message {number}" for number in range(1, 9)]
        for text in texts:
            await send_with_enter(sender.page, text)
        await expect(pending_messages(sender.page)).to_have_count(len(texts), timeout=WAIT_MS)
        await sender.context.set_offline(False)

        for text in texts:
            await expect(shown_message(reader.page, text)).to_have_count(1, timeout=WAIT_MS)
        assert await shown_bodies(reader.page) == texts
        await expect(pending_messages(sender.page)).to_have_count(0, timeout=WAIT_MS)
        assert [body for _, body, _ in await stored_messages(room)] == texts
        # The server did reject some frames for the rate limit, and the page sent them again.
        assert "code=rate_limited" in node.log_path.read_text(errors="replace")
        await expect(sender.page.locator("#chat-errors [data-error]")).to_have_count(0, timeout=WAIT_MS)
        assert_clean(sender)
        assert_clean(reader)


class TestFailedSend:
    async def test_rejected_message_shows_reason_and_retry(self, open_session, room, alice):
        """Send a body over the 4,000-character limit through the composer.

        The textarea's maxlength attribute would cut typed text at 4,000
        characters, so the test removes it and then types and sends like a
        user. The frame takes the page's real send path to the server, which
        rejects it.
        """
        session = await open_session()
        await log_in(session, alice.username)
        await open_room_from_list(session, room.slug)
        page = session.page
        textarea = page.locator("form#composer textarea[name=body]")
        await textarea.evaluate("element => element.removeAttribute('maxlength')")

        sentence = "This message is longer than the server accepts. "
        too_long = (sentence * 100)[:4000].rstrip() + "!"
        too_long += "!" * (4001 - len(too_long))
        assert len(too_long) == 4001
        await send_with_enter(page, too_long)

        failed = pending_messages(page)
        await expect(failed).to_have_count(1, timeout=WAIT_MS)
        await expect(failed).to_have_attribute("data-state", "failed", timeout=WAIT_MS)
        reason = "Not sent: Message is longer than 4000 characters (it has 4001)."
        await expect(failed.locator(".status")).to_have_text(reason, timeout=WAIT_MS)
        retry = failed.get_by_role("button", name="Retry")
        await expect(retry).to_be_visible(timeout=WAIT_MS)
        assert await read_outbox(page, room.slug, alice.username) == []
        assert await stored_messages(room) == []
        # The error belongs to the failed message, so the page-wide error list stays empty.
        await expect(page.locator("#chat-errors [data-error]")).to_have_count(0, timeout=WAIT_MS)
        await page.screenshot(path=screenshot_path("failed.png"))

        await retry.click(timeout=WAIT_MS)
        await expect(failed).to_have_attribute("data-state", "failed", timeout=WAIT_MS)
        await expect(failed.locator(".status")).to_have_text(reason, timeout=WAIT_MS)
        await expect(failed.get_by_role("button", name="Retry")).to_have_count(1, timeout=WAIT_MS)

        accepted = "A short message after the rejected one"
        await send_with_enter(page, accepted)
        await expect(shown_message(page, accepted)).to_have_count(1, timeout=WAIT_MS)
        await expect(failed).to_have_count(1, timeout=WAIT_MS)
        assert [body for _, body, _ in await stored_messages(room)] == [accepted]
        assert_clean(session)


HISTORY_SIZE = 120


@pytest.fixture
def room_history(room, bob):
    """Store HISTORY_SIZE messages from bob in the room, more than one page of 50.

    They are inserted in one query with consecutive seqs and the matching
    last_seq, which is what message_create would leave, at a fraction of the
    time of 120 transactions and broadcasts.
    """
    Message.objects.bulk_create(
        Message(room=room, seq=number, author=bob, body=f"History message {number}")
        for number in range(1, HISTORY_SIZE + 1)
    )
    Room.objects.filter(pk=room.pk).update(last_seq=HISTORY_SIZE)
    room.refresh_from_db()
    return room


async def log_distance_from_bottom(page: Page) -> float:
    return await page.locator("#message-log").evaluate(
        "log => log.scrollHeight - log.scrollTop - log.clientHeight"
    )


async def offset_in_log(page: Page, seq: int) -> float:
    """Return how far the message's top edge is below the top edge of the visible log, in CSS pixels."""
    return await page.locator(f'#messages article.message[data-seq="{seq}"]').evaluate(
        "element => element.getBoundingClientRect().top"
        " - document.getElementById('message-log').getBoundingClientRect().top"
    )


class TestReading:
    async def test_pinned_marker_and_load_earlier(self, open_session, room_history, alice, bob):
        room = room_history
        session = await open_session()
        await log_in(session, alice.username)
        await open_room_from_list(session, room.slug)
        page = session.page
        log = page.locator("#message-log")
        marker = page.locator("#new-messages")
        first_shown = HISTORY_SIZE - 50 + 1
        assert await shown_seqs(page) == list(range(first_shown, HISTORY_SIZE + 1))
        assert await log_distance_from_bottom(page) < 1

        # At the bottom, a new message keeps the log pinned to the newest line.
        await post_through_service(room, bob, "Arrives while pinned")
        await expect(shown_message(page, "Arrives while pinned")).to_have_count(1, timeout=WAIT_MS)
        assert await log_distance_from_bottom(page) < 1
        await expect(marker).to_be_hidden(timeout=WAIT_MS)

        # Scrolled up, a new message leaves the position alone and shows the marker.
        await log.hover(timeout=WAIT_MS)
        await page.mouse.wheel(0, -100_000)
        await expect(log).to_have_js_property("scrollTop", 0, timeout=WAIT_MS)
        await post_through_service(room, bob, "Arrives while scrolled up")
        await expect(shown_message(page, "Arrives while scrolled up")).to_have_count(1, timeout=WAIT_MS)
        await expect(marker).to_be_visible(timeout=WAIT_MS)
        assert await log.evaluate("log => log.scrollTop") == 0
        await page.screenshot(path=screenshot_path("new-messages.png"))

        # "Load earlier" prepends the previous 50 and keeps the same message at the same place.
        offset_before = await offset_in_log(page, first_shown)
        await page.get_by_role("link", name="Load earlier messages").click(timeout=WAIT_MS)
        await expect(page.locator(f'#messages article.message[data-seq="{first_shown - 50}"]')).to_have_count(
            1, timeout=WAIT_MS
        )
        await expect(page.locator("#messages .load-earlier")).to_have_count(1, timeout=WAIT_MS)
        # htmx settles 20 ms after the swap; let that pass before reading the position.
        await page.wait_for_timeout(100)
        assert abs(await offset_in_log(page, first_shown) - offset_before) <= 1
        assert await log.evaluate("log => log.scrollTop") > 0
        assert await shown_seqs(page) == list(range(first_shown - 50, HISTORY_SIZE + 3))

        await marker.get_by_role("button", name="New messages below").click(timeout=WAIT_MS)
        await expect(marker).to_be_hidden(timeout=WAIT_MS)
        assert await log_distance_from_bottom(page) < 1
        assert_clean(session)


@pytest.fixture
def second_room(make_room):
    return make_room("garden", "Garden")


class TestRoomSwitching:
    @pytest.fixture
    def node_env(self) -> dict[str, str]:
        # Short presence timings, so that closed connections leave the store within about 1.5 s.
        return {"PRESENCE_HEARTBEAT_INTERVAL": "0.5", "PRESENCE_TTL": "2", "PRESENCE_LEAVE_GRACE": "1"}

    async def test_ten_switches_leave_one_socket(self, open_session, node, room, second_room, alice):
        session = await open_session()
        await log_in(session, alice.username)
        page = session.page
        sockets = []
        page.on("websocket", lambda socket: sockets.append(socket.url))
        state = page.locator("#connection-state")

        slugs = [room.slug, second_room.slug] * 5 + [room.slug]
        for slug in slugs:
            await page.goto(session.url(f"/rooms/{slug}/"), timeout=WAIT_MS)
            await expect(state).to_have_attribute("data-state", "connected", timeout=WAIT_MS)
        # Each page load opened exactly one socket, to its own room.
        assert [url.split("?")[0] for url in sockets] == [node.ws_url(slug) for slug in slugs]

        # Every page left behind closed its socket, so the node has one open socket, in the last room.
        assert await wait_for_open_sockets(node, {room.pk: 1}, timeout_s=WAIT_MS / 1000) == {room.pk: 1}
        # The presence store lists one connection of alice's, in the room she is in now.
        assert await wait_for_presence(room.slug, {alice.username: 1}, timeout_s=WAIT_MS / 1000) == {
            alice.username: 1
        }
        assert await wait_for_presence(second_room.slug, {}, timeout_s=WAIT_MS / 1000) == {}
        await expect(page.locator(f'#presence li[data-presence-user="{alice.username}"]')).to_have_count(
            1, timeout=WAIT_MS
        )
        assert_clean(session)


class TestContentSecurityPolicy:
    async def test_room_page_has_strict_csp(self, open_session, room_history, alice, bob):
        room = room_history
        sender = await open_session()
        reader = await open_session()
        await log_in(sender, alice.username)
        await log_in(reader, bob.username)

        response = await sender.page.goto(sender.url(f"/rooms/{room.slug}/"), timeout=WAIT_MS)
        assert response is not None
        policy = response.headers.get("content-security-policy", "")
        directives = {part.split()[0]: part.split()[1:] for part in policy.split(";") if part.strip()}
        assert directives.get("script-src") == ["'self'"]
        assert directives.get("style-src") == ["'self'"]
        assert "'unsafe-inline'" not in policy
        assert "'unsafe-eval'" not in policy
        await expect(sender.page.locator("#connection-state")).to_have_attribute("data-state", "connected")
        await reader.page.goto(reader.url(f"/rooms/{room.slug}/"), timeout=WAIT_MS)
        await expect(reader.page.locator("#connection-state")).to_have_attribute("data-state", "connected")

        # Chat: send, receive, see presence, load earlier (an htmx swap) and use the new-messages marker.
        await send_with_enter(sender.page, "Checking the policy")
        await expect(shown_message(reader.page, "Checking the policy")).to_have_count(1, timeout=WAIT_MS)
        await send_with_button(reader.page, "Reply under the policy")
        await expect(shown_message(sender.page, "Reply under the policy")).to_have_count(1, timeout=WAIT_MS)
        await expect(sender.page.locator(f'#presence li[data-presence-user="{bob.username}"]')).to_have_count(1)
        await sender.page.get_by_role("link", name="Load earlier messages").click(timeout=WAIT_MS)
        earliest_loaded = HISTORY_SIZE - 2 * 50 + 1
        await expect(sender.page.locator(f'#messages article.message[data-seq="{earliest_loaded}"]')).to_have_count(1)
        await sender.page.locator("#message-log").evaluate("log => { log.scrollTop = 0; }")
        await post_through_service(room, bob, "Arrives while scrolled up")
        await expect(sender.page.locator("#new-messages")).to_be_visible(timeout=WAIT_MS)
        await sender.page.locator("#new-messages button").click(timeout=WAIT_MS)

        for session in (sender, reader):
            assert csp_violations(session) == []
            assert_clean(session)

        # Control: an inline style attribute must be reported, or the check above proves nothing.
        await sender.page.evaluate(
            "document.body.insertAdjacentHTML('beforeend', '<p id=\"csp-probe\" style=\"color: red\">probe</p>')"
        )
        deadline = time.monotonic() + WAIT_MS / 1000
        while not csp_violations(sender) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert any("inline style" in text for text in csp_violations(sender))


class TestModeration:
    async def test_hidden_message_shows_placeholder(self, open_session, room, alice, bob):
        session = await open_session()
        await log_in(session, alice.username)
        await open_room_from_list(session, room.slug)
        page = session.page
        kept = await post_through_service(room, bob, "This one stays")
        hidden = await post_through_service(room, bob, "This one a moderator removes")
        await expect(page.locator("#messages article.message")).to_have_count(2, timeout=WAIT_MS)

        await hide_message(room, hidden)

        removed = page.locator(f'#messages article.message[data-seq="{hidden}"]')
        await expect(removed).to_have_attribute("data-removed", "", timeout=WAIT_MS)
        await expect(removed.locator("p.body")).to_have_text("This message was removed by a moderator.")
        await expect(page.locator(f'#messages article.message[data-seq="{kept}"] p.body')).to_have_text(
            "This one stays"
        )
        # A new page load renders the same placeholder from the server.
        await page.reload(timeout=WAIT_MS)
        await expect(removed.locator("p.body")).to_have_text("This message was removed by a moderator.")
        assert_clean(session)
