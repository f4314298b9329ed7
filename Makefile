# replfs — every target installs what it needs first (scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test soak bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m replfs.demo

test: setup
	$(PYTEST) -q -p no:cacheprovider

soak: setup
	$(PYTEST) -q -p no:cacheprovider -m soak -o addopts=""

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info bench/results
