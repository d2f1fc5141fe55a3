# The two commands a new user runs (see README):
#   make demo   set up a virtual environment, install the real assets, run the main job
#   make test   set up, install the assets, run the whole test suite
#   make bench  every trainer on every workload (benchmarks/run.py; BENCH_ARGS=--quick: tiny),
#               then decoding speed with and without the KV cache vs JAX (benchmarks/decoding.py)
#               and the int8 weight store vs float32/float16 (benchmarks/int8_store.py)
# Everything installs from the package registries by pinned name; nothing is fetched from a
# model hub at run time.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
DEMO   ?= out/demo

.PHONY: setup assets demo test test-fast bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

assets: setup
	$(PY) -m mobiletune.assets install

demo: assets
	bash scripts/demo.sh $(PY) $(DEMO)

test: assets
	$(PY) -m pytest -q -p no:cacheprovider --durations=25

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: assets
	$(PY) benchmarks/run.py $(BENCH_ARGS)
	$(PY) benchmarks/decoding.py
	$(PY) benchmarks/decoding.py --monolithic
	$(PY) benchmarks/int8_store.py

lint: setup
	$(VENV)/bin/ruff check mobiletune export recipes tests benchmarks

clean:
	rm -rf $(VENV) out .pytest_cache
