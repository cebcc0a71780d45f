"""PyTorch eager reference for `bench_step`: the same LLaMA model, batch and step, timed the same way.

    python3 examples/bench/torch_step.py --vocab 8000 --hidden 512 --inter 1376 --heads 8 \
        --layers 4 --seq 256 --batch 8 --steps 10 [--lora-rank 32] [--threads 2] [--sdpa]
        [--galore-rank 128 [--galore-gap 200]]

The model is the one relora-model builds: pre-norm blocks, RMSNorm (eps 1e-6), rotate-half RoPE
(base 10,000), causal attention, SwiGLU, no biases, untied LM head, weights ~ N(0, 0.02). With
--lora-rank r every projection is a frozen W plus a rank-r LoRA branch (alpha 32, A Kaiming-
uniform, B zero): a ReLoRA step between restarts. Attention is the eager composition (scores,
mask, softmax, weighted sum) unless --sdpa asks for torch's fused kernel. AdamW is torch's
default (the multi-tensor `foreach` implementation), lr 1e-3, no weight decay, no clipping.

With --galore-rank r the optimizer is the authors' GaLoreAdamW (`pip install galore-torch`) with
the seven projections' weights projected at rank r (scale 0.25, proj_type std) and the rest
plain; its subspace refresh (an SVD of each projection's gradient every --galore-gap steps) is
timed on its own after the run and added to the optimizer's time amortised over the gap, as
bench_step does.

Each step is timed in three parts (forward with the loss read back, backward, optimizer
step); the medians over --steps steps after 5 warm-up steps are printed on one RESULT line
with tokens/s and the process's peak resident memory, in bench_step's key=value format.
Needs `pip install torch` (the CPU wheel is enough).
"""

import argparse
import math
import resource
import statistics
import time

import torch
import torch.nn.functional as F

ap = argparse.ArgumentParser()
for name, default in [("vocab", 8000), ("hidden", 512), ("inter", 1376), ("heads", 8),
                      ("layers", 4), ("seq", 256), ("batch", 8), ("steps", 10),
                      ("lora-rank", 0), ("threads", 2), ("galore-rank", 0), ("galore-gap", 200)]:
    ap.add_argument("--" + name, type=int, default=default)
ap.add_argument("--sdpa", action="store_true")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

head_dim = args.hidden // args.heads
freqs = 1.0 / 10000.0 ** (torch.arange(head_dim // 2, dtype=torch.float64) * 2 / head_dim)
angles = torch.outer(torch.arange(args.seq, dtype=torch.float64), freqs)
COS, SIN = angles.cos().float(), angles.sin().float()  # [t, head_dim / 2]
CAUSAL = torch.full((args.seq, args.seq), float("-inf")).triu(1)


def rope(x):
    """Rotate-half RoPE on x [b, heads, t, head_dim]."""
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
    return torch.cat([x1 * COS - x2 * SIN, x2 * COS + x1 * SIN], dim=-1)


class RMSNorm(torch.nn.Module):
    def __init__(self, h):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(h))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Projection(torch.nn.Module):
    """x·Wᵀ, or with a rank: frozen W plus s·(x·Aᵀ)·Bᵀ."""

    def __init__(self, inp, out, rank):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(out, inp) * 0.02, requires_grad=rank == 0)
        self.rank = rank
        if rank:
            bound = 1.0 / math.sqrt(inp)
            self.a = torch.nn.Parameter(torch.empty(rank, inp).uniform_(-bound, bound))
            self.b = torch.nn.Parameter(torch.zeros(out, rank))
            self.scale = 32.0 / rank

    def forward(self, x):
        y = F.linear(x, self.weight)
        if self.rank:
            y = y + F.linear(F.linear(x, self.a) * self.scale, self.b)
        return y


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        h, i, r = args.hidden, args.inter, args.lora_rank
        self.attn_norm, self.mlp_norm = RMSNorm(h), RMSNorm(h)
        self.q, self.k, self.v, self.o = (Projection(h, h, r) for _ in range(4))
        self.gate, self.up = Projection(h, i, r), Projection(h, i, r)
        self.down = Projection(i, h, r)

    def forward(self, x):
        b, t, h = x.shape
        n = self.attn_norm(x)
        heads = lambda y: y.view(b, t, args.heads, head_dim).transpose(1, 2)
        q, k, v = rope(heads(self.q(n))), rope(heads(self.k(n))), heads(self.v(n))
        if args.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + CAUSAL
            y = scores.softmax(-1) @ v
        x = x + self.o(y.transpose(1, 2).reshape(b, t, h))
        n = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(n)) * self.up(n))


class Llama(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(args.vocab, args.hidden) * 0.02)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(args.layers))
        self.norm = RMSNorm(args.hidden)
        self.head = torch.nn.Parameter(torch.randn(args.vocab, args.hidden) * 0.02)

    def forward(self, ids):
        x = self.embed[ids]
        for blk in self.blocks:
            x = blk(x)
        return F.linear(self.norm(x), self.head)


model = Llama()
trainable = [p for p in model.parameters() if p.requires_grad]
if args.galore_rank:
    from galore_torch import GaLoreAdamW

    projected = [m.weight for m in model.modules() if isinstance(m, Projection)]
    ids_projected = {id(p) for p in projected}
    plain = [p for p in trainable if id(p) not in ids_projected]
    opt = GaLoreAdamW([dict(params=plain),
                       dict(params=projected, rank=args.galore_rank, update_proj_gap=args.galore_gap,
                            scale=0.25, proj_type="std")],
                      lr=1e-3, weight_decay=0.0, no_deprecation_warning=True)
else:
    opt = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
ids, targets = tokens[:, :-1], tokens[:, 1:].reshape(-1)

fwd, bwd, step = [], [], []
for i in range(args.steps + 5):
    t0 = time.perf_counter()
    loss = F.cross_entropy(model(ids).reshape(-1, args.vocab), targets)
    loss.item()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    if i >= 5:
        fwd.append((t1 - t0) * 1e3)
        bwd.append((t2 - t1) * 1e3)
        step.append((t3 - t2) * 1e3)

f, b, o = (statistics.median(v) for v in (fwd, bwd, step))
refresh = ""
if args.galore_rank:
    # One refresh of every projector, on a fresh gradient, amortised over the gap.
    F.cross_entropy(model(ids).reshape(-1, args.vocab), targets).backward()
    t0 = time.perf_counter()
    for p in projected:
        proj = opt.state[p]["projector"]
        proj.ortho_matrix = None
        proj.project(p.grad, 1)
    ms = (time.perf_counter() - t0) * 1e3
    o += ms / args.galore_gap
    refresh = f" galore_refresh_ms={ms:.1f} galore_gap={args.galore_gap}"
tps = args.batch * args.seq / ((f + b + o) / 1e3)
kind = (f"lora-r{args.lora_rank}" if args.lora_rank
        else f"galore-r{args.galore_rank}" if args.galore_rank else "full")
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"RESULT torch-{kind} torch={torch.__version__} isa={torch.backends.cpu.get_cpu_capability()} "
      f"threads={torch.get_num_threads()} sdpa={int(args.sdpa)} "
      f"params={sum(p.numel() for p in model.parameters())} trainable={sum(p.numel() for p in trainable)} "
      f"batch={args.batch}x{args.seq} fwd_ms={f:.1f} bwd_ms={b:.1f} opt_ms={o:.1f} "
      f"tokens_per_s={tps:.0f} peak_rss_mib={rss:.0f}{refresh}")
