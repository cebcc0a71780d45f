//! `method: relora`: LoRA branches (the `lora:` section) merged into the frozen weights and
//! started afresh every `merge_every` steps, with a partial reset of their optimizer moments
//! and a jagged cosine schedule that climbs back from zero after each restart (Lialin et
//! al., §3; the `relora:` section).

use super::lora::Lora;
use super::{LoraBase, TrainMethod};
use crate::check::Checks;
use crate::train::params::TrainParams;
use anyhow::Result;
use relora_model::{Llama, LlamaConfig, ResetMode, Restarts, Rng, Schedule, TrainConfig};
use serde::{Deserialize, Serialize};

/// `relora:`: when to merge and reset, and the ablation switches of Table 6.
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
fn d_reset() -> ResetMode {
    ResetMode::Magnitude { fraction: 0.99 }
}
fn d_true() -> bool {
    true
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

pub struct Relora;

impl TrainMethod for Relora {
    fn name(&self) -> &'static str {
        "relora"
    }
    fn summary(&self) -> &'static str {
        "ReLoRA (low-rank updates merged into the weights)"
    }
    fn sections(&self) -> &'static [&'static str] {
        &["lora", "relora"]
    }
    fn check(&self, p: &TrainParams, c: &mut Checks) {
        if let Some(l) = &p.lora {
            l.check(c);
            c.require(
                l.base != LoraBase::None,
                &["lora", "base"],
                "ReLoRA merges into W, so `base: none` is only for method lora",
            );
        }
        match &p.relora {
            Some(r) => r.check(c),
            None => c.require(
                false,
                &["method"],
                "method `relora` needs a `relora:` section (merge_every, ...)",
            ),
        }
    }
    fn adapt_model(
        &self,
        p: &TrainParams,
        model: &mut Llama,
        from_init: bool,
        rng: &mut Rng,
    ) -> Result<()> {
        Lora.adapt_model(p, model, from_init, rng)
    }
    fn configure(&self, p: &TrainParams, total: u64, cfg: &mut TrainConfig) {
        let Some(r) = &p.relora else { return };
        cfg.restarts = Some(Restarts {
            merge_every: r.restarts.then_some(r.merge_every),
            reset_every: r
                .optimizer_reset
                .then_some(r.reset_every.unwrap_or(r.merge_every)),
            reset: r.reset,
        });
        // Without restarts there is nothing to be jagged about: the stage's own schedule.
        if r.jagged && r.restarts {
            cfg.schedule = Schedule::Jagged {
                warmup: p.warmup,
                restart_warmup: r.restart_warmup(),
                cycle: r.merge_every,
                total,
                min_ratio: p.min_lr_ratio,
            };
        }
    }
    // The branches, their sizes and their frozen W are LoRA's (`lora.rs`).
    fn matmul_weights(&self, p: &TrainParams, cfg: &LlamaConfig, has_init: bool) -> (f64, f64) {
        Lora.matmul_weights(p, cfg, has_init)
    }
    fn parameter_bytes(&self, p: &TrainParams, cfg: &LlamaConfig, has_init: bool) -> (f64, f64) {
        Lora.parameter_bytes(p, cfg, has_init)
    }
    fn frozen_format(&self, p: &TrainParams) -> Option<&'static str> {
        Lora.frozen_format(p)
    }
    fn optimizer_floats(&self, p: &TrainParams, cfg: &LlamaConfig, has_init: bool) -> f64 {
        Lora.optimizer_floats(p, cfg, has_init)
    }
}
