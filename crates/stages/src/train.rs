//! `train`: full-rank, ReLoRA, LoRA and Control training, with resume from checkpoints.
//!
//! Inputs: `data` (a tokenize stage) and optionally `init` (a train stage): its weights
//! (`init_mode: weights`, the warm start) or its whole training state (`init_mode:
//! continue`, for chained ReLoRA phases and for full training that continues a warm start).

use crate::check::Checks;
use crate::device::DeviceParam;
pub use crate::record::{Method, TrainInfo};
use anyhow::{bail, Context, Result};
use relora_data::{
    read_sequences, DatasetManifest, Loader, LoaderConfig, PackSpec, Packing, Sequences, Split,
};
use relora_exec::{parse_params, Estimate, InputEstimate, Progress, StageContext, StageKind};
use relora_model::checkpoint::{self, load_tensors, save_tensors};
use relora_model::precision::Precision;
use relora_model::{
    control_config, AdamConfig, Llama, LlamaConfig, LoraInit, ResetMode, Restarts, Rng, Schedule,
    StepMetrics, TrainConfig, Trainer,
};
use relora_spec::{Resources, SpecError, StageSpec};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// `model:` a named size (`llama_130m`) or explicit dimensions.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ModelParam {
    Named(String),
    Dims(ModelDims),
}

/// `model: {hidden, intermediate, heads, layers}`; any other key is an error.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
}

impl<'de> Deserialize<'de> for ModelParam {
    // By hand rather than `untagged`, so a bad key inside the map is reported by name and
    // path instead of "did not match any variant".
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = ModelParam;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a model name (llama_9m … llama_1b) or {hidden, intermediate, heads, layers}",
                )
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ModelParam, E> {
                Ok(ModelParam::Named(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, m: A) -> Result<ModelParam, A::Error> {
                let d = serde::de::value::MapAccessDeserializer::new(m);
                ModelDims::deserialize(d).map(ModelParam::Dims)
            }
        }
        d.deserialize_any(Visit)
    }
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
    /// Default: kaiming_a_zero_b (B = 0, as LoRA and ReLoRA start), except for a pure
    /// factorised layer from scratch (`base: none`), which has no W to carry it: kaiming_both.
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
    /// Steps over which the LR climbs back after each restart. Default: 2% of
    /// `merge_every` (at least 1), the paper's 100 steps for restarts every 5,000.
    #[serde(default)]
    pub restart_warmup: Option<u64>,
}

impl ReloraParams {
    /// The restart warmup in force (explicit, or the default).
    pub fn restart_warmup(&self) -> u64 {
        self.restart_warmup
            .unwrap_or_else(|| (self.merge_every / 50).max(1))
    }
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
    /// Sequences shuffled together; the loader holds a few windows in memory.
    #[serde(default = "d_window")]
    pub shuffle_window: usize,
    /// Threads decoding parquet ahead of the trainer (cosmetic: the order is the same).
    #[serde(default = "d_loader_threads")]
    pub loader_threads: usize,
    #[serde(default)]
    pub device: DeviceParam,
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
    /// Data parallelism: several processes, each computing a share of every step's
    /// micro-batches (README, "Data-parallel training").
    #[serde(default)]
    pub parallel: Option<ParallelParams>,
}

/// `parallel:`: how many data-parallel ranks train the stage.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelParams {
    /// Processes (MPI ranks), each taking an equal share of every step's micro-batches.
    pub ranks: usize,
}

impl TrainParams {
    /// Data-parallel ranks (1 without `parallel`).
    pub fn ranks(&self) -> usize {
        self.parallel.map_or(1, |p| p.ranks)
    }

    /// Micro-batches per optimizer step, over all ranks.
    pub fn micro_batches_per_step(&self) -> usize {
        self.batch_tokens
            .map_or(1, |b| b / (self.micro_batch * self.seq_len).max(1))
            .max(1)
    }
}

fn d_window() -> usize {
    relora_data::DEFAULT_WINDOW
}
fn d_loader_threads() -> usize {
    1
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
fn d_ckpt() -> u64 {
    100
}
fn d_eval_seq() -> usize {
    64
}
fn d_init_mode() -> InitMode {
    InitMode::Weights
}

/// The model's shape for a vocabulary of `vocab` tokens.
pub fn model_config(m: &ModelParam, vocab: usize) -> Result<LlamaConfig> {
    let cfg = match m {
        ModelParam::Named(n) => LlamaConfig::named(n, vocab).with_context(|| {
            let names: Vec<&str> = relora_model::config::NAMED.iter().map(|c| c.0).collect();
            format!("unknown model `{n}`; known: {}", names.join(", "))
        })?,
        ModelParam::Dims(d) => LlamaConfig {
            vocab_size: vocab,
            hidden: d.hidden,
            intermediate: d.intermediate,
            heads: d.heads,
            layers: d.layers,
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

impl TrainParams {
    /// Every problem with these parameters that can be known before the stage runs.
    fn check(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let mut c = Checks::new(stage);
        let has_init = stage.inputs.contains_key("init");
        if let Err(err) = model_config(&self.model, 32) {
            c.require(false, &["model"], format!("{err:#}"));
        }
        if let ModelParam::Dims(d) = &self.model {
            c.at_least(
                &["model", "intermediate"],
                d.intermediate as u64,
                1,
                "the MLP width",
            );
        }
        c.at_least(
            &["steps"],
            self.steps,
            1,
            "a stage trains at least one step",
        );
        c.at_least(
            &["seq_len"],
            self.seq_len as u64,
            2,
            "a sequence of n tokens gives n - 1 predictions to learn from",
        );
        c.at_least(
            &["micro_batch"],
            self.micro_batch as u64,
            1,
            "sequences per pass",
        );
        if let Some(b) = self.batch_tokens {
            let per_pass = self.micro_batch * self.seq_len;
            c.require(
                per_pass == 0 || (b >= per_pass && b % per_pass == 0),
                &["batch_tokens"],
                format!(
                    "batch_tokens ({b}) must be a positive multiple of micro_batch × seq_len \
                     ({per_pass})"
                ),
            );
        }
        if let Some(par) = self.parallel {
            let per_step = self.micro_batches_per_step();
            c.require(
                par.ranks >= 1 && per_step.is_multiple_of(par.ranks),
                &["parallel", "ranks"],
                format!(
                    "parallel.ranks ({}) must be at least 1 and divide the micro-batches of a \
                     step ({per_step} = batch_tokens / (micro_batch × seq_len)), so that every \
                     rank takes an equal share; raise batch_tokens or lower micro_batch",
                    par.ranks
                ),
            );
            c.require(
                par.ranks <= 1 || !matches!(self.device, DeviceParam::CudaId(_)),
                &["device"],
                format!(
                    "device `cuda:N` names one GPU, but parallel.ranks ({}) trains on one GPU \
                     per rank; use `device: cuda` and each rank gets its own",
                    par.ranks
                ),
            );
        }
        c.positive(&["lr"], self.lr);
        c.within(&["min_lr_ratio"], self.min_lr_ratio, 0.0, 1.0, true, true);
        if let Some(total) = self.total_steps {
            c.require(
                total >= self.steps || self.init_mode == InitMode::Continue,
                &["total_steps"],
                format!(
                    "total_steps ({total}) is the schedule's horizon and cannot be less than \
                     this stage's steps ({})",
                    self.steps
                ),
            );
        }
        let horizon = self.total_steps.unwrap_or(self.steps);
        if self.schedule == ScheduleKind::Cosine && self.init_mode != InitMode::Continue {
            c.require(
                self.warmup < horizon,
                &["warmup"],
                format!(
                    "warmup ({}) must be shorter than the schedule ({horizon} steps), or the \
                     cosine never starts",
                    self.warmup
                ),
            );
        }
        if let Some(clip) = self.clip_grad {
            c.positive(&["clip_grad"], clip);
        }
        c.within(
            &["weight_decay"],
            self.weight_decay,
            0.0,
            f64::INFINITY,
            true,
            false,
        );
        c.within(&["beta1"], self.beta1, 0.0, 1.0, true, false);
        c.within(&["beta2"], self.beta2, 0.0, 1.0, true, false);
        c.positive(&["eps"], self.eps);
        c.at_least(
            &["eval_sequences"],
            self.eval_sequences as u64,
            1,
            "the final evaluation scores at least one sequence",
        );
        c.at_least(
            &["shuffle_window"],
            self.shuffle_window as u64,
            1,
            "sequences shuffled together",
        );
        c.at_least(
            &["loader_threads"],
            self.loader_threads as u64,
            1,
            "threads decoding the training shards",
        );
        c.require(
            self.init_mode != InitMode::Continue || has_init,
            &["init_mode"],
            "init_mode continue needs an `init` input",
        );
        if self.method == Method::Control && has_init {
            c.extend(vec![stage.error(
                &["inputs", "init"],
                "Control is a smaller model trained from scratch; it takes no init",
            )]);
        }
        match (&self.lora, self.method) {
            (Some(_), Method::Full) => c.require(
                false,
                &["lora"],
                "`lora:` is not used by method full; remove it or pick relora, lora or control",
            ),
            (Some(l), _) => {
                c.at_least(
                    &["lora", "rank"],
                    l.rank as u64,
                    1,
                    "the LoRA factors' rank",
                );
                c.positive(&["lora", "alpha"], l.alpha);
                c.within(
                    &["lora", "dropout"],
                    l.dropout as f64,
                    0.0,
                    1.0,
                    true,
                    false,
                );
                c.require(
                    !(self.method == Method::Relora && l.base == LoraBase::None),
                    &["lora", "base"],
                    "ReLoRA merges into W, so `base: none` is only for method lora",
                );
            }
            (None, _) => {}
        }
        match (&self.relora, self.method) {
            (None, Method::Relora) => c.require(
                false,
                &["method"],
                "method `relora` needs a `relora:` section (merge_every, ...)",
            ),
            (Some(_), m) if m != Method::Relora => c.require(
                false,
                &["relora"],
                format!("`relora:` is only for method relora, not {m:?}"),
            ),
            (Some(r), _) => r.check(&mut c),
            (None, _) => {}
        }
        c.finish()
    }
}

impl ReloraParams {
    fn check(&self, c: &mut Checks) {
        c.at_least(
            &["relora", "merge_every"],
            self.merge_every,
            1,
            "steps between merges",
        );
        if let Some(k) = self.reset_every {
            c.at_least(
                &["relora", "reset_every"],
                k,
                1,
                "steps between optimizer resets",
            );
        }
        match self.reset {
            ResetMode::Zero => {}
            ResetMode::Random { fraction } | ResetMode::Magnitude { fraction } => c.within(
                &["relora", "reset", "fraction"],
                fraction,
                0.0,
                1.0,
                true,
                true,
            ),
        }
        let w = self.restart_warmup();
        c.require(
            w < self.merge_every,
            &["relora", "restart_warmup"],
            format!(
                "restart_warmup ({w}) must be shorter than merge_every ({})",
                self.merge_every
            ),
        );
        c.require(
            !(self.jagged && self.restarts && w == 0),
            &["relora", "restart_warmup"],
            "restart_warmup 0 turns the jagged schedule into a plain cosine (the LR never \
             returns to 0 after a merge); give it at least 1 step, or set `jagged: false`",
        );
    }
}

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

/// The shape this stage trains: the named or given model, or Control's narrower one.
fn stage_model_config(p: &TrainParams, vocab: usize) -> Result<LlamaConfig> {
    let base = model_config(&p.model, vocab)?;
    if p.method != Method::Control {
        return Ok(base);
    }
    let rank = p.lora.clone().unwrap_or_default().rank;
    let target = relora_trainable(&base, rank);
    Ok(control_config(base, target))
}

/// The warm-start weights or a fresh init, then a LoRA branch on every projection where the
/// method asks for one.
fn build_model(
    p: &TrainParams,
    cfg: LlamaConfig,
    init_dir: Option<&Path>,
    device: &candle_core::Device,
) -> Result<Llama> {
    let mut rng = Rng::derive(p.seed, "init");
    let mut model = match (init_dir, p.init_mode) {
        (Some(dir), InitMode::Weights) => {
            let path = dir.join("model.safetensors");
            Llama::from_tensors(cfg, &load_tensors(&path, device)?)
                .with_context(|| format!("loading {}", path.display()))?
        }
        _ => Llama::random(cfg, &mut rng, device)?,
    };
    if matches!(p.method, Method::Relora | Method::Lora) {
        let lora = p.lora.clone().unwrap_or_default();
        let factorised = lora.base == LoraBase::None && init_dir.is_none();
        let init = lora.init.unwrap_or(if factorised {
            LoraInit::KaimingBoth
        } else {
            LoraInit::KaimingAZeroB
        });
        for (_, layer) in model.projections_mut() {
            layer.add_lora(lora.rank, lora.alpha, lora.dropout, init, &mut rng)?;
            if factorised {
                layer.weight = None;
            }
        }
    }
    // Parameters and moments stay f32 whatever the compute dtype (relora_model::precision).
    model.compute = p.dtype.dtype();
    Ok(model)
}

/// The learning-rate schedule: ReLoRA's jagged cosine, or a plain cosine or constant.
fn schedule(p: &TrainParams, total: u64) -> Schedule {
    match (&p.relora, p.schedule) {
        (Some(r), _) if r.jagged && r.restarts => Schedule::Jagged {
            warmup: p.warmup,
            restart_warmup: r.restart_warmup(),
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
    }
}

/// The trainer's configuration, for a stage that starts at step `start_step`.
fn train_config(p: &TrainParams, start_step: u64) -> TrainConfig {
    // Each rank accumulates its share of the step's micro-batches.
    let accum = (p.micro_batches_per_step() / p.ranks()).max(1);
    let restarts = p.relora.as_ref().map(|r| Restarts {
        merge_every: r.restarts.then_some(r.merge_every),
        reset_every: r
            .optimizer_reset
            .then_some(r.reset_every.unwrap_or(r.merge_every)),
        reset: r.reset,
    });
    TrainConfig {
        micro_batch: p.micro_batch,
        accum,
        lr: p.lr,
        schedule: schedule(p, p.total_steps.unwrap_or(start_step + p.steps)),
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
    }
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
    if p.method == Method::Control {
        let rank = p.lora.clone().unwrap_or_default().rank;
        println!(
            "Control: hidden {} intermediate {} ({} trainable parameters, as many as ReLoRA \
             rank {rank} on {:?} trains)",
            cfg.hidden,
            cfg.intermediate,
            cfg.param_count(),
            p.model
        );
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
        "{} trainable and {} frozen parameters ({:?}, {} compute)",
        model.trainable_count(),
        model.frozen_count(),
        p.method,
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
        trainer.state = checkpoint::load(&ckpt, &trainer.model, &mut trainer.opt, &device)
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
    let history = trainer.run(
        &mut loader,
        Some(&valid_seqs),
        &scratch.join("checkpoints"),
        &metrics_path,
        start_step + p.steps,
        |m| {
            if lead {
                report_step(ctx, m, start_step, p.steps, log_every)
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
        method: p.method,
        step: trainer.state.step,
        tokens: trainer.state.tokens,
        loader: loader.state(),
        data_seed: data_seed(&p, init_info.as_ref()),
        seq_len: p.seq_len,
        packing: p.packing,
        tokenizer_blake3: data.tokenizer_blake3.clone(),
        trainable_params: trainer.model.trainable_count(),
        frozen_params: trainer.model.frozen_count(),
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
    std::fs::create_dir_all(out.join("checkpoint"))?;
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
    use relora_model::{Llama, LoraInit, Rng};

    #[test]
    fn data_order_follows_a_warm_start_but_not_an_imported_checkpoint() {
        let p: TrainParams = serde_json::from_value(serde_json::json!({
            "model": "llama_9m", "method": "relora", "steps": 10, "lr": 1e-3, "seed": 7
        }))
        .unwrap();
        let info = |tokens: u64| TrainInfo {
            model: LlamaConfig::named("llama_9m", 300).unwrap(),
            method: Method::Full,
            step: 0,
            tokens,
            loader: Default::default(),
            data_seed: 3,
            seq_len: 32,
            packing: Packing::Concat,
            tokenizer_blake3: String::new(),
            trainable_params: 0,
            frozen_params: 0,
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
