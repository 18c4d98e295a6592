# Two commands for a fresh machine with Python 3.10+:
#   make demo   tune a soft prompt on the frozen tiny GPT and print what it gained
#   make test   run the test suite (both CPU cores)
# Each creates .venv and installs minipt with its dev and hf extras on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.minipt-installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev,hf]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/minipt demo

test: $(STAMP)
	$(BIN)/python -m pytest -n auto -q

clean:
	rm -rf $(VENV) runs .pytest_cache
