"""Build the course's website: the executed notebooks, the method, the README and the API, offline.

    python tools/build_docs.py                      # execute every notebook (nbclient), then build
    ISEG_EXECUTED_NOTEBOOKS=build/executed python tools/build_docs.py   # use a test run's notebooks

`make docs` runs this. With ``ISEG_EXECUTED_NOTEBOOKS`` set (CI sets it for `make test`, whose
conftest.py writes every notebook nbval ran there), the site is built from those notebooks and no
notebook runs again; a notebook missing from that folder, or whose cells differ from
``notebooks/``, is an error. Otherwise the notebooks are executed here, one at a time.

The generator is Sphinx with myst-nb (notebooks) and myst-parser (Markdown), with the
sphinx-book-theme; all of it, and MathJax (the django-static-mathjax package's copy), comes from
pip packages, so nothing is fetched to build or to read the site. After the build,
``tools/docs_check.py`` checks it (links, figures, cells, no remote resources) and this script
fails if anything is wrong. The site is in ``build/site`` and packed as ``build/site.tar.gz``.
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
BUILD = ROOT / "build"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see conftest.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WIDGET = "application/vnd.jupyter.widget-view+json"
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/svg+xml")
WIDGET_NOTE = ("*A still picture of this widget's first state. Its controls are live when you run the notebook "
               "in JupyterLab (or Voilà): every slider, button and click redraws the figure.*")


def repository_url() -> str:
    """The repository's address (pyproject's ``[project.urls] Repository``): Colab opens notebooks from it."""
    m = re.search(r'^Repository\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return m.group(1).rstrip("/")


def colab_url(name: str) -> str:
    path = repository_url().removeprefix("https://github.com/")
    return f"https://colab.research.google.com/github/{path}/blob/main/notebooks/{name}.ipynb"


def notebook_names() -> list[str]:
    return [p.stem for p in sorted(NOTEBOOKS.glob("*.ipynb"))]


# -- executed notebooks ---------------------------------------------------------------------------

def _peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def execute(name: str, out: Path) -> Path:
    """Run ``notebooks/NAME.ipynb`` with nbclient and write it with its outputs, time and peak memory."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    peak = None
    t0 = time.perf_counter()
    with client.setup_kernel():
        pid = client.km.provisioner.process.pid
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
            peak = _peak_rss_mb(pid) or peak
    seconds = time.perf_counter() - t0
    nb.metadata.pop("widgets", None)
    nb.metadata["iseg_run"] = {"executed_by": "nbclient", "seconds": round(seconds, 1),
                               "peak_rss_mb": None if peak is None else round(peak)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.ipynb"
    nbformat.write(nb, path)
    print(f"executed {name} in {seconds:.1f} s", flush=True)
    return path


def source_cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def executed_notebooks(folder: Path | None) -> dict[str, Path]:
    """Every notebook, executed: from ``folder`` (a test run's) or executed now into build/executed."""
    names = notebook_names()
    if folder is None:  # two at a time: a kernel spends part of its time starting and importing
        from concurrent.futures import ThreadPoolExecutor

        out = BUILD / "executed"
        with ThreadPoolExecutor(int(os.environ.get("ISEG_DOCS_JOBS", "2"))) as pool:
            return dict(zip(names, pool.map(lambda name: execute(name, out), names)))
    found = {}
    for name in names:
        path = folder / f"{name}.ipynb"
        if not path.is_file():
            sys.exit(f"build_docs: {path} is missing: the test run did not save it (did the notebook fail?). "
                     "Run `make test` with ISEG_EXECUTED_NOTEBOOKS set, or `make docs` without it to execute here.")
        ran, source = nbformat.read(path, as_version=4), nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        if source_cells(ran) != source_cells(source):
            sys.exit(f"build_docs: {path} was executed from other cells than notebooks/{name}.ipynb; run the tests again.")
        found[name] = path
    return found


# -- the pages ------------------------------------------------------------------------------------

def readme_table() -> dict[str, tuple[str, str]]:
    """The README's course table: notebook -> (what you learn, what you play with)."""
    rows = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"\|\s*`(\d\d_\w+)`\s*\|(.*)\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = (m.group(2).strip(), m.group(3).strip())
    return rows


def title_of(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            m = re.search(r"^#\s+(.+)$", cell.source, re.M)
            if m:
                return m.group(1).strip()
    return "?"


def needs(nb) -> str:
    run = nb.metadata.get("iseg_run", {})
    measured = f"it ran in {run['seconds']:.0f} s" if run.get("seconds") is not None else "it ran"
    if run.get("peak_rss_mb"):
        measured += f" with a peak of {run['peak_rss_mb'] / 1024:.1f} GB of memory (the kernel's)"
    knob = any(c.cell_type == "code" and re.search(r"^MODEL\s*=", c.source, re.M) for c in nb.cells)
    other = ("Stable Diffusion 2.1 (`MODEL` in the first cell) needs a CUDA GPU and its weights." if knob
             else "It runs on the shipped shapes models only.")
    return f"A CPU is enough: with the shapes model (as on this page) {measured} on a 2-core CPU. {other}"


def header_cell(name: str, nb) -> nbformat.NotebookNode:
    lines = [
        "```{admonition} Run this notebook",
        ":class: tip",
        f"- **JupyterLab, on your computer**: `make setup`, then `jupyter lab notebooks/{name}.ipynb`; "
        "there every figure is a live widget.",
        f"- **Colab**: [open {name}.ipynb in Colab]({colab_url(name)}).",
    ]
    if name == "07_interactive":
        lines.append("- **Voilà**: `make app` serves this notebook as a standalone web app at "
                     "<http://localhost:8866>: click, draw a stroke or a box, or type a description.")
    lines += [f"- **Needs**: {needs(nb)}", "```"]
    cell = nbformat.v4.new_markdown_cell("\n".join(lines))
    cell.metadata["iseg_site"] = True  # added by the site: tools/docs_check.py does not look for it in the notebook
    cell["id"] = "iseg-site-run"
    return cell


def still_pictures(cell) -> None:
    """Widget outputs become their still PNG (ipympl's canvas and iseg's figure boxes carry one)."""
    outputs = []
    for out in cell.get("outputs", []):
        data = out.get("data", {})
        if WIDGET in data:
            plain = data.get("text/plain", "")
            data.pop(WIDGET)
            if "image/png" in data:
                data.pop("text/html", None)  # ipympl's HTML is the same picture with a "Figure N" label
                outputs.append(out)
                if not plain.startswith("Canvas("):  # controls above the figure, not a plain figure
                    outputs.append(nbformat.v4.new_output("display_data", data={"text/markdown": WIDGET_NOTE}))
            elif plain:
                outputs.append(out)
            continue
        outputs.append(out)
    cell["outputs"] = outputs


def collapse_solutions(cell) -> None:
    """Cells that JupyterLab shows collapsed (exercise solutions) are collapsed on the page too."""
    jupyter = cell.metadata.get("jupyter", {})
    tags = cell.metadata.setdefault("tags", [])
    if jupyter.get("source_hidden") or "solution" in tags:
        tags.append("hide-input")
    if jupyter.get("outputs_hidden"):
        tags.append("hide-output")
    if not tags:
        del cell.metadata["tags"]


def without_remote_pictures(text: str) -> str:
    """A picture from another host (a Colab badge) becomes its words: the site loads nothing remote."""
    text = re.sub(r"!\[([^\]]*)\]\((?:https?:)?//[^)\s]+\)", lambda m: m.group(1) or "picture", text)
    return re.sub(r"<img\b[^>]*\bsrc=[\"'](?:https?:)?//[^>]*>", "", text)


def local_pictures_only(cell) -> None:
    """A text cell's pictures from other hosts become their words (``without_remote_pictures``)."""
    cell.source = without_remote_pictures(cell.source)


def page_notebook(name: str, nb):
    page = copy.deepcopy(nb)
    for cell in page.cells:
        if cell.cell_type == "code":
            still_pictures(cell)
            collapse_solutions(cell)
        elif cell.cell_type == "markdown":
            local_pictures_only(cell)
    page.cells.insert(1, header_cell(name, nb))
    return page


def readme_page() -> str:
    """The README as a page: links into docs/ become the site's pages, other files the repository's."""
    text = without_remote_pictures((ROOT / "README.md").read_text())
    repo = repository_url()

    def link(m):
        target = m.group(2)
        if re.match(r"[a-z]+:|#", target):
            return m.group(0)
        path, _, anchor = target.partition("#")
        if path.startswith("docs/"):
            return f"{m.group(1)}({path.removeprefix('docs/')}{'#' + anchor if anchor else ''})"
        return f"{m.group(1)}({repo}/blob/main/{target})"

    text = re.sub(r"(!?\[[^\]]*\])\(([^)\s]+)\)", link, text)
    text = re.sub(r"\A# iseg\n", "# The library (README)\n", text)
    return text


def api_page() -> str:
    import inspect

    import iseg

    lines = ["# API reference", "",
             "Every public name of the package (`iseg.__all__`), with its docstring. The steps of the method "
             "live in their own modules (the README's *Architecture* table names them).", ""]
    for name in iseg.__all__:
        obj = getattr(iseg, name)
        if not callable(obj):  # a constant has no docstring of its own: it is described here
            value = [f"   :value: {obj!r}"] if isinstance(obj, str) else []
            lines += ["```{eval-rst}", f".. py:data:: iseg.{name}", *value, "", f"   {DATA_DOCS[name]}", "```", ""]
            continue
        kind = "autoclass" if inspect.isclass(obj) else "autofunction"
        options = ["   :members:"] if kind == "autoclass" else []
        lines += ["```{eval-rst}", f".. {kind}:: iseg.{name}", *options, "```", ""]
    lines += ["## Deprecated", "",
              "Names `iseg` exported before and no longer does: each still works, warns once "
              "(`DeprecationWarning`) and will be removed in 0.2.", ""]
    lines += [f"- `iseg.{name}`: use {instead}" for name, (_, instead) in iseg.DEPRECATED.items()]
    return "\n".join(lines) + "\n"


DATA_DOCS = {
    "DEFAULT_MODEL": "The model that ``load_model()`` loads when it is given no name (Stable Diffusion 2.1-base).",
}


def index_page(pages: dict[str, nbformat.NotebookNode]) -> str:
    table = readme_table()
    lines = ["# iseg: the course", "",
             "Training-free segmentation from the attention maps of a diffusion model (the iSeg method), "
             "taught in notebooks. Each page below is one notebook as it ran on the *shapes* model (a miniature "
             "diffusion model that ships with `iseg`), with all its figures; each says how to run it yourself: in "
             "JupyterLab after `make setup`, on Colab, or (the interactive one) as a Voilà app.", "",
             "## The course", "",
             "| notebook | what you learn | what you play with | time (2-core CPU) |", "|---|---|---|---|"]
    for name, nb in pages.items():
        learn, play = table.get(name, ("", ""))
        run = nb.metadata.get("iseg_run", {})
        seconds = f"{run['seconds']:.0f} s" if run.get("seconds") is not None else ""
        lines.append(f"| [{title_of(nb)}](notebooks/{name}.ipynb) | {learn} | {play} | {seconds} |")
    lines += ["", "## Reference", "",
              "- [The method](method.md): what the library computes, step by step, with its formulas.",
              "- [The library (README)](readme.md): installing, the command line, models, evaluation, architecture.",
              "- [API reference](api.md): every public name of `iseg` with its docstring.", "",
              "```{toctree}", ":hidden:", ":caption: The course", "",
              *[f"notebooks/{name}" for name in pages], "```", "",
              "```{toctree}", ":hidden:", ":caption: Reference", "", "method", "readme", "api", "```", ""]
    return "\n".join(lines)


def mathjax(static: Path) -> None:
    """MathJax 3 (tex-chtml) and its fonts from the django-static-mathjax package: no CDN."""
    import mathjax

    es5 = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    dest = static / "mathjax"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(es5 / "tex-chtml.js", dest / "tex-chtml.js")
    for sub in ("output/chtml/fonts/woff-v2", "input/tex/extensions", "ui", "a11y", "sre"):
        if (es5 / sub).is_dir():
            shutil.copytree(es5 / sub, dest / sub, dirs_exist_ok=True)


def stage(executed: dict[str, Path], src: Path) -> dict[str, nbformat.NotebookNode]:
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    shutil.copy2(ROOT / "docs" / "conf.py", src / "conf.py")
    shutil.copytree(ROOT / "docs" / "_static", src / "_static")
    for f in (ROOT / "docs").iterdir():
        if f.suffix in (".md", ".png", ".gif"):
            shutil.copy2(f, src / f.name)
    (src / "readme.md").write_text(readme_page())
    (src / "api.md").write_text(api_page())
    mathjax(src / "_static")
    pages = {}
    (src / "notebooks").mkdir()
    for name, path in executed.items():
        nb = nbformat.read(path, as_version=4)
        pages[name] = page_notebook(name, nb)
        nbformat.write(pages[name], src / "notebooks" / f"{name}.ipynb")
    (src / "index.md").write_text(index_page(pages))
    return pages


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--executed", type=Path, default=os.environ.get("ISEG_EXECUTED_NOTEBOOKS") or None,
                   help="a folder of executed notebooks (default: $ISEG_EXECUTED_NOTEBOOKS; unset: execute them now)")
    p.add_argument("--out", type=Path, default=BUILD / "site")
    p.add_argument("--no-browser", dest="browser", action="store_false",
                   help="skip reading every page in headless Chromium (build/site-shots/ keeps its screenshots)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    executed = executed_notebooks(args.executed)
    took = {"notebooks": time.perf_counter() - t0}
    src = BUILD / "docs-src"
    pages = stage(executed, src)
    if args.out.exists():
        shutil.rmtree(args.out)
    log = BUILD / "sphinx-warnings.log"
    cmd = [sys.executable, "-m", "sphinx", "-b", "html", "-q", "-w", str(log), str(src), str(args.out)]
    if subprocess.run(cmd, cwd=ROOT).returncode:
        return 1
    took["sphinx"] = time.perf_counter() - t0 - sum(took.values())
    sys.path.insert(0, str(Path(__file__).parent))
    import docs_check

    problems = docs_check.check_site(args.out, pages, warnings=log.read_text())
    took["checks"] = time.perf_counter() - t0 - sum(took.values())
    if args.browser:
        import docs_browser

        if docs_browser.chromium() is None:
            reason = "no Chromium to read the site with (Debian: sudo apt-get install chromium)"
            if os.environ.get("CI", "").lower() == "true":
                problems.append(reason)
            else:
                print("note:", reason, "- the browser check is skipped")
        else:
            problems += docs_browser.read_site(args.out, BUILD / "site-shots")
            took["browser"] = time.perf_counter() - t0 - sum(took.values())
    with tarfile.open(args.out.with_suffix(".tar.gz"), "w:gz") as tar:
        tar.add(args.out, arcname="site")
    for problem in problems:
        print("docs:", problem)
    verdict = f"{len(problems)} problems" if problems else "checks passed"
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in took.items())
    print(f"site: {args.out} ({args.out.with_suffix('.tar.gz')}), {len(pages)} notebooks, {verdict}, "
          f"{time.perf_counter() - t0:.0f} s ({phases})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
