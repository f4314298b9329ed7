# replfs — every target installs what it needs first (scripts/setup.sh).
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(VENV)/bin/pytest

.PHONY: setup demo test soak soak-smoke bench bench-peer clean

setup:
	@bash scripts/setup.sh

demo: setup
	@$(PY) -m replfs.demo

# The whole suite, with every soak test once at its smallest size (see
# tests/soak.py): a soak test that breaks shows up on the next CI run.
# -m overrides pyproject's "-m 'not soak'".  It runs as SHARDS pytest
# processes at once (default: one per core; scripts/shards.sh, logs in
# test-logs/; SHARDS=1: one process on the terminal).  Each lists its 30
# slowest tests: the suite must stay under 15 minutes on 2 cores.
SHARDS ?=
test: setup
	@SHARDS="$(SHARDS)" LOGS=test-logs bash scripts/shards.sh -q -p no:cacheprovider -m "soak or not soak" --soak-smoke --durations=30 $(TEST_ARGS)

# Every soak test at full size (hours), in SHARDS pytest processes at
# once (default: one per core; logs in soak-logs/; scripts/shards.sh).
# Part of it: make soak SOAK_ARGS="tests/sim"
soak: setup
	@SHARDS="$(SHARDS)" LOGS=soak-logs bash scripts/shards.sh -q -p no:cacheprovider -m soak -o addopts="" $(SOAK_ARGS)

# Only the soak tests, each once at its smallest size (a few minutes).
soak-smoke: setup
	$(PYTEST) -q -p no:cacheprovider -m soak --soak-smoke

# Every benchmark layer: tables, JSON and PNG charts in bench/results/
# (docs/benchmarks.md).  A subset or options: make bench BENCH_ARGS="fs --quick"
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

# replfs against a GlusterFS replica-2 volume on this machine, same
# filesystem workloads; installs GlusterFS from Debian's packages first.
bench-peer: setup
	@bash scripts/setup-bench-peer.sh
	$(PY) -m bench.peer $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info bench/results
