# replfs — every target installs what it needs first (scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test soak soak-smoke bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m replfs.demo

# The whole suite, with every soak test once at its smallest size (see
# tests/soak.py): a soak test that breaks shows up on the next CI run.
# -m overrides pyproject's "-m 'not soak'".
test: setup
	$(PYTEST) -q -p no:cacheprovider -m "soak or not soak" --soak-smoke

soak: setup
	$(PYTEST) -q -p no:cacheprovider -m soak -o addopts=""

# Only the soak tests, each once at its smallest size (a few minutes).
soak-smoke: setup
	$(PYTEST) -q -p no:cacheprovider -m soak --soak-smoke

bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info bench/results
