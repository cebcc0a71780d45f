//! `train`: full-rank, ReLoRA, LoRA and Control training, with resume from checkpoints.
//!
//! Inputs: `data` (a tokenize stage) and optionally `init` (a train stage): its weights
//! (`init_mode: weights`, the warm start) or its whole training state (`init_mode:
//! continue`, for chained ReLoRA phases and for full training that continues a warm start).

use anyhow::{bail, Context, Result};
use relora_data::{pack, read_split, DatasetManifest, Loader, LoaderState, Packing};
use relora_exec::{parse_params, Progress, StageContext, StageKind};
use relora_model::checkpoint::{self, load_tensors, save_tensors};
use relora_model::precision::Precision;
use relora_model::{
    control_config, AdamConfig, Llama, LlamaConfig, LoraInit, ResetMode, Restarts, Rng, Schedule,
    TrainConfig, Trainer,
};
use relora_spec::{Resources, SpecError, StageSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ModelParam {
    Named(String),
    Dims {
        hidden: usize,
        intermediate: usize,
        heads: usize,
        layers: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Full,
    Relora,
    Lora,
    Control,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBase {
    /// A frozen random W plus the low-rank branch.
    FrozenRandom,
    /// A pure factorised layer, no W (the May 2023 reference code's LoRA baseline).
    None,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraParams {
    #[serde(default = "d_rank")]
    pub rank: usize,
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    #[serde(default = "d_dropout")]
    pub dropout: f32,
    /// Default: kaiming_a_zero_b on a warm start, kaiming_both from scratch.
    #[serde(default)]
    pub init: Option<LoraInit>,
    #[serde(default = "d_base")]
    pub base: LoraBase,
}

impl Default for LoraParams {
    fn default() -> Self {
        LoraParams {
            rank: d_rank(),
            alpha: d_alpha(),
            dropout: d_dropout(),
            init: None,
            base: d_base(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReloraParams {
    pub merge_every: u64,
    /// Default: merge_every.
    #[serde(default)]
    pub reset_every: Option<u64>,
    #[serde(default = "d_reset")]
    pub reset: ResetMode,
    /// Ablation switches.
    #[serde(default = "d_true")]
    pub restarts: bool,
    #[serde(default = "d_true")]
    pub optimizer_reset: bool,
    #[serde(default = "d_true")]
    pub jagged: bool,
    #[serde(default)]
    pub restart_warmup: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InitMode {
    Weights,
    Continue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    Cosine,
    Constant,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainParams {
    pub model: ModelParam,
    pub method: Method,
    /// Optimizer steps in this stage.
    pub steps: u64,
    #[serde(default = "d_seq_len")]
    pub seq_len: usize,
    #[serde(default = "d_micro")]
    pub micro_batch: usize,
    /// Tokens per optimizer step; reached by gradient accumulation. Default: one micro-batch.
    #[serde(default)]
    pub batch_tokens: Option<usize>,
    pub lr: f64,
    #[serde(default = "d_min_lr")]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub warmup: u64,
    #[serde(default = "d_schedule")]
    pub schedule: ScheduleKind,
    /// The schedule's horizon (steps of the whole run across chained stages). Default: the
    /// steps of this stage, plus those of a continued init.
    #[serde(default)]
    pub total_steps: Option<u64>,
    #[serde(default = "d_clip")]
    pub clip_grad: Option<f64>,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub beta1: f64,
    #[serde(default = "d_beta2")]
    pub beta2: f64,
    #[serde(default = "d_eps")]
    pub eps: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub packing: Packing,
    #[serde(default = "d_device")]
    pub device: String,
    #[serde(default)]
    pub dtype: Precision,
    #[serde(default = "d_ckpt")]
    pub checkpoint_every: u64,
    #[serde(default)]
    pub eval_every: u64,
    #[serde(default = "d_eval_seq")]
    pub eval_sequences: usize,
    #[serde(default = "d_init_mode")]
    pub init_mode: InitMode,
    #[serde(default)]
    pub lora: Option<LoraParams>,
    #[serde(default)]
    pub relora: Option<ReloraParams>,
    /// Cosmetic.
    #[serde(default)]
    pub log_every: Option<u64>,
}

fn d_rank() -> usize {
    128
}
fn d_alpha() -> f64 {
    32.0
}
fn d_dropout() -> f32 {
    0.1
}
fn d_base() -> LoraBase {
    LoraBase::FrozenRandom
}
fn d_reset() -> ResetMode {
    ResetMode::Magnitude { fraction: 0.99 }
}
fn d_true() -> bool {
    true
}
fn d_seq_len() -> usize {
    256
}
fn d_micro() -> usize {
    8
}
fn d_min_lr() -> f64 {
    0.1
}
fn d_schedule() -> ScheduleKind {
    ScheduleKind::Cosine
}
fn d_clip() -> Option<f64> {
    Some(1.0)
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_device() -> String {
    "cpu".into()
}
fn d_ckpt() -> u64 {
    100
}
fn d_eval_seq() -> usize {
    64
}
fn d_init_mode() -> InitMode {
    InitMode::Weights
}

/// What a train stage records about itself for the stages that consume it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainInfo {
    pub model: LlamaConfig,
    pub method: Method,
    pub step: u64,
    pub tokens: u64,
    pub loader: LoaderState,
    pub data_seed: u64,
    pub seq_len: usize,
    pub packing: Packing,
    pub tokenizer_blake3: String,
    pub trainable_params: usize,
    pub frozen_params: usize,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub perplexity: Option<f64>,
}

impl TrainInfo {
    pub fn read(dir: &Path) -> Result<TrainInfo> {
        let p = dir.join("train.json");
        serde_json::from_slice(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a train stage's record", p.display()))
    }
}

pub fn model_config(m: &ModelParam, vocab: usize) -> Result<LlamaConfig> {
    let cfg = match m {
        ModelParam::Named(n) => LlamaConfig::named(n, vocab).with_context(|| {
            let names: Vec<&str> = relora_model::config::NAMED.iter().map(|c| c.0).collect();
            format!("unknown model `{n}`; known: {}", names.join(", "))
        })?,
        ModelParam::Dims {
            hidden,
            intermediate,
            heads,
            layers,
        } => LlamaConfig {
            vocab_size: vocab,
            hidden: *hidden,
            intermediate: *intermediate,
            heads: *heads,
            layers: *layers,
        },
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

/// Trainable parameters of `cfg` wrapped with rank-`r` LoRA (what Control is sized to).
pub fn relora_trainable(cfg: &LlamaConfig, r: usize) -> usize {
    let (h, i) = (cfg.hidden, cfg.intermediate);
    let lora = 4 * r * 2 * h + 3 * r * (h + i);
    2 * cfg.vocab_size * h + cfg.layers * (lora + 2 * h) + h
}

pub struct Train;

impl StageKind for Train {
    fn name(&self) -> &'static str {
        "train"
    }
    fn version(&self) -> u32 {
        1
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        Some(&[("data", true), ("init", false)])
    }
    fn cosmetic_params(&self) -> &'static [&'static str] {
        &["log_every", "checkpoint_every"]
    }
    fn resources(&self, params: &Value) -> Resources {
        crate::device_resources(params)
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let p: TrainParams = parse_params(stage)?;
        let mut e = Vec::new();
        if let ModelParam::Named(_) = &p.model {
            if let Err(err) = model_config(&p.model, 32) {
                e.push(stage.error(&["params", "model"], format!("{err:#}")));
            }
        }
        if p.steps == 0 {
            e.push(stage.error(&["params", "steps"], "steps must be at least 1"));
        }
        if p.method == Method::Relora && p.relora.is_none() {
            e.push(stage.error(
                &["params"],
                "method `relora` needs a `relora:` section (merge_every, ...)",
            ));
        }
        if p.method != Method::Relora && p.relora.is_some() {
            e.push(stage.error(
                &["params", "relora"],
                format!("`relora:` is only for method relora, not {:?}", p.method),
            ));
        }
        if p.init_mode == InitMode::Continue && !stage.inputs.contains_key("init") {
            e.push(stage.error(
                &["params", "init_mode"],
                "init_mode continue needs an `init` input",
            ));
        }
        if p.method == Method::Control && stage.inputs.contains_key("init") {
            e.push(stage.error(
                &["inputs", "init"],
                "Control is a smaller model trained from scratch; it takes no init",
            ));
        }
        if let Some(b) = p.batch_tokens {
            if b % (p.micro_batch * p.seq_len) != 0 {
                e.push(stage.error(
                    &["params", "batch_tokens"],
                    format!(
                        "batch_tokens ({b}) must be a multiple of micro_batch × seq_len ({})",
                        p.micro_batch * p.seq_len
                    ),
                ));
            }
        }
        relora_spec::no_errors(e)
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        run_train(ctx)
    }
}

fn run_train(ctx: &mut StageContext) -> Result<()> {
    let p: TrainParams = serde_json::from_value(ctx.params.clone())?;
    let device = relora_model::device(&p.device)?;
    let data_dir = ctx.input("data")?.to_path_buf();
    let data = DatasetManifest::read(&data_dir)?;
    let init_dir = ctx.inputs.get("init").cloned();
    let init_info = init_dir.as_deref().map(TrainInfo::read).transpose()?;

    // The model's shape.
    let base_cfg = model_config(&p.model, data.vocab_size)?;
    let lora = p.lora.clone().unwrap_or_default();
    let cfg = match p.method {
        Method::Control => {
            let target = relora_trainable(&base_cfg, lora.rank);
            let c = control_config(base_cfg, target);
            println!(
                "Control: hidden {} intermediate {} ({} trainable parameters; ReLoRA rank {} on {:?} trains {target})",
                c.hidden, c.intermediate, c.param_count(), lora.rank, p.model
            );
            c
        }
        _ => base_cfg,
    };
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

    // Build the model: warm-start weights or a fresh init, then LoRA where the method asks.
    let mut rng = Rng::derive(p.seed, "init");
    let mut model = match (&init_dir, p.init_mode) {
        (Some(dir), InitMode::Weights) => {
            let t = load_tensors(&dir.join("model.safetensors"), &device)?;
            Llama::from_tensors(cfg, &t)
                .with_context(|| format!("loading {}", dir.join("model.safetensors").display()))?
        }
        _ => Llama::random(cfg, &mut rng, &device)?,
    };
    if matches!(p.method, Method::Relora | Method::Lora) {
        let warm = init_dir.is_some();
        let init = lora.init.unwrap_or(if warm || p.method == Method::Relora {
            LoraInit::KaimingAZeroB
        } else {
            LoraInit::KaimingBoth
        });
        if p.method == Method::Relora && lora.base == LoraBase::None {
            bail!("ReLoRA merges into W, so `lora.base: none` is only for method lora");
        }
        for (_, layer) in model.projections_mut() {
            layer.add_lora(lora.rank, lora.alpha, lora.dropout, init, &mut rng)?;
            if lora.base == LoraBase::None && !warm {
                layer.weight = None;
            }
        }
    }
    // Parameters and moments stay f32 whatever the compute dtype (crate::precision).
    model.compute = p.dtype.dtype();
    println!(
        "{} trainable and {} frozen parameters ({:?}, {} compute)",
        model.trainable_count(),
        model.frozen_count(),
        p.method,
        p.dtype.name()
    );

    // Data: continue after what the init consumed, with its shuffle seed.
    let train_docs = read_split(&data_dir.join("train"))?;
    let valid_docs = read_split(&data_dir.join("valid"))?;
    let pad = data.pad_id;
    let train_seqs = pack(&train_docs, p.seq_len, p.packing, pad);
    let valid_seqs = pack(&valid_docs, p.seq_len, p.packing, pad);
    if train_seqs.len() < p.micro_batch {
        bail!(
            "the training split holds {} sequences of {} tokens, fewer than one micro-batch",
            train_seqs.len(),
            p.seq_len
        );
    }
    let data_seed = init_info.as_ref().map_or(p.seed, |i| i.data_seed);
    let mut loader = Loader::new(train_seqs, data_seed, 0, 1);
    if let Some(info) = &init_info {
        if info.seq_len == p.seq_len && info.packing == p.packing {
            loader.restore(info.loader);
        } else {
            println!(
                "note: seq_len or packing differ from the init run; data starts from the beginning"
            );
        }
    }

    // Optimizer, schedule, restarts.
    let accum = p
        .batch_tokens
        .map_or(1, |b| b / (p.micro_batch * p.seq_len))
        .max(1);
    let start_step = match (&init_info, p.init_mode) {
        (Some(i), InitMode::Continue) => i.step,
        _ => 0,
    };
    let total = p.total_steps.unwrap_or(start_step + p.steps);
    let relora = p.relora.clone();
    let schedule = match (&relora, p.schedule) {
        (Some(r), _) if r.jagged && r.restarts => Schedule::Jagged {
            warmup: p.warmup,
            restart_warmup: r.restart_warmup,
            cycle: r.merge_every,
            total,
            min_ratio: p.min_lr_ratio,
        },
        (_, ScheduleKind::Constant) => Schedule::Constant { warmup: p.warmup },
        _ => Schedule::Cosine {
            warmup: p.warmup,
            total,
            min_ratio: p.min_lr_ratio,
        },
    };
    let restarts = relora.as_ref().map(|r| Restarts {
        merge_every: r.restarts.then_some(r.merge_every),
        reset_every: r
            .optimizer_reset
            .then_some(r.reset_every.unwrap_or(r.merge_every)),
        reset: r.reset,
    });
    let tcfg = TrainConfig {
        micro_batch: p.micro_batch,
        accum,
        lr: p.lr,
        schedule,
        clip_grad: p.clip_grad,
        adam: AdamConfig {
            beta1: p.beta1,
            beta2: p.beta2,
            eps: p.eps,
            weight_decay: p.weight_decay,
        },
        restarts,
        checkpoint_every: p.checkpoint_every,
        eval_every: p.eval_every,
        eval_sequences: p.eval_sequences,
    };
    let mut trainer = Trainer::new(model, tcfg, p.seed, device.clone())?;
    if let (Some(dir), InitMode::Continue) = (&init_dir, p.init_mode) {
        let st = checkpoint::load(
            &dir.join("checkpoint"),
            &trainer.model,
            &mut trainer.opt,
            &device,
        )
        .with_context(|| format!("continuing from {}", dir.display()))?;
        trainer.state = st;
        loader.restore(trainer.state.loader);
    }
    let scratch = ctx.scratch_dir.clone();
    let metrics_path = scratch.join("metrics.jsonl");
    if let Some(step) = trainer.resume(&scratch.join("checkpoints"), &mut loader, &metrics_path)? {
        println!("resuming from the checkpoint at step {step}");
    } else {
        match (&init_dir, p.init_mode) {
            // A continued stage's metrics begin as a copy of its init's.
            (Some(init), InitMode::Continue) => {
                std::fs::copy(init.join("metrics.jsonl"), &metrics_path)?;
            }
            _ => {
                let _ = std::fs::remove_file(&metrics_path);
                if let Some(info) = &init_info {
                    trainer.state.tokens = info.tokens;
                }
            }
        }
    }
    let end = start_step + p.steps;
    let log_every = p.log_every.unwrap_or(10).max(1);
    let history = trainer.run(
        &mut loader,
        Some(&valid_seqs),
        &scratch.join("checkpoints"),
        &metrics_path,
        end,
        |m| {
            ctx.progress(&Progress {
                step: m.step - start_step,
                total: p.steps,
                loss: Some(m.loss),
                tokens_per_s: Some(m.tokens_per_s),
                note: m.event.clone(),
            });
            if m.step % log_every == 0 || m.eval_loss.is_some() {
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
        },
    )?;

    // Outputs: merged weights, the live low-rank update, the full state, metrics, a record.
    let out = ctx.out_dir.clone();
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
    std::fs::create_dir_all(out.join("checkpoint"))?;
    checkpoint::write_folder(
        &out.join("checkpoint"),
        &trainer.model,
        &trainer.opt,
        &trainer.state,
    )?;
    std::fs::copy(&metrics_path, out.join("metrics.jsonl"))?;
    let last = history.last();
    let info = TrainInfo {
        model: cfg,
        method: p.method,
        step: trainer.state.step,
        tokens: trainer.state.tokens,
        loader: loader.state(),
        data_seed,
        seq_len: p.seq_len,
        packing: p.packing,
        tokenizer_blake3: data.tokenizer_blake3.clone(),
        trainable_params: trainer.model.trainable_count(),
        frozen_params: trainer.model.frozen_count(),
        final_loss: last.map(|m| m.loss),
        eval_loss: last.and_then(|m| m.eval_loss),
        perplexity: last.and_then(|m| m.perplexity),
    };
    std::fs::write(out.join("train.json"), serde_json::to_vec_pretty(&info)?)?;
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
        if tps.is_empty() {
            None
        } else {
            Some(tps.iter().sum::<f64>() / tps.len() as f64)
        },
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use relora_model::{Llama, LoraInit, Rng};

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
