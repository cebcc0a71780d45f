//! `method: control`: full-rank training of a narrower model with as many trainable
//! parameters as ReLoRA trains at `lora.rank` (the paper's Control row, Table 2), from
//! scratch.

use super::{relora_trainable, TrainMethod};
use crate::check::Checks;
use crate::train::params::TrainParams;
use relora_model::{control_config, LlamaConfig};

pub struct Control;

impl Control {
    /// The rank whose ReLoRA trainable count Control matches.
    fn rank(p: &TrainParams) -> usize {
        p.lora().rank
    }
}

impl TrainMethod for Control {
    fn name(&self) -> &'static str {
        "control"
    }
    fn summary(&self) -> &'static str {
        "full-rank training of a narrower model (Control)"
    }
    fn sections(&self) -> &'static [&'static str] {
        // Only `lora.rank` is read: the ReLoRA run this one is sized against.
        &["lora"]
    }
    fn refuses_init(&self) -> Option<&'static str> {
        Some("Control is a smaller model trained from scratch")
    }
    fn check(&self, p: &TrainParams, c: &mut Checks) {
        if let Some(l) = &p.lora {
            l.check(c);
            c.require(
                l.frozen == relora_model::quant::FrozenFormat::F32,
                &["lora", "frozen"],
                "Control trains a full-rank model with no frozen W; `lora.frozen` is for \
                 relora and lora",
            );
        }
    }
    fn model_config(&self, p: &TrainParams, named: LlamaConfig) -> LlamaConfig {
        control_config(named, relora_trainable(&named, Self::rank(p)))
    }
    fn model_note(&self, p: &TrainParams, cfg: &LlamaConfig) -> Option<String> {
        Some(format!(
            "Control: hidden {} intermediate {} ({} trainable parameters, as many as ReLoRA \
             rank {} on {:?} trains)",
            cfg.hidden,
            cfg.intermediate,
            cfg.param_count(),
            Self::rank(p),
            p.model
        ))
    }
}
