//! `method: lora`: a low-rank branch s·B·A beside every projection, trained with the rest
//! of the weights frozen, never merged (the paper's LoRA row). The `lora:` section and the
//! branches it describes are shared with ReLoRA (`relora.rs`), which merges them, and with
//! Control, which is sized by its rank.

use super::{block_and_head, TrainMethod};
use crate::check::Checks;
use crate::train::params::TrainParams;
use anyhow::Result;
use relora_model::quant::FrozenFormat;
use relora_model::{Llama, LlamaConfig, LoraInit, Rng};
use serde::{Deserialize, Serialize};

/// What the low-rank branch sits beside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBase {
    /// A frozen random W plus the low-rank branch.
    FrozenRandom,
    /// A pure factorised layer, no W (the May 2023 reference code's LoRA baseline).
    None,
}

/// `lora:`: the low-rank branches.
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
    /// How the frozen W is stored: f32, or compact (bf16, int8, nf4); see relora_model::quant.
    #[serde(default)]
    pub frozen: FrozenFormat,
    /// NF4's block: weights per scale, over the flattened W.
    #[serde(default = "d_block")]
    pub block: usize,
}

impl Default for LoraParams {
    fn default() -> Self {
        LoraParams {
            rank: d_rank(),
            alpha: d_alpha(),
            dropout: d_dropout(),
            init: None,
            base: d_base(),
            frozen: FrozenFormat::F32,
            block: d_block(),
        }
    }
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
fn d_block() -> usize {
    64
}
fn d_base() -> LoraBase {
    LoraBase::FrozenRandom
}

/// Trainable parameters of `cfg` wrapped with rank-`r` LoRA (what Control is sized to).
pub fn relora_trainable(cfg: &LlamaConfig, r: usize) -> usize {
    let (h, i) = (cfg.hidden, cfg.intermediate);
    let lora = 4 * r * 2 * h + 3 * r * (h + i);
    2 * cfg.vocab_size * h + cfg.layers * (lora + 2 * h) + h
}

impl LoraParams {
    /// The `lora:` section's checks, for any method that reads it.
    pub(super) fn check(&self, c: &mut Checks) {
        c.at_least(
            &["lora", "rank"],
            self.rank as u64,
            1,
            "the LoRA factors' rank",
        );
        c.positive(&["lora", "alpha"], self.alpha);
        c.within(
            &["lora", "dropout"],
            self.dropout as f64,
            0.0,
            1.0,
            true,
            false,
        );
        if self.frozen == FrozenFormat::F32 {
            return;
        }
        c.require(
            self.base != LoraBase::None,
            &["lora", "frozen"],
            format!(
                "lora.frozen: {} stores the frozen W, and `base: none` has none",
                self.frozen.name()
            ),
        );
        if self.frozen == FrozenFormat::Nf4 {
            // Blocks run over the flattened W (as bitsandbytes'), so any size fits.
            c.at_least(
                &["lora", "block"],
                self.block as u64,
                1,
                "weights per NF4 scale",
            );
        }
    }

    /// A low-rank branch on every projection of `model`; without W where `base: none` starts
    /// from scratch (a pure factorised layer).
    pub(super) fn add_branches(
        &self,
        model: &mut Llama,
        from_init: bool,
        rng: &mut Rng,
    ) -> Result<()> {
        let factorised = self.base == LoraBase::None && !from_init;
        let init = self.init.unwrap_or(if factorised {
            LoraInit::KaimingBoth
        } else {
            LoraInit::KaimingAZeroB
        });
        for (_, layer) in model.projections_mut() {
            layer.add_lora(self.rank, self.alpha, self.dropout, init, rng)?;
            if factorised {
                layer.weight = None;
            }
            layer.quantize_frozen(self.frozen, self.block)?;
        }
        Ok(())
    }

    /// (trainable parameters, bytes of the frozen W in its format).
    pub(super) fn parameter_bytes(&self, cfg: &LlamaConfig, has_init: bool) -> (f64, f64) {
        let trainable = relora_trainable(cfg, self.rank) as f64;
        if self.base == LoraBase::None && !has_init {
            return (trainable, 0.0);
        }
        let (h, i) = (cfg.hidden, cfg.intermediate);
        let shapes = [(h, h), (h, h), (h, h), (h, h), (i, h), (i, h), (h, i)];
        let per_block: usize = shapes
            .iter()
            .map(|&(rows, cols)| self.frozen.bytes(rows, cols, self.block))
            .sum();
        (trainable, (cfg.layers * per_block) as f64)
    }

    /// (trainable, frozen) matmul weights: the factors and the LM head train, W is frozen
    /// (or absent, for a pure factorised layer from scratch).
    pub(super) fn matmul_weights(&self, cfg: &LlamaConfig, has_init: bool) -> (f64, f64) {
        let (blocks, head) = block_and_head(cfg);
        let (h, i, r) = (cfg.hidden as f64, cfg.intermediate as f64, self.rank as f64);
        let factors = cfg.layers as f64 * (4.0 * r * 2.0 * h + 3.0 * r * (h + i));
        let frozen = if self.base == LoraBase::None && !has_init {
            0.0
        } else {
            blocks
        };
        (factors + head, frozen)
    }
}

pub struct Lora;

impl TrainMethod for Lora {
    fn name(&self) -> &'static str {
        "lora"
    }
    fn summary(&self) -> &'static str {
        "LoRA (low-rank training without restarts)"
    }
    fn sections(&self) -> &'static [&'static str] {
        &["lora"]
    }
    fn check(&self, p: &TrainParams, c: &mut Checks) {
        if let Some(l) = &p.lora {
            l.check(c);
        }
    }
    fn adapt_model(
        &self,
        p: &TrainParams,
        model: &mut Llama,
        from_init: bool,
        rng: &mut Rng,
    ) -> Result<()> {
        p.lora().add_branches(model, from_init, rng)
    }
    fn matmul_weights(&self, p: &TrainParams, cfg: &LlamaConfig, has_init: bool) -> (f64, f64) {
        p.lora().matmul_weights(cfg, has_init)
    }
    fn parameter_bytes(&self, p: &TrainParams, cfg: &LlamaConfig, has_init: bool) -> (f64, f64) {
        p.lora().parameter_bytes(cfg, has_init)
    }
    fn frozen_format(&self, p: &TrainParams) -> Option<&'static str> {
        Some(p.lora().frozen.name())
    }
    fn optimizer_floats(&self, p: &TrainParams, cfg: &LlamaConfig, _has_init: bool) -> f64 {
        // Adam's two moments for the factors, embeddings, norms and head; none for W.
        2.0 * relora_trainable(cfg, p.lora().rank) as f64
    }
}
