#!/usr/bin/env bash
# Export the fixture model with relora-pipe's code, then load it with transformers alone and
# compare its logits with crates/hf/fixtures/transformers.json (or, with --write, make that
# fixture anew, e.g. to re-check against a newer transformers).
#
#   python3 -m venv .venv-hf && .venv-hf/bin/pip install torch transformers
#   PYTHON=.venv-hf/bin/python bash scripts/hf/check_transformers.sh [--write]
#
# The Rust test `crates/hf` `transformers_logits_are_reproduced` checks our side against the
# same fixture on every `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
cargo run --quiet --example hf_fixture -- "$dir"
"$PYTHON" scripts/hf/transformers_logits.py "$dir" crates/hf/fixtures/transformers.json "$@"
