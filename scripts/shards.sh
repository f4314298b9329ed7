#!/bin/bash
# Run pytest as $SHARDS processes at once, each on every SHARDS-th test
# of the selection (pytest --shard K/N, tests/conftest.py: round robin
# over the collection order, so each gets its share of every family of
# tests), for make test and make soak on a 2-core machine.
#
#   SHARDS=N LOGS=DIR scripts/shards.sh PYTEST-ARGS...
#
# SHARDS defaults to one per core; with one shard pytest runs on the
# terminal as usual.  Otherwise shard K writes DIR/shard-K.log (its own
# --basetemp, its own leak check), and once all are done each log is
# printed whole, one after the other, with a last line per shard.  The
# exit status is 0 only if every shard passed (a shard with no tests
# left, pytest's status 5, passes).
set -u
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
N=${SHARDS:-$(nproc)}
LOGS=${LOGS:-test-logs}
case "$N" in ''|*[!0-9]*|0) echo "SHARDS must be a positive number, not '$N'" >&2; exit 2;; esac
if [ "$N" -eq 1 ]; then
    exec "$PYTEST" "$@"
fi
mkdir -p "$LOGS"
base="${TMPDIR:-/tmp}/replfs-shards-$$"
pids=()
for k in $(seq 1 "$N"); do
    "$PYTEST" "$@" --shard "$k/$N" --basetemp="$base-$k" > "$LOGS/shard-$k.log" 2>&1 &
    pids+=($!)
    echo "shard $k/$N: pid $!, log $LOGS/shard-$k.log"
done
# a line a minute, so a long run shows it is alive
(
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do
        sleep 60 & nap=$!
        wait "$nap"
        line=""
        for k in $(seq 1 "$N"); do
            line+="  shard $k: $(tr -cd '.FEsxX' < "$LOGS/shard-$k.log" 2>/dev/null | wc -c) done"
        done
        echo "$(date +%H:%M:%S)$line"
    done
) &
ticker=$!
trap 'kill "${pids[@]}" "$ticker" 2>/dev/null; wait; exit 130' INT TERM
rc=0
status=()
for k in $(seq 1 "$N"); do
    wait "${pids[$((k - 1))]}"
    st=$?
    [ "$st" -eq 0 ] || [ "$st" -eq 5 ] || rc=1
    status+=("$st")
done
kill "$ticker" 2>/dev/null
wait "$ticker" 2>/dev/null
for k in $(seq 1 "$N"); do
    echo "=================== shard $k/$N ($LOGS/shard-$k.log) ==================="
    cat "$LOGS/shard-$k.log"
done
for k in $(seq 1 "$N"); do
    echo "shard $k/$N (exit ${status[$((k - 1))]}): $(tail -n 1 "$LOGS/shard-$k.log")"
done
[ "$rc" -ne 0 ] || rm -rf "$base"-*       # kept for a look when a shard failed
exit "$rc"
