#!/usr/bin/env bash
# Coverage-guided fuzzing (cargo-fuzz, libFuzzer) of every reader of outside input:
# pipeline files, --set values, corpus files (jsonl, json.gz, text, parquet), token shards,
# Hugging Face checkpoints, training checkpoints and the executor's config file. The
# targets are in fuzz/fuzz_targets, their seed inputs in fuzz/seeds; what libFuzzer finds
# worth keeping goes to fuzz/corpus (not in git), crashes to fuzz/artifacts.
#
#   bash scripts/faults/fuzz.sh                 # every target, 600 s each, two at a time
#   SECONDS_PER_TARGET=60 PARALLEL=4 bash scripts/faults/fuzz.sh corpus shards
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz passes nightly flags to rustc; this machine
# has one stable toolchain, so RUSTC_BOOTSTRAP=1 lets it accept them (for the fuzz build
# only). No sanitizer (-s none): the readers are safe Rust, and what is looked for is a
# panic, a hang (-timeout) or an allocation too big (-rss_limit_mb, -malloc_limit_mb).
# Prints, per target, libFuzzer's executions, coverage (cov: edges, ft: features) and
# whether it found a crash.
set -uo pipefail
cd "$(dirname "$0")/../../fuzz"
export RUSTC_BOOTSTRAP=1
secs=${SECONDS_PER_TARGET:-600}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(pipeline_yaml set_values corpus shards hf_import checkpoint executor_config)
for t in "${targets[@]}"; do cargo fuzz build -s none --release "$t" >/dev/null 2>&1 || { echo "$t: build failed"; exit 1; }; done
mkdir -p logs
run() {
  local t=$1
  mkdir -p "corpus/$t" "artifacts/$t"
  local t0=$SECONDS
  cargo fuzz run -s none --release "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -malloc_limit_mb=2048 \
    -max_len=65536 -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
    > "logs/$t.log" 2>&1
  local code=$?
  local execs cov ft
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$')
  cov=$(grep -o 'cov: [0-9]*' "logs/$t.log" | tail -1)
  ft=$(grep -o 'ft: [0-9]*' "logs/$t.log" | tail -1)
  local crashes
  crashes=$(ls "artifacts/$t" 2>/dev/null | wc -l)
  echo "FUZZ $t: $((SECONDS - t0)) s of ${secs}, ${execs:-?} executions, $cov, $ft, exit $code, $crashes artifact(s)"
}
# PARALLEL at a time (default 2: this machine's cores).
par=${PARALLEL:-2}
for ((i = 0; i < ${#targets[@]}; i += par)); do
  for ((j = i; j < i + par && j < ${#targets[@]}; j++)); do
    run "${targets[j]}" &
  done
  wait
done
