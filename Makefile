# The README's two commands: `make run` and `make test`. Both set up .venv on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.relkd-installed
OUTPUT ?= runs/default
PYTEST_ARGS ?=

# The report test drives a real headless browser: Debian's chromium, installed once if missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install check-space browser run test clean

install: $(STAMP)

# Re-installs when the pins or the package definition change. pip's output goes to a log
# because the pinned stack is 270 packages; the log is shown if anything fails.
$(STAMP): requirements.txt setup.py
	@test -x $(BIN)/python || { echo "relkd: creating $(VENV) with $$($(PYTHON) --version)"; $(PYTHON) -m venv $(VENV); }
	@$(MAKE) --no-print-directory check-space
	@echo "relkd: installing the pinned TFX 1.15.1 / TensorFlow 2.15.1 stack into $(VENV) (about 2 minutes, 3.3 GB)..."
	@$(BIN)/pip install --disable-pip-version-check --no-deps --ignore-requires-python \
		-r requirements.txt > $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@$(BIN)/pip install --disable-pip-version-check --no-deps --no-build-isolation -e . \
		>> $(VENV)/install.log 2>&1 || { tail -n 40 $(VENV)/install.log; exit 1; }
	@touch $@
	@echo "relkd: installed ($(BIN)/relkd)."

# A first install writes 3.3 GB into the venv, and pip unpacks TensorFlow's 475 MB wheel on the
# way: say so before pip runs out of space midway. An existing venv only tops up and is not checked.
NEEDED_MB ?= 4000
check-space:
	@ls -d $(VENV)/lib/python*/site-packages/tensorflow >/dev/null 2>&1 || { \
		free=$$(df -Pk $(VENV) | awk 'NR == 2 { print int($$4 / 1024) }'); \
		if [ "$$free" -lt $(NEEDED_MB) ]; then \
			echo "relkd: installing needs about $(NEEDED_MB) MB free for $(VENV), but only $$free MB are free there. Free some disk (or set VENV=<a directory on a larger disk>) and run again." >&2; \
			exit 1; \
		fi; }

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
