//! Replays a sequence of gradients through relora-pipe's GaLore optimizer, for the
//! comparison with the authors' galore-torch (`scripts/galore/check.sh`).
//!
//! cargo run --release --example galore_replay -- CONFIG.json IN.safetensors OUT.safetensors
//!
//! CONFIG: `{"galore": {rank, update_proj_gap, scale, proj_type}, "lr", "beta1", "beta2",
//! "eps", "weight_decay", "steps"}`. IN holds `w.NAME` (the initial 2-D weights, every one
//! projected) and `g.STEP.NAME` (the gradient of each step, from 0). OUT gets `w.NAME` after
//! every step, as `w.STEP.NAME`.

use anyhow::{Context, Result};
use candle_core::{Device, Var};
use relora_model::checkpoint::{load_tensors, save_tensors};
use relora_model::{AdamConfig, AdamW, GaloreConfig};
use serde::Deserialize;
use std::collections::HashMap;
use std::path::Path;

#[derive(Deserialize)]
struct Config {
    galore: GaloreConfig,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    steps: usize,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [config, input, output] = args.as_slice() else {
        anyhow::bail!("usage: galore_replay CONFIG.json IN.safetensors OUT.safetensors");
    };
    let cfg: Config = serde_json::from_slice(&std::fs::read(config)?)
        .with_context(|| format!("{config} is not a replay config"))?;
    let dev = Device::Cpu;
    let tensors = load_tensors(Path::new(input), &dev)?;
    let mut names: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix("w.").map(str::to_string))
        .collect();
    names.sort();
    let vars: Vec<(String, Var, bool)> = names
        .iter()
        .map(|n| {
            Ok((
                n.clone(),
                Var::from_tensor(&tensors[&format!("w.{n}")])?,
                false,
            ))
        })
        .collect::<Result<_>>()?;
    let mut opt = AdamW::new(
        vars.clone(),
        AdamConfig {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        },
    )?;
    opt.use_galore(cfg.galore, |_| true)?;
    let mut out = HashMap::new();
    for step in 0..cfg.steps {
        let grads = names
            .iter()
            .map(|n| {
                tensors
                    .get(&format!("g.{step}.{n}"))
                    .cloned()
                    .with_context(|| format!("{input} has no g.{step}.{n}"))
            })
            .collect::<Result<Vec<_>>>()?;
        opt.step(&grads, cfg.lr)?;
        for (n, v, _) in &vars {
            out.insert(format!("w.{step}.{n}"), v.as_tensor().copy()?);
        }
    }
    save_tensors(&out, Path::new(output))
}
