#!/usr/bin/env bash
# relora-pipe's GaLore optimizer against the authors' galore-torch (scripts/galore/check.py
# says what is compared and how). Needs a Python with torch and galore-torch:
#   python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch galore-torch
#   PYTHON=/tmp/venv/bin/python bash scripts/galore/check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
# `cargo test` builds the examples; build it here when it has not run.
REPLAY=${REPLAY:-target/debug/examples/galore_replay}
[ -x "$REPLAY" ] || cargo build -q --example galore_replay
# galore-torch imports bitsandbytes, which may try to fetch kernels from the Hugging Face
# hub; nothing here needs them.
export HF_HUB_OFFLINE=1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" scripts/galore/check.py "$REPLAY" "$work"
