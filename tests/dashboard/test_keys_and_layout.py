"""Keys kept in the tab's session storage and never in the URL; every view at 375 px wide
without horizontal scrolling."""
import pytest

from tests.dashboard.conftest import expect, screenshot

pytestmark = pytest.mark.browser

VIEWS = ("live", "upload", "models", "users")


def test_keys_stay_in_session_storage_never_in_the_url(browser, open_dashboard, server):
    page = open_dashboard()
    stored = page.evaluate("({...sessionStorage})")
    assert stored["emoloop.appKey"] == server.app_key
    assert stored["emoloop.adminKey"] == server.admin_key
    assert page.evaluate("localStorage.length") == 0
    requested = []
    page.on("request", lambda request: requested.append(request.url))
    for view in VIEWS:
        page.goto(f"/#{view}")
        assert server.app_key not in page.url and server.admin_key not in page.url
    page.reload()
    expect(page.locator("#keys-dialog")).to_be_hidden()  # entered once: kept across reloads
    assert not any(server.app_key in url or server.admin_key in url for url in requested)

    page.click("#open-keys")
    page.click("#keys-forget")
    assert page.evaluate("sessionStorage.length") == 0
    page.click("#keys-cancel")

    # A new tab (a new browsing context) starts without keys, and asks for them.
    fresh = browser.new_page(base_url=server.base, viewport={"width": 1100, "height": 760})
    try:
        fresh.goto("/")
        expect(fresh.locator("#keys-dialog")).to_be_visible()
        fresh.fill("#app-key", "emo_" + "x" * 20)
        fresh.fill("#speaker-id", "alice")
        screenshot(fresh, "keys")
        fresh.click("#keys-cancel")
    finally:
        fresh.close()


def test_every_view_fits_375_px_wide(open_dashboard, speech_file):
    page = open_dashboard(width=375, height=812)
    page.goto("/#live")
    page.click("#live-toggle")
    page.locator("#live-stats .stat-list").wait_for(timeout=8_000)
    page.click("#live-toggle")
    assert_no_horizontal_overflow(page, "live")
    screenshot(page, "mobile-live")

    page.goto("/#upload")
    page.set_input_files("#upload-input", str(speech_file))
    page.locator("#upload-result .label-button").first.wait_for()
    assert_no_horizontal_overflow(page, "upload")
    screenshot(page, "mobile-upload")

    page.goto("/#models")
    page.locator("article.version").first.wait_for()
    page.locator("#audit .audit-entry").first.wait_for()
    assert_no_horizontal_overflow(page, "models")
    screenshot(page, "mobile-models")

    page.goto("/#users")
    assert_no_horizontal_overflow(page, "users")


def assert_no_horizontal_overflow(page, view: str) -> None:
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the {view} view is {width} px wide at a 375 px viewport"
    # And nothing pokes out of the viewport while being clipped by an ancestor.
    wide = page.evaluate("""() => [...document.querySelectorAll('main *, header *')]
        .filter((e) => e.getClientRects().length && e.getBoundingClientRect().right > 375.5)
        .map((e) => e.tagName + '.' + e.className)""")
    assert not wide, f"the {view} view has elements past 375 px: {wide[:5]}"
