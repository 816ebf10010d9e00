# The README's two commands: `make run` and `make test`. Both set up .venv on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.relkd-installed
OUTPUT ?= runs/default
PYTEST_ARGS ?=

# The report test drives a real headless browser: Debian's chromium, installed once if missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install browser run test clean

install: $(STAMP)

# Re-installs when the pins or the package definition change. pip's output goes to a log
# because the pinned stack is 270 packages; the log is shown if anything fails.
$(STAMP): requirements.txt setup.py
	@test -x $(BIN)/python || { echo "relkd: creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@echo "relkd: installing the pinned TFX 1.15.1 / TensorFlow 2.15.1 stack into $(VENV) (about 2 minutes, 3.3 GB)..."
	@$(BIN)/pip install --disable-pip-version-check --no-deps --ignore-requires-python \
		-r requirements.txt > $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@$(BIN)/pip install --disable-pip-version-check --no-deps --no-build-isolation -e . \
		>> $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $@
	@echo "relkd: installed ($(BIN)/relkd)."

run: $(STAMP)
	$(BIN)/relkd run --output $(OUTPUT)

browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		echo "relkd: installing Debian's chromium for the report's browser test..."; \
		$(SUDO) apt-get update -qq >/dev/null && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

test: $(STAMP) browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf runs .pytest_cache
