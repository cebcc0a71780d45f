//! Checkpoints: safetensors for the model and the optimizer moments, JSON for the rest.
//!
//! Each checkpoint is written to a fresh folder and made current by atomically rewriting a
//! `latest` file, so a kill at any moment leaves the previous checkpoint intact.

use crate::llama::Llama;
use crate::optim::AdamW;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use relora_data::LoaderState;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Everything besides tensors that a resumed run needs to continue bit for bit.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Optimizer steps taken in this run (ReLoRA: since the phase began).
    pub step: u64,
    pub opt_step: u64,
    /// Training tokens consumed so far, warm start included.
    pub tokens: u64,
    pub loader: LoaderState,
    pub dropout_rng: Rng,
    pub restart_rng: Rng,
    pub reset_rng: Rng,
    /// Bytes of metrics.jsonl that belong to the steps before this checkpoint.
    pub metrics_len: u64,
}

fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
        .with_context(|| format!("writing {}", tmp.display()));
    if written.is_err() {
        // A full disk: leave no partial file taking the space a retry needs.
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

pub fn save_tensors(map: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let written = candle_core::safetensors::save(map, &tmp)
        .map_err(anyhow::Error::from)
        .and_then(|()| Ok(std::fs::File::open(&tmp)?.sync_all()?))
        .with_context(|| format!("writing {}", tmp.display()));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

pub fn load_tensors(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, dev)
        .with_context(|| format!("{} is not a readable safetensors file", path.display()))
}

fn optimizer_tensors(opt: &AdamW) -> HashMap<String, Tensor> {
    let mut m = HashMap::new();
    for p in &opt.params {
        m.insert(format!("m.{}", p.name), p.m.clone());
        m.insert(format!("v.{}", p.name), p.v.clone());
        if let Some(g) = &p.galore {
            if let Some(l) = &g.left {
                m.insert(format!("galore_left.{}", p.name), l.clone());
            }
            if let Some(r) = &g.right {
                m.insert(format!("galore_right.{}", p.name), r.clone());
            }
        }
    }
    m
}

/// Write a full checkpoint (model, optimizer, state) as `dir/ckpt-<step>` and point
/// `dir/latest` at it; older checkpoints are removed after.
pub fn save(dir: &Path, model: &Llama, opt: &AdamW, state: &TrainState) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = format!("ckpt-{:08}", state.step);
    let target = dir.join(&name);
    let tmp = dir.join(format!("{name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    if let Err(e) = write_folder(&tmp, model, opt, state) {
        // On a full disk the partial folder would hold the space the next attempt needs;
        // the previous checkpoint, which `latest` still names, is untouched.
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "saving the checkpoint at step {} (the previous one is kept)",
            state.step
        )));
    }
    if target.exists() {
        std::fs::remove_dir_all(&target)?;
    }
    std::fs::rename(&tmp, &target)?;
    write_file_atomic(&dir.join("latest"), name.as_bytes())?;
    for e in std::fs::read_dir(dir)?.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n.starts_with("ckpt-") && n != name {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    Ok(target)
}

/// The model, optimizer and state files of a checkpoint, into an existing folder.
pub fn write_folder(dir: &Path, model: &Llama, opt: &AdamW, state: &TrainState) -> Result<()> {
    save_tensors(&model.state_tensors()?, &dir.join("state.safetensors"))?;
    save_tensors(&optimizer_tensors(opt), &dir.join("optim.safetensors"))?;
    write_file_atomic(&dir.join("state.json"), &serde_json::to_vec_pretty(state)?)?;
    Ok(())
}

/// The checkpoint folder `dir/latest` points at, if any.
pub fn latest(dir: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(dir.join("latest")).ok()?;
    let p = dir.join(name.trim());
    p.join("state.json").exists().then_some(p)
}

/// Restore model tensors, optimizer moments and state from a checkpoint folder.
pub fn load(ckpt: &Path, model: &mut Llama, opt: &mut AdamW, dev: &Device) -> Result<TrainState> {
    let tensors = load_tensors(&ckpt.join("state.safetensors"), dev)?;
    model
        .load_state(&tensors)
        .with_context(|| format!("checkpoint {} does not fit this model", ckpt.display()))?;
    let moments = load_tensors(&ckpt.join("optim.safetensors"), dev)?;
    for p in opt.params.iter_mut() {
        let (Some(m), Some(v)) = (
            moments.get(&format!("m.{}", p.name)),
            moments.get(&format!("v.{}", p.name)),
        ) else {
            bail!(
                "checkpoint {} has no optimizer state for `{}`",
                ckpt.display(),
                p.name
            );
        };
        // Another method's moments (a GaLore run continued as full-rank, say) have another
        // shape; caught here rather than as a shape error in the first step.
        for (what, t, want) in [("first", m, &p.m), ("second", v, &p.v)] {
            if t.dims() != want.dims() {
                bail!(
                    "checkpoint {}: the {what} moment of `{}` is {:?}, this stage's optimizer \
                     keeps {:?}; was it written by another training method?",
                    ckpt.display(),
                    p.name,
                    t.dims(),
                    want.dims()
                );
            }
        }
        p.m = m.clone();
        p.v = v.clone();
        if let Some(g) = &mut p.galore {
            g.left = moments.get(&format!("galore_left.{}", p.name)).cloned();
            g.right = moments.get(&format!("galore_right.{}", p.name)).cloned();
        }
    }
    let path = ckpt.join("state.json");
    let state: TrainState = serde_json::from_slice(&std::fs::read(&path)?)
        .with_context(|| format!("{} is corrupt", path.display()))?;
    opt.step = state.opt_step;
    // A projector set by a step taken must come back, or the run would not continue bit
    // for bit (a fresh SVD at the next step would replace the subspace early).
    if opt.step > 0 {
        if let Some(p) = opt
            .params
            .iter()
            .find(|p| p.galore.as_ref().is_some_and(|g| !g.is_set()))
        {
            bail!(
                "checkpoint {} has no GaLore projector for `{}`, though {} steps were taken",
                ckpt.display(),
                p.name,
                opt.step
            );
        }
    }
    Ok(state)
}
