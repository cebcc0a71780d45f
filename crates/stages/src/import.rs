//! `import`: a Hugging Face LLaMA checkpoint directory as a model entry like any other
//! (`model.safetensors`, `train.json`, `tokenizer.json`), so a train stage can continue
//! pre-training it (`init: STAGE`) and tokenize stages can use its tokenizer.

use crate::record::TrainInfo;
use anyhow::{Context, Result};
use relora_data::Packing;
use relora_exec::{parse_params, StageContext, StageKind};
use relora_model::checkpoint::save_tensors;
use relora_spec::{SpecError, StageSpec};
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportParams {
    /// The checkpoint directory (relative to the pipeline file): config.json,
    /// model.safetensors (or an index and its shards), tokenizer.json.
    pub path: PathBuf,
}

pub struct Import;

/// The files of a checkpoint directory that decide what is imported.
fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the checkpoint directory {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            p.is_file()
                && (name == "config.json"
                    || name == "tokenizer.json"
                    || name.ends_with(".safetensors")
                    || name == "model.safetensors.index.json")
        })
        .collect();
    files.sort();
    Ok(files)
}

impl StageKind for Import {
    fn name(&self) -> &'static str {
        "import"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::IMPORT
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        Some(&[])
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let p: ImportParams = parse_params(stage)?;
        let dir = stage.base_dir.join(&p.path);
        if !dir.is_dir() {
            return Err(vec![stage.error(
                &["params", "path"],
                format!(
                    "`{}` is not a directory (relative to {})",
                    p.path.display(),
                    stage.base_dir.display()
                ),
            )]);
        }
        // The checks that need only config.json, before anything runs.
        relora_hf::read_config(&dir)
            .map(|_| ())
            .map_err(|e| vec![stage.error(&["params", "path"], e.to_string())])
    }
    fn external_files(&self, stage: &StageSpec) -> Result<Vec<(String, PathBuf)>> {
        let p: ImportParams = serde_json::from_value(stage.params.clone())?;
        Ok(checkpoint_files(&stage.base_dir.join(&p.path))?
            .into_iter()
            .map(|f| {
                let label = f
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string();
                (label, f)
            })
            .collect())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: ImportParams = serde_json::from_value(ctx.params.clone())?;
        let dir = ctx.resolve(&p.path.to_string_lossy());
        let imported = relora_hf::import(&dir, &candle_core::Device::Cpu)?;
        save_tensors(&imported.tensors, &ctx.out_dir.join("model.safetensors"))?;
        let tokenizer = ctx.out_dir.join("tokenizer.json");
        std::fs::copy(&imported.tokenizer, &tokenizer)?;
        let cfg = imported.cfg;
        let info = TrainInfo {
            model: cfg,
            method: "full".into(),
            step: 0,
            tokens: 0,
            loader: Default::default(),
            data_seed: 0,
            seq_len: imported.config.max_position_embeddings,
            packing: Packing::Concat,
            tokenizer_blake3: blake3::hash(&std::fs::read(&tokenizer)?)
                .to_hex()
                .to_string(),
            trainable_params: cfg.param_count(),
            frozen_params: 0,
            optimizer_state_floats: None,
            final_loss: None,
            eval_loss: None,
            perplexity: None,
        };
        std::fs::write(
            ctx.out_dir.join("train.json"),
            serde_json::to_vec_pretty(&info)?,
        )?;
        println!(
            "imported {}: hidden {}, intermediate {}, {} heads, {} layers, vocabulary {} ({} parameters)",
            dir.display(),
            cfg.hidden,
            cfg.intermediate,
            cfg.heads,
            cfg.layers,
            cfg.vocab_size,
            cfg.param_count()
        );
        ctx.metric("params", cfg.param_count());
        Ok(())
    }
}
