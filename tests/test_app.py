"""End to end: the interactive notebook served by Voila, driven in headless Chromium.

Chromium and the rules for a machine without it: see ``browser.py``.
"""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from browser import FLAGS, chromium_or_skip, free_port, stop, wait_for

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "07_interactive.ipynb"


@pytest.mark.browser
def test_click_on_an_object_changes_the_mask(tmp_path):
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "voila", str(NOTEBOOK), "--no-browser", f"--port={port}", "--Voila.ip=127.0.0.1",
         "--port_retries=0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=NOTEBOOK.parent,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for(url)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
            page = browser.new_page()
            page.goto(url, timeout=180_000)
            canvas = page.locator("div.jupyter-matplotlib-figure canvas").last
            canvas.wait_for(timeout=180_000)
            page.get_by_text("click the image, or type and press Segment").wait_for(timeout=60_000)
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
        stop(server)
