# Two entry points: `make demo` and `make test`. Both create .venv once and reuse it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The browser test opens a report in Debian's headless Chromium; installed once, as root
# or through sudo (a CI machine starts with Python and the Debian registry only).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint install browser clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
		chromium fonts-dejavu-core

browser: $(CHROMIUM)

demo: $(STAMP)
	$(BIN)/python -m autopar demo

lint: $(STAMP)
	$(BIN)/ruff check autopar tests examples benchmarks
	$(BIN)/ruff format --check autopar tests examples benchmarks

test: $(STAMP) $(CHROMIUM) lint
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV)
