# `make run` starts the whole stack (api, job worker, inference worker) on the embedded SQLite default;
# `make test` runs the whole suite. Both create .venv and install first: `make run` only what running needs,
# `make test` (and `make install`, the developer set-up) also the test extra, and what the suite drives for real
# (Debian/Ubuntu apt packages chromium, chromium-driver, redis-server) when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install system-deps run test clean

$(RUN_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

install: $(TEST_STAMP)

# The suite drives real programs: headless Chromium (the web page), a Redis server (the shared queue) and jq (the
# mlx-knife JSON API examples).
system-deps:
	@missing=""; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	(command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1) || missing="$$missing chromium"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v jq >/dev/null 2>&1 || missing="$$missing jq"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if command -v apt-get >/dev/null 2>&1; then \
		echo "Installing$$missing for the test suite (apt)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null || \
		{ $(SUDO) apt-get update -q >/dev/null && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing >/dev/null; }; \
	else \
		echo "The test suite needs$$missing on PATH (macOS: brew install --cask chromium chromedriver; brew install redis jq)"; \
		exit 1; \
	fi

# `make run` owns MLXK_HOME while it runs: mlxk processes already serving it (a server `mlxk run` left, a background
# job worker, an earlier `make run`) are stopped first, one line each, so nothing holds the port or the inference
# socket. The index step queues nothing and starts no worker (honcho's worker scans once at start), so Ctrl-C on
# honcho stops everything `make run` started.
run: $(RUN_STAMP)
	$(BIN)/mlxk processes stop --all
	$(BIN)/mlxk list --all --no-scan
	PATH="$(CURDIR)/$(BIN):$$PATH" MLXK_STARTED_BY="make run" $(BIN)/honcho start -f Procfile

test: $(TEST_STAMP) system-deps
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
