"""PyTorch's GFLOP/s on the products `bench_matmul` times: same shapes, same layouts.

    python3 examples/bench/torch_matmul.py [--tokens 2048 --hidden 512 --inter 1376 --vocab 8000] [--threads 2]

A `ᵀ` operand is a transposed view (`.t()` of a row-major tensor), as the fused ops read it by
strides, so MKL sees the same transposes ours does. Each product is repeated for ~0.3 s and
the best rep is reported, as bench_matmul does. Prints one `MATMUL` line per shape.
"""

import argparse
import time

import torch

ap = argparse.ArgumentParser()
for name, default in [("tokens", 2048), ("hidden", 512), ("inter", 1376), ("vocab", 8000),
                      ("threads", 2)]:
    ap.add_argument("--" + name, type=int, default=default)
args = ap.parse_args()
torch.set_num_threads(args.threads)
t, h, i, v = args.tokens, args.hidden, args.inter, args.vocab

shapes = [
    ("square-1024", (1024, 1024, 1024), False, False),
    ("proj-fwd x·Wᵀ", (t, h, h), False, True),
    ("proj-dx dy·W", (t, h, h), False, False),
    ("proj-dW dyᵀ·x", (h, h, t), True, False),
    ("mlp-fwd x·Wᵀ", (t, i, h), False, True),
    ("mlp-dW dyᵀ·x", (i, h, t), True, False),
    ("head-fwd x·Wᵀ", (t, v, h), False, True),
    ("head-dx dz·W", (t, h, v), False, False),
    ("head-dW dzᵀ·x", (v, h, t), True, False),
]
for r in (32, 128):
    shapes += [
        (f"r{r} u=x·Aᵀ", (t, r, h), False, True),
        (f"r{r} y+=u·Bᵀ", (t, h, r), False, True),
        (f"r{r} v=dy·B", (t, r, h), False, False),
        (f"r{r} dx+=v·A", (t, h, r), False, False),
        (f"r{r} dA=vᵀ·x", (r, h, t), True, False),
        (f"r{r} dB=dyᵀ·u", (h, r, t), True, False),
    ]

print(f"# torch={torch.__version__} isa={torch.backends.cpu.get_cpu_capability()} "
      f"threads={torch.get_num_threads()}")
for name, (m, n, k), lhs_t, rhs_t in shapes:
    lhs = torch.rand(k, m).t() if lhs_t else torch.rand(m, k)
    rhs = torch.rand(n, k).t() if rhs_t else torch.rand(k, n)
    out = torch.empty(m, n)
    torch.mm(lhs, rhs, out=out)
    best, start, reps = float("inf"), time.perf_counter(), 0
    while reps < 3 or time.perf_counter() - start < 0.3:
        t0 = time.perf_counter()
        torch.mm(lhs, rhs, out=out)
        best = min(best, time.perf_counter() - t0)
        reps += 1
    print(f'MATMUL shape="{name}" m={m} n={n} k={k} torch={2 * m * n * k / best / 1e9:.1f}')
