"""A real server (`nightread review`, started as a process on a free loopback port) over seeded data,
and Debian's Chromium driven by Playwright (never `playwright install`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require_or_skip

CHROMIUM = os.environ.get("NIGHTREAD_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = Path(os.environ.get("NIGHTREAD_SCREENSHOT_DIR", "test-output/screenshots"))


@dataclass
class ReviewServer:
    url: str
    seeded: object
    database_url: str


@pytest.fixture
def review_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReviewServer]:
    """One server per test over freshly seeded data, so no test sees another's decisions."""
    from db.migrate import upgrade
    from db.session import make_engine
    from integrations.storage import LocalObjectStore
    from tests.review_seed import seed
    from tests.services import free_port, stop_process, wait_until

    data = tmp_path_factory.mktemp("review")
    url = f"sqlite:///{data / 'nightread.db'}"
    upgrade(url)
    engine = make_engine(url)
    seeded = seed(engine, LocalObjectStore(data / "objects"))
    engine.dispose()
    port = free_port()
    log = data / "review.log"
    env = {**os.environ, "NIGHTREAD_DATA_DIR": str(data)}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "nightread"), "review", "--host", "127.0.0.1", "--port", str(port)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[2],
        )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    try:
        wait_until(ready, timeout=60, what="nightread review", proc=proc, log=log)
        yield ReviewServer(url=base, seeded=seeded, database_url=url)
    finally:
        stop_process(proc)


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        require_or_skip(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require_or_skip("playwright (pip install playwright; the browser is Debian's chromium)")
    with sync_playwright() as p:
        # Playwright gives each launch a fresh, empty user-data dir
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def new_page(browser, review_server):  # type: ignore[no-untyped-def]
    """Pages in fresh browser contexts (each its own cookies) on the test's server; `page.csp_errors`
    collects the console's Content-Security-Policy violations."""
    contexts = []

    def make():  # type: ignore[no-untyped-def]
        context = browser.new_context(base_url=review_server.url, viewport={"width": 1280, "height": 900})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.csp_errors = []
        page.on(
            "console",
            lambda m: page.csp_errors.append(m.text) if "Content Security Policy" in m.text else None,
        )
        return page

    try:
        yield make
    finally:
        for context in contexts:
            context.close()


@pytest.fixture
def page(new_page):  # type: ignore[no-untyped-def]
    return new_page()


def screenshot(page, name: str) -> Path:  # type: ignore[no-untyped-def]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
