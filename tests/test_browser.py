"""Room pages in Debian's Chromium, driven by Playwright, against a real daphne process.

Each test saves screenshots into docs/screenshots/ and overwrites them on every run.
The tests need Playwright (in the `test` extra) and Debian's Chromium at
/usr/bin/chromium, which bin/test installs when it is missing. They use the
system Chromium only, so `playwright install` is never needed.
"""
from __future__ import annotations

import re
import shutil
import uuid
from dataclasses import dataclass, field

import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher, make_password

from tests.support import REPO_ROOT, running_daphne

from playwright.async_api import BrowserContext, Page, async_playwright, expect

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
SCREENSHOT_DIR = REPO_ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1000, "height": 700}
# Upper bound in milliseconds for every wait on the page. Delivery in these
# tests usually takes well under a second, so the margin covers a slow machine.
WAIT_MS = 10_000
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

    def url(self, path: str) -> str:
        return self.base_url + path


@pytest.fixture
def node(tmp_path):
    with running_daphne(tmp_path) as daphne_node:
        yield daphne_node
        # pytest shows this output only for a failing test, next to the failure.
        log = daphne_node.log_path.read_text(errors="replace")
        print(f"--- last {DAPHNE_LOG_TAIL_CHARS} characters of {daphne_node.log_path} ---")
        print(log[-DAPHNE_LOG_TAIL_CHARS:])


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


@pytest.fixture
def open_session(browser, node):
    """Return a coroutine function that opens a new browser context on the node.

    The context aborts every request that does not go to the node, so a page
    that loads anything from another host fails `assert_clean`.
    """

    async def open_browser_session(**context_options) -> BrowserSession:
        context = await browser.new_context(viewport=VIEWPORT, **context_options)
        context.set_default_timeout(WAIT_MS)
        context.set_default_navigation_timeout(WAIT_MS)
        page = await context.new_page()
        session = BrowserSession(context=context, page=page, base_url=node.http_url)

        async def allow_only_node(route) -> None:
            if route.request.url.startswith(node.http_url + "/"):
                await route.continue_()
            else:
                session.blocked_urls.append(route.request.url)
                await route.abort()

        await context.route("**/*", allow_only_node)
        context.on("request", lambda request: session.requested_urls.append(request.url))
        page.on("pageerror", lambda error: session.page_errors.append(str(error)))
        return session

    return open_browser_session


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


def assert_clean(session: BrowserSession) -> None:
    """Assert that the page raised no uncaught errors and requested nothing outside the node."""
    assert session.page_errors == []
    assert session.blocked_urls == []


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
        await offline.page.screenshot(path=screenshot_path("reconnecting.png"))

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
