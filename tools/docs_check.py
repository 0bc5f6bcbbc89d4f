"""Checks of the built website (tools/build_docs.py runs them; tests/test_docs.py proves they fail).

- every internal link and picture points at a file that exists, and every #anchor at an id there;
- nothing is loaded from another host (scripts, styles, fonts, pictures): the site works offline;
- every notebook page shows each figure of its executed notebook (the pictures are counted);
- every notebook page shows its notebook's cells: each code cell's source, in order, and each heading;
- the API page documents every name of ``iseg.__all__``, each with its docstring's first line.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from bs4 import BeautifulSoup

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/svg+xml")
REMOTE = re.compile(r"^(https?:)?//", re.I)


_parsed: dict = {}


def _soup(path: Path) -> BeautifulSoup:
    """The parsed page, parsed once (pages are read by several checks and as link targets)."""
    stat = path.stat()
    key = (path.resolve(), stat.st_mtime_ns, stat.st_size)
    if key not in _parsed:
        _parsed[key] = BeautifulSoup(path.read_text(encoding="utf-8"), "html.parser")
    return _parsed[key]


def pages_of(site: Path) -> list[Path]:
    """The site's pages (``_static`` holds the theme's templates, not pages)."""
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)


def check_links(site: Path) -> list[str]:
    """Internal links, pictures, scripts and styles that point at nothing."""
    problems, ids = [], {}

    def ids_of(page: Path) -> set[str]:
        if page not in ids:
            soup = _soup(page)
            ids[page] = {t["id"] for t in soup.find_all(id=True)} | {t["name"] for t in soup.find_all("a", attrs={"name": True})}
        return ids[page]

    for page in pages_of(site):
        soup = _soup(page)
        for tag, attr in (("a", "href"), ("img", "src"), ("script", "src"), ("link", "href")):
            for t in soup.find_all(tag, attrs={attr: True}):
                target = t[attr]
                if REMOTE.match(target) or re.match(r"^(mailto|data|javascript):", target):
                    continue
                parts = urlsplit(target)
                if parts.scheme:
                    continue
                dest = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
                if dest.is_dir():
                    dest = dest / "index.html"
                where = page.relative_to(site)
                if not dest.is_file():
                    problems.append(f"{where}: broken link {target}")
                elif parts.fragment and dest.suffix == ".html" and unquote(parts.fragment) not in ids_of(dest):
                    problems.append(f"{where}: broken anchor {target}")
    return problems


def check_offline(site: Path) -> list[str]:
    """Scripts, styles, fonts and pictures loaded from another host."""
    problems = []
    for page in pages_of(site):
        soup = _soup(page)
        where = page.relative_to(site)
        for tag, attr in (("script", "src"), ("img", "src"), ("iframe", "src"), ("link", "href")):
            for t in soup.find_all(tag, attrs={attr: True}):
                if tag == "link" and not {"stylesheet", "preload", "icon", "modulepreload"} & set(t.get("rel", [])):
                    continue
                if REMOTE.match(t[attr]):
                    problems.append(f"{where}: <{tag}> loads {t[attr]}")
        for style in soup.find_all("style"):
            problems += [f"{where}: <style> loads {u}" for u in re.findall(r"url\(['\"]?((?:https?:)?//[^)'\"]+)", style.text)]
    for css in sorted(site.rglob("*.css")):
        text = css.read_text(encoding="utf-8", errors="replace")
        for u in re.findall(r"url\(['\"]?((?:https?:)?//[^)'\"]+)|@import\s+['\"]((?:https?:)?//[^'\"]+)", text):
            problems.append(f"{css.relative_to(site)}: loads {u[0] or u[1]}")
    return problems


def notebook_figures(nb) -> int:
    """Pictures among a notebook's outputs (one per output, whatever its kind)."""
    return sum(any(k in out.get("data", {}) for k in IMAGE_TYPES)
               for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", []))


def page_figures(soup: BeautifulSoup) -> int:
    return sum(len(out.find_all("img")) for out in soup.select("div.cell_output"))


def _code(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def _words(text: str) -> str:
    return re.sub(r"\W+", " ", text).strip().lower()


def check_cells(soup: BeautifulSoup, nb) -> list[str]:
    """The page's code cells are the notebook's, in order; every heading of its text is there."""
    problems = []
    want = [_code(c.source) for c in nb.cells if c.cell_type == "code"]
    got = [_code(div.get_text()) for div in soup.select("div.cell_input pre")]
    if len(want) != len(got):
        problems.append(f"{len(got)} code cells on the page, {len(want)} in the notebook")
    for i, (w, g) in enumerate(zip(want, got)):
        if w != g:
            problems.append(f"code cell {i} differs from the notebook's: {g[:60]!r} vs {w[:60]!r}")
    headings = {_words(h.get_text()) for h in soup.find_all(re.compile(r"^h[1-6]$"))}
    for cell in nb.cells:
        if cell.cell_type == "markdown" and not cell.metadata.get("iseg_site"):
            prose = re.sub(r"^(```|~~~).*?^\1", "", cell.source, flags=re.M | re.S)  # not a code block's comments
            for heading in re.findall(r"^#{1,6}\s+(.+)$", prose, re.M):
                text = _words(re.sub(r"[`*_]|\$[^$]*\$", " ", heading))
                if not any(text in h for h in headings):
                    problems.append(f"heading {heading!r} is not on the page")
    return problems


def check_notebook_page(page: Path, nb) -> list[str]:
    if not page.is_file():
        return [f"{page.name}: no page"]
    soup = _soup(page)
    problems = check_cells(soup, nb)
    want, got = notebook_figures(nb), page_figures(soup)
    if want != got:
        problems.append(f"{got} figures on the page, {want} in the executed notebook")
    return [f"{page.name}: {p}" for p in problems]


def check_api(page: Path, names: list[str], docstrings: dict[str, str]) -> list[str]:
    """Every public name has its entry (an id ``iseg.NAME``) and its docstring's first line."""
    if not page.is_file():
        return ["api.html: no page"]
    soup = _soup(page)
    problems = []
    for name in names:
        entry = soup.find(id=f"iseg.{name}")
        if entry is None:
            problems.append(f"api.html: no entry for iseg.{name}")
            continue
        first = _words(docstrings.get(name, "").strip().split("\n\n")[0])
        body = entry.find_parent("dl")
        if first and (body is None or first not in _words(body.get_text())):
            problems.append(f"api.html: iseg.{name} lacks its docstring ({first[:50]!r})")
    return problems


def check_site(site: Path, pages: dict, warnings: str = "") -> list[str]:
    """Every check; ``pages`` maps a notebook's name to the notebook the page was built from."""
    import inspect

    import iseg

    problems = [f"sphinx: {w}" for w in warnings.splitlines()
                if re.search(r"WARNING: .*(reference target not found|unknown document|not readable|"
                             r"nonexisting document|Unknown target|cross-reference target not found|"
                             r"image file|Duplicate|undefined label|Lexing literal_block)", w)
                and "docstring of" not in w]
    problems += check_links(site) + check_offline(site)
    for name, nb in pages.items():
        problems += check_notebook_page(site / "notebooks" / f"{name}.html", nb)
    docstrings = {name: inspect.getdoc(getattr(iseg, name)) or "" for name in iseg.__all__
                  if callable(getattr(iseg, name))}  # a constant's text is the site's own (build_docs.DATA_DOCS)
    problems += check_api(site / "api.html", list(iseg.__all__), docstrings)
    return problems
