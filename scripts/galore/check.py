"""Compare relora-pipe's GaLore optimizer with the authors' galore-torch (GaLoreAdamW).

Both get the same initial weights and the same sequence of gradients for enough steps to
cross two projector refreshes after the first, for every proj_type; the weights after each
step must agree within 1e-5 relative (and the change from the initial weights within 1e-3
relative, a far stricter test of the updates themselves).

An SVD's signs are arbitrary, and GaLore keeps Adam's moments across a refresh, so two
correct SVDs that choose other signs train differently after the second refresh.
relora-pipe fixes each singular pair's sign (the largest-magnitude entry of the left vector
is positive); for the comparison, galore-torch's projector gets the same rule applied to
its own float32 SVD. The run without the rule is shown too, to say what the signs change,
and one with torch's SVD in float64 (ours is), to say what the rest of the difference is.

usage: python check.py REPLAY_BINARY WORKDIR
"""

import json
import math
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

import galore_torch
from galore_torch.galore_projector import GaLoreProjector

SHAPES = {"tall": (48, 24), "wide": (24, 64), "square": (32, 32)}
STEPS = 25
BASE = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decay=0.01, steps=STEPS)
GALORE = dict(rank=8, update_proj_gap=10, scale=0.25)


def signed_orthogonal_matrix(self, weights, rank, type, svd_dtype=torch.float32):
    """galore-torch's SVD (thin, float32 unless told), with relora-pipe's sign rule."""
    matrix = weights.data.to(svd_dtype)
    U, s, Vh = torch.linalg.svd(matrix, full_matrices=False)
    U, Vh = U[:, :rank].float().clone(), Vh[:rank, :].float().clone()
    for k in range(rank):
        i = int(torch.argmax(U[:, k].abs()))
        if U[i, k] < 0:
            U[:, k] = -U[:, k]
            Vh[k, :] = -Vh[k, :]
    if type == "right":
        return Vh
    if type == "left":
        return U
    return [U, Vh]


def gradients(gen):
    """Low-rank structure plus noise, so the top singular vectors are well separated."""
    out = []
    for _ in range(STEPS):
        step = {}
        for name, (m, n) in SHAPES.items():
            k = 12
            scales = torch.tensor([0.7**j for j in range(k)])
            left = torch.randn(m, k, generator=gen) * scales
            step[name] = left @ torch.randn(k, n, generator=gen) + 0.05 * torch.randn(m, n, generator=gen)
        out.append(step)
    return out


def run_torch(w0, grads, cfg, proj_type):
    params = {n: torch.nn.Parameter(w.clone()) for n, w in w0.items()}
    opt = galore_torch.GaLoreAdamW(
        [dict(params=list(params.values()), rank=GALORE["rank"],
              update_proj_gap=GALORE["update_proj_gap"], scale=GALORE["scale"],
              proj_type=proj_type)],
        lr=cfg["lr"], betas=(cfg["beta1"], cfg["beta2"]), eps=cfg["eps"],
        weight_decay=cfg["weight_decay"], no_deprecation_warning=True)
    trace = []
    for step in grads:
        for n, p in params.items():
            p.grad = step[n].clone()
        opt.step()
        trace.append({n: p.detach().clone() for n, p in params.items()})
    return trace


def run_ours(binary, workdir, w0, grads, cfg, proj_type):
    tensors = {f"w.{n}": w for n, w in w0.items()}
    for s, step in enumerate(grads):
        tensors.update({f"g.{s}.{n}": g for n, g in step.items()})
    inp, out, conf = (os.path.join(workdir, f) for f in ("in.safetensors", "out.safetensors", "config.json"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, inp)
    with open(conf, "w") as f:
        json.dump(dict(cfg, galore=dict(GALORE, proj_type=proj_type)), f)
    subprocess.run([binary, conf, inp, out], check=True)
    got = load_file(out)
    return [{n: got[f"w.{s}.{n}"] for n in w0} for s in range(STEPS)]


def compare(w0, a, b):
    """(worst relative weight difference, worst relative update difference) over steps."""
    worst_w = worst_u = 0.0
    for sa, sb in zip(a, b):
        for n in w0:
            d = (sa[n].double() - sb[n].double()).norm().item()
            worst_w = max(worst_w, d / sb[n].double().norm().item())
            worst_u = max(worst_u, d / (sb[n].double() - w0[n].double()).norm().item())
    return worst_w, worst_u


def main():
    binary, workdir = sys.argv[1], sys.argv[2]
    os.makedirs(workdir, exist_ok=True)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(20240306)
    w0 = {n: torch.randn(m, k, generator=gen) * 0.02 for n, (m, k) in SHAPES.items()}
    grads = gradients(gen)
    failed = False
    print(f"galore-torch {getattr(galore_torch, '__version__', '1.0')}, torch {torch.__version__}; "
          f"{STEPS} steps, rank {GALORE['rank']}, refresh every {GALORE['update_proj_gap']}")
    for proj_type in ["std", "reverse_std", "right", "left", "full"]:
        cfg = dict(BASE)
        if proj_type == "full":
            # The r×r core of a fresh SVD is diagonal in exact arithmetic; its off-diagonal
            # rounding noise becomes O(1) under m/(√v + ε) unless ε dwarfs it, on both sides.
            cfg["eps"] = 1e-3
        ours = run_ours(binary, workdir, w0, grads, cfg, proj_type)
        original = GaLoreProjector.get_orthogonal_matrix
        GaLoreProjector.get_orthogonal_matrix = signed_orthogonal_matrix
        try:
            theirs = run_torch(w0, grads, cfg, proj_type)
        finally:
            GaLoreProjector.get_orthogonal_matrix = original
        unsigned = run_torch(w0, grads, cfg, proj_type)
        # The same with torch's SVD in float64, as ours is: what is left of the difference.
        GaLoreProjector.get_orthogonal_matrix = lambda self, w, rank, type: signed_orthogonal_matrix(
            self, w, rank, type, torch.float64)
        try:
            theirs64 = run_torch(w0, grads, cfg, proj_type)
        finally:
            GaLoreProjector.get_orthogonal_matrix = original
        w_rel, u_rel = compare(w0, ours, theirs)
        _, u_unsigned = compare(w0, ours, unsigned)
        _, u_64 = compare(w0, ours, theirs64)
        ok = w_rel <= 1e-5 and u_rel <= 1e-3
        failed |= not ok
        print(f"{proj_type:12s} weights {w_rel:.2e} relative, updates {u_rel:.2e} relative "
              f"{'ok' if ok else 'FAILED'} (torch's SVD in float64: updates {u_64:.2e}; "
              f"torch's own SVD signs: updates {u_unsigned:.2e})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
