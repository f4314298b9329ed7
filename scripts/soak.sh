#!/bin/bash
# make soak: every soak test at full size (tests/soak.py), in $SHARDS
# pytest processes at once (default: one per core); arguments go to
# pytest.  Each shard takes
# every SHARDS-th test (pytest --shard K/N, tests/conftest.py), writes
# its log to soak-logs/shard-K.log and its summary line here; the run
# fails if any shard fails.  One shard: plain pytest on the terminal.
set -u
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
N=${SHARDS:-$(nproc)}
case "$N" in ''|*[!0-9]*|0) echo "soak: SHARDS must be a positive number, not '$N'" >&2; exit 2;; esac
if [ "$N" -eq 1 ]; then
    exec "$PYTEST" -q -p no:cacheprovider -m soak -o addopts="" "$@"
fi
mkdir -p soak-logs
pids=()
for k in $(seq 1 "$N"); do
    "$PYTEST" -q -p no:cacheprovider -m soak -o addopts="" --shard "$k/$N" \
        --basetemp="${TMPDIR:-/tmp}/replfs-soak-$$-$k" "$@" \
        > "soak-logs/shard-$k.log" 2>&1 &
    pids+=($!)
    echo "soak: shard $k/$N started (pid $!, log soak-logs/shard-$k.log)"
done
rc=0
for k in $(seq 1 "$N"); do
    wait "${pids[$((k - 1))]}"
    st=$?
    # 5: pytest found nothing for this shard (fewer tests than shards)
    [ "$st" -eq 0 ] || [ "$st" -eq 5 ] || rc=1
    echo "soak: shard $k/$N: $(tail -n 1 "soak-logs/shard-$k.log")"
done
[ "$rc" -eq 0 ] || echo "soak: FAILED (see soak-logs/)" >&2
exit "$rc"
