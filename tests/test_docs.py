"""The course's website (`make docs`): its checks can fail, widgets leave a still picture, the test run
saves what it executed. The site itself is built and checked by `make docs` (tools/build_docs.py)."""

import base64
import io
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
pytest.importorskip("bs4")
import build_docs  # noqa: E402
import docs_check  # noqa: E402


def executed_notebook():
    nb = nbformat.v4.new_notebook()
    code = nbformat.v4.new_code_cell("x = 1\nprint(x)")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n"),
                    nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})]
    nb.cells = [nbformat.v4.new_markdown_cell("# A title\n\nSome text."), code,
                nbformat.v4.new_markdown_cell("## Exercises"), nbformat.v4.new_code_cell("y = 2")]
    return nb


PAGE = """<html><body><h1>A title</h1><p>Some text.</p>
<div class="cell_input"><pre>x = 1
print(x)</pre></div><div class="cell_output"><pre>1</pre><img src="../_images/a.png"></div>
<h2 id="exercises">Exercises</h2><div class="cell_input"><pre>y = 2</pre></div>
<a href="#exercises">up</a> <a href="../index.html">home</a> <a href="https://example.org/x">out</a>
<script src="../_static/x.js"></script></body></html>"""


def site(tmp_path, page=PAGE):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "_images").mkdir()
    (tmp_path / "_static").mkdir()
    (tmp_path / "_images" / "a.png").write_bytes(b"png")
    (tmp_path / "_static" / "x.js").write_text("")
    (tmp_path / "index.html").write_text("<html><body><h1>home</h1></body></html>")
    (tmp_path / "notebooks" / "nb.html").write_text(page)
    return tmp_path


def test_a_faithful_page_passes(tmp_path):
    s = site(tmp_path)
    assert docs_check.check_links(s) == []
    assert docs_check.check_offline(s) == []
    assert docs_check.check_notebook_page(s / "notebooks" / "nb.html", executed_notebook()) == []


@pytest.mark.parametrize("change, problem", [
    (("../index.html", "../missing.html"), "broken link ../missing.html"),
    (("#exercises\"", "#nowhere\""), "broken anchor #nowhere"),
    (("../_images/a.png", "../_images/b.png"), "broken link ../_images/b.png"),
])
def test_a_broken_internal_link_is_found(tmp_path, change, problem):
    s = site(tmp_path, PAGE.replace(*change))
    assert [p for p in docs_check.check_links(s) if problem in p], docs_check.check_links(s)


@pytest.mark.parametrize("tag", ['<script src="https://cdn.example.org/mathjax.js"></script>',
                                 '<link rel="stylesheet" href="//fonts.googleapis.com/css?family=Lato">',
                                 '<style>@font-face { src: url("https://fonts.gstatic.com/x.woff2") }</style>'])
def test_anything_loaded_from_another_host_is_found(tmp_path, tag):
    s = site(tmp_path, PAGE.replace("</body>", tag + "</body>"))
    assert len(docs_check.check_offline(s)) == 1


def test_a_remote_font_in_a_stylesheet_is_found(tmp_path):
    s = site(tmp_path)
    (s / "_static" / "theme.css").write_text("@import 'https://fonts.googleapis.com/css2?family=Inter';")
    assert docs_check.check_offline(s) == ["_static/theme.css: loads https://fonts.googleapis.com/css2?family=Inter"]


def test_a_missing_figure_is_found(tmp_path):
    s = site(tmp_path, PAGE.replace('<img src="../_images/a.png">', ""))
    assert docs_check.check_notebook_page(s / "notebooks" / "nb.html", executed_notebook()) == [
        "nb.html: 0 figures on the page, 1 in the executed notebook"]


@pytest.mark.parametrize("change, problem", [
    (("print(x)", "print(x + 1)"), "code cell 0 differs"),
    (('<div class="cell_input"><pre>y = 2</pre></div>', ""), "1 code cells on the page, 2 in the notebook"),
    (("<h2 id=\"exercises\">Exercises</h2>", ""), "heading 'Exercises' is not on the page"),
])
def test_a_page_that_differs_from_its_notebook_is_found(tmp_path, change, problem):
    s = site(tmp_path, PAGE.replace(*change))
    problems = docs_check.check_notebook_page(s / "notebooks" / "nb.html", executed_notebook())
    assert [p for p in problems if problem in p], problems


def test_the_api_check_wants_every_name_and_its_docstring(tmp_path):
    page = tmp_path / "api.html"
    page.write_text('<dl><dt id="iseg.load_model">load_model</dt><dd><p>Load a model.</p></dd></dl>'
                    '<dl><dt id="iseg.ISeg">ISeg</dt><dd><p>Something else.</p></dd></dl>')
    docs = {"load_model": "Load a model.\n\nMore.", "ISeg": "The method.", "Settings": "Settings."}
    assert docs_check.check_api(page, ["load_model", "ISeg", "Settings"], docs) == [
        "api.html: iseg.ISeg lacks its docstring ('the method')", "api.html: no entry for iseg.Settings"]


def test_widget_outputs_become_their_still_picture_with_a_note():
    cell = nbformat.v4.new_code_cell("view.widget()")
    widget = {"model_id": "abc", "version_major": 2, "version_minor": 0}
    cell.outputs = [
        nbformat.v4.new_output("display_data", data={build_docs.WIDGET: widget, "image/png": "AAAA",
                                                      "text/html": "<img>", "text/plain": "Canvas(toolbar=...)"}),
        nbformat.v4.new_output("execute_result", data={build_docs.WIDGET: widget, "image/png": "BBBB",
                                                       "text/plain": "FigureBox(children=...)"}, execution_count=1),
        nbformat.v4.new_output("display_data", data={build_docs.WIDGET: widget, "text/plain": "Button()"}),
    ]
    build_docs.still_pictures(cell)
    kinds = [sorted(o.get("data", {})) for o in cell.outputs]
    assert kinds == [["image/png", "text/plain"], ["image/png", "text/plain"], ["text/markdown"], ["text/plain"]]
    assert cell.outputs[2].data["text/markdown"] == build_docs.WIDGET_NOTE  # controls: a note that they are live


def test_solution_cells_are_collapsed():
    hidden = nbformat.v4.new_code_cell("answer = 42", metadata={"jupyter": {"source_hidden": True}})
    tagged = nbformat.v4.new_code_cell("answer = 42", metadata={"tags": ["solution"]})
    plain = nbformat.v4.new_code_cell("x = 1")
    for cell in (hidden, tagged, plain):
        build_docs.collapse_solutions(cell)
    assert hidden.metadata["tags"] == ["hide-input"] and "hide-input" in tagged.metadata["tags"]
    assert "tags" not in plain.metadata


def test_each_page_says_how_to_run_it_and_what_it_needs():
    nb = executed_notebook()
    nb.metadata["iseg_run"] = {"seconds": 31.4, "peak_rss_mb": 900}
    page = build_docs.page_notebook("07_interactive", nb)
    header = page.cells[1].source
    assert page.cells[0].source == nb.cells[0].source and len(page.cells) == len(nb.cells) + 1
    assert "jupyter lab notebooks/07_interactive.ipynb" in header and "make app" in header
    repo = build_docs.repository_url().removeprefix("https://github.com/")
    assert f"https://colab.research.google.com/github/{repo}/blob/main/notebooks/07_interactive.ipynb" in header
    assert "31 s" in header and "0.9 GB" in header and "CPU" in header
    assert "make app" not in build_docs.page_notebook("02_cross_attention", nb).cells[1].source


def test_the_readme_page_links_into_the_site_and_the_repository():
    text = build_docs.readme_page()
    assert "](method.md)" in text and "](docs/method.md)" not in text
    assert "![quickstart](quickstart.png)" in text
    assert "](#evaluating-on-datasets)" in text


def test_figure_box_carries_a_still_picture_of_its_figure():
    import matplotlib

    matplotlib.use("Agg")
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from PIL import Image

    from iseg.course.explore import figure_box

    fig, ax = plt.subplots(figsize=(3, 2), dpi=50)
    ax.imshow([[0, 1], [1, 0]])
    box = figure_box([w.IntSlider()], fig)
    data = box._repr_mimebundle_()
    assert build_docs.WIDGET in data  # a live front end still renders the widget
    picture = Image.open(io.BytesIO(base64.b64decode(data["image/png"])))
    assert picture.size == (150, 100)
    plt.close(fig)


def _nbval_run(tmp_path, *sources):
    """pytest --nbval on a notebook of these code cells, with conftest.py's hook and ISEG_EXECUTED_NOTEBOOKS set."""
    import os
    import subprocess

    nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), *map(nbformat.v4.new_code_cell, sources)]
    nbformat.write(nb, tmp_path / "t.ipynb")
    (tmp_path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    out = tmp_path / "executed"
    env = {**os.environ, "ISEG_EXECUTED_NOTEBOOKS": str(out)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval-lax",
                          "--nbval-current-env", "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path / "t.ipynb")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return run, out / "t.ipynb"


def test_the_test_run_saves_the_notebooks_it_executed(tmp_path):
    """conftest.py's hook: nbval's outputs written with the notebook, its run time and memory."""
    png = ("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
           "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082")
    run, path = _nbval_run(tmp_path, "print(6 * 7)", f"from IPython.display import Image\nImage(data=bytes.fromhex('{png}'))")
    assert run.returncode == 0, run.stdout + run.stderr
    saved = nbformat.read(path, as_version=4)
    nbformat.validate(saved)
    assert saved.cells[1].outputs[0].text == "42\n"
    assert "image/png" in saved.cells[2].outputs[0].data and docs_check.notebook_figures(saved) == 1
    assert saved.metadata.iseg_run["seconds"] > 0


def test_a_notebook_that_failed_is_not_saved(tmp_path):
    run, path = _nbval_run(tmp_path, "print(1)", "raise ValueError('broken')", "print(3)")
    assert run.returncode != 0 and "broken" in run.stdout
    assert not path.exists()  # the site's build then stops, naming the missing notebook


def test_two_processes_keep_each_notebook_in_one_kernel_and_print_its_time(tmp_path):
    """`make test` runs pytest in two xdist processes: every cell of a notebook must still run, in
    order, in the one kernel of one process (conftest.py's scheduler), and the times are printed."""
    import os
    import subprocess

    for name in ("a", "b", "c"):  # each later cell needs the earlier ones' names, in the same kernel
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
        nb.cells = [nbformat.v4.new_code_cell(c) for c in
                    ("import os, time\nstart = [os.getpid()]", "time.sleep(0.5)\nstart.append(os.getpid())",
                     "assert len(start) == 2 and len(set(start)) == 1\nstart.append(os.getpid())",
                     "assert len(start) == 3")]
        nbformat.write(nb, tmp_path / f"{name}.ipynb")
    (tmp_path / "test_plain.py").write_text("import pytest\n\n@pytest.mark.parametrize('k', range(6))\n"
                                            "def test_k(k):\n    assert k < 6\n")
    (tmp_path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    env = {k: v for k, v in os.environ.items() if k != "ISEG_EXECUTED_NOTEBOOKS"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--no-loadscope-reorder", "-p", "no:cacheprovider",
                          "--nbval-lax", "--nbval-current-env", "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "18 passed" in run.stdout and "2 workers" in run.stdout
    times = run.stdout.split("notebook run times (nbval)")[1]
    assert all(f"{name}.ipynb: " in times for name in "abc")


def test_the_readme_links_to_the_site_and_says_how_to_build_it():
    owner, name = build_docs.repository_url().removeprefix("https://github.com/").split("/")
    readme = (ROOT / "README.md").read_text()
    assert f"https://{owner}.github.io/{name}/" in readme
    assert "make docs" in readme and (ROOT / ".github" / "workflows" / "pages.yml").is_file()


def test_comments_in_a_markdown_code_block_are_not_headings(tmp_path):
    nb = executed_notebook()
    nb.cells[0].source += "\n\n```bash\n# not a heading\niseg --help\n```\n"
    s = site(tmp_path)
    assert docs_check.check_notebook_page(s / "notebooks" / "nb.html", nb) == []


def test_a_remote_picture_in_a_text_cell_becomes_its_words():
    nb = executed_notebook()
    nb.cells[0].source = ("[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
                          "(https://colab.research.google.com/github/o/r/blob/main/notebooks/x.ipynb)\n\n# A title\n"
                          '<img src="https://example.org/a.png"> ![local](../docs/quickstart.png)')
    text = build_docs.page_notebook("x", nb).cells[0].source
    assert text.startswith("[Open In Colab](https://colab.research.google.com/github/o/r/blob/main/notebooks/x.ipynb)")
    assert "example.org" not in text and "![local](../docs/quickstart.png)" in text


def test_one_repository_address():
    """The site's Colab links and the notebooks' install cell name the same repository."""
    from iseg.course import colab

    assert colab.REPOSITORY.rstrip("/") == build_docs.repository_url()
