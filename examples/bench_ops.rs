//! Per-op benchmark: milliseconds of each fused op's forward pass and of its forward and
//! backward passes together, at one block's shapes, against the FLOPs of its matmuls. It says
//! which op a training step's time goes to beyond the matmuls, as `bench_step` cannot.
//!
//! cargo run --release --example bench_ops [-- --hidden 512 --inter 1376 --heads 8 \
//!     --seq 256 --batch 8 --vocab 8000 --rank 32] [--only NAME] [--kernels avx2]
//!
//! `--only` keeps the ops whose name contains NAME; `--kernels baseline|avx2|avx512` caps the
//! instruction set of the elementwise kernels (`relora_model::fused::simd`; gemm's own
//! dispatch is unaffected).
//!
//! The backward pass starts from a gradient of ones over the op's output (candle's
//! `backward` on a non-scalar), and includes candle's bookkeeping: a zero-filled buffer and
//! a sum for each input's gradient. Medians of 10 reps after 2 warm-ups;
//! threads: rayon's pool (RAYON_NUM_THREADS). One `OP` line per op.

use candle_core::{DType, Device, Tensor, Var};
use relora_model::fused::simd::{self, Level};
use relora_model::fused::{self, RopeTables};
use relora_model::Rng;
use std::time::Instant;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// An op under test, applied to its inputs.
type OpFn<'a> = Box<dyn Fn(&[Tensor]) -> Tensor + 'a>;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// (forward ms, forward + backward ms) of `f` over fresh Vars made from `inputs`.
fn time(inputs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Tensor) -> (f64, f64) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let (mut fwd, mut both) = (Vec::new(), Vec::new());
    for rep in 0..12 {
        let t0 = Instant::now();
        let out = f(&ts);
        let t1 = Instant::now();
        let grads = out.backward().unwrap();
        let t2 = Instant::now();
        drop(grads);
        if rep >= 2 {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            both.push((t2 - t0).as_secs_f64() * 1e3);
        }
    }
    (median(fwd), median(both))
}

fn main() {
    // As train stages run (see relora_model::alloc).
    relora_model::alloc::keep_freed_memory();
    let (h, i, heads, t, b, vocab, r) = (
        arg("--hidden", 512),
        arg("--inter", 1376),
        arg("--heads", 8),
        arg("--seq", 256),
        arg("--batch", 8),
        arg("--vocab", 8000),
        arg("--rank", 32),
    );
    let mut rng = Rng::new(0);
    let mut randn = |shape: &[usize], std: f32| {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(n, std), shape, &Device::Cpu).unwrap()
    };
    let m = b * t;
    let x = randn(&[b, t, h], 1.0);
    let xi = randn(&[b, t, i], 1.0);
    let w = randn(&[h, h], 0.02);
    let (a, bb) = (randn(&[r, h], 0.02), randn(&[h, r], 0.02));
    let head = randn(&[vocab, h], 0.02);
    let xm = randn(&[m, h], 1.0);
    let targets = Tensor::from_vec(
        (0..m as u32).map(|j| j % vocab as u32).collect::<Vec<_>>(),
        m,
        &Device::Cpu,
    )
    .unwrap();
    let weights = Tensor::ones(m, DType::F32, &Device::Cpu).unwrap();
    let tables = RopeTables::new(t, h / heads, 10_000.0);
    let scale = 1.0 / ((h / heads) as f64).sqrt();
    let gflop = |f: f64| f * 1e-9;
    let ops: Vec<(&str, Vec<Tensor>, f64, OpFn)> = vec![
        (
            "rms_norm",
            vec![
                x.clone(),
                Tensor::ones(h, DType::F32, &Device::Cpu).unwrap(),
            ],
            0.0,
            Box::new(|v| fused::rms_norm(&v[0], &v[1], 1e-6).unwrap()),
        ),
        (
            "residual add",
            vec![x.clone(), x.clone()],
            0.0,
            Box::new(|v| (&v[0] + &v[1]).unwrap()),
        ),
        (
            "linear h→h",
            vec![x.clone(), w.clone()],
            gflop(6.0 * (m * h * h) as f64),
            Box::new(|v| fused::linear(&v[0], &v[1]).unwrap()),
        ),
        (
            "lora_linear h→h",
            vec![x.clone(), a.clone(), bb.clone()],
            gflop(4.0 * (m * h * h) as f64 + 12.0 * (m * r * h) as f64),
            Box::new(|v| fused::lora_linear(&v[0], &w, &v[1], &v[2], 1.0, None).unwrap()),
        ),
        (
            "rope",
            vec![x.clone()],
            0.0,
            Box::new(|v| fused::rope(&v[0], &tables).unwrap()),
        ),
        (
            "attention",
            vec![
                x.clone(),
                x.affine(0.5, 0.0).unwrap(),
                x.affine(0.25, 0.0).unwrap(),
            ],
            // QKᵀ and PV over the causal half, forward; twice that again backward.
            gflop(3.0 * 2.0 * (b * t * t * h) as f64),
            Box::new(move |v| fused::causal_attention(&v[0], &v[1], &v[2], heads, scale).unwrap()),
        ),
        (
            "swiglu",
            vec![xi.clone(), xi.affine(0.5, 0.0).unwrap()],
            0.0,
            Box::new(|v| fused::swiglu(&v[0], &v[1]).unwrap()),
        ),
        (
            "head + cross-entropy",
            vec![xm.clone(), head.clone()],
            gflop(6.0 * (m * h * vocab) as f64),
            Box::new(|v| fused::head_cross_entropy(&v[0], &v[1], &targets, &weights).unwrap()),
        ),
    ];
    let args: Vec<String> = std::env::args().collect();
    let text = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    if let Some(k) = text("--kernels") {
        let level = Level::from_name(&k)
            .unwrap_or_else(|| panic!("--kernels {k}: baseline, avx2 or avx512"));
        simd::force(level);
    }
    let only = text("--only");
    println!(
        "# isa={} kernels={} threads={} tokens={m} hidden={h} inter={i} heads={heads} \
         vocab={vocab} rank={r}",
        fused::gemm::isa(),
        simd::level().name(),
        rayon::current_num_threads()
    );
    for (name, inputs, flops, f) in &ops {
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let (fwd, both) = time(inputs, f.as_ref());
        let rate = if *flops > 0.0 {
            format!(" gflops_per_s={:.0}", flops / (both / 1e3))
        } else {
            String::new()
        };
        println!("OP name={name:?} fwd_ms={fwd:.2} fwd_bwd_ms={both:.2}{rate}");
    }
}
