#!/usr/bin/env bash
# What going through Slurm costs per stage: a chain of 10 trivial stages run locally and
# through a one-node Slurm cluster started here (polling every 1 s, the default, and every
# 0.2 s), with each job's time from submission to start and from its end until the
# orchestrator noticed, as the batch script and the orchestrator logged them.
#
#   bash scripts/slurm/overhead.sh        (root, Slurm installed: scripts/slurm/cluster.sh install)
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/debug/relora-pipe}
[ -x "$BIN" ] || cargo build
work=$(mktemp -d)
chmod 755 "$work" # the munge user must reach the cluster's folder
cluster="$work/cluster"
trap 'bash scripts/slurm/cluster.sh stop "$cluster"; rm -rf "$work"' EXIT
export RELORA_SLURM_PORT=${RELORA_SLURM_PORT:-18817}
started=$(bash scripts/slurm/cluster.sh start "$cluster")
eval "$started"

chain() {
    echo "pipeline: overhead"
    echo "executor: {poll_seconds: $1}"
    echo "stages:"
    echo "  s0: {kind: command, params: {run: 'echo 0 > \$OUT/o.txt'}}"
    for i in $(seq 1 9); do
        echo "  s$i: {kind: command, inputs: {prev: s$((i - 1))}, params: {run: 'cat \$IN_PREV/o.txt > \$OUT/o.txt; echo $i >> \$OUT/o.txt'}}"
    done
}

seconds() {
    python3 -c 'import subprocess, sys, time
t = time.time()
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
print(f"{time.time() - t:.3f}")' "$@"
}

chain 1 >"$work/p.yaml"
local_s=$(RELORA_CACHE="$work/c-local" seconds "$BIN" run "$work/p.yaml")
printf '%-28s %8s %22s %22s\n' "10 chained stages" "wall s" "submit→start s (mean/max)" "end→noticed s (mean/max)"
printf '%-28s %8.2f\n' "local" "$local_s"
for poll in 1 0.2; do
    chain "$poll" >"$work/p.yaml"
    cache="$work/c-slurm-$poll"
    s=$(RELORA_CACHE="$cache" seconds "$BIN" run "$work/p.yaml" --executor slurm)
    cat "$cache"/entries/*/log.txt | python3 -c '
import re, sys
rows = [tuple(map(float, m.groups())) for m in
        re.finditer(r"([0-9.]+) s from submission to start, ([0-9.-]+) s from its end", sys.stdin.read())]
start = [r[0] for r in rows]; end = [r[1] for r in rows]
print(f"{sum(start)/len(start):.2f} / {max(start):.2f}   {sum(end)/len(end):.2f} / {max(end):.2f}   ({len(rows)} jobs)")
' >"$work/stats"
    printf '%-28s %8.2f   %s\n' "slurm, poll ${poll} s" "$s" "$(cat "$work/stats")"
done
