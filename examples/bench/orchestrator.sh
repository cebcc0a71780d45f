#!/usr/bin/env bash
# Times a fully cached `plan` and `run` on generated pipelines of N command stages
# (a chain with fan-out: stage i reads stage i/2), to compare with `dvc status` (~1 s on a
# 13-stage pipeline here) and Snakemake's dry run (~2 s).
# Usage: examples/bench/orchestrator.sh [path/to/relora-pipe]   (default: target/release)
set -euo pipefail
BIN=${1:-target/release/relora-pipe}
BIN=$(realpath "$BIN")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for n in 20 300; do
  f="$work/p$n.yaml"
  {
    echo "pipeline: bench$n"
    echo "stages:"
    for i in $(seq 0 $((n - 1))); do
      echo "  s$i:"
      echo "    kind: command"
      if [ "$i" -gt 0 ]; then echo "    inputs: {up: s$((i / 2))}"; fi
      echo "    params: {run: \"echo $i > \$OUT/o.txt\"}"
    done
  } > "$f"
  export RELORA_CACHE="$work/cache$n"
  "$BIN" run "$f" --jobs 2 >/dev/null 2>&1
  for cmd in plan run; do
    best=999999
    for _ in 1 2 3 4 5; do
      t0=$(date +%s%N)
      "$BIN" "$cmd" "$f" >/dev/null 2>&1
      t1=$(date +%s%N)
      ms=$(( (t1 - t0) / 1000000 ))
      [ "$ms" -lt "$best" ] && best=$ms
    done
    echo "$n stages, fully cached: $cmd ${best} ms (best of 5)"
  done
done
