# `make run` starts the whole stack (api, job worker, inference worker) on the embedded SQLite default;
# `make test` runs the whole suite. Both create .venv and install first; `make test` also installs the
# headless Chromium the web page's browser test drives (Debian/Ubuntu: apt packages chromium, chromium-driver).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser run test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

browser:
	@if command -v chromedriver >/dev/null 2>&1 && (command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1); then \
		exit 0; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "Installing Chromium and ChromeDriver for the browser test (apt)"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null || \
		{ $(SUDO) apt-get update -q >/dev/null && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null; }; \
	else \
		echo "The browser test needs Chromium and ChromeDriver on PATH (macOS: brew install --cask chromium chromedriver)"; \
		exit 1; \
	fi

run: $(STAMP)
	$(BIN)/mlxk list --all
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/honcho start -f Procfile

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
