# `make demo` and `make test` set up .venv on first use (torch 2.9.0 is a ~7 GB CUDA build on
# x86_64; the tf extra lets the SavedModel export test run) and reuse it afterwards; the stamp
# file reinstalls only when setup.py changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)
export PJRT_DEVICE ?= CPU

.PHONY: setup demo test lint docs docs-serve bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,examples,tf]'
	rm -f $(VENV)/.installed-*
	touch $@

setup: $(STAMP)

demo: setup
	rm -rf runs/demo
	$(PY) examples/digits.py --model-dir runs/demo

test: setup
	$(PY) -m pytest -n 2 --dist loadfile tests

lint: setup
	$(VENV)/bin/ruff check torch_tpu_estimator tests examples benchmarks

docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve

bench: setup
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/estimator_vs_hand_loop.py --figure docs/assets/speed.svg

clean:
	rm -rf runs exports .pytest_cache site
