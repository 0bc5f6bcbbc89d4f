"""Sphinx settings for the course's website. Built by `make docs` (tools/build_docs.py), which copies
this file into build/docs-src with the pages; not meant to be run on docs/ directly."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # build/docs-src -> the repository
sys.path.insert(0, str(ROOT / "tools"))
from build_docs import repository_url  # noqa: E402

REPOSITORY = repository_url()

project = "iseg"
author = "the iseg authors"
copyright = "the iseg authors, MIT licence"
extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.mathjax"]
exclude_patterns = ["_build"]

# notebooks arrive executed (by the test run, or by tools/build_docs.py): never run them here
nb_execution_mode = "off"
nb_ipywidgets_js = {}  # widget outputs are still pictures here; the widget manager would come from a CDN
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3  # the README links to its own sections by their GitHub anchors

# MathJax is copied into _static by tools/build_docs.py from the django-static-mathjax package
mathjax_path = "mathjax/tex-chtml.js"
html_static_path = ["_static"]
html_css_files = ["iseg.css"]

html_theme = "sphinx_book_theme"
html_title = "iseg: the course"
html_theme_options = {
    "repository_url": REPOSITORY,
    "use_repository_button": True,
    "use_download_button": True,
    "show_toc_level": 2,
}
html_last_updated_fmt = None

autodoc_member_order = "bysource"
autodoc_typehints = "description"
