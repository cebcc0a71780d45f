//! Matmul benchmark: GFLOP/s of the products a training step makes, through the fused ops'
//! matmul helper, for each kernel crate it can use (`gemm`, which the model uses, and
//! `faer`). examples/bench/torch_matmul.py times the same shapes and layouts in
//! PyTorch; examples/bench/vs_pytorch.sh prints both.
//!
//! cargo run --release --example bench_matmul [-- --tokens 2048 --hidden 512 --inter 1376 --vocab 8000]
//!
//! Shapes: a square 1024³ product; the projections of the 20.8M config (y = x·Wᵀ, dx = dy·W,
//! dW = dyᵀ·x), the LM head's three (logits, dx, dW) and the six skinny products of a rank-32 and a rank-128 ReLoRA layer
//! (u = x·Aᵀ, y += u·Bᵀ, v = dy·B, dx += v·A, dA = vᵀ·x, dB = dyᵀ·u), each with the
//! operand layouts the ops use (a `ᵀ` operand is read transposed, by strides). Threads:
//! rayon's pool (RAYON_NUM_THREADS). Prints one `MATMUL` line per shape and backend.

use relora_model::fused::gemm::{isa, mm_with, Backend, Threads};
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// A product `[m × k]·[k × n]`, each operand row-major as stored, or stored transposed.
struct Shape {
    name: String,
    m: usize,
    n: usize,
    k: usize,
    lhs_t: bool,
    rhs_t: bool,
}

fn shape(name: &str, (m, n, k): (usize, usize, usize), lhs_t: bool, rhs_t: bool) -> Shape {
    Shape {
        name: name.to_string(),
        m,
        n,
        k,
        lhs_t,
        rhs_t,
    }
}

/// The shapes of one training step (see the module doc).
fn shapes(t: usize, h: usize, i: usize, v: usize) -> Vec<Shape> {
    let mut v = vec![
        shape("square-1024", (1024, 1024, 1024), false, false),
        shape("proj-fwd x·Wᵀ", (t, h, h), false, true),
        shape("proj-dx dy·W", (t, h, h), false, false),
        shape("proj-dW dyᵀ·x", (h, h, t), true, false),
        shape("mlp-fwd x·Wᵀ", (t, i, h), false, true),
        shape("mlp-dW dyᵀ·x", (i, h, t), true, false),
        shape("head-fwd x·Wᵀ", (t, v, h), false, true),
        shape("head-dx dz·W", (t, h, v), false, false),
        shape("head-dW dzᵀ·x", (v, h, t), true, false),
    ];
    for r in [32, 128] {
        v.extend([
            shape(&format!("r{r} u=x·Aᵀ"), (t, r, h), false, true),
            shape(&format!("r{r} y+=u·Bᵀ"), (t, h, r), false, true),
            shape(&format!("r{r} v=dy·B"), (t, r, h), false, false),
            shape(&format!("r{r} dx+=v·A"), (t, h, r), false, false),
            shape(&format!("r{r} dA=vᵀ·x"), (r, h, t), true, false),
            shape(&format!("r{r} dB=dyᵀ·u"), (h, r, t), true, false),
        ]);
    }
    v
}

fn gflops(s: &Shape, backend: Backend) -> f64 {
    let (m, n, k) = (s.m, s.n, s.k);
    let lhs: Vec<f32> = (0..m * k).map(|j| (j % 7) as f32 * 0.1).collect();
    let rhs: Vec<f32> = (0..k * n).map(|j| (j % 5) as f32 * 0.1).collect();
    let mut dst = vec![0f32; m * n];
    // (column stride, row stride) of an operand stored as given or transposed.
    let strides = |rows: usize, cols: usize, t: bool| if t { (rows, 1) } else { (1, cols) };
    let (lc, lr) = strides(m, k, s.lhs_t);
    let (rc, rr) = strides(k, n, s.rhs_t);
    let run = |dst: &mut [f32]| {
        // SAFETY: the buffers have the extents given; dst is not aliased.
        unsafe {
            mm_with(
                backend,
                (m, n, k),
                (dst.as_mut_ptr(), 1, n),
                (lhs.as_ptr(), lc, lr),
                (rhs.as_ptr(), rc, rr),
                1.0,
                false,
                Threads::All,
            )
        }
    };
    run(&mut dst);
    // Repeat until ~0.3 s has passed; report the best rep (the machine is noisy).
    let mut best = f64::MAX;
    let start = Instant::now();
    let mut reps = 0;
    while reps < 3 || start.elapsed().as_secs_f64() < 0.3 {
        let t = Instant::now();
        run(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
        reps += 1;
    }
    2.0 * (m * n * k) as f64 / best / 1e9
}

/// The CPU's model name, as /proc/cpuinfo gives it.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|r| r.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() {
    let (t, h, i, v) = (
        arg("--tokens", 2048),
        arg("--hidden", 512),
        arg("--inter", 1376),
        arg("--vocab", 8000),
    );
    println!(
        "# cpu={:?} isa={} threads={}",
        cpu_model(),
        isa(),
        rayon::current_num_threads()
    );
    for s in shapes(t, h, i, v) {
        let g = gflops(&s, Backend::Gemm);
        let f = gflops(&s, Backend::Faer);
        println!(
            "MATMUL shape={:?} m={} n={} k={} gemm={g:.1} faer={f:.1}",
            s.name, s.m, s.n, s.k
        );
    }
}
