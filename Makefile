# The same commands the README gives and CI runs.
PYTHON ?= python

.PHONY: setup browser test lint app gpu-check docs

setup:  ## install the CPU build of PyTorch, then iseg with its test, notebook and docs extras, then Chromium
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test,notebooks,docs]"
	@$(MAKE) --no-print-directory browser

# The browser tests drive Debian's Chromium (never a downloaded browser). Installed where this can
# be done (apt-get as root, or with sudo that needs no password); elsewhere one line says what to do,
# and outside CI those tests are skipped with that reason.
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends chromium >/dev/null && echo "chromium installed"; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo apt-get update -q >/dev/null && sudo apt-get install -y -q --no-install-recommends chromium >/dev/null && echo "chromium installed"; \
	else echo "note: the browser tests need Chromium (Debian/Ubuntu: sudo apt-get install chromium); without it they are skipped"; fi

# two processes (pytest-xdist) on CI's two cores; each notebook's cells stay together in one (conftest.py)
TEST_PROCESSES ?= 2

test:  ## unit tests, the browser tests and every notebook (nbval), in TEST_PROCESSES processes
	$(PYTHON) -m pytest -n $(TEST_PROCESSES) --no-loadscope-reorder

lint:  ## ruff over the package, the tests, the tools and the notebooks
	$(PYTHON) -m ruff check iseg tests tools notebooks

app:  ## the interactive notebook as a standalone web app (http://localhost:8866)
	$(PYTHON) -m voila notebooks/07_interactive.ipynb --no-browser --port 8866

gpu-check:  ## every notebook on this machine's GPU with both shapes models, then SD 2.1-base if cached (bench/gpu-check.json)
	$(PYTHON) bench/gpu_check.py --out bench/gpu-check.json

# The course's website in build/site (and build/site.tar.gz), built offline, then checked: links,
# figures, cells, API, and every page read in headless Chromium (screenshots in build/site-shots).
# With ISEG_EXECUTED_NOTEBOOKS=DIR set for `make test` too, it uses the notebooks that run executed;
# without it, it executes the notebooks itself. DOCS_FLAGS=--no-browser skips the Chromium reading.
docs:  ## the course as a website (build/site/index.html)
	$(PYTHON) tools/build_docs.py $(DOCS_FLAGS)
