#!/usr/bin/env bash
# Run resumable training commands in turns, one at a time, until every one has finished.
#
#   Training/run_in_turns.sh A.cmd B.cmd ...
#
# Each file holds one `python3 Training/train.py ...` command with --run, --steps and --max-minutes:
# a chunk stops cleanly after --max-minutes (checkpoint written) and the next file's run gets the
# core, so runs compared at equal steps progress together. A run whose log.csv reached --steps is
# skipped; the loop ends when all have. Run from the repository root, e.g.
#   nohup Training/run_in_turns.sh Training/runs/a.cmd Training/runs/b.cmd > Training/runs/turns.out 2>&1 &
set -u
while :; do
    pending=0
    for file in "$@"; do
        run=$(grep -o -- '--run [^ ]*' "$file" | cut -d' ' -f2)
        steps=$(grep -o -- '--steps [0-9]*' "$file" | cut -d' ' -f2)
        last=$(tail -n 1 "$run/log.csv" 2>/dev/null | cut -d, -f1)
        [ "$last" = "$steps" ] && continue
        pending=1
        echo "$(date -u +%FT%TZ) $file: from step ${last:-0} of $steps" >> "$run.out"
        bash "$file" >> "$run.out" 2>&1 || { echo "$file failed" >&2; exit 1; }
    done
    [ "$pending" = 0 ] && break
done
