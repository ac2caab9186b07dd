# Set-up and entry points. `make demo` and `make test` each do all the set-up on a
# fresh machine: a virtual environment, torch pinned (a CPU-only machine takes the
# local CPU wheel; on a GPU machine the same pin resolves to PyPI's CUDA build),
# then mtlbench itself with its test extra, then the out-of-tree plugins under
# plugins/ exactly as a third party installs them (pip install ./plugins/NAME;
# mtlbench-torchjd with all its aggregators' extras).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
PLUGINS := $(sort $(dir $(wildcard plugins/*/pyproject.toml)))
PLUGIN_FILES := $(shell find plugins -name '*.py' -o -name 'pyproject.toml' 2>/dev/null | grep -v /build/)

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml Makefile $(PLUGIN_FILES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "setuptools>=68" wheel
	$(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q $(patsubst %/mtlbench-torchjd/,%/mtlbench-torchjd[full],$(addprefix ./,$(PLUGINS)))
	rm -rf plugins/*/build plugins/*/*.egg-info
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/mtlbench run benchmarks/kidney.toml

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25

bench: $(STAMP)
	$(BIN)/python benchmarks/perf/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
