# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= runs/demo
# CLIP_benchmark's own environment (tests/interop/test_clip_benchmark.py): its pins never enter mmpt's.
CLIPBENCH ?= .venv-clipbench
CLIPBENCH_STAMP := $(CLIPBENCH)/.installed

.PHONY: setup clipbench demo test smoke lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torchaudio 2.11 pins torch 2.11; install the trio first so deepspeed's build sees torch.
	$(BIN)/pip install -q torch==2.11.0 torchaudio==2.11.0 torchvision==0.26.0
	$(BIN)/pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# A venv layered on $(VENV) (its site-packages added after this env's own, so the numpy pinned here wins)
# with CLIP_benchmark 1.6.2 and what it needs beyond its declared dependencies: `requests` (imported, not
# declared) and numpy < 2.4 (its accuracy() converts a 1-element array with float()). Install time only.
$(CLIPBENCH_STAMP): $(STAMP)
	$(BIN)/python -m venv $(CLIPBENCH)
	$(BIN)/python -c "import sysconfig, pathlib; pathlib.Path('$(CLIPBENCH)/lib/python' + sysconfig.get_python_version() + '/site-packages/_mmpt_base.pth').write_text('import site; site.addsitedir(' + repr(sysconfig.get_paths()['purelib']) + ')\\n')"
	$(CLIPBENCH)/bin/pip install -q clip-benchmark==1.6.2 requests==2.34.2 numpy==2.3.5
	touch $(CLIPBENCH_STAMP)

clipbench: $(CLIPBENCH_STAMP)

setup: $(STAMP) $(CLIPBENCH_STAMP)

demo: $(STAMP)
	$(BIN)/mmpt demo --out $(DEMO_DIR)

test: $(STAMP) $(CLIPBENCH_STAMP)
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
