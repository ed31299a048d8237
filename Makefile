# The two commands of the README, and a few helpers. The virtual environment is .venv.
VENV ?= .venv
STAMP := $(VENV)/.tropd-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast lint format clean

$(STAMP): pyproject.toml scripts/install.sh
	bash scripts/install.sh $(VENV)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tropd demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# the quick tier: losses, config, data parsing, protocol, client, decoding, CLI parsing; no model world built,
# no service started, no training run (tests marked `slow` are left out: tests/conftest.py)
test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf artifacts runs .pytest_cache
