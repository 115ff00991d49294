"""Debian's headless Chromium, driven by Playwright with the system browser (no download)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .conftest import require_program

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync"]


@contextmanager
def chromium(profile: Path, **context: Any) -> Iterator[Any]:
    """A browser context on a fresh profile (`--user-data-dir`); closed whatever happens."""
    executable = require_program("chromium", CHROMIUM)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(str(profile), executable_path=executable, headless=True,
                                                        args=FLAGS, **context)
        try:
            yield browser
        finally:
            browser.close()
