//! Training-step benchmark: the same LLaMA model and batch as examples/bench/torch_step.py
//! (PyTorch eager); examples/bench/vs_pytorch.sh runs the two back to back.
//!
//! cargo run --release --example bench_step -- --vocab 8000 --hidden 512 --inter 1376 \
//!     --heads 8 --layers 4 --seq 256 --batch 8 --steps 20 [--lora-rank 32]
//!     [--galore-rank 128 [--galore-gap 200]] [--lora-rank 32 --frozen bf16|int8|nf4]
//!     [--model llama_350m] [--device cuda] [--dtype bf16] [--reference-ops] [--malloc-default]
//!     [--kernels baseline|avx2|avx512] [--checkpoint-activations]
//!
//! `--checkpoint-activations` recomputes each block in the backward pass
//! (relora_model::recompute), keeping only the blocks' inputs from the forward pass.
//! `--kernels` caps the instruction set of the elementwise kernels (`relora_model::fused::simd`;
//! the default is the best this CPU has; gemm's matmul kernels are chosen by gemm alone).
//! `--reference-ops` times the reference composition of candle primitives instead of the
//! fused ops (crates/model/src/fused). No gradient clipping and 5 warm-up steps (`--warmup N`), as the
//! PyTorch script. Prints forward, backward and optimizer milliseconds (medians), tokens/s,
//! and an MFU estimate: model FLOPs (6·N + attention per token, for LoRA too) against this
//! device's measured matmul rate in the compute dtype, and with `--peak-tflops P` also against
//! a datasheet peak (989 for H100/H200 SXM dense bf16, as llm.c and torchtitan report MFU).
//! On the CPU it prints peak resident memory during the steps (`peak_rss_mib`; the kernel's
//! high-water mark is reset once the model is built, whose own peak is `build_peak_rss_mib`;
//! use `--malloc-default` so that memory freed after building leaves the process); on CUDA the most device
//! memory seen in use (sampled after each forward and backward pass).
//!
//! `--galore-rank R`: GaLore's projected Adam on the seven projections (full-rank weights).
//! Its subspace refresh (an SVD of every projection's gradient, every `--galore-gap` steps)
//! is timed on its own after the run and printed with its cost amortised per step.

use candle_core::{DType, Device, Tensor};
use relora_data::Batch;
use relora_model::train::batch_loss;
use relora_model::{AdamConfig, AdamW, Llama, LlamaConfig, LoraInit, Rng};
use std::time::Instant;

fn arg_str(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn arg(name: &str, default: usize) -> usize {
    arg_str(name).map_or(default, |v| v.parse().expect("a number"))
}

/// Device memory in use now, in MiB (CUDA only).
fn device_used_mib(dev: &Device) -> f64 {
    #[cfg(feature = "cuda")]
    if let Ok(d) = dev.as_cuda_device() {
        if let Ok((free, total)) = d.cuda_stream().context().mem_get_info() {
            return (total - free) as f64 / 1048576.0;
        }
    }
    let _ = dev;
    0.0
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM")).map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
            })
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// The device's matmul rate in `dtype`, GFLOP/s: the denominator of MFU.
fn matmul_gflops(dev: &Device, dtype: DType) -> f64 {
    let n = if dev.is_cpu() { 1024 } else { 8192 };
    let a = Tensor::ones((n, n), DType::F32, dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let mm = |a: &Tensor| relora_model::precision::matmul(a, a).unwrap();
    let _ = mm(&a);
    dev.synchronize().unwrap();
    let t = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        let _ = mm(&a);
    }
    dev.synchronize().unwrap();
    2.0 * (n * n * n * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    // As train stages run (see relora_model::alloc); --malloc-default measures without it.
    if !std::env::args().any(|a| a == "--malloc-default") {
        relora_model::alloc::keep_freed_memory();
    }
    let vocab = arg("--vocab", 8000);
    let cfg = match arg_str("--model") {
        Some(name) => LlamaConfig::named(&name, vocab).expect("a model name such as llama_60m"),
        None => LlamaConfig {
            vocab_size: vocab,
            hidden: arg("--hidden", 512),
            intermediate: arg("--inter", 1376),
            heads: arg("--heads", 8),
            layers: arg("--layers", 4),
        },
    };
    let (seq, batch, steps, rank) = (
        arg("--seq", 256),
        arg("--batch", 8),
        arg("--steps", 20),
        arg("--lora-rank", 0),
    );
    let dev = relora_model::device(arg_str("--device").as_deref().unwrap_or("cpu"))?;
    if let Some(k) = arg_str("--kernels") {
        use relora_model::fused::simd::{force, Level};
        force(
            Level::from_name(&k)
                .ok_or_else(|| anyhow::anyhow!("--kernels {k}: baseline, avx2 or avx512"))?,
        );
    }
    let dtype_name = arg_str("--dtype").unwrap_or_else(|| "f32".into());
    let dtype = match dtype_name.as_str() {
        "f32" => DType::F32,
        "bf16" => DType::BF16,
        other => anyhow::bail!("--dtype {other}: use f32 or bf16"),
    };
    let peak = matmul_gflops(&dev, dtype);
    let mut rng = Rng::new(0);
    // Built on the host and moved, as the train stage builds: a GPU never holds the dense
    // W of a layer kept compact.
    let mut model = Llama::random(cfg, &mut rng, &Device::Cpu)?;
    model.compute = dtype;
    let checkpointed = std::env::args().any(|a| a == "--checkpoint-activations");
    model.checkpoint_activations = checkpointed;
    let reference = std::env::args().any(|a| a == "--reference-ops");
    if reference {
        model.ops = relora_model::fused::Ops::Reference;
    }
    // The frozen W's format (`--frozen`, with --lora-rank): f32 unless asked.
    let frozen = match arg_str("--frozen").as_deref() {
        None | Some("f32") => relora_model::quant::FrozenFormat::F32,
        Some("bf16") => relora_model::quant::FrozenFormat::Bf16,
        Some("int8") => relora_model::quant::FrozenFormat::Int8,
        Some("nf4") => relora_model::quant::FrozenFormat::Nf4,
        Some(other) => anyhow::bail!("--frozen {other}: use f32, bf16, int8 or nf4"),
    };
    if rank > 0 {
        for (_, p) in model.projections_mut() {
            p.add_lora(rank, 32.0, 0.0, LoraInit::KaimingAZeroB, &mut rng)?;
            // NF4 blocks of 64 weights, QLoRA's.
            p.quantize_frozen(frozen, 64)?;
        }
    }
    if !dev.is_cpu() {
        model = model.to_device(&dev)?;
    }
    let mut opt = AdamW::new(model.trainable(), AdamConfig::default())?;
    let galore = arg("--galore-rank", 0);
    let gap = arg("--galore-gap", 200);
    if galore > 0 {
        let names: Vec<String> = model
            .projections()
            .map(|(n, _)| format!("{n}.weight"))
            .collect();
        opt.use_galore(
            relora_model::GaloreConfig {
                rank: galore,
                update_proj_gap: gap as u64,
                scale: 0.25,
                proj_type: relora_model::ProjType::Std,
            },
            |n| names.iter().any(|x| x == n),
        )?;
    }
    let mut last_grads = Vec::new();
    // The peak so far is building the model (all of it in f32 first, then each frozen W
    // converted); the step's peak is measured from here, after resetting the kernel's
    // high-water mark (with --malloc-default, so freed memory leaves the process).
    let build_peak = peak_rss_mib();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let toks: Vec<u32> = (0..batch * (seq + 1))
        .map(|_| rng.next_u32() % cfg.vocab_size as u32)
        .collect();
    let mask = vec![1u8; seq + 1];
    let b = Batch::from_rows(
        (0..batch).map(|i| (&toks[i * (seq + 1)..(i + 1) * (seq + 1)], &mask[..])),
    );
    let (mut fwd, mut bwd, mut opt_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut dev_mib = 0f64;
    let warmup = arg("--warmup", 5);
    for step in 0..steps + warmup {
        let t0 = Instant::now();
        let loss = batch_loss(&model, &b, &dev, None)?;
        let _ = loss.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let t1 = Instant::now();
        dev_mib = dev_mib.max(device_used_mib(&dev));
        let store = model.backward(&loss)?;
        dev.synchronize()?;
        dev_mib = dev_mib.max(device_used_mib(&dev));
        let params = model.trainable();
        let grads: Vec<Tensor> = params
            .iter()
            .map(|(_, v, _)| {
                store
                    .get(v.as_tensor())
                    .cloned()
                    .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap())
            })
            .collect();
        let t2 = Instant::now();
        opt.step(&grads, 1e-3)?;
        dev.synchronize()?;
        let t3 = Instant::now();
        if galore > 0 && step + 1 == steps + warmup {
            last_grads = grads;
        }
        if step >= warmup {
            fwd.push((t1 - t0).as_secs_f64() * 1e3);
            bwd.push((t2 - t1).as_secs_f64() * 1e3);
            opt_ms.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    let (f, bw, mut o) = (median(&mut fwd), median(&mut bwd), median(&mut opt_ms));
    // GaLore: one refresh of every projection's subspace, timed alone, amortised over the gap
    // into the optimizer's per-step time.
    let mut refresh_note = String::new();
    if galore > 0 {
        let t = Instant::now();
        for (p, g) in opt.params.iter_mut().zip(&last_grads) {
            if let Some(proj) = &mut p.galore {
                proj.refresh(g)?;
            }
        }
        dev.synchronize()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        refresh_note = format!(" galore_refresh_ms={ms:.1} galore_gap={gap}");
        o += ms / gap as f64;
    }
    let tokens = (batch * seq) as f64;
    let tps = tokens / ((f + bw + o) / 1e3);
    // LoRA skips the frozen weights' gradient: about 4·N instead of 6·N for those matmuls.
    let flops = cfg.flops_per_token(seq);
    let mfu = flops * tps / (peak * 1e9);
    let datasheet = arg_str("--peak-tflops")
        .map(|p| {
            let p: f64 = p.parse().expect("--peak-tflops: a number of TFLOP/s");
            format!(
                " mfu_vs_datasheet={:.1}% datasheet_tflops={p}",
                flops * tps / (p * 1e12) * 100.0
            )
        })
        .unwrap_or_default();
    println!(
        "RESULT {}{}{} device={dev:?} isa={} kernels={} dtype={dtype_name} params={} trainable={} batch={batch}x{seq} fwd_ms={f:.1} bwd_ms={bw:.1} opt_ms={o:.1} tokens_per_s={tps:.0} mfu_vs_matmul={:.1}% matmul_gflops={peak:.0}{datasheet} peak_rss_mib={:.0} build_peak_rss_mib={build_peak:.0} device_mem_mib={dev_mib:.0}{refresh_note}",
        match (rank, galore) {
            (r, _) if r > 0 => format!("lora-r{r}-{}", frozen.name()),
            (_, g) if g > 0 => format!("galore-r{g}"),
            _ => "full".into(),
        },
        if reference { "-reference-ops" } else { "" },
        if checkpointed { "-checkpointed" } else { "" },
        relora_model::fused::gemm::isa(),
        relora_model::fused::simd::level().name(),
        cfg.param_count(),
        model.trainable_count(),
        mfu * 100.0,
        peak_rss_mib()
    );
    Ok(())
}
