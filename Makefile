# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo

.PHONY: setup demo test smoke lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torchaudio 2.11 pins torch 2.11; install the trio first so deepspeed's build sees torch.
	$(BIN)/pip install -q torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmpt demo --out $(DEMO_DIR)

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python tests/lint_imports.py  # import-linter layer contracts + no import cycles
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q tests
	$(MAKE) smoke

smoke: $(STAMP)
	$(BIN)/mmpt demo --out runs/smoke --smoke

lint: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python tests/lint_imports.py

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/embed_throughput.py

clean:
	rm -rf runs build dist *.egg-info
