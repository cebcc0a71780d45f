//! relora-model: the LLaMA model, LoRA layers and the ReLoRA training engine on candle, with
//! GaLore's projected optimizer ([`galore`]) and frozen weights in compact formats ([`quant`]).
//!
//! Plain structs with a `forward`; the training loop in [`train`] reads top to bottom.
//! Nothing here knows about YAML, pipelines or the cache: callers hand in a model config,
//! a data loader and folders to write to.

pub mod alloc;
pub mod checkpoint;
pub mod config;
pub mod frozen;
pub mod fused;
pub mod galore;
pub mod linear;
pub mod llama;
pub mod optim;
pub mod parallel;
pub mod precision;
pub mod quant;
pub mod recompute;
pub mod rng;
pub mod schedule;
pub mod train;

pub use config::LlamaConfig;
pub use galore::{GaloreConfig, ProjType};
pub use linear::{Linear, LoraInit};
pub use llama::Llama;
pub use optim::{AdamConfig, AdamW, ResetMode};
pub use parallel::{Collective, Solo};
pub use rng::Rng;
pub use schedule::Schedule;
pub use train::{evaluate, Restarts, StepMetrics, TrainConfig, Trainer};

use candle_core::Device;

/// `cpu`, `cuda`, `cuda:N` or `auto` (CUDA when this binary has it and a GPU is visible).
pub fn device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        s if s == "cuda" || s.starts_with("cuda:") => {
            if !candle_core::utils::cuda_is_available() {
                anyhow::bail!(
                    "device `{s}` asked for, but this binary was built without CUDA \
                     (rebuild with `--features cuda`) or no GPU is visible; use `device: cpu`"
                );
            }
            let n: usize = s
                .strip_prefix("cuda:")
                .map(str::parse)
                .transpose()?
                .unwrap_or(0);
            Device::new_cuda(n).map_err(|e| {
                anyhow::anyhow!(
                    "device `{s}`: CUDA device {n} cannot be opened ({e}). Check that a GPU is \
                     visible (`nvidia-smi`) and that its driver's libcuda.so.1 is found before \
                     any stub; or use `device: cpu`"
                )
            })
        }
        other => anyhow::bail!("unknown device `{other}`: use cpu, cuda, cuda:N or auto"),
    }
}

/// The paper's "Control" baseline: a full-rank config with `base`'s depth and heads whose
/// trainable-parameter count is as close as possible to `target`. Hidden sizes run over
/// multiples of 2·heads; for each, the MLP width that hits `target` is solved for exactly,
/// and the hidden size whose MLP ratio is nearest `base`'s wins.
pub fn control_config(base: LlamaConfig, target: usize) -> LlamaConfig {
    let ratio = base.intermediate as f64 / base.hidden as f64;
    let (l, v) = (base.layers as f64, base.vocab_size as f64);
    let step = base.heads * 2;
    let mut best: Option<(f64, LlamaConfig)> = None;
    let mut h = step;
    while h <= base.hidden {
        let hf = h as f64;
        // target = 2·V·h + L·(4h² + 3h·i + 2h) + h, solved for i.
        let i =
            (target as f64 - 2.0 * v * hf - hf - l * (4.0 * hf * hf + 2.0 * hf)) / (3.0 * l * hf);
        if i >= 1.0 {
            let c = LlamaConfig {
                hidden: h,
                intermediate: i.round() as usize,
                ..base
            };
            let off = (c.intermediate as f64 / hf / ratio).ln().abs();
            if best.as_ref().is_none_or(|(o, _)| off < *o) {
                best = Some((off, c));
            }
        }
        h += step;
    }
    best.map(|(_, c)| c).unwrap_or(base)
}

#[cfg(test)]
mod tests;
