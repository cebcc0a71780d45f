//! Training methods as plug-ins: each one file, each a [`TrainMethod`], as stage kinds are
//! [`StageKind`](relora_exec::StageKind)s.
//!
//! A method says what its YAML sections may hold (checked at plan time), what model it
//! trains (Control narrows it, LoRA and ReLoRA add low-rank branches), how the shared
//! training loop is configured for it (ReLoRA's merges, resets and jagged schedule) and how
//! big it is for `plan --estimate`. The train stage itself knows no method by name: adding
//! one is a file here and a line in [`METHODS`].

mod control;
mod full;
mod galore;
mod lora;
mod relora;

pub use galore::GaloreParams;
pub use lora::{relora_trainable, LoraBase, LoraParams};
pub use relora::ReloraParams;

use super::params::TrainParams;
use crate::check::Checks;
use anyhow::Result;
use relora_model::{Llama, LlamaConfig, Rng, TrainConfig};
use serde::{Deserialize, Serialize};

/// What a training method decides; the defaults are full-rank training's.
pub trait TrainMethod: Sync {
    /// The name in YAML (`method: relora`) and in `train.json`.
    fn name(&self) -> &'static str;

    /// One phrase for model cards and logs ("full-rank training").
    fn summary(&self) -> &'static str;

    /// The method sections of a train stage's parameters (`lora`, `relora`, …) this method
    /// reads; any other method's section in its stage is a plan-time error.
    fn sections(&self) -> &'static [&'static str] {
        &[]
    }

    /// Why an `init` input (a warm start or a continued run) makes no sense for it, where
    /// it does not.
    fn refuses_init(&self) -> Option<&'static str> {
        None
    }

    /// Plan-time checks of this method's own parameters, reported at their YAML keys.
    fn check(&self, _p: &TrainParams, _c: &mut Checks) {}

    /// The model this method trains, given the one the stage names.
    fn model_config(&self, _p: &TrainParams, named: LlamaConfig) -> LlamaConfig {
        named
    }

    /// A line for the log about the model chosen, where the method changed it.
    fn model_note(&self, _p: &TrainParams, _cfg: &LlamaConfig) -> Option<String> {
        None
    }

    /// Changes to the freshly built (or warm-started) model before training: `from_init`
    /// says whether its weights came from an `init` input.
    fn adapt_model(
        &self,
        _p: &TrainParams,
        _model: &mut Llama,
        _from_init: bool,
        _rng: &mut Rng,
    ) -> Result<()> {
        Ok(())
    }

    /// What the method adds to the shared training loop's configuration, or replaces in it:
    /// ReLoRA's merges, resets and jagged schedule, GaLore's projected optimizer. `total` is
    /// the schedule's horizon in steps.
    fn configure(&self, _p: &TrainParams, _total: u64, _cfg: &mut TrainConfig) {}

    /// Floats of optimizer state (Adam's two moments per trainable parameter, unless the
    /// method keeps fewer), for `plan --estimate`.
    fn optimizer_floats(&self, _p: &TrainParams, cfg: &LlamaConfig, _has_init: bool) -> f64 {
        2.0 * cfg.param_count() as f64
    }

    /// (trainable parameters, bytes of frozen weights), for `plan --estimate`'s memory.
    fn parameter_bytes(&self, _p: &TrainParams, cfg: &LlamaConfig, _has_init: bool) -> (f64, f64) {
        (cfg.param_count() as f64, 0.0)
    }

    /// The format frozen weights are kept in, where the method has any.
    fn frozen_format(&self, _p: &TrainParams) -> Option<&'static str> {
        None
    }

    /// (trainable, frozen) matmul weights, for `plan --estimate`'s FLOPs.
    fn matmul_weights(&self, _p: &TrainParams, cfg: &LlamaConfig, _has_init: bool) -> (f64, f64) {
        let (blocks, head) = block_and_head(cfg);
        (blocks + head, 0.0)
    }
}

/// Every method this binary can train, in the order the README lists them.
const METHODS: &[&dyn TrainMethod] = &[
    &full::Full,
    &relora::Relora,
    &lora::Lora,
    &control::Control,
    &galore::Galore,
];

/// The method called `name`, if there is one.
pub fn find(name: &str) -> Option<&'static dyn TrainMethod> {
    METHODS.iter().copied().find(|m| m.name() == name)
}

/// The names of every method, for messages.
pub fn names() -> String {
    let names: Vec<&str> = METHODS.iter().map(|m| m.name()).collect();
    names.join(", ")
}

/// Every method section any method reads (`lora`, `relora`, …), each with the methods that
/// read it.
pub fn sections() -> Vec<(&'static str, Vec<&'static str>)> {
    let mut out: Vec<(&str, Vec<&str>)> = Vec::new();
    for m in METHODS {
        for s in m.sections() {
            match out.iter_mut().find(|(name, _)| name == s) {
                Some((_, readers)) => readers.push(m.name()),
                None => out.push((s, vec![m.name()])),
            }
        }
    }
    out
}

/// `method:` in a train stage's parameters: a name, resolved when the YAML is parsed, so an
/// unknown one is reported at its key with the known ones listed.
#[derive(Clone, Copy)]
pub struct MethodName(pub &'static dyn TrainMethod);

impl std::ops::Deref for MethodName {
    type Target = dyn TrainMethod;
    fn deref(&self) -> &Self::Target {
        self.0
    }
}

impl std::fmt::Debug for MethodName {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.0.name())
    }
}

impl PartialEq for MethodName {
    fn eq(&self, other: &Self) -> bool {
        self.0.name() == other.0.name()
    }
}

impl Serialize for MethodName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name())
    }
}

impl<'de> Deserialize<'de> for MethodName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        find(&name).map(MethodName).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown training method `{name}`; known: {}",
                names()
            ))
        })
    }
}

/// Matmul weights of a LLaMA's blocks and of its LM head.
pub fn block_and_head(cfg: &LlamaConfig) -> (f64, f64) {
    let (h, i) = (cfg.hidden as f64, cfg.intermediate as f64);
    (
        cfg.layers as f64 * (4.0 * h * h + 3.0 * h * i),
        cfg.vocab_size as f64 * h,
    )
}
