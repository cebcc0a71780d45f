#!/usr/bin/env bash
# The kill storm of issue #26, at length: a tiny pipeline with every stage kind is killed
# KILLS times (default 100) at random moments (SIGKILL to the orchestrator or to a stage's
# process group, SIGTERM, SIGINT), each followed by another run; then one run to the end,
# and the checks of tests/pipeline/storm.rs (outputs byte-identical to an uninterrupted
# run's, `verify` clean, no process left, no staging or scratch folder after gc).
#
#   bash scripts/faults/kill-storm.sh            # 100 kills, a random seed
#   KILLS=20 SEED=7 bash scripts/faults/kill-storm.sh
#
# The seed is printed first, so a failing storm can be replayed exactly.
set -euo pipefail
cd "$(dirname "$0")/../.."
seed=${SEED:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}
echo "kill storm: ${KILLS:-100} kills, seed $seed"
RELORA_STORM_KILLS=${KILLS:-100} RELORA_STORM_SEED=$seed \
  cargo test --test pipeline storm -- --nocapture 2>&1 | grep -E "^STORM|panicked|test result|assert"
