//! `train.json`: what a train stage records about itself for the stages that consume it
//! (`eval`, a continued `train`). Its own module, so that both kinds' code fingerprints
//! cover it and neither covers the other's code.

use anyhow::{Context, Result};
use relora_data::{LoaderState, Packing};
use relora_model::LlamaConfig;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// What a train stage records about itself for the stages that consume it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainInfo {
    pub model: LlamaConfig,
    /// The method's name (`method:` of the stage, or `full` for an import).
    pub method: String,
    pub step: u64,
    pub tokens: u64,
    pub loader: LoaderState,
    pub data_seed: u64,
    pub seq_len: usize,
    pub packing: Packing,
    pub tokenizer_blake3: String,
    pub trainable_params: usize,
    pub frozen_params: usize,
    /// Floats of optimizer state at the end (moments, and GaLore's projectors); absent in
    /// records written before it was kept.
    #[serde(default)]
    pub optimizer_state_floats: Option<usize>,
    pub final_loss: Option<f64>,
    pub eval_loss: Option<f64>,
    pub perplexity: Option<f64>,
}

impl TrainInfo {
    pub fn read(dir: &Path) -> Result<TrainInfo> {
        let p = dir.join("train.json");
        serde_json::from_slice(
            &std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?,
        )
        .with_context(|| format!("{} is not a train stage's record", p.display()))
    }
}

/// Fail unless two stages' tokenizers are the same file: `(what, blake3)` for each side,
/// where `what` names the input and its stage.
pub fn same_tokenizer(model: (&str, &str), data: (&str, &str)) -> Result<()> {
    if model.1 != data.1 {
        anyhow::bail!(
            "{} was trained with tokenizer {} but {} was tokenized with {}; token ids mean \
             different things under different tokenizers. Tokenize this data with the model's \
             tokenizer: give its tokenize stage `inputs: {{tokenizer: STAGE}}`, naming the \
             stage that made the model's training data",
            model.0,
            short(model.1),
            data.0,
            short(data.1)
        );
    }
    Ok(())
}

fn short(hash: &str) -> String {
    format!("blake3:{}", &hash[..hash.len().min(12)])
}
