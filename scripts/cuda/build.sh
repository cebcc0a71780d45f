#!/usr/bin/env bash
# Build the CUDA binary of relora-pipe on a machine with no GPU and no CUDA toolkit.
#
#   bash scripts/cuda/build.sh     # → out/cuda/relora-pipe-cuda.tar.xz (stripped binaries)
#
# Why it looks like this:
# - The GPU machines run the CUDA 13.0 driver (580 series). Kernels built by a newer nvcc may
#   not load there, and cudarc 0.19 rejects 13.5, so the toolkit is pinned to 13.0 wheels from
#   PyPI, installed into .cuda/venv (ignored by git, reused by later builds).
# - candle links libcuda at build time, and there is no driver here: we link against a stub
#   with one function per driver symbol (scripts/cuda/driver-symbols.txt), each returning
#   CUDA_ERROR_STUB_LIBRARY (34). The binary is not linked to the stub's path; at run time the
#   real driver's libcuda.so.1 is found by the loader.
# - CUDA_COMPUTE_CAP=90: Hopper (H100/H200). Set it in the environment for another card.
# - target/cuda is its own target folder so CPU and CUDA builds never evict each other. The
#   first build takes 10 minutes on 2 idle cores (mostly candle-kernels); keep the folder.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
venv=$root/.cuda/venv
stub=$root/.cuda/stub

if [ ! -x "$venv/bin/nvcc-ok" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
  touch "$venv/bin/nvcc-ok"
fi
# NCCL (data-parallel sums on GPUs) is linked as libnccl.so.2, whose ABI holds across 2.x;
# the GPU machine's own copy (PyTorch's) is loaded at run time.
if [ ! -e "$venv/bin/nccl-ok" ]; then
  "$venv/bin/pip" install --quiet nvidia-nccl-cu13==2.30.7
  touch "$venv/bin/nccl-ok"
fi
site=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')
export CUDA_HOME=$site/nvidia/cu13
export CUDA_PATH=$CUDA_HOME
[ -x "$CUDA_HOME/bin/nvcc" ] || { echo "nvcc not found under $CUDA_HOME" >&2; exit 1; }
"$CUDA_HOME/bin/nvcc" --version | tail -2

# The wheels ship versioned sonames only; the linker wants the plain names.
nccl_lib=$site/nvidia/nccl/lib
for lib in "$CUDA_HOME"/lib/lib*.so.* "$nccl_lib"/lib*.so.*; do
  plain=${lib%%.so.*}.so
  [ -e "$plain" ] || ln -s "$(basename "$lib")" "$plain"
done

if [ ! -f "$stub/libcuda.so" ]; then
  mkdir -p "$stub"
  awk 'NF { printf "int %s(void) { return 34; }\n", $1 }' scripts/cuda/driver-symbols.txt \
    > "$stub/libcuda_stub.c"
  gcc -shared -fPIC -o "$stub/libcuda.so.1" -Wl,-soname,libcuda.so.1 "$stub/libcuda_stub.c"
  ln -sf libcuda.so.1 "$stub/libcuda.so"
fi

export PATH=$CUDA_HOME/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$stub:$CUDA_HOME/lib:$nccl_lib${LIBRARY_PATH:+:$LIBRARY_PATH}
export CARGO_TARGET_DIR=$root/target/cuda
cargo build --release --features cuda --bin relora-pipe --example bench_step --example cuda_parity \
  --example nccl_check

# Only the tarball travels to the GPU machine (scripts/cuda/device-check.sh unpacks it).
# xz -9: its 64 MiB window spans a whole binary, so the four (which share candle and its
# kernels) pack into 19 MB instead of gzip's 59 MB; a device run carries 64 MiB at most.
mkdir -p out/cuda
stage=$(mktemp -d)
strip -o "$stage/relora-pipe" "$CARGO_TARGET_DIR/release/relora-pipe"
for ex in bench_step cuda_parity nccl_check; do
  strip -o "$stage/$ex" "$CARGO_TARGET_DIR/release/examples/$ex"
done
tar -C "$stage" -cf - relora-pipe bench_step cuda_parity nccl_check | xz -9 -T2 \
  > out/cuda/relora-pipe-cuda.tar.xz
rm -f out/cuda/relora-pipe-cuda.tar.gz
rm -rf "$stage"
ls -l out/cuda
