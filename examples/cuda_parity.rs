//! CPU against CUDA: the same tiny model, forward and backward, in f32 and bf16, full-rank and
//! ReLoRA; then one clipped AdamW step, a merge-and-reinit and a magnitude reset of the LoRA
//! moments on both devices. Every tensor is compared as ‖gpu − cpu‖ / ‖cpu‖ against 1e-4 (f32)
//! or 1e-2 (bf16; the CPU side is the emulated bf16 of `relora_model::precision`).
//!
//!   cargo run --release --features cuda --example cuda_parity [-- --device cuda:0]
//!
//! Prints one line per check and a summary; exits non-zero if any check fails.

use candle_core::{DType, Device, Tensor};
use relora_data::Batch;
use relora_model::llama::cross_entropy;
use relora_model::optim::clip_grad_norm;
use relora_model::train::batch_tensors;
use relora_model::{AdamConfig, AdamW, Llama, LlamaConfig, LoraInit, ResetMode, Rng};

const CFG: LlamaConfig = LlamaConfig {
    vocab_size: 512,
    hidden: 64,
    intermediate: 172,
    heads: 4,
    layers: 2,
};

fn rel_err(gpu: &Tensor, cpu: &Tensor) -> anyhow::Result<f64> {
    let a = gpu.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = cpu.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((diff / norm.max(1e-30)).sqrt())
}

/// The model as `dev` builds it from fixed seeds: identical weights on every device.
fn build(dev: &Device, lora: bool, compute: DType) -> anyhow::Result<Llama> {
    let mut rng = Rng::new(7);
    let mut m = Llama::random(CFG, &mut rng, dev)?;
    if lora {
        for (_, p) in m.projections_mut() {
            // Both factors non-zero so every LoRA gradient is exercised; no dropout, whose
            // mask would be the same on both devices anyway.
            p.add_lora(8, 32.0, 0.0, LoraInit::KaimingBoth, &mut rng)?;
        }
    }
    m.compute = compute;
    Ok(m)
}

struct Side {
    model: Llama,
    logits: Tensor,
    loss: f64,
    grads: Vec<Tensor>,
    opt: AdamW,
}

fn run(dev: &Device, lora: bool, compute: DType, b: &Batch) -> anyhow::Result<Side> {
    let mut model = build(dev, lora, compute)?;
    let (ids, targets, weights) = batch_tensors(b, dev)?;
    let logits = model.forward(&ids, None)?;
    let flat = logits.reshape((b.batch_size * b.len, CFG.vocab_size))?;
    let loss_t = cross_entropy(&flat, &targets, &weights)?;
    let loss = loss_t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let store = loss_t.backward()?;
    let mut grads: Vec<Tensor> = model
        .trainable()
        .iter()
        .map(|(n, v, _)| {
            store
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{n}: no gradient"))
        })
        .collect::<anyhow::Result<_>>()?;
    let reported = grads.clone();
    let mut opt = AdamW::new(model.trainable(), AdamConfig::default())?;
    clip_grad_norm(&mut grads, Some(1.0))?;
    opt.step(&grads, 1e-3)?;
    if lora {
        let mut rng = Rng::new(99);
        for (_, p) in model.projections_mut() {
            p.merge_and_reinit(&mut rng)?;
        }
        opt.reset_lora(ResetMode::Magnitude { fraction: 0.9 }, &mut Rng::new(5))?;
    }
    Ok(Side {
        model,
        logits,
        loss,
        grads: reported,
        opt,
    })
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let spec = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1))
        .map_or("cuda", String::as_str);
    let gpu = relora_model::device(spec)?;
    let mut rng = Rng::new(3);
    let (bsz, t) = (4, 64);
    let toks: Vec<u32> = (0..bsz * (t + 1))
        .map(|_| rng.next_u32() % CFG.vocab_size as u32)
        .collect();
    let mask = vec![1u8; t + 1];
    let b = Batch::from_rows((0..bsz).map(|i| (&toks[i * (t + 1)..(i + 1) * (t + 1)], &mask[..])));

    let (mut checks, mut failed) = (0, 0);
    for lora in [false, true] {
        for compute in [DType::F32, DType::BF16] {
            let tol = if compute == DType::F32 { 1e-4 } else { 1e-2 };
            let what = format!(
                "{} {}",
                if lora { "relora" } else { "full" },
                if compute == DType::F32 { "f32" } else { "bf16" }
            );
            let c = run(&Device::Cpu, lora, compute, &b)?;
            let g = run(&gpu, lora, compute, &b)?;
            let mut pairs: Vec<(String, f64)> = vec![
                ("logits".into(), rel_err(&g.logits, &c.logits)?),
                ("loss".into(), ((g.loss - c.loss) / c.loss).abs()),
            ];
            let names = c.model.trainable();
            for (k, (n, _, _)) in names.iter().enumerate() {
                pairs.push((format!("grad {n}"), rel_err(&g.grads[k], &c.grads[k])?));
            }
            // After the AdamW step, the merge and the reset: weights (W holds the merged
            // update) and the moments the reset pruned.
            let (gs, cs) = (g.model.state_tensors(), c.model.state_tensors());
            for (n, ct) in &cs {
                pairs.push((format!("after step {n}"), rel_err(&gs[n], ct)?));
            }
            for (gp, cp) in g.opt.params.iter().zip(&c.opt.params) {
                if cp.is_lora {
                    // The reset keeps the top 10% by magnitude; elements within rounding of
                    // the threshold may fall either side, so compare the norms.
                    pairs.push((format!("exp_avg {}", cp.name), rel_err(&gp.m, &cp.m)?));
                }
            }
            let mut max = (String::new(), 0f64);
            for (n, e) in &pairs {
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
    }
    // LoRA dropout draws its masks on the device: the same run RNG gives the same masks,
    // another gives others, and the mask keeps 90% of inputs at 1/0.9.
    {
        let mut m = build(&gpu, false, DType::F32)?;
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
    println!("PARITY {checks} checks, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
    Ok(())
}
