#!/usr/bin/env bash
# relora-pipe's training step against PyTorch eager, back to back, on this machine's CPU.
#
#   bash examples/bench/vs_pytorch.sh            # the three configs, full-rank and LoRA r32
#   STEPS=5 CONFIGS=tiny bash examples/bench/vs_pytorch.sh
#   CONFIGS=20.8M KINDS="full lora32 galore128" bash examples/bench/vs_pytorch.sh
#
# For each config (tiny, the 20.8M model, hidden 1024 × 2 layers) and each kind (full-rank;
# frozen W plus rank-32 LoRA on every projection, a ReLoRA step between restarts) it runs
# `bench_step` (release build) and examples/bench/torch_step.py with the same model, batch
# and thread count, then prints one table: forward, backward and optimizer ms (medians),
# tokens/s, peak resident memory, and ours / PyTorch in tokens/s. Above the table it names the
# machine: the CPU model, the instruction set each side's kernels dispatched to (gemm's
# AVX-512 or AVX2+FMA matmuls and our elementwise kernels' level, see
# crates/model/src/fused/simd.rs; torch's "CPU capability"), the threads, and both sides' f32
# GFLOP/s on a 1024³ matmul (bench_matmul and torch_matmul.py). A figure holds for the
# machine it was measured on.
# KINDS (default "full lora32") may add galoreR: GaLore at rank R (update_proj_gap 200, scale
# 0.25), against the authors' GaLoreAdamW, each side's subspace refresh timed alone and
# amortised over the 200 steps into the optimizer's time.
# Needs: cargo, python3 with torch (`pip install torch`; PYTHON picks the interpreter), and
# galore-torch for galoreR.
# THREADS (default 2) sets both sides.
set -euo pipefail
cd "$(dirname "$0")/../.."

STEPS=${STEPS:-10}
THREADS=${THREADS:-2}
CONFIGS=${CONFIGS:-"tiny 20.8M h1024x2"}
KINDS=${KINDS:-"full lora32"}
declare -A ARGS=(
  [tiny]="--vocab 1000 --hidden 128 --inter 352 --heads 4 --layers 2 --seq 64 --batch 8"
  [20.8M]="--vocab 8000 --hidden 512 --inter 1376 --heads 8 --layers 4 --seq 256 --batch 8"
  [h1024x2]="--vocab 8000 --hidden 1024 --inter 2736 --heads 16 --layers 2 --seq 256 --batch 4"
)

PYTHON=${PYTHON:-python3}
"$PYTHON" -c "import torch" 2>/dev/null || { echo "needs PyTorch: pip install torch" >&2; exit 1; }
cargo build --release --example bench_step --example bench_matmul >&2
cpu=$(grep -m1 '^model name' /proc/cpuinfo | sed 's/.*: //')
ours_mm=$(RAYON_NUM_THREADS=$THREADS ./target/release/examples/bench_matmul | grep 'square-1024')
torch_mm=$("$PYTHON" examples/bench/torch_matmul.py --threads "$THREADS" | grep 'square-1024')
field() { tr ' ' '\n' | sed -n "s/^$1=//p" | head -1; }
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for config in $CONFIGS; do
  for kind in $KINDS; do
    case $kind in
      full) extra=() ;;
      lora*) extra=(--lora-rank "${kind#lora}") ;;
      galore*) extra=(--galore-rank "${kind#galore}") ;;
      *) echo "unknown kind $kind (full, loraR, galoreR)" >&2; exit 1 ;;
    esac
    echo "== $config $kind" >&2
    ours=$(RAYON_NUM_THREADS=$THREADS ./target/release/examples/bench_step ${ARGS[$config]} \
      --steps "$STEPS" "${extra[@]}" | grep '^RESULT')
    torch=$("$PYTHON" examples/bench/torch_step.py ${ARGS[$config]} --steps "$STEPS" \
      --threads "$THREADS" "${extra[@]}" | grep '^RESULT')
    echo "$config $kind ours $ours" >>"$results"
    echo "$config $kind torch $torch" >>"$results"
  done
done

first_ours=$(grep -m1 ' ours ' "$results")
first_torch=$(grep -m1 ' torch ' "$results")
echo "CPU: $cpu ($(nproc) cores online), $THREADS threads on both sides"
echo "relora-pipe: matmul kernels $(echo "$first_ours" | field isa), elementwise kernels \
$(echo "$first_ours" | field kernels); 1024³ f32 matmul $(echo "$ours_mm" | field gemm) GFLOP/s"
echo "PyTorch $(echo "$first_torch" | field torch): CPU capability $(echo "$first_torch" | field isa); \
1024³ f32 matmul $(echo "$torch_mm" | field torch) GFLOP/s"
echo
"$PYTHON" - "$results" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    config, kind, who, rest = line.split(" ", 3)
    kv = dict(f.split("=", 1) for f in rest.split() if "=" in f)
    rows[(config, kind, who)] = kv
print("| config | kind | | fwd ms | bwd ms | opt ms | tokens/s | peak RSS MiB | ours / PyTorch |")
print("|---|---|---|---|---|---|---|---|---|")
for (config, kind, who), kv in rows.items():
    ratio = ""
    if who == "ours":
        other = rows.get((config, kind, "torch"))
        if other:
            ratio = f"{float(kv['tokens_per_s']) / float(other['tokens_per_s']):.2f}×"
    name = "relora-pipe" if who == "ours" else "PyTorch eager"
    print(f"| {config} | {kind} | {name} | {kv['fwd_ms']} | {kv['bwd_ms']} | {kv['opt_ms']} "
          f"| {kv['tokens_per_s']} | {kv['peak_rss_mib']} | {ratio} |")
EOF
