//! relora-model: the LLaMA model, LoRA layers and the ReLoRA training engine on candle.
//!
//! Plain structs with a `forward`; the training loop in [`train`] reads top to bottom.
//! Nothing here knows about YAML, pipelines or the cache: callers hand in a model config,
//! a data loader and folders to write to.

pub mod checkpoint;
pub mod config;
pub mod frozen;
pub mod linear;
pub mod llama;
pub mod optim;
pub mod rng;
pub mod schedule;
pub mod train;

pub use config::LlamaConfig;
pub use linear::{Linear, LoraInit};
pub use llama::Llama;
pub use optim::{AdamConfig, AdamW, ResetMode};
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
            Ok(Device::new_cuda(n)?)
        }
        other => anyhow::bail!("unknown device `{other}`: use cpu, cuda, cuda:N or auto"),
    }
}

/// The full-rank config, as close as possible in trainable parameters to `target`, that
/// keeps `base`'s depth, heads and MLP ratio: the paper's "Control" baseline.
pub fn control_config(base: LlamaConfig, target: usize) -> LlamaConfig {
    let ratio = base.intermediate as f64 / base.hidden as f64;
    let step = base.heads * 2;
    let mut best = base;
    let mut best_gap = usize::MAX;
    let mut h = step;
    while h <= base.hidden {
        let c = LlamaConfig {
            hidden: h,
            intermediate: ((h as f64 * ratio).round() as usize).max(1),
            ..base
        };
        let gap = c.param_count().abs_diff(target);
        if gap < best_gap {
            best = c;
            best_gap = gap;
        }
        h += step;
    }
    best
}

#[cfg(test)]
mod tests;
