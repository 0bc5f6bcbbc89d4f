"""Read the built website in headless Chromium, as a learner would, at a laptop's window size.

Every page is served on 127.0.0.1 and opened in Debian's Chromium (Playwright, as tests/browser.py
does); a problem is any request to another host (the site must work offline), any file that does
not load, a picture that does not decode, an uncaught script error, or formulas MathJax did not
typeset. A screenshot of every page is kept in ``build/site-shots/``.

    python tools/docs_browser.py [build/site]
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAPTOP = {"width": 1366, "height": 768}
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def chromium() -> str | None:
    return os.environ.get("ISEG_CHROMIUM") or shutil.which("chromium") or (
        "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def read_site(site: Path, shots: Path) -> list[str]:
    """Open every page; returns the problems found (an empty list: every page read cleanly)."""
    from docs_check import pages_of
    from playwright.sync_api import sync_playwright

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    shots.mkdir(parents=True, exist_ok=True)
    problems = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=FLAGS)
            page = browser.new_page(viewport=LAPTOP)
            current = {}

            def on_request(request):
                if not request.url.startswith((origin, "data:", "blob:", "about:")):
                    problems.append(f"{current['name']}: requests {request.url} (another host)")
                    return

            def on_response(response):
                if response.status >= 400 and not response.url.endswith("/favicon.ico"):
                    problems.append(f"{current['name']}: {response.url} answered {response.status}")

            page.on("request", on_request)
            page.on("response", on_response)
            page.on("pageerror", lambda error: problems.append(f"{current['name']}: script error {error}"))
            page.route("**/*", lambda route: route.abort() if not route.request.url.startswith(origin)
                       else route.continue_())
            for path in pages_of(site):
                name = path.relative_to(site).as_posix()
                current["name"] = name
                page.goto(f"{origin}/{name}", wait_until="networkidle")
                broken = page.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth === 0)"
                                       ".map(i => i.getAttribute('src').slice(0, 80))")
                problems += [f"{name}: picture {src} does not load" for src in broken]
                formulas = page.evaluate("document.querySelectorAll('div.math, span.math').length")
                if formulas:  # Sphinx loads MathJax on the pages that have formulas
                    page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20000)
                    page.evaluate("MathJax.startup.promise")
                    typeset = page.evaluate("document.querySelectorAll('mjx-container').length")
                    errors = page.evaluate("document.querySelectorAll('mjx-merror').length")
                    if typeset < formulas or errors:
                        problems.append(f"{name}: {typeset} of {formulas} formulas typeset, {errors} with errors")
                page.screenshot(path=str(shots / (name.replace("/", "_").removesuffix(".html") + ".png")))
            browser.close()
    finally:
        server.shutdown()
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    site = Path(argv[0]) if argv else ROOT / "build" / "site"
    if chromium() is None:
        reason = "no Chromium to read the site with (Debian: sudo apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            print("docs:", reason)
            return 1
        print("note:", reason, "- the browser check is skipped")
        return 0
    problems = read_site(site, ROOT / "build" / "site-shots")
    for problem in problems:
        print("docs:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
