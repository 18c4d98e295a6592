# Two commands for a fresh machine with Python 3.10+:
#   make demo   tune a soft prompt on the frozen tiny GPT and print what it gained
#   make test   run the test suite (all cores)
#   make lint   ruff check and ruff format --check (configured in pyproject.toml)
# Each creates .venv on first use and installs minipt with its dev and hf extras, every package at the version
# of the lock (requirements-lock.txt), so every machine gets the environment the suite passed with.
# For maintainers:
#   make test-latest   the suite in a second environment (.venv-latest) of the newest versions pyproject allows
#   make lock          write requirements-lock.txt again from pyproject.toml (then run make test and commit)
#   make mutate MODULE=minipt/serve.py   mutation testing of one module ([tool.mutmut] in pyproject.toml)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.minipt-installed
LOCK   := requirements-lock.txt
LATEST := .venv-latest
TOOLS  := .venv-tools

.PHONY: demo test lint test-latest lock mutate clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --constraint $(LOCK) -e ".[dev,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/minipt demo

test: $(STAMP)
	$(BIN)/python -m pytest -n auto -q

# The linter and the formatter's check, at the lock's ruff version; `ruff format` and `ruff check --fix` repair.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# No lock: pip takes the newest release of every package that pyproject's ranges admit (torch too, unless
# PIP_CONSTRAINT pins it, as .ci/constraints.txt does for the CPU build). The environment is made afresh each time.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --upgrade --upgrade-strategy eager -e ".[dev,hf]"
	$(LATEST)/bin/python -m pip list --format=freeze --exclude-editable >$(LATEST)/versions.txt
	MINIPT_UNLOCKED=1 $(LATEST)/bin/python -m pytest -n auto -q

# One resolution for Linux and macOS and every Python from 3.10 (uv's universal mode writes environment markers),
# with torch at the version CI tests (.ci/constraints.txt).
lock:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet "uv>=0.9"
	$(TOOLS)/bin/uv pip compile pyproject.toml --extra dev --extra hf --universal --python-version 3.10 \
		--constraint .ci/constraints.txt --no-emit-index-url --custom-compile-command "make lock" --output-file $(LOCK)

# mutmut in the tools environment, which sees the test environment's packages (torch, minipt) through a .pth file.
MUTMUT := $(TOOLS)/.mutmut-installed
$(MUTMUT): $(STAMP)
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet "mutmut==3.8.1"
	echo "import site; site.addsitedir('$$($(BIN)/python -c 'import site; print(site.getsitepackages()[0])')')" \
		>$$($(TOOLS)/bin/python -c 'import site; print(site.getsitepackages()[0])')/minipt-test-env.pth
	touch $(MUTMUT)

mutate: $(MUTMUT)
	$(TOOLS)/bin/python .ci/mutate.py $(MODULE)

clean:
	rm -rf $(VENV) $(LATEST) $(TOOLS) runs .pytest_cache mutants
