# The two commands of the project: `make demo` and `make test`. Both create the virtual
# environment on first use, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CLUSTER := $(VENV)/.cluster
DOCS := $(VENV)/.docs
CONSTRAINTS := requirements/constraints.txt
OUT ?= outputs/demo

.PHONY: demo docs figures gpu-check lint test test-fast clean-venv

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and exactly pinned, so nothing pulls a different build in afterwards
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) torch torchvision
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

# Ray for the sweep and MkDocs for the site: the tests need them, the demo does not
$(CLUSTER): $(STAMP)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev,cluster,docs]'
	touch $(CLUSTER)

$(DOCS): $(STAMP)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev,docs]'
	touch $(DOCS)

demo: $(STAMP)
	$(PY) -m analysis.demo --out $(OUT)

# every figure into figures/ (PNG + PDF), from the runs in $(OUT), running what is missing
figures: $(STAMP)
	$(PY) -m analysis.demo --out $(OUT) --figures figures

# the documentation site into site/ (offline; strict: a broken link or reference fails)
docs: $(DOCS)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# the layers contract (pyproject.toml) and the linter come first: a change that breaks either fails fast
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check

# --durations: the 25 slowest tests, printed at the end of every run (CI keeps the record)
test: $(CLUSTER) lint
	$(PY) -m pytest -q --durations=25

# the tests not marked slow, without the notebooks (only tests/): about a minute and a half on 2 cores
test-fast: $(CLUSTER) lint
	$(PY) -m pytest -q tests -m "not slow and not gpu" --durations=10

clean-venv:
	rm -rf $(VENV)

# the prepared GPU check (benchmarks/gpu_check.py): on a machine with a CUDA device, under 8 minutes,
# writing benchmarks/results/gpu_check.json; ARGS=--dry-run checks the script itself on the CPU
gpu-check: $(CLUSTER)
	$(PY) benchmarks/gpu_check.py $(ARGS)
