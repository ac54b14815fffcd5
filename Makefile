# Everything installs itself: `make train` and `make test` work on a machine with only Python 3.10+.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.13.0
# pip's default index gives Linux machines PyTorch's CUDA build (several GB). For a CPU-only install:
#   make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=
# pip compiles every installed module to bytecode, one file at a time (35 s of a fresh install here);
# compileall does it on every core afterwards (18 s), skipping the packages' own test suites.
PIP := $(PY) -m pip install --quiet --disable-pip-version-check --no-compile
COMPILE := $(PY) -m compileall -q -j 0 -x '/(tests?|testing/_internal)/'

.PHONY: install train test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(PIP) -e ".[dev,sweeps,mlflow,wandb]"
	$(COMPILE) $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") > /dev/null || true  # a file that does not compile is skipped, as pip skips it
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -n auto $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(STAMP)
	$(PY) -m nanollm.bench $(ARGS)

clean:
	rm -rf $(VENV) data/cache .pytest_cache
