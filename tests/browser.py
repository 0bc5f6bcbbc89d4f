"""What the browser tests share: Debian's Chromium found or a visible reason why not, free ports,
and servers started and stopped on 127.0.0.1.

Chromium comes from Debian (`/usr/bin/chromium`, installed by `make setup` where it can be), driven
by Playwright; no browser is ever downloaded. Outside CI a machine without it skips these tests
with the reason; under CI (``CI=true``) a missing browser is a failure, never a skip.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _chromium() -> tuple[str | None, str | None]:
    """The path of Debian's Chromium, and None; or None and why the browser tests cannot run."""
    path = os.environ.get("ISEG_CHROMIUM") or shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        return None, "no Chromium: install Debian's (sudo apt-get install chromium) or run `make setup` as root"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None, "playwright is not installed: pip install -e '.[test]'"
    return path, None


def browser_tests_run() -> bool:
    """Whether the browser tests run here (they are skipped without Chromium, except under CI, where they fail)."""
    return _chromium()[0] is not None or os.environ.get("CI", "").lower() == "true"


def chromium_or_skip() -> str:
    """The path of Debian's Chromium; skips (or fails under CI) with the reason when it is absent."""
    path, reason = _chromium()
    if reason is not None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser tests must run in CI: {reason}")
        pytest.skip(reason)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120) -> None:
    end = time.time() + seconds
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {seconds:.0f} s")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
