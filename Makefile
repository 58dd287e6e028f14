# Every target sets up the virtualenv first (scripts/setup-venv.sh), so each works on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fastfetch-installed

.PHONY: setup demo lint test test-quick simd bench bench-quick clean

$(STAMP): requirements.txt scripts/setup-venv.sh
	bash scripts/setup-venv.sh $(VENV)
	touch $@

setup: $(STAMP)  ## create .venv with every dependency (Pillow-SIMD where it builds)

demo: $(STAMP)  ## fetch the bundled demo source into data/demo (served on 127.0.0.1)
	$(PY) bin/fetch --dataset demo --out data/demo

lint: $(STAMP)  ## ruff (lint + format check) and mypy on fastfetch/ and encode/
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint  ## lint and types, then the whole test suite, slow tests included (what CI runs)
	$(PY) -m pytest -q

test-quick: $(STAMP)  ## the suite without tests marked slow
	$(PY) -m pytest -q -m "not slow"

simd: $(STAMP)  ## (re)build Pillow-SIMD into the venv (wheel cached per venv), falling back to Pillow
	bash scripts/install-pillow-simd.sh $(VENV)

bench: $(STAMP)  ## every benchmark (~35 min on 2 cores): results in benchmarks/RESULTS.md
	FASTFETCH_PY=$(PY) bash benchmarks/run_all.sh

bench-quick: $(STAMP)  ## a smoke run of the benchmarks (~5 min)
	FASTFETCH_PY=$(PY) bash benchmarks/run_all.sh --quick

clean:
	rm -rf data/demo .pytest_cache
