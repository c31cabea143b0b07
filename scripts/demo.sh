#!/usr/bin/env bash
# The vfs-lockd demo: set up on a fresh Debian machine (as root) and run a ~30 s rig with
# 3 guests (2 processes each) and 2 host processes on one share, every workload, and one
# kill -9 of the lock daemon, ending with the report table. Exits with the rig's status
# (1 on any violation or lost lock).
#
#   sudo scripts/demo.sh                 # the demo
#   sudo scripts/demo.sh --keep          # extra arguments go to `vfs-lockd rig`
#   RIG_SECONDS=60 sudo scripts/demo.sh  # longer
set -euo pipefail

cd "$(dirname "$0")/.."
RIG_SECONDS=${RIG_SECONDS:-30}
KILL_EVERY=${KILL_EVERY:-15}
OUT=${OUT:-${TMPDIR:-/tmp}/vfs-lockd-demo}

if [ "$(id -u)" != 0 ]; then
    echo "demo.sh: run as root (the rig mounts FUSE file systems)" >&2
    exit 2
fi

# Everything the project needs (venv, compiler, the package and its extras).
bash scripts/setup.sh

echo "== rig: 3 guests x 2 procs + 2 host procs, all workloads, ${RIG_SECONDS} s," \
     "daemon kill -9 every ${KILL_EVERY} s"
status=0
.venv/bin/vfs-lockd rig --guests 3 --procs 2 --host-procs 2 --seconds "$RIG_SECONDS" \
    --workload counter,ranges,sqlite,flock --kill-lockd-every "$KILL_EVERY" \
    --json "$OUT-report.json" --plot "$OUT-latency.png" "$@" || status=$?
echo "== report: $OUT-report.json, latency plot: $OUT-latency.png (exit status $status)"
exit "$status"
