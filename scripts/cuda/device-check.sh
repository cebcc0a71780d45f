#!/usr/bin/env bash
# The CUDA checks and benchmarks, in one run on a GPU machine (CUDA 13 driver; no Rust and no
# network needed). Build the tarball on any Linux machine with `bash scripts/cuda/build.sh`,
# copy this repository's pipelines/ and scripts/ plus out/cuda/relora-pipe-cuda.tar.xz to the
# GPU machine, and run from the repository root:
#
#   bash scripts/cuda/device-check.sh
#
# Writes under $OUT (default out/device): nvidia-smi.txt, parity.txt, nccl.txt,
# quickstart.txt, throughput.txt and summary.txt. Each step has its own time limit, so one that hangs
# cannot eat the others' time.
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
bin=$(mktemp -d)
# tar needs the xz program for this; Python's tarfile does not.
tar -C "$bin" -xJf out/cuda/relora-pipe-cuda.tar.xz 2>/dev/null \
  || python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
       out/cuda/relora-pipe-cuda.tar.xz "$bin"
summary=$OUT/summary.txt
: > "$summary"
note() { echo "$*" | tee -a "$summary"; }

# cuBLAS, cuRAND, NCCL and the runtime come from the machine's PyTorch install (too big to
# carry).
libdirs=$(python3 - <<'PY'
import os, nvidia
roots = [os.path.dirname(p) for p in nvidia.__path__] + list(nvidia.__path__)
seen = []
for root in roots:
    for d, _, files in os.walk(root):
        if any(f.startswith(("libcublas.so", "libcurand.so", "libcudart.so", "libnvrtc.so", "libnccl.so")) for f in files):
            if d not in seen:
                seen.append(d)
print(":".join(seen))
PY
)
export LD_LIBRARY_PATH=${libdirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
note "card: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
ldd "$bin/relora-pipe" | grep -E "cuda|cublas|curand|nccl|not found" >> "$OUT/nvidia-smi.txt"
missing=$(ldd "$bin/relora-pipe" "$bin/nccl_check" | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')
[ -z "$missing" ] || note "missing libraries (nothing below can run): $missing"

# 1. Each fused op on CUDA against the CPU (values and gradients within 1e-5), then the
#    model with the fused ops and with the reference composition: f32 within 1e-4, bf16
#    within 1e-2.
timeout 90 "$bin/cuda_parity" --device cuda > "$OUT/parity.txt" 2>&1
note "parity (exit $?): $(grep -E '^PARITY' "$OUT/parity.txt" || tail -1 "$OUT/parity.txt")"

# 1b. NCCL, the data-parallel sums: world size 1, and every GPU together when there are
#     several (one thread per GPU), exact sums and the bus bandwidth.
timeout 60 "$bin/nccl_check" > "$OUT/nccl.txt" 2>&1
note "nccl (exit $?): $(grep -E '^NCCL' "$OUT/nccl.txt" || tail -1 "$OUT/nccl.txt")"
grep -E "all-reduce" "$OUT/nccl.txt" >> "$summary"

# 2. The quickstart end to end with device: cuda.
sed 's/device: cpu/device: cuda/' pipelines/quickstart.yaml > pipelines/quickstart-cuda.yaml
start=$(date +%s)
RELORA_CACHE=$(mktemp -d) timeout 210 "$bin/relora-pipe" run pipelines/quickstart-cuda.yaml \
  > "$OUT/quickstart.txt" 2>&1
code=$?
note "quickstart on cuda (exit $code, $(( $(date +%s) - start )) s): $(grep -E 'stage\(s\) ran' "$OUT/quickstart.txt" | tail -1)"
grep -E "perplexity|ReLoRA|Full|LoRA|Control" "$OUT/quickstart.txt" | tail -8 >> "$summary"

# 3. Throughput in bf16: 60M, 130M and 350M, full-rank and ReLoRA (rank 128), GaLore at 130M,
#    T5 vocabulary, micro-batch 32 × 256 tokens. MFU is against the card's measured bf16 matmul rate and
#    against the datasheet's dense bf16 peak (PEAK_TFLOPS, 989 for H100/H200 SXM).
for model in llama_60m llama_130m llama_350m; do
  for rank in 0 128; do
    timeout 30 "$bin/bench_step" --model "$model" --vocab 32100 --seq 256 --batch 32 \
      --steps 10 --device cuda --dtype bf16 --lora-rank "$rank" \
      --peak-tflops "${PEAK_TFLOPS:-989}" 2>&1 | grep RESULT \
      | sed "s/^RESULT/$model/" >> "$OUT/throughput.txt"
  done
done
# GaLore at 130M (rank 256, the GaLore paper's): its step, and its SVD refresh (on the host)
# amortised over 200 steps.
timeout 40 "$bin/bench_step" --model llama_130m --vocab 32100 --seq 256 --batch 32 \
  --steps 10 --device cuda --dtype bf16 --galore-rank 256 \
  --peak-tflops "${PEAK_TFLOPS:-989}" 2>&1 | grep RESULT \
  | sed "s/^RESULT/llama_130m/" >> "$OUT/throughput.txt"
# ReLoRA at 350M with its frozen W in each format (lora.frozen): the step's GPU memory and
# speed in bf16, micro-batch 32 × 256, W dequantised by the kernel for cuBLAS (parity.txt
# compares each format's forward, backward and merge with the CPU's).
for frozen in f32 bf16 int8 nf4; do
  timeout 30 "$bin/bench_step" --model llama_350m --vocab 32100 --seq 256 --batch 32 \
    --steps 5 --device cuda --dtype bf16 --lora-rank 128 --frozen "$frozen" \
    --peak-tflops "${PEAK_TFLOPS:-989}" 2>&1 | grep RESULT \
    | sed "s/^RESULT/llama_350m frozen=$frozen/" >> "$OUT/throughput.txt"
done
cat "$OUT/throughput.txt" >> "$summary"
cat "$summary"
