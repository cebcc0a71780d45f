//! `eval`: perplexity of a trained model on a fixed token budget of the validation or the
//! test split.

use crate::device::DeviceParam;
use crate::train::TrainInfo;
use anyhow::{Context, Result};
use relora_data::{DatasetManifest, PackSpec, SequenceReader, Split};
use relora_exec::{parse_params, Estimate, InputEstimate, StageContext, StageKind};
use relora_model::checkpoint::load_tensors;
use relora_model::precision::Precision;
use relora_model::{evaluate, Llama};
use relora_spec::{Resources, SpecError, StageSpec};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// Validation tokens to score (rounded down to whole sequences).
    #[serde(default = "d_tokens")]
    pub tokens: usize,
    /// Default: the sequence length the model was trained with.
    #[serde(default)]
    pub seq_len: Option<usize>,
    #[serde(default = "d_micro")]
    pub micro_batch: usize,
    #[serde(default)]
    pub device: DeviceParam,
    /// Compute dtype: f32 or bf16 (bf16 for speed on a GPU; weights are read as f32).
    #[serde(default)]
    pub dtype: Precision,
    /// Which held-out split to score: `valid` (what choices are made on) or `test` (what a
    /// chosen model is reported on; the tokenize stage must hold one out).
    #[serde(default)]
    pub split: EvalSplit,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalSplit {
    #[default]
    Valid,
    Test,
}

impl EvalSplit {
    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::Valid => "valid",
            EvalSplit::Test => "test",
        }
    }
}

fn d_tokens() -> usize {
    65_536
}
fn d_micro() -> usize {
    8
}

pub struct Eval;

impl StageKind for Eval {
    fn name(&self) -> &'static str {
        "eval"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::EVAL
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        Some(&[("model", true), ("data", true)])
    }
    fn resources(&self, params: &Value) -> Resources {
        crate::device::resources_of(params)
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let p: EvalParams = parse_params(stage)?;
        let mut c = crate::check::Checks::new(stage);
        c.at_least(
            &["tokens"],
            p.tokens as u64,
            1,
            "validation tokens to score",
        );
        c.at_least(
            &["micro_batch"],
            p.micro_batch as u64,
            1,
            "sequences per pass",
        );
        if let Some(n) = p.seq_len {
            c.at_least(
                &["seq_len"],
                n as u64,
                2,
                "a sequence of n tokens gives n - 1 predictions to score",
            );
        }
        c.finish()
    }
    fn estimate(
        &self,
        stage: &StageSpec,
        inputs: &BTreeMap<String, InputEstimate>,
        _cached: Option<&Path>,
    ) -> Result<Estimate> {
        let p: EvalParams = serde_json::from_value(stage.params.clone())?;
        crate::estimate::eval(&p, inputs)
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        relora_model::alloc::keep_freed_memory();
        let p: EvalParams = serde_json::from_value(ctx.params.clone())?;
        let device = p.device.open(&ctx.gpus)?;
        let model_dir = ctx.input("model")?.to_path_buf();
        let data_dir = ctx.input("data")?.to_path_buf();
        let info = TrainInfo::read(&model_dir)?;
        let data = DatasetManifest::read(&data_dir)?;
        crate::record::same_tokenizer(
            (&ctx.describe_input("model"), &info.tokenizer_blake3),
            (&ctx.describe_input("data"), &data.tokenizer_blake3),
        )?;
        let weights = model_dir.join("model.safetensors");
        let mut model = Llama::from_tensors(info.model, &load_tensors(&weights, &device)?)
            .with_context(|| format!("loading {}", weights.display()))?;
        model.compute = p.dtype.dtype();
        let seq_len = p.seq_len.unwrap_or(info.seq_len);
        let shards = match p.split {
            EvalSplit::Valid => data.valid.shards.clone(),
            EvalSplit::Test => match &data.test {
                Some(t) => t.shards.clone(),
                None => anyhow::bail!(
                    "`split: test` asks for the test split, but {} holds none: give its \
                     tokenize stage `test_docs` or `test_files`",
                    ctx.describe_input("data")
                ),
            },
        };
        let split = Split::new(&data_dir, shards);
        let available = split.sequences(seq_len, info.packing);
        let n = (p.tokens / seq_len).max(1);
        if available < n as u64 {
            println!(
                "note: the {} split holds about {available} sequences of {seq_len}; scoring \
                 all of them",
                p.split.name()
            );
        }
        let spec = PackSpec {
            seq_len,
            packing: info.packing,
            pad_id: data.pad_id,
            vocab_size: Some(data.vocab_size as u32),
        };
        // Streamed: memory holds a few micro-batches, whatever `tokens` is.
        let batches = SequenceReader::new(&split, spec, 1)?.prefetch(n, p.micro_batch);
        let mut sequences = 0;
        let batches = batches.inspect(|b| sequences += b.as_ref().map_or(0, |b| b.batch_size));
        let (loss, tokens) = evaluate(&model, batches, &device)?;
        let result = json!({
            "split": p.split.name(),
            "eval_loss": loss,
            "perplexity": loss.exp(),
            "tokens": tokens,
            "sequences": sequences,
            "seq_len": seq_len,
            "method": info.method,
            "model": info.model,
            "trainable_params": info.trainable_params,
            "frozen_params": info.frozen_params,
            "optimizer_state_floats": info.optimizer_state_floats,
            "train_tokens": info.tokens,
        });
        println!(
            "{} perplexity {:.3} (loss {loss:.4}) over {tokens} tokens",
            p.split.name(),
            loss.exp()
        );
        std::fs::write(
            ctx.out_dir.join("eval.json"),
            serde_json::to_vec_pretty(&result)?,
        )?;
        if let Value::Object(m) = result {
            for (k, v) in m {
                ctx.metric(&k, v);
            }
        }
        Ok(())
    }
}
