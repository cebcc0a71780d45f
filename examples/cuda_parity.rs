//! CPU against CUDA, in two parts.
//!
//! 1. Each fused op (`relora_model::fused`: RMSNorm, RoPE, SwiGLU, causal attention, the
//!    cross-entropy, AdamW) on the GPU against the same op on the CPU: values, and the
//!    gradient of every input, within 1e-5 relative (f32). A failure here names the kernel.
//! 2. The same tiny model, forward and backward, in f32 and bf16, full-rank and ReLoRA, once
//!    with the fused ops on the GPU and once with the reference composition of candle
//!    primitives; then one clipped AdamW step, a merge-and-reinit and a magnitude reset of
//!    the LoRA moments. Every tensor is compared as ‖gpu − cpu‖ / ‖cpu‖ against 1e-4 (f32)
//!    or 1e-2 (bf16; the CPU side is the emulated bf16 of `relora_model::precision`).
//!    ReLoRA also with its frozen W in bf16, int8 and NF4 (`lora.frozen`): on the GPU the
//!    kernel dequantises W for cuBLAS, on the CPU the fused compact kernel; and the
//!    dequantised W itself, which must be the same bits on both devices.
//! 3. GaLore: three projected Adam steps on every projection of the full model (a new
//!    subspace at the first and the third; the SVD on the host, the products on the device),
//!    the same gradients on both sides: weights and projected moments within 1e-4.
//!
//!   cargo run --release --features cuda --example cuda_parity [-- --device cuda:0]
//!
//! Prints one line per check and a summary; exits non-zero if any check fails.

use candle_core::{DType, Device, Tensor, Var};
use relora_data::Batch;
use relora_model::fused::{self, Ops, RopeTables};
use relora_model::optim::clip_grad_norm;
use relora_model::quant::FrozenFormat;
use relora_model::train::batch_tensors;
use relora_model::{AdamConfig, AdamW, GaloreConfig, Llama, LoraInit, ProjType, ResetMode, Rng};

mod common;
use common::{random_batch, trainable_grads, TINY as CFG};

fn rel_err(gpu: &Tensor, cpu: &Tensor) -> anyhow::Result<f64> {
    let a = gpu.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = cpu.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((diff / norm.max(1e-30)).sqrt())
}

/// |‖gpu‖ − ‖cpu‖| / ‖cpu‖: for tensors whose elements may legitimately differ in place
/// but not in total.
fn norm_err(gpu: &Tensor, cpu: &Tensor) -> anyhow::Result<f64> {
    let norm = |t: &Tensor| -> anyhow::Result<f64> {
        let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt())
    };
    let (a, b) = (norm(gpu)?, norm(cpu)?);
    Ok((a - b).abs() / b.max(1e-30))
}

/// The model as `dev` builds it from fixed seeds: identical weights on every device.
/// NF4's block in these checks: 16 weights, so blocks straddle the tiny model's rows.
const NF4_BLOCK: usize = 16;

fn build(
    dev: &Device,
    lora: Option<FrozenFormat>,
    compute: DType,
    ops: Ops,
) -> anyhow::Result<Llama> {
    let mut rng = Rng::new(7);
    let mut m = Llama::random(CFG, &mut rng, dev)?;
    if let Some(frozen) = lora {
        for (_, p) in m.projections_mut() {
            // Both factors non-zero so every LoRA gradient is exercised; no dropout, whose
            // mask would be the same on both devices anyway.
            p.add_lora(8, 32.0, 0.0, LoraInit::KaimingBoth, &mut rng)?;
            p.quantize_frozen(frozen, NF4_BLOCK)?;
        }
    }
    m.compute = compute;
    m.ops = ops;
    Ok(m)
}

struct Side {
    model: Llama,
    logits: Tensor,
    loss: f64,
    grads: Vec<Tensor>,
    opt: AdamW,
    /// The largest ‖W − Q(W)‖ / ‖W‖ of the merge's requantisation (0 for an f32 W).
    quant_error: f64,
}

fn run(
    dev: &Device,
    lora: Option<FrozenFormat>,
    compute: DType,
    ops: Ops,
    b: &Batch,
) -> anyhow::Result<Side> {
    let mut model = build(dev, lora, compute, ops)?;
    let (ids, targets, weights) = batch_tensors(b, dev)?;
    let logits = model.forward(&ids, None)?;
    // The loss as training computes it: on the CPU the head fused with the loss, on the
    // GPU the head's matmul then the fused cross-entropy (or the reference composition).
    let loss_t = model.loss(&ids, &targets, &weights, None)?;
    let loss = loss_t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let store = loss_t.backward()?;
    let mut grads = trainable_grads(&model, &store)?;
    let reported = grads.clone();
    let mut opt = AdamW::new(model.trainable(), AdamConfig::default())?;
    clip_grad_norm(&mut grads, Some(1.0))?;
    opt.step(&grads, 1e-3)?;
    let mut quant_error = 0f64;
    if lora.is_some() {
        let mut rng = Rng::new(99);
        for (_, p) in model.projections_mut() {
            quant_error = quant_error.max(p.merge_and_reinit(&mut rng)?);
        }
        opt.reset_lora(ResetMode::Magnitude { fraction: 0.9 }, &mut Rng::new(5))?;
    }
    Ok(Side {
        model,
        logits,
        loss,
        grads: reported,
        opt,
        quant_error,
    })
}

/// `f` applied to `inputs` as Vars on `dev`, reduced to a scalar against fixed random
/// weights and differentiated: the output, then each input's gradient.
fn op_on(
    dev: &Device,
    inputs: &[Tensor],
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> anyhow::Result<Vec<Tensor>> {
    let vars = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev)?))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts)?;
    let r = Tensor::from_vec(Rng::new(11).normal_vec(y.elem_count(), 1.0), y.shape(), dev)?;
    let store = (y.flatten_all()? * r.flatten_all()?)?
        .sum_all()?
        .backward()?;
    let mut out = vec![y];
    for v in &vars {
        let g = store.get(v.as_tensor()).cloned();
        out.push(g.ok_or_else(|| anyhow::anyhow!("an input got no gradient"))?);
    }
    Ok(out)
}

/// Part 1: each fused op on the GPU against the CPU, (name, relative error) per tensor.
fn op_checks(gpu: &Device) -> anyhow::Result<Vec<(String, f64)>> {
    let mut rng = Rng::new(21);
    let mut randn = |shape: &[usize], std: f32| -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(rng.normal_vec(n, std), shape, &Device::Cpu)
    };
    type Op = Box<dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>>;
    let tables = RopeTables::new(16, 32, 10_000.0);
    let targets: Vec<u32> = (0..24u32).map(|i| (i * 37) % 300).collect();
    let targets = Tensor::new(targets.as_slice(), &Device::Cpu)?;
    let weights = Tensor::from_vec(
        (0..24)
            .map(|i| if i == 5 { 0f32 } else { 1.0 })
            .collect::<Vec<_>>(),
        24,
        &Device::Cpu,
    )?;
    let attention = |heads: usize, d: usize| -> Op {
        let scale = 1.0 / (d as f64).sqrt();
        Box::new(move |t: &[Tensor]| fused::causal_attention(&t[0], &t[1], &t[2], heads, scale))
    };
    let cases: Vec<(&str, Vec<Tensor>, Op)> = vec![
        (
            "rms_norm",
            vec![randn(&[2, 8, 96], 1.0)?, randn(&[96], 1.0)?],
            Box::new(|t: &[Tensor]| fused::rms_norm(&t[0], &t[1], 1e-6)),
        ),
        (
            "rope",
            vec![randn(&[2, 16, 4 * 32], 1.0)?],
            Box::new(move |t: &[Tensor]| fused::rope(&t[0], &tables)),
        ),
        (
            "swiglu",
            vec![randn(&[2, 8, 200], 2.0)?, randn(&[2, 8, 200], 1.0)?],
            Box::new(|t: &[Tensor]| fused::swiglu(&t[0], &t[1])),
        ),
        (
            "attention, head_dim 40",
            vec![
                randn(&[2, 20, 3 * 40], 1.0)?,
                randn(&[2, 20, 3 * 40], 1.0)?,
                randn(&[2, 20, 3 * 40], 1.0)?,
            ],
            attention(3, 40),
        ),
        (
            "attention, head_dim 64",
            vec![
                randn(&[1, 70, 2 * 64], 1.0)?,
                randn(&[1, 70, 2 * 64], 1.0)?,
                randn(&[1, 70, 2 * 64], 1.0)?,
            ],
            attention(2, 64),
        ),
        (
            "cross_entropy",
            vec![randn(&[24, 300], 3.0)?],
            Box::new(move |t: &[Tensor]| {
                let dev = t[0].device();
                fused::cross_entropy(&t[0], &targets.to_device(dev)?, &weights.to_device(dev)?)
            }),
        ),
    ];
    let mut out = Vec::new();
    for (name, inputs, f) in &cases {
        let (c, g) = (op_on(&Device::Cpu, inputs, f)?, op_on(gpu, inputs, f)?);
        for (k, (g, c)) in g.iter().zip(&c).enumerate() {
            let what = if k == 0 {
                "output".to_string()
            } else {
                format!("grad {k}")
            };
            out.push((format!("{name} {what}"), rel_err(g, c)?));
        }
    }
    // AdamW in place, with every constant away from its default.
    let c = fused::adamw::AdamStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.95,
        one_minus_beta1: 0.1,
        one_minus_beta2: 0.05,
        eps: 1e-8,
        weight_decay: 0.01,
        bias1: 0.271,
        bias2: 0.142_625,
        grad_scale: 0.5,
    };
    let (p, m, g) = (
        randn(&[1000], 1.0)?,
        randn(&[1000], 0.1)?,
        randn(&[1000], 1.0)?,
    );
    let v = randn(&[1000], 0.01)?.abs()?;
    let sides = [Device::Cpu, gpu.clone()].map(|dev| -> anyhow::Result<[Tensor; 3]> {
        let [p, m, v] = [&p, &m, &v].map(|t| t.to_device(&dev).and_then(|t| t.copy()));
        let (p, m, v) = (p?, m?, v?);
        fused::adamw::step(&p, &m, &v, &g.to_device(&dev)?, c)?;
        Ok([p, m, v])
    });
    let [cpu, on_gpu] = sides;
    for (name, (g, c)) in ["p", "m", "v"].iter().zip(on_gpu?.iter().zip(&cpu?)) {
        out.push((format!("adamw {name}"), rel_err(g, c)?));
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let spec = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1))
        .map_or("cuda", String::as_str);
    let gpu = relora_model::device(spec)?;
    let b = random_batch(3, 4, 64);

    let (mut checks, mut failed) = (0, 0);
    let op_tol = 1e-5;
    for (name, e) in op_checks(&gpu)? {
        checks += 1;
        let ok = e.is_finite() && e <= op_tol;
        failed += usize::from(!ok);
        let verdict = if ok { "ok" } else { "FAIL" };
        println!("op {name}: relative error {e:.3e} (tolerance {op_tol:.0e}): {verdict}");
    }
    let methods = [
        None,
        Some(FrozenFormat::F32),
        Some(FrozenFormat::Bf16),
        Some(FrozenFormat::Int8),
        Some(FrozenFormat::Nf4),
    ];
    for (ops, lora, compute) in [Ops::Fused, Ops::Reference]
        .into_iter()
        .flat_map(|o| methods.map(|l| (o, l)))
        .flat_map(|(o, l)| [DType::F32, DType::BF16].map(|c| (o, l, c)))
    {
        let tol = if compute == DType::F32 { 1e-4 } else { 1e-2 };
        let what = format!(
            "{} {} ({} ops on the GPU)",
            match lora {
                None => "full".to_string(),
                Some(FrozenFormat::F32) => "relora".to_string(),
                Some(f) => format!("relora, W in {}", f.name()),
            },
            if compute == DType::F32 { "f32" } else { "bf16" },
            if ops == Ops::Fused {
                "fused"
            } else {
                "reference"
            }
        );
        // Like against like: the CPU runs the same ops (the reference composition rounds
        // every intermediate to bf16, the fused ops only their outputs).
        let c = run(&Device::Cpu, lora, compute, ops, &b)?;
        let g = run(&gpu, lora, compute, ops, &b)?;
        // (what, relative error, its tolerance)
        let mut pairs: Vec<(String, f64, f64)> = vec![
            ("logits".into(), rel_err(&g.logits, &c.logits)?, tol),
            ("loss".into(), ((g.loss - c.loss) / c.loss).abs(), tol),
        ];
        let names = c.model.trainable();
        for (k, (n, _, _)) in names.iter().enumerate() {
            pairs.push((format!("grad {n}"), rel_err(&g.grads[k], &c.grads[k])?, tol));
        }
        // After the AdamW step, the merge and the reset: weights (W holds the merged
        // update) and the moments the reset pruned.
        let (gs, cs) = (g.model.state_tensors()?, c.model.state_tensors()?);
        for (n, ct) in &cs {
            if n.ends_with(".codes") || n.ends_with(".scales") {
                continue; // a compact W: compared dequantised, below
            }
            pairs.push((format!("after step {n}"), rel_err(&gs[n], ct)?, tol));
        }
        // A merged W quantised again: a weight within rounding of a boundary between two
        // codes may take either, so the two devices' W differ by less than quantising's
        // own error (the merge reports it), not by rounding.
        let bound = tol.max(c.quant_error);
        for ((n, gp), (_, cp)) in g.model.projections().zip(c.model.projections()) {
            if cp.quantized.is_some() {
                let (gw, cw) = (gp.frozen_weight()?.unwrap(), cp.frozen_weight()?.unwrap());
                pairs.push((format!("after merge {n}.weight"), rel_err(&gw, &cw)?, bound));
            }
        }
        for (gp, cp) in g.opt.params.iter().zip(&c.opt.params) {
            if cp.is_lora {
                // The reset keeps the top 10% by magnitude; elements within rounding of
                // the threshold may fall either side, so compare the norms.
                pairs.push((format!("exp_avg {}", cp.name), norm_err(&gp.m, &cp.m)?, tol));
            }
        }
        let mut max = (String::new(), 0f64);
        for (n, e, tol) in &pairs {
            let tol = *tol;
            checks += 1;
            if e.is_nan() || *e > tol {
                failed += 1;
                println!("FAIL {what} {n}: relative error {e:.3e} > {tol:.0e}");
            }
            if *e > max.1 {
                max = (n.clone(), *e);
            }
        }
        println!(
            "{what}: {} tensors, worst {} at {:.3e} (tolerance {tol:.0e})",
            pairs.len(),
            max.0,
            max.1
        );
    }
    // The dequantising kernel against the host: the same bits, as f32 and as bf16.
    for format in [FrozenFormat::Bf16, FrozenFormat::Int8, FrozenFormat::Nf4] {
        let (c, g) = (
            build(&Device::Cpu, Some(format), DType::F32, Ops::Fused)?,
            build(&gpu, Some(format), DType::F32, Ops::Fused)?,
        );
        let mut differ = 0usize;
        let mut total = 0usize;
        for ((_, cp), (_, gp)) in c.projections().zip(g.projections()) {
            let (cq, gq) = (
                cp.quantized.as_ref().unwrap(),
                gp.quantized.as_ref().unwrap(),
            );
            for dt in [DType::F32, DType::BF16] {
                let host = cq
                    .dense(dt, &Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?;
                let dev = gq.dense(dt, &gpu)?.to_device(&Device::Cpu)?;
                let dev = dev.to_dtype(DType::F32)?.flatten_all()?;
                for (a, b) in host.to_vec1::<f32>()?.iter().zip(dev.to_vec1::<f32>()?) {
                    differ += usize::from(a.to_bits() != b.to_bits());
                    total += 1;
                }
            }
        }
        checks += 1;
        failed += usize::from(differ != 0);
        println!(
            "dequantize {} on the GPU: {differ} of {total} weights differ from the host's bits: {}",
            format.name(),
            if differ == 0 { "ok" } else { "FAIL" }
        );
    }
    // LoRA dropout draws its masks on the device: the same run RNG gives the same masks,
    // another gives others, and the mask keeps 90% of inputs at 1/0.9.
    {
        let mut m = build(&gpu, None, DType::F32, Ops::Fused)?;
        let mut rng = Rng::new(7);
        for (_, p) in m.projections_mut() {
            p.add_lora(8, 32.0, 0.1, LoraInit::KaimingBoth, &mut rng)?;
        }
        let ids = Tensor::from_slice(&b.inputs, (b.batch_size, b.len), &gpu)?;
        let a = m
            .forward(&ids, Some(&mut Rng::new(1)))?
            .to_device(&Device::Cpu)?;
        let same = rel_err(&m.forward(&ids, Some(&mut Rng::new(1)))?, &a)?;
        let other = rel_err(&m.forward(&ids, Some(&mut Rng::new(2)))?, &a)?;
        let like = Tensor::zeros((1, 1), DType::F32, &gpu)?;
        let mask = relora_model::linear::dropout_mask(&mut Rng::new(1), (1000, 1000), 0.1, &like)?;
        let kept = mask
            .ne(0.0)?
            .to_dtype(DType::F32)?
            .mean_all()?
            .to_scalar::<f32>()?;
        let max = mask.max_all()?.to_scalar::<f32>()?;
        let ok = same == 0.0
            && other > 1e-3
            && (kept - 0.9).abs() < 0.005
            && (max - 1.0 / 0.9).abs() < 1e-6;
        checks += 1;
        if !ok {
            failed += 1;
        }
        println!(
            "dropout on the device: same seed differs by {same:.1e}, another seed by {other:.1e}, \
             kept {kept:.4}, scale {max:.6}: {}",
            if ok { "ok" } else { "FAIL" }
        );
    }
    // GaLore on the device against the CPU, from the same weights and gradients.
    {
        let c = run(&Device::Cpu, None, DType::F32, Ops::Fused, &b)?;
        let cfg = GaloreConfig {
            rank: 4,
            update_proj_gap: 2,
            scale: 0.25,
            proj_type: ProjType::Std,
        };
        let names: Vec<String> = c
            .model
            .projections()
            .map(|(n, _)| format!("{n}.weight"))
            .collect();
        let mut sides = Vec::new();
        for dev in [&Device::Cpu, &gpu] {
            let vars = c
                .model
                .trainable()
                .into_iter()
                .map(|(n, v, l)| Ok((n, Var::from_tensor(&v.as_tensor().to_device(dev)?)?, l)))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut opt = AdamW::new(vars.clone(), AdamConfig::default())?;
            opt.use_galore(cfg, |n| names.contains(&n.to_string()))?;
            for step in 1..=3 {
                let grads = c
                    .grads
                    .iter()
                    .map(|g| (g.to_device(dev)? * step as f64).map_err(Into::into))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                opt.step(&grads, 1e-3)?;
            }
            sides.push(opt);
        }
        let (cpu_opt, gpu_opt) = (&sides[0], &sides[1]);
        let mut worst = (String::new(), 0f64);
        for (cp, gp) in cpu_opt.params.iter().zip(&gpu_opt.params) {
            for (what, a, b) in [
                ("weight", gp.var.as_tensor(), cp.var.as_tensor()),
                ("exp_avg", &gp.m, &cp.m),
            ] {
                let e = rel_err(a, b)?;
                checks += 1;
                if e.is_nan() || e > 1e-4 {
                    failed += 1;
                    println!(
                        "FAIL galore {what} {}: relative error {e:.3e} > 1e-4",
                        cp.name
                    );
                }
                if e > worst.1 {
                    worst = (format!("{what} {}", cp.name), e);
                }
            }
        }
        println!(
            "galore (rank 4, refresh at steps 1 and 3): {} tensors, worst {} at {:.3e} (tolerance 1e-4)",
            2 * cpu_opt.params.len(),
            worst.0,
            worst.1
        );
    }
    println!("PARITY {checks} checks, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
