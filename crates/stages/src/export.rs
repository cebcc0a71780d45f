//! `export`: a trained model as a Hugging Face transformers checkpoint directory
//! (relora-hf), with its tokenizer and a model card. Also behind `relora-pipe export`.

use crate::record::{same_tokenizer, TrainInfo};
use anyhow::{Context, Result};
use relora_data::DatasetManifest;
use relora_exec::{parse_params, StageContext, StageKind};
use relora_hf::{ExportSpec, SpecialTokens};
use relora_model::checkpoint::load_tensors;
use relora_spec::{SpecError, StageSpec};
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ExportParams {
    /// A line for the model card's title (default: the method and size).
    #[serde(default)]
    pub title: Option<String>,
}

pub struct Export;

/// Write the model of the train entry `model_dir` (tokenized by the entry `tokenizer_dir`,
/// which holds `tokenizer.json` and usually `dataset.json`) to `out` in transformers'
/// layout. `provenance` adds a line to the card (the one-off command names the pipeline,
/// stage and key; a stage's own outputs may only hold what its key covers).
pub fn export_entry(
    model_dir: &Path,
    tokenizer_dir: &Path,
    names: (&str, &str),
    title: Option<&str>,
    provenance: Option<&str>,
    out: &Path,
) -> Result<()> {
    let info = TrainInfo::read(model_dir)?;
    let tokenizer = tokenizer_dir.join("tokenizer.json");
    same_tokenizer(
        (names.0, &info.tokenizer_blake3),
        (names.1, &relora_cache::hash_file(&tokenizer)?),
    )?;
    let data = DatasetManifest::read(tokenizer_dir).ok();
    let tok = relora_data::tokenize::load_tokenizer(&tokenizer)?;
    let named = |id: u32| tok.id_to_token(id).map(|s| (id, s));
    let eos = data
        .as_ref()
        .map(|d| d.eos_id)
        .or_else(|| tok.token_to_id("</s>"))
        .context(
            "the tokenizer has no `</s>` and the entry no dataset.json naming its end token",
        )?;
    let pad = data
        .as_ref()
        .map(|d| d.pad_id)
        .or_else(|| tok.token_to_id("<pad>"));
    let special = SpecialTokens {
        eos: named(eos).context("the end token's id is not in the tokenizer")?,
        pad: pad.and_then(named),
        unk: tok.token_to_id("<unk>").and_then(named),
    };
    let weights = model_dir.join("model.safetensors");
    let tensors = load_tensors(&weights, &candle_core::Device::Cpu)?;
    let card = model_card(
        &info,
        data.as_ref(),
        &relora_cache::hash_file(&weights)?,
        title,
        provenance,
    );
    relora_hf::export(
        &ExportSpec {
            cfg: info.model,
            tensors: &tensors,
            tokenizer: &tokenizer,
            special,
            max_positions: info.seq_len,
            card,
        },
        out,
    )?;
    Ok(())
}

fn model_card(
    info: &TrainInfo,
    data: Option<&DatasetManifest>,
    weights_hash: &str,
    title: Option<&str>,
    provenance: Option<&str>,
) -> String {
    let m = &info.model;
    // A name this binary does not know (a newer one's record) is shown as it is.
    let method =
        crate::train::method::find(&info.method).map_or(info.method.as_str(), |m| m.summary());
    let title = title.map_or_else(
        || format!("LLaMA, {} parameters, {method}", m.param_count()),
        str::to_string,
    );
    let mut s = format!(
        "---\nlibrary_name: transformers\ntags: [llama, relora, relora-pipe]\n---\n\n# {title}\n\n\
         A LLaMA-architecture causal language model pre-trained with relora-pipe.\n\n\
         | | |\n|---|---|\n\
         | method | {method} |\n\
         | size | hidden {}, intermediate {}, {} heads, {} layers, vocabulary {} ({} parameters) |\n\
         | steps | {} (this stage's run) |\n\
         | tokens seen | {} (warm start included) |\n\
         | sequence length | {} |\n",
        m.hidden,
        m.intermediate,
        m.heads,
        m.layers,
        m.vocab_size,
        m.param_count(),
        info.step,
        info.tokens,
        info.seq_len,
    );
    if let Some(p) = info.perplexity {
        s += &format!("| validation perplexity | {p:.3} (at the last step, on the training run's evaluation set) |\n");
    }
    if let Some(d) = data {
        s += &format!(
            "| data | {} training documents ({} tokens) from {} |\n",
            d.train.documents,
            d.train.tokens,
            d.sources
                .iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    s += &format!("| weights | blake3 {weights_hash} (relora-pipe's model.safetensors) |\n");
    if let Some(p) = provenance {
        s += &format!("| made from | {p} |\n");
    }
    s += "\nLoad it with `LlamaForCausalLM.from_pretrained(dir)` and \
          `AutoTokenizer.from_pretrained(dir)`. Documents were packed one after another, each \
          ending in the end token; `bos_token_id` is that token.\n";
    s
}

impl StageKind for Export {
    fn name(&self) -> &'static str {
        "export"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::EXPORT
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        Some(&[("model", true), ("tokenizer", true)])
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        parse_params::<ExportParams>(stage).map(|_| ())
    }
    fn estimate(
        &self,
        _stage: &StageSpec,
        inputs: &std::collections::BTreeMap<String, relora_exec::InputEstimate>,
        _cached: Option<&Path>,
    ) -> Result<relora_exec::Estimate> {
        let model = inputs
            .get("model")
            .and_then(|m| m.facts.get("model_bytes"))
            .and_then(|v| v.as_f64());
        Ok(match model {
            Some(bytes) => relora_exec::Estimate {
                lines: vec![format!(
                    "writes ≈ {:.1} MB: the weights in f32, the tokenizer and a card",
                    bytes / 1e6
                )],
                facts: serde_json::json!({ "disk_bytes": bytes }),
            },
            None => relora_exec::Estimate::default(),
        })
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: ExportParams = serde_json::from_value(ctx.params.clone())?;
        export_entry(
            ctx.input("model")?,
            ctx.input("tokenizer")?,
            (
                &ctx.describe_input("model"),
                &ctx.describe_input("tokenizer"),
            ),
            p.title.as_deref(),
            None,
            &ctx.out_dir,
        )?;
        println!("exported to {}", ctx.out_dir.display());
        Ok(())
    }
}
