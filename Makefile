# One command for the main job, one for the tests; each sets up the local virtual environment.
#   make reproduce   -> runs every registered notebook in the smoke profile into results/smoke/
#   make test        -> unit + golden tests and nbval on the notebooks
#   make bench       -> speed benchmarks into results/bench/*.json
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test reproduce reproduce-paper bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest tests notebooks --nbval-lax

reproduce: $(STAMP)
	$(BIN)/zsad reproduce --profile smoke

bench: $(STAMP)
	$(BIN)/zsad bench

reproduce-paper: $(STAMP)
	$(BIN)/zsad reproduce --profile paper --data-root $(DATA_ROOT)

clean:
	rm -rf $(VENV) results/smoke
