"""End to end: the interactive notebook served by Voila, driven in headless Chromium.

Chromium comes from Debian (`/usr/bin/chromium`, installed by `.ci/run`), driven by Playwright;
no browser is downloaded.
"""

import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "06_interactive.ipynb"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, seconds: float = 120):
    end = time.time() + seconds
    while time.time() < end:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer")


def test_click_on_an_object_changes_the_mask(tmp_path):
    from playwright.sync_api import sync_playwright

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
         "--port_retries=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=NOTEBOOK.parent,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait(url)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page()
            page.goto(url, timeout=180_000)
            canvas = page.locator("div.jupyter-matplotlib-figure canvas").last
            canvas.wait_for(timeout=180_000)
            page.get_by_text("prompts cleared").wait_for(timeout=60_000)
            box = canvas.bounding_box()
            before = canvas.screenshot()
            # example 8 of the shapes test split has a circle centred near (47, 47) of 64x64;
            # the figure shows the image edge to edge, so canvas pixels map linearly to image pixels
            canvas.click(position={"x": box["width"] * 47.5 / 64, "y": box["height"] * 47.5 / 64})
            page.get_by_text(re.compile(r"points: \d+ pixels")).wait_for(timeout=60_000)
            time.sleep(1.0)  # the redrawn canvas arrives after the status label
            after = canvas.screenshot()
            page.screenshot(path=str(tmp_path / "app.png"))
            browser.close()
        assert before != after
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
