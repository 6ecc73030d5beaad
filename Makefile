# Two entry points for a fresh machine: `make train` and `make test`.
# Both create .venv (torch pinned to the version the CPU machines carry; on a GPU machine pip takes
# the CUDA build of the same release) and install cosformer with its extras in editable mode.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
ARGS   ?=

.PHONY: setup train test lint format clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[train,dev]"
	touch $@

setup: $(BIN)/.installed

train: setup
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no \
		scripts/train.py --config configs/default.yaml $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info
