//! A train stage's parameters (`params:` of a `kind: train` stage) and the checks that hold
//! for every method; each method checks its own sections (`method/`).

use super::method::{self, GaloreParams, LoraParams, MethodName, ReloraParams};
use crate::check::Checks;
use crate::device::DeviceParam;
use anyhow::{Context, Result};
use relora_data::Packing;
use relora_model::precision::Precision;
use relora_model::LlamaConfig;
use relora_spec::{SpecError, StageSpec};
use serde::{Deserialize, Serialize};

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
    pub method: MethodName,
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
    /// Keep only each block's input in the forward pass and recompute the block in the
    /// backward pass: activations of one block instead of all, for one more forward pass of
    /// the blocks per step (relora_model::recompute).
    #[serde(default)]
    pub checkpoint_activations: bool,
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
    #[serde(default)]
    pub galore: Option<GaloreParams>,
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
    /// The `lora:` section, or its defaults where the stage has none.
    pub fn lora(&self) -> LoraParams {
        self.lora.clone().unwrap_or_default()
    }

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

impl TrainParams {
    /// Every problem with these parameters that can be known before the stage runs.
    pub(super) fn check(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
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
        if let (Some(why), true) = (self.method.refuses_init(), has_init) {
            c.extend(vec![
                stage.error(&["inputs", "init"], format!("{why}; it takes no init"))
            ]);
        }
        // Another method's section is a mistake worth stopping for: its settings would be
        // silently ignored.
        for (section, readers) in method::sections() {
            if stage.params.get(section).is_some() && !self.method.sections().contains(&section) {
                c.require(
                    false,
                    &[section],
                    format!(
                        "`{section}:` is not used by method {}; remove it, or pick a method \
                         that reads it ({})",
                        self.method.name(),
                        readers.join(", ")
                    ),
                );
            }
        }
        self.method.check(self, &mut c);
        c.finish()
    }
}
