# The same commands the README gives and CI runs.
PYTHON ?= python

.PHONY: setup test lint app

setup:  ## install the CPU build of PyTorch, then iseg with its test and notebook extras
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[test,notebooks]"

test:  ## unit tests and every notebook (nbval)
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check iseg tests tools

app:  ## the interactive notebook as a standalone web app (http://localhost:8866)
	$(PYTHON) -m voila notebooks/06_interactive.ipynb --no-browser --port 8866
