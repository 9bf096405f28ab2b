"""The dashboard in a real headless Chromium against a real `emoloop serve` on loopback.

Debian's `chromium` (/usr/bin/chromium) driven by the `playwright` package, never a browser that
`playwright install` downloads. Without it the browser tests skip, except under CI=true, where
they fail (.ci/run installs it). One server and one browser serve the whole package (and stop
after its last test), so the suite takes about a minute; each test gets a fresh browser context
(its own session storage) and enters the keys through the page's own dialog.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.bench.local_server import free_port, stop_process_group
from service.bench.clips import to_wav, voiced_clip
from storage.api_keys import ApiKeyRepository
from storage.artifacts import ArtifactStore, LocalArtifactStore
from storage.db import create_db_engine, make_session_factory
from storage.migrate import upgrade_to_head
from tests.service.conftest import random_model  # noqa: F401  (a session fixture, reused)

CHROMIUM = Path("/usr/bin/chromium")
EMOLOOP = str(Path(sys.executable).with_name("emoloop"))
# The README's screenshots are refreshed with `EMOLOOP_SCREENSHOTS=docs/screenshots make test`;
# a plain run still takes every screenshot (a view that fails to render fails the test), but into
# a temporary folder, removed when the run ends, so testing never dirties the working tree or
# leaves a megabyte behind in /tmp.
_KEEP_SCREENSHOTS = bool(os.environ.get("EMOLOOP_SCREENSHOTS"))
SCREENSHOTS = Path(os.environ.get("EMOLOOP_SCREENSHOTS")
                   or tempfile.mkdtemp(prefix="emoloop-screenshots-")).resolve()
# The flags the brief for these tests fixes: no network of its own, no first-run work.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "browser: drives the dashboard in headless Chromium")


def pytest_unconfigure(config) -> None:
    if not _KEEP_SCREENSHOTS:
        shutil.rmtree(SCREENSHOTS, ignore_errors=True)


@dataclass
class Server:
    base: str
    app_key: str
    admin_key: str
    db: object  # a session factory on the server's database, for looking behind the page
    artifacts: ArtifactStore

    def get(self, path: str, key: str | None = None) -> httpx.Response:
        return httpx.get(self.base + path, headers=_bearer(key or self.app_key), timeout=30)

    def predict(self, audio: bytes) -> dict:
        response = httpx.post(self.base + "/v1/predictions",
                              files={"file": ("clip.wav", audio, "audio/wav")},
                              headers=_bearer(self.app_key), timeout=30)
        assert response.status_code == 201, response.text
        return response.json()


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
def chromium() -> Path:
    message = None
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing (apt-get install chromium)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            message = "the playwright package is not installed (pip install -e '.[dev]')"
    if message:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


@pytest.fixture(scope="package")
def server_process(chromium, tmp_path_factory) -> Iterator[tuple[Server, subprocess.Popen, Path]]:
    """`emoloop serve` starting on a free loopback port: a fresh migrated SQLite database, an app
    key and an admin key; serve registers the bundled model as version 1 itself, as on a first
    run, so the screenshots show real answers."""
    data_dir = tmp_path_factory.mktemp("dashboard-data")
    url = f"sqlite:///{data_dir / 'emoloop.db'}"
    upgrade_to_head(url)
    engine = create_db_engine(url)
    db = make_session_factory(engine)
    artifacts = LocalArtifactStore(data_dir / "artifacts")
    with db() as session:
        keys = ApiKeyRepository(session)
        app_key, admin_key = keys.create("dashboard", "app")[1], keys.create("ops", "admin")[1]
        session.commit()
    port = free_port()
    env = {**os.environ, "EMOLOOP_DATABASE_URL": url, "EMOLOOP_DATA_DIR": str(data_dir),
           "EMOLOOP_API__MODEL_POLL_INTERVAL_S": "0.2", "EMOLOOP_LEARNER__ENABLED": "false",
           # Every recording becomes a job, so the page's polling and progress are exercised.
           "EMOLOOP_API__RECORDING_WAIT_S": "0"}
    # The log goes to a file, not a pipe nobody reads (a full pipe would stall the server).
    log_path = data_dir / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [EMOLOOP, "serve", "--port", str(port), "--log-level", "warning"], env=env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(f"http://127.0.0.1:{port}", app_key, admin_key, db, artifacts)
    try:
        yield server, process, log_path
    finally:
        stop_process_group(process)
        engine.dispose()


@pytest.fixture(scope="package")
def server(server_process) -> Server:
    """The server, once it answers /ready."""
    server, process, log_path = server_process
    _wait_ready(server.base, process, log_path)
    return server


@pytest.fixture(scope="package")
def fake_microphone(tmp_path_factory) -> Path:
    """What Chromium's fake microphone plays (in a loop): a voiced clip, as 16-bit WAV."""
    path = tmp_path_factory.mktemp("microphone") / "speech.wav"
    path.write_bytes(to_wav(voiced_clip(4.0, 48_000, seed=3), 48_000))
    return path


@pytest.fixture(scope="package")
def browser(chromium, fake_microphone, server_process):
    """Headless Chromium, launched while the server starts (hence `server_process`)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() gives every run a fresh, temporary user-data-dir.
        browser = playwright.chromium.launch(
            executable_path=str(chromium), headless=True,
            args=CHROMIUM_FLAGS + ["--use-fake-ui-for-media-stream",
                                   "--use-fake-device-for-media-stream",
                                   f"--use-file-for-fake-audio-capture={fake_microphone}"])
        yield browser
        browser.close()


@pytest.fixture
def open_dashboard(browser, server):
    """open_dashboard(width=..., admin=True) -> a page showing the dashboard with keys entered.
    Errors in the page's scripts or console fail the test."""
    contexts, errors = [], []

    def open_page(width: int = 1280, height: int = 860, admin: bool = True):
        context = browser.new_context(viewport={"width": width, "height": height},
                                      base_url=server.base)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(str(error)))
        # Console errors too (a Content-Security-Policy refusal is one), except the browser's
        # note on each API answer with an error status, which the tests provoke on purpose.
        page.on("console", lambda message: errors.append(message.text) if message.type == "error"
                and not message.text.startswith("Failed to load resource") else None)
        page.goto("/")
        page.wait_for_selector("body[data-ready=true]")
        page.fill("#app-key", server.app_key)
        if admin:
            page.fill("#admin-key", server.admin_key)
        page.click("#keys-save")
        page.wait_for_selector("#keys-dialog", state="hidden")
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not errors, f"the page raised: {errors}"


@pytest.fixture(scope="package")
def speech_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "speech.wav"
    path.write_bytes(to_wav(voiced_clip(2.0, 16_000, seed=1), 16_000))
    return path


def expect(locator):
    """Playwright's retrying assertions, imported late: without playwright the tests skip."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def screenshot(target, name: str) -> None:
    """Save a screenshot of a whole page, or of one part of it (a locator), for the README."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    whole_page = {"full_page": True} if hasattr(target, "goto") else {}
    target.screenshot(path=str(SCREENSHOTS / f"{name}.png"), animations="disabled", **whole_page)


def _wait_ready(base: str, process: subprocess.Popen, log_path: Path,
                timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "the server did not become ready"
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


