//! `train`: one stage of training (full-rank, ReLoRA, LoRA, Control, …), resumable from its
//! checkpoints.
//!
//! Inputs: `data` (a tokenize stage) and optionally `init` (a train stage): its weights
//! (`init_mode: weights`, the warm start) or its whole training state (`init_mode:
//! continue`, for chained ReLoRA phases and for full training that continues a warm start).
//!
//! The data's journey through this folder: `params.rs` (what the YAML may say, checked at
//! plan time) → `method/` (what each method makes of it: the model, the restarts, the
//! schedule) → this file (data, model and trainer put together, outputs written).

pub mod method;
mod params;

pub use crate::record::TrainInfo;
pub use method::{relora_trainable, LoraBase, LoraParams, ReloraParams, TrainMethod};
pub use params::{
    model_config, InitMode, ModelDims, ModelParam, ParallelParams, ScheduleKind, TrainParams,
};

use crate::tensorboard::EventWriter;
use anyhow::{bail, Context, Result};
use relora_data::{
    read_sequences, DatasetManifest, Loader, LoaderConfig, PackSpec, Sequences, Split,
};
use relora_exec::{parse_params, Estimate, InputEstimate, Progress, StageContext, StageKind};
use relora_model::checkpoint::{self, load_tensors, save_tensors};
use relora_model::{
    AdamConfig, Llama, LlamaConfig, Rng, Schedule, StepMetrics, TrainConfig, Trainer,
};
use relora_spec::{Resources, SpecError, StageSpec};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

pub struct Train;

impl StageKind for Train {
    fn name(&self) -> &'static str {
        "train"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::TRAIN
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        Some(&[("data", true), ("init", false)])
    }
    fn cosmetic_params(&self) -> &'static [&'static str] {
        &["log_every", "checkpoint_every", "loader_threads"]
    }
    fn resources(&self, params: &Value) -> Resources {
        // Validation has run: a `parallel` that does not parse is never scheduled.
        let ranks = params
            .get("parallel")
            .and_then(|p| serde_json::from_value::<ParallelParams>(p.clone()).ok())
            .map_or(1, |p| p.ranks);
        let device = crate::device::resources_of(params);
        Resources {
            // One GPU per rank when the stage runs on GPUs.
            gpus: device.gpus * ranks as u32,
            // A binary without MPI starts the stage as one process, which says how to build
            // one with MPI; launching it under mpirun would fail first where Open MPI is
            // not installed, with a message about mpirun instead.
            ranks: if relora_parallel::HAS_MPI {
                ranks as u32
            } else {
                1
            },
            ..device
        }
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        parse_params::<TrainParams>(stage)?.check(stage)
    }
    fn estimate(
        &self,
        stage: &StageSpec,
        inputs: &BTreeMap<String, InputEstimate>,
        _cached: Option<&Path>,
    ) -> Result<Estimate> {
        let p: TrainParams = serde_json::from_value(stage.params.clone())?;
        let vocab = inputs
            .get("data")
            .and_then(|d| d.facts.get("vocab_size"))
            .and_then(Value::as_u64);
        let cfg = vocab
            .map(|v| stage_model_config(&p, v as usize))
            .transpose()?;
        crate::estimate::train(&p, cfg, inputs)
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        relora_model::alloc::keep_freed_memory();
        run_train(ctx)
    }
}

/// The shape this stage trains: the named or given model, as its method shapes it.
fn stage_model_config(p: &TrainParams, vocab: usize) -> Result<LlamaConfig> {
    Ok(p.method.model_config(p, model_config(&p.model, vocab)?))
}

/// The warm-start weights or a fresh init, as the method adapts them (LoRA branches).
fn build_model(
    p: &TrainParams,
    cfg: LlamaConfig,
    init_dir: Option<&Path>,
    device: &candle_core::Device,
) -> Result<Llama> {
    // Built and adapted on the host, then moved: a GPU never holds the dense W of a layer
    // whose method keeps it compact (lora.frozen), and the values are the same (every
    // draw is the host's).
    let host = candle_core::Device::Cpu;
    let mut rng = Rng::derive(p.seed, "init");
    let mut model = match (init_dir, p.init_mode) {
        (Some(dir), InitMode::Weights) => {
            let path = dir.join("model.safetensors");
            Llama::from_owned_tensors(cfg, load_tensors(&path, &host)?)
                .with_context(|| format!("loading {}", path.display()))?
        }
        _ => Llama::random(cfg, &mut rng, &host)?,
    };
    p.method
        .adapt_model(p, &mut model, init_dir.is_some(), &mut rng)?;
    if !device.is_cpu() {
        model = model.to_device(device)?;
    }
    // Parameters and moments stay f32 whatever the compute dtype (relora_model::precision).
    model.compute = p.dtype.dtype();
    model.checkpoint_activations = p.checkpoint_activations;
    Ok(model)
}

/// The stage's learning-rate schedule (a method may replace it: ReLoRA's jagged cosine).
fn schedule(p: &TrainParams, total: u64) -> Schedule {
    match p.schedule {
        ScheduleKind::Constant => Schedule::Constant { warmup: p.warmup },
        ScheduleKind::Cosine => Schedule::Cosine {
            warmup: p.warmup,
            total,
            min_ratio: p.min_lr_ratio,
        },
    }
}

/// The trainer's configuration, for a stage that starts at step `start_step`: the stage's
/// settings, then what its method adds or replaces.
fn train_config(p: &TrainParams, start_step: u64) -> TrainConfig {
    // Each rank accumulates its share of the step's micro-batches.
    let accum = (p.micro_batches_per_step() / p.ranks()).max(1);
    let total = p.total_steps.unwrap_or(start_step + p.steps);
    let mut cfg = TrainConfig {
        micro_batch: p.micro_batch,
        accum,
        lr: p.lr,
        schedule: schedule(p, total),
        clip_grad: p.clip_grad,
        adam: AdamConfig {
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
        },
        restarts: None,
        galore: None,
        checkpoint_every: p.checkpoint_every,
        eval_every: p.eval_every,
        eval_sequences: p.eval_sequences,
    };
    p.method.configure(p, total, &mut cfg);
    cfg
}

/// The training loader (continuing after what the init consumed, with its shuffle seed) and
/// the validation sequences of the periodic evaluation. Fails before any training when
/// either split is too small, so a rerun never repeats a long run to fail at its last step.
fn load_data(
    p: &TrainParams,
    data_dir: &Path,
    data: &DatasetManifest,
    init: Option<&TrainInfo>,
) -> Result<(Loader, Sequences)> {
    let spec = PackSpec {
        seq_len: p.seq_len,
        packing: p.packing,
        pad_id: data.pad_id,
        vocab_size: Some(data.vocab_size as u32),
    };
    let train = Split::new(data_dir, data.train.shards.clone());
    let available = train.sequences(p.seq_len, p.packing);
    if available < p.micro_batch as u64 {
        bail!(
            "the training split ({}) holds {available} sequences of {} tokens, fewer than one \
             micro-batch of {}",
            data_dir.join("train").display(),
            p.seq_len,
            p.micro_batch
        );
    }
    let valid = Split::new(data_dir, data.valid.shards.clone());
    let valid_seqs = read_sequences(&valid, &spec, p.eval_sequences.max(1))?;
    if valid_seqs.is_empty() {
        bail!(
            "the validation split ({}) holds no whole sequence of {} tokens, so the final \
             evaluation could not run; give the data stage more validation documents \
             (`valid_docs`, `valid_files`) or lower seq_len",
            data_dir.join("valid").display(),
            p.seq_len
        );
    }
    let mut loader = Loader::new(
        train,
        LoaderConfig {
            seq_len: p.seq_len,
            packing: p.packing,
            pad_id: data.pad_id,
            vocab_size: spec.vocab_size,
            seed: data_seed(p, init),
            window: p.shuffle_window,
            rank: 0,
            world: 1,
            threads: p.loader_threads,
        },
    )?;
    if let Some(info) = init {
        if loader.can_restore(&info.loader) {
            loader.restore(&info.loader)?;
        } else {
            println!(
                "note: the data, seq_len, packing or shuffle_window differ from the init run's; \
                 data starts from the beginning"
            );
        }
    }
    Ok((loader, valid_seqs))
}

/// The loader's seed: a stage that continues an init keeps reading in the init's order; an
/// init that read no data (an imported checkpoint) leaves the order to this stage's seed.
fn data_seed(p: &TrainParams, init: Option<&TrainInfo>) -> u64 {
    init.filter(|i| i.tokens > 0)
        .map_or(p.seed, |i| i.data_seed)
}

fn run_train(ctx: &mut StageContext) -> Result<()> {
    let p: TrainParams = serde_json::from_value(ctx.params.clone())?;
    // Join the data-parallel group first, so that a launch mistake fails before any work.
    // Ranks on GPUs take one each, and sum through NCCL; on the CPU, through MPI.
    let relora_parallel::Joined { comm, device } = relora_parallel::join(p.ranks(), |rank| {
        if p.ranks() > 1 && !ctx.gpus.is_empty() {
            relora_model::device(&format!("cuda:{}", rank_gpu(rank)))
        } else {
            p.device.open(&ctx.gpus)
        }
    })?;
    // Rank 0 writes everything: metrics, checkpoints, outputs, progress.
    let lead = comm.rank() == 0;
    let data_dir = ctx.input("data")?.to_path_buf();
    let data = DatasetManifest::read(&data_dir)?;
    let init_dir = ctx.inputs.get("init").cloned();
    let init_info = init_dir.as_deref().map(TrainInfo::read).transpose()?;

    let cfg = stage_model_config(&p, data.vocab_size)?;
    if let Some(note) = p.method.model_note(&p, &cfg) {
        println!("{note}");
    }
    if let Some(info) = &init_info {
        if info.model != cfg {
            bail!(
                "the init checkpoint is a {:?} model, this stage builds {:?}",
                info.model,
                cfg
            );
        }
        if info.tokenizer_blake3 != data.tokenizer_blake3 {
            bail!("the init checkpoint was trained with another tokenizer than this stage's data");
        }
    }
    let model = build_model(&p, cfg, init_dir.as_deref(), &device)?;
    println!(
        "{} trainable and {} frozen parameters ({}, {} compute)",
        model.trainable_count(),
        model.frozen_count(),
        p.method.summary(),
        p.dtype.name()
    );
    let (mut loader, valid_seqs) = load_data(&p, &data_dir, &data, init_info.as_ref())?;

    let start_step = match (&init_info, p.init_mode) {
        (Some(i), InitMode::Continue) => i.step,
        _ => 0,
    };
    let mut trainer = Trainer::new(model, train_config(&p, start_step), p.seed, device.clone())?
        .with_collective(comm);
    if let (Some(dir), InitMode::Continue) = (&init_dir, p.init_mode) {
        let ckpt = dir.join("checkpoint");
        trainer.state = checkpoint::load(&ckpt, &mut trainer.model, &mut trainer.opt, &device)
            .with_context(|| format!("continuing from {}", dir.display()))?;
        loader.restore(&trainer.state.loader)?;
    }
    let scratch = ctx.scratch_dir.clone();
    let metrics_path = scratch.join("metrics.jsonl");
    if let Some(step) = trainer.resume(&scratch.join("checkpoints"), &mut loader, &metrics_path)? {
        println!("resuming from the checkpoint at step {step}");
    } else {
        match (&init_dir, p.init_mode) {
            // A continued stage's metrics begin as a copy of its init's.
            (Some(init), InitMode::Continue) => {
                if lead {
                    std::fs::copy(init.join("metrics.jsonl"), &metrics_path)?;
                }
            }
            _ => {
                if lead {
                    let _ = std::fs::remove_file(&metrics_path);
                }
                if let Some(info) = &init_info {
                    trainer.state.tokens = info.tokens;
                }
            }
        }
    }
    let log_every = p.log_every.unwrap_or(10).max(1);
    // TensorBoard scalars beside the log (not among the outputs: they carry wall times).
    // A folder that cannot be written costs the charts, not the run.
    let mut events = match (lead, ctx.out_dir.parent()) {
        (true, Some(entry)) => match EventWriter::create(&entry.join("tensorboard")) {
            Ok(w) => Some(w),
            Err(e) => {
                println!("no TensorBoard events: {e}");
                None
            }
        },
        _ => None,
    };
    let history = trainer.run(
        &mut loader,
        Some(&valid_seqs),
        &scratch.join("checkpoints"),
        &metrics_path,
        start_step + p.steps,
        |m| {
            if lead {
                report_step(ctx, m, start_step, p.steps, log_every);
            }
            if let Some(w) = &mut events {
                if let Err(e) = w.scalars(m.step, &scalars(m)) {
                    println!("TensorBoard events stopped: {}: {e}", w.path().display());
                    events = None;
                }
            }
        },
    )?;
    if p.ranks() > 1 {
        // A timing: for the log and the manifest only.
        let t = trainer.comm_time;
        println!(
            "rank {}: {:.3} s in {} all-reduces of the gradients",
            trainer.comm.rank(),
            t.total.as_secs_f64(),
            t.calls
        );
        ctx.metric("allreduce_s", t.total.as_secs_f64());
    }
    if !lead {
        return Ok(());
    }

    let info = TrainInfo {
        model: cfg,
        method: p.method.name().to_string(),
        step: trainer.state.step,
        tokens: trainer.state.tokens,
        loader: loader.state(),
        data_seed: data_seed(&p, init_info.as_ref()),
        seq_len: p.seq_len,
        packing: p.packing,
        tokenizer_blake3: data.tokenizer_blake3.clone(),
        trainable_params: trainer.model.trainable_count(),
        frozen_params: trainer.model.frozen_count(),
        optimizer_state_floats: Some(trainer.opt.state_floats()),
        final_loss: history.last().map(|m| m.loss),
        eval_loss: history.last().and_then(|m| m.eval_loss),
        perplexity: history.last().and_then(|m| m.perplexity),
    };
    write_outputs(&ctx.out_dir, &trainer, &metrics_path, &info)?;
    record_metrics(ctx, &info, &history);
    // A timing: for the log and the manifest only.
    let waited = loader.waited().as_secs_f64();
    println!("waited {waited:.2}s in total for training data");
    ctx.metric("data_wait_s", waited);
    Ok(())
}

/// The CUDA ordinal a rank of a data-parallel group uses: its rank on this node among the
/// GPUs it sees. `mpirun` shows every local rank all the stage's GPUs; Slurm's
/// `--gpus-per-task` shows each task its own, as ordinal 0.
fn rank_gpu(rank: usize) -> usize {
    let local = ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
        .unwrap_or(rank);
    local % relora_exec::visible_gpus().len().max(1)
}

/// One step's progress line for the executor, and a log line every `log_every` steps.
/// A step's TensorBoard scalars.
fn scalars(m: &StepMetrics) -> Vec<(&'static str, f64)> {
    let mut v = vec![
        ("train/loss", m.loss),
        ("train/learning_rate", m.lr),
        ("train/grad_norm", m.grad_norm),
        ("train/tokens", m.tokens as f64),
        ("train/tokens_per_s", m.tokens_per_s),
    ];
    if let Some(l) = m.eval_loss {
        v.push(("eval/loss", l));
    }
    if let Some(p) = m.perplexity {
        v.push(("eval/perplexity", p));
    }
    if let Some(q) = m.quant_error {
        v.push(("train/quant_error", q));
    }
    v
}

fn report_step(ctx: &StageContext, m: &StepMetrics, start_step: u64, steps: u64, log_every: u64) {
    ctx.progress(&Progress {
        step: m.step - start_step,
        total: steps,
        loss: Some(m.loss),
        tokens_per_s: Some(m.tokens_per_s),
        note: m.event.clone(),
    });
    if m.step.is_multiple_of(log_every) || m.eval_loss.is_some() {
        println!(
            "step {} loss {:.4} lr {:.3e} grad_norm {:.3} tokens/s {:.0}{}{}",
            m.step,
            m.loss,
            m.lr,
            m.grad_norm,
            m.tokens_per_s,
            m.eval_loss
                .map(|l| format!(" eval_loss {l:.4} ppl {:.2}", l.exp()))
                .unwrap_or_default(),
            m.event
                .as_ref()
                .map(|e| format!(" [{e}]"))
                .unwrap_or_default()
        );
    }
}

/// Merged weights, the live low-rank update, the full training state, the metrics and the
/// stage's record: all of them functions of the key alone (no timings).
fn write_outputs(out: &Path, trainer: &Trainer, metrics: &Path, info: &TrainInfo) -> Result<()> {
    save_tensors(
        &trainer.model.merged_tensors()?,
        &out.join("model.safetensors"),
    )?;
    let mut lora_update = std::collections::HashMap::new();
    for (name, layer) in trainer.model.projections() {
        if let Some(d) = layer.lora_delta()? {
            lora_update.insert(format!("{name}.weight"), d);
        }
    }
    if !lora_update.is_empty() {
        save_tensors(&lora_update, &out.join("lora_update.safetensors"))?;
    }
    std::fs::create_dir_all(out.join("checkpoint"))
        .with_context(|| format!("creating {}", out.join("checkpoint").display()))?;
    checkpoint::write_folder(
        &out.join("checkpoint"),
        &trainer.model,
        &trainer.opt,
        &trainer.state,
    )?;
    std::fs::copy(metrics, out.join("metrics.jsonl"))?;
    std::fs::write(out.join("train.json"), serde_json::to_vec_pretty(info)?)?;
    Ok(())
}

/// The manifest's metrics (throughput included: the manifest is where timings belong).
fn record_metrics(ctx: &mut StageContext, info: &TrainInfo, history: &[StepMetrics]) {
    let tps: Vec<f64> = history.iter().skip(1).map(|m| m.tokens_per_s).collect();
    ctx.metric("trainable_params", info.trainable_params);
    ctx.metric("frozen_params", info.frozen_params);
    ctx.metric("step", info.step);
    ctx.metric("tokens", info.tokens);
    ctx.metric("first_loss", history.first().map(|m| m.loss));
    ctx.metric("final_loss", info.final_loss);
    ctx.metric("eval_loss", info.eval_loss);
    ctx.metric("perplexity", info.perplexity);
    ctx.metric(
        "tokens_per_s",
        (!tps.is_empty()).then(|| tps.iter().sum::<f64>() / tps.len() as f64),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use relora_data::Packing;
    use relora_model::{Llama, LoraInit, Rng};

    #[test]
    fn data_order_follows_a_warm_start_but_not_an_imported_checkpoint() {
        let p: TrainParams = serde_json::from_value(serde_json::json!({
            "model": "llama_9m", "method": "relora", "steps": 10, "lr": 1e-3, "seed": 7
        }))
        .unwrap();
        let info = |tokens: u64| TrainInfo {
            model: LlamaConfig::named("llama_9m", 300).unwrap(),
            method: "full".into(),
            step: 0,
            tokens,
            loader: Default::default(),
            data_seed: 3,
            seq_len: 32,
            packing: Packing::Concat,
            tokenizer_blake3: String::new(),
            trainable_params: 0,
            frozen_params: 0,
            optimizer_state_floats: None,
            final_loss: None,
            eval_loss: None,
            perplexity: None,
        };
        assert_eq!(data_seed(&p, None), 7);
        assert_eq!(
            data_seed(&p, Some(&info(5120))),
            3,
            "a warm start's order continues"
        );
        assert_eq!(data_seed(&p, Some(&info(0))), 7, "an import read no data");
    }

    #[test]
    fn parameter_counts_of_every_method_match_the_models() {
        let cfg = LlamaConfig {
            vocab_size: 300,
            hidden: 64,
            intermediate: 176,
            heads: 4,
            layers: 3,
        };
        let dev = candle_core::Device::Cpu;
        let mut rng = Rng::new(0);
        // Full: the config's formula.
        let full = Llama::random(cfg, &mut rng, &dev).unwrap();
        assert_eq!(full.trainable_count(), cfg.param_count());
        // ReLoRA (and LoRA over a frozen random W): embeddings, norms and the factors.
        let mut relora = Llama::random(cfg, &mut rng, &dev).unwrap();
        for (_, p) in relora.projections_mut() {
            p.add_lora(8, 32.0, 0.1, LoraInit::KaimingAZeroB, &mut rng)
                .unwrap();
        }
        assert_eq!(relora.trainable_count(), relora_trainable(&cfg, 8));
        assert_eq!(
            relora.frozen_count(),
            cfg.layers * (4 * 64 * 64 + 3 * 64 * 176)
        );
        // LoRA without W: the same trainable count, nothing frozen.
        let mut factorised = Llama::random(cfg, &mut rng, &dev).unwrap();
        for (_, p) in factorised.projections_mut() {
            p.add_lora(8, 32.0, 0.1, LoraInit::KaimingBoth, &mut rng)
                .unwrap();
            p.weight = None;
        }
        assert_eq!(factorised.trainable_count(), relora_trainable(&cfg, 8));
        assert_eq!(factorised.frozen_count(), 0);
        // Control: a full-rank model with ReLoRA's trainable count, to within 0.5%.
        let control = relora_model::control_config(cfg, relora_trainable(&cfg, 8));
        let n = Llama::random(control, &mut rng, &dev)
            .unwrap()
            .trainable_count();
        let target = relora_trainable(&cfg, 8) as f64;
        assert!(
            (n as f64 - target).abs() / target < 0.05,
            "control {n} vs {target}"
        );
        assert_eq!((control.layers, control.heads), (cfg.layers, cfg.heads));
        assert!(control.hidden < cfg.hidden);
    }
}
