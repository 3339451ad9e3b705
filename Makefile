# Two commands do all the set-up on a fresh machine (Python 3.11 with pip):
#   make demo   - a POS session against the embedded sandboxes, SQLite default
#   make test   - the whole test suite (hypothesis "ci" profile)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench bench-quick diagrams fuzz clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/txengine demo

test: $(STAMP)
	HYPOTHESIS_PROFILE=ci $(BIN)/python -m pytest -q

# Long property exploration (the fuzz profile); its example database is .hypothesis-fuzz/
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -q tests/test_property_lifecycle.py tests/test_property_values.py

test-fast: $(STAMP)
	HYPOTHESIS_PROFILE=dev $(BIN)/python -m pytest -q -m "not slow"

# Every benchmark, one table of ratios against baselines run alongside: bench/RESULTS.md.
# `make bench-quick` is a smoke run with small sizes (not written down).
bench: $(STAMP)
	$(BIN)/python bench/run.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run.py --quick

# diagrams/: Mermaid, DOT and SVG of the lifecycle and of each provider, generated from
# engine/machine.py and the drivers.  SVG needs Graphviz: installed with apt-get when
# `dot` is missing and we are root, otherwise the command says what to install.
diagrams: $(STAMP)
	$(BIN)/python -m txengine.diagrams --write diagrams --install-dot

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
