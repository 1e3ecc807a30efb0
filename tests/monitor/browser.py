"""Headless Chromium for the dashboard's end-to-end tests (Debian packages `chromium` + `chromium-driver`).

`require_browser()` skips a test when the browser is missing, except in CI (`DRAGON_REQUIRE_BROWSER=1`)
where a missing browser must fail loudly instead of silently skipping the only end-to-end check.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from selenium import webdriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW_SIZE = (1440, 1300)  # a laptop-wide page, tall enough to screenshot all of it


def require_browser() -> None:
    """Skip (or, with DRAGON_REQUIRE_BROWSER=1, fail) unless selenium, chromium and chromedriver are present."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    if not missing:
        return
    message = f"browser test needs {', '.join(missing)} (apt-get install chromium chromium-driver)"
    if os.environ.get("DRAGON_REQUIRE_BROWSER") == "1":
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def chromium_driver() -> Iterator[webdriver.Chrome]:
    """A headless Chromium WebDriver with a fresh profile; always quit and the profile removed on exit.

    Flags: no sandbox (CI containers run as root), no GPU and no /dev/shm (small containers), and no
    background networking of any kind: the test machines have no internet, and a browser waiting on
    update or sync servers only makes tests slow.
    """
    # Imported here, not at module top, so require_browser() can skip cleanly without selenium.
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dragon-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--window-size={WINDOW_SIZE[0]},{WINDOW_SIZE[1]}",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    driver = None
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
        yield driver
    finally:
        if driver is not None:
            driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
