"""Every notebook as a learner runs it: JupyterLab in headless Chromium, Run All, no error shown, and
for every notebook with a widget, one control moved and the figure's pixels compared before/after.

This is the test that catches a slider whose picture stays frozen (a figure shown once as a static
image while the view changes data nobody sees). JupyterLab serves a copy of ``notebooks/`` from a
temporary folder on 127.0.0.1, so nothing in the repository is written. Screenshots of each figure
before and after are kept under pytest's temporary folder (``ISEG_SCREENSHOTS`` to choose one).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import notebook_runner
import pytest
from browser import FLAGS, chromium_or_skip, free_port, stop, wait_for

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
TOKEN = "iseg-browser-test"

# what to do with each notebook's widget (its controls and figure are one output of the last
# widget cell): press the first slider's handle to the right, optionally press a button after
# that, or click the figure at a point given in image fractions
# the notebooks whose model line names the device: on the fake GPU it is cuda:0
DEVICE_LINE = {p.stem for p in NOTEBOOKS.glob("*.ipynb") if '\\"| device:\\", model.device' in p.read_text()}

ACTIONS = {
    "00_quickstart": dict(slider=True),
    "01_pipeline_by_hand": None,
    "02_cross_attention": dict(slider=True),
    "03_self_attention_and_entropy": dict(slider=True),
    "04_iterative_refinement": dict(slider=True),
    "05_category_enhancement": dict(slider=True),
    "06_generated_images": dict(slider=True, button="Generate and segment"),
    "07_interactive": dict(click=(47.5 / 64, 47.5 / 64)),  # the circle of example 8
    "08_evaluation": None,
    "09_open_vocabulary": None,
    "10_model_families": dict(slider=True),
}


def test_every_notebook_is_listed():
    assert sorted(ACTIONS) == sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    chromium = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("lab")
    shutil.copytree(NOTEBOOKS, root / "notebooks", ignore=shutil.ignore_patterns("outputs", ".ipynb_checkpoints"))
    settings = root / "settings"
    # render every cell (no windowing) so that Run All's outputs are all in the page; no news pop-ups
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        '{"windowingMode": "none"}')
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        '{"fetchNews": "false", "checkForUpdates": false}')
    # the kernels (only they: not JupyterLab's server) run the models as if on a GPU (tests/fake_cuda.py):
    # this Run All of every notebook is also the proof that the shapes UNet's course runs on one
    spec = root / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    kernel_env = notebook_runner.kernel_env(fake_cuda=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ipykernel)", "language": "python", "metadata": {"debugger": True},
        "env": {"PYTHONPATH": kernel_env["PYTHONPATH"], "ISEG_FAKE_CUDA": "1"}}))
    port = free_port()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTER_RUNTIME_DIR=str(root / "runtime"),
               JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"), JUPYTER_PATH=str(root / "jupyter"),
               MPLBACKEND="module://ipympl.backend_nbagg")
    env.pop("ISEG_FAKE_CUDA", None)
    env.pop("CI", None)  # the kernels run notebooks as a user would
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}", f"--ServerApp.root_dir={root / 'notebooks'}",
         "--LabApp.news_url=", "--ServerApp.open_browser=False"]
        + (["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, cwd=root,
    )
    shots = Path(os.environ.get("ISEG_SCREENSHOTS", root / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        wait_for(f"http://127.0.0.1:{port}/api/status?token={TOKEN}")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=FLAGS)
            yield dict(browser=browser, url=f"http://127.0.0.1:{port}", shots=shots)
            browser.close()
    finally:
        stop(server)


def _run_all(page, name: str, timeout_s: float) -> float:
    notebook = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")
    notebook.wait_for(timeout=90_000)
    # the kernel has started and is connected when the status bar says so
    page.locator(".jp-StatusBar-Widget", has_text="Idle").first.wait_for(timeout=90_000)
    prompts = notebook.locator(".jp-CodeCell .jp-InputArea-prompt")
    t0 = time.perf_counter()
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    end = time.time() + timeout_s
    texts: list[str] = []
    while time.time() < end:
        texts = [t.strip() for t in prompts.all_inner_texts()]
        if texts and all(t not in ("[ ]:", "[*]:", "") for t in texts):
            return time.perf_counter() - t0
        if notebook.locator("[data-mime-type='application/vnd.jupyter.error']").count():
            return time.perf_counter() - t0  # Run All stops at an error; the caller reports it
        time.sleep(0.5)
    raise TimeoutError(f"{name}: Run All did not finish in {timeout_s:.0f} s (prompts: {texts})")


# a laptop screen: JupyterLab at 1400x1000 with the file browser open leaves a 968 px output area
VIEWPORT = {"width": 1400, "height": 1000}
OUTPUT_AREA_PX = 968

_MEASURE = """() => {
  const panel = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
  const found = [];
  const cells = [...panel.querySelectorAll('.jp-Cell')];
  const items = panel.querySelectorAll(
    '.jp-OutputArea-output .jupyter-matplotlib-figure, .jp-OutputArea-output img, ' +
    '.jp-OutputArea-output .widget-box, .jp-OutputArea-output .widget-slider, .jp-OutputArea-output .widget-button');
  for (const el of items) {
    const area = el.closest('.jp-OutputArea-output');
    const a = area.getBoundingClientRect();
    let r = el.getBoundingClientRect();
    let width = r.width;
    // an ipympl figure may scroll inside its box: what it draws is its widest visible canvas
    for (const c of el.querySelectorAll('canvas')) {
      const cr = c.getBoundingClientRect();
      if (cr.width > width) { width = cr.width; }
    }
    if (r.width === 0 && width === 0) continue;
    const cell = cells.indexOf(el.closest('.jp-Cell'));
    found.push({cell, kind: el.tagName.toLowerCase() + '.' + String(el.className).split(' ')[0],
                width: Math.round(width), left: Math.round(r.left - a.left), area: Math.round(a.width),
                natural: el.naturalWidth || null});
  }
  return found;
}"""


def _open_file_browser(page) -> None:
    """The file browser open in the left side bar, as a learner has it (JupyterLab's default)."""
    browser = page.locator("#filebrowser")
    if not browser.is_visible():
        page.locator(".jp-SideBar.jp-mod-left [data-id='filebrowser']").first.click()
        browser.wait_for(state="visible", timeout=30_000)


def _too_wide(page) -> tuple[list[dict], list[dict]]:
    """Every figure, image and widget of the notebook's outputs, and those wider than their output area."""
    measured = page.evaluate(_MEASURE)
    wide = [m for m in measured if m["left"] + m["width"] > m["area"] + 1
            or (m["natural"] is not None and m["natural"] > m["area"])]  # an image shrunk to fit is too small to read
    return measured, wide


def _figure_changes(page, figure, act, path_before: Path, path_after: Path, seconds: float = 90) -> bool:
    """Whether the figure's pixels change after ``act`` and then settle.

    The mouse is moved off the figure before each picture (ipympl shows its toolbar on hover, which
    is not a redraw), and a change counts only once two pictures in a row agree: a slow control
    (06's generation) must finish drawing, not merely start.
    """
    page.mouse.move(1, 1)
    time.sleep(1.0)
    before = figure.screenshot(path=str(path_before), animations="disabled")
    act()
    page.mouse.move(1, 1)
    end = time.time() + seconds
    previous = None
    while time.time() < end:
        time.sleep(1.0)
        shot = figure.screenshot(animations="disabled")
        if shot != before and shot == previous:
            path_after.write_bytes(shot)
            return True
        previous = shot
    return False


@pytest.mark.browser
@pytest.mark.parametrize("name", sorted(ACTIONS))
def test_notebook_runs_and_its_widget_redraws_in_jupyterlab(lab, name):
    page = lab["browser"].new_page(viewport=VIEWPORT)
    ok = False
    try:
        # ?reset: a fresh workspace with this notebook alone, not the tabs of the previous test
        page.goto(f"{lab['url']}/lab/tree/{name}.ipynb?reset&token={TOKEN}", timeout=120_000)
        seconds = _run_all(page, name, timeout_s=240)
        print(f"{name}: Run All took {seconds:.1f} s in JupyterLab")
        panel = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)")
        errors = panel.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
        assert errors.count() == 0, f"{name} shows an error: {errors.first.inner_text()[:2000]}"
        if name in DEVICE_LINE:   # the kernel's model is on the (fake) GPU
            assert panel.get_by_text("| device: cuda:0").count() >= 1, f"{name}: the model is not on the fake GPU"
        _open_file_browser(page)
        time.sleep(1.0)  # the notebook's outputs take the narrower width
        page.screenshot(path=str(lab["shots"] / f"{name}.png"), full_page=True)
        measured, wide = _too_wide(page)
        areas = sorted({m["area"] for m in measured})
        print(f"{name}: {len(measured)} figures, images and widgets; output area {areas} px")
        (lab["shots"] / f"{name}-widths.json").write_text(json.dumps(measured, indent=1))
        assert all(a <= OUTPUT_AREA_PX + 8 for a in areas), f"{name}: the output area is {areas} px, not a laptop's"
        assert not wide, f"{name}: wider than the {OUTPUT_AREA_PX} px output area: {wide}"
        action = ACTIONS[name]
        if action is None:
            ok = True
            return
        # the widget: the last output that holds both controls and a live figure
        outputs = panel.locator(".jp-OutputArea-output").filter(has=page.locator(".jupyter-matplotlib-figure"))
        widget = outputs.filter(has=page.locator(".widget-slider, .widget-button, .widget-toggle-buttons")).last
        widget.scroll_into_view_if_needed()
        # an ipympl figure holds several canvases, some hidden (size 0): the top visible one takes the clicks
        figure = widget.locator(".jupyter-matplotlib-figure canvas").filter(visible=True).last
        figure.wait_for(timeout=60_000)

        def act():
            if action.get("slider"):
                handle = widget.locator(".widget-slider .noUi-handle").first
                handle.focus()
                handle.press("ArrowRight")
            if action.get("button"):
                widget.get_by_role("button", name=action["button"]).click()
            if action.get("click"):
                box = figure.bounding_box()
                fx, fy = action["click"]
                figure.click(position={"x": box["width"] * fx, "y": box["height"] * fy})

        changed = _figure_changes(page, figure, act, lab["shots"] / f"{name}-before.png", lab["shots"] / f"{name}-after.png")
        assert changed, f"{name}: the figure did not change after moving its control (see {lab['shots']})"
        # measured again once the widget has drawn (a live figure's canvas may be sized late)
        _, wide = _too_wide(page)
        assert not wide, f"{name}: wider than the {OUTPUT_AREA_PX} px output area once drawn: {wide}"
        ok = True
    finally:
        if not ok:  # what the learner would have seen
            page.screenshot(path=str(lab["shots"] / f"{name}-failed.png"), full_page=True)
        page.close()
