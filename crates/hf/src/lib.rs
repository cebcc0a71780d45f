//! relora-hf: LLaMA checkpoints in Hugging Face transformers' layout, out and in.
//!
//! [`export`] writes a directory that `LlamaForCausalLM.from_pretrained(dir)` and
//! `AutoTokenizer.from_pretrained(dir)` load with no code of ours: `config.json`,
//! `generation_config.json`, `model.safetensors` under transformers' tensor names,
//! `tokenizer.json` with `tokenizer_config.json` and `special_tokens_map.json`, and a model
//! card. [`import`] reads such a directory (ours, or another LLaMA-architecture checkpoint of
//! the same design) back into relora-model's tensor names, checking the architecture, the
//! sizes and every tensor. Errors name the file and the field or tensor.
//!
//! The model is the same function on both sides: relora-model's LLaMA is transformers'
//! (rotate-half RoPE with base 10,000, RMSNorm with eps 1e-6, SwiGLU, untied head, no
//! biases), so a checkpoint that differs in any of these is refused rather than
//! approximated. Nothing here knows about pipelines or the cache.

use candle_core::{DType, Device, Tensor};
use relora_model::llama::{PROJECTIONS, RMS_EPS, ROPE_BASE};
use relora_model::LlamaConfig;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A problem with a checkpoint directory: the file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{}: {what}", file.display())]
pub struct HfError {
    pub file: PathBuf,
    pub what: String,
}

fn err(file: &Path, what: impl Into<String>) -> HfError {
    HfError {
        file: file.to_path_buf(),
        what: what.into(),
    }
}

/// `config.json`: the fields of transformers' `LlamaConfig` that decide the function the
/// model computes, and the special token ids.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfConfig {
    pub architectures: Vec<String>,
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(default = "positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "float32")]
    pub torch_dtype: String,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// One id, or a list of them (newer checkpoints).
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

fn silu() -> String {
    "silu".into()
}
fn positions() -> usize {
    2048
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn float32() -> String {
    "float32".into()
}

/// transformers' name for one of relora-model's tensors.
pub fn hf_name(ours: &str) -> String {
    let Some(rest) = ours.strip_prefix("layers.") else {
        return match ours {
            "lm_head.weight" => ours.to_string(),
            other => format!("model.{other}"),
        };
    };
    let (layer, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let module = tail.split('.').next().unwrap_or("");
    let group = match module {
        "q_proj" | "k_proj" | "v_proj" | "o_proj" => "self_attn.",
        "gate_proj" | "up_proj" | "down_proj" => "mlp.",
        _ => "",
    };
    format!("model.layers.{layer}.{group}{tail}")
}

/// Every tensor of a plain LLaMA of `cfg`, with its shape, under relora-model's names.
pub fn expected_tensors(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden, cfg.intermediate, cfg.vocab_size);
    let mut out = vec![("embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.layers {
        let shapes = [(h, h), (h, h), (h, h), (h, h), (i, h), (i, h), (h, i)];
        for (p, (r, c)) in PROJECTIONS.iter().zip(shapes) {
            out.push((format!("layers.{l}.{p}.weight"), vec![r, c]));
        }
        out.push((format!("layers.{l}.input_layernorm.weight"), vec![h]));
        out.push((
            format!("layers.{l}.post_attention_layernorm.weight"),
            vec![h],
        ));
    }
    out.push(("norm.weight".to_string(), vec![h]));
    out.push(("lm_head.weight".to_string(), vec![v, h]));
    out
}

/// The special tokens of the tokenizer the model was trained with.
#[derive(Debug, Clone)]
pub struct SpecialTokens {
    /// The end-of-document token (every training document ends in it).
    pub eos: (u32, String),
    pub pad: Option<(u32, String)>,
    pub unk: Option<(u32, String)>,
}

/// What [`export`] writes.
pub struct ExportSpec<'a> {
    pub cfg: LlamaConfig,
    /// Plain (merged) weights under relora-model's names.
    pub tensors: &'a HashMap<String, Tensor>,
    /// The training data's `tokenizer.json`.
    pub tokenizer: &'a Path,
    pub special: SpecialTokens,
    /// The sequence length the model was trained at (`max_position_embeddings`).
    pub max_positions: usize,
    /// `README.md`, the model card.
    pub card: String,
}

fn write_json(path: &Path, v: &Value) -> Result<(), HfError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| err(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| err(path, format!("cannot write: {e}")))
}

/// The `config.json` of an exported model.
pub fn hf_config(spec: &ExportSpec) -> HfConfig {
    let c = &spec.cfg;
    HfConfig {
        architectures: vec!["LlamaForCausalLM".into()],
        model_type: "llama".into(),
        vocab_size: c.vocab_size,
        hidden_size: c.hidden,
        intermediate_size: c.intermediate,
        num_hidden_layers: c.layers,
        num_attention_heads: c.heads,
        num_key_value_heads: Some(c.heads),
        head_dim: Some(c.head_dim()),
        hidden_act: "silu".into(),
        max_position_embeddings: spec.max_positions,
        rms_norm_eps: RMS_EPS,
        rope_theta: ROPE_BASE,
        rope_scaling: None,
        attention_bias: false,
        mlp_bias: false,
        tie_word_embeddings: false,
        torch_dtype: "float32".into(),
        // Documents were packed after the previous one's end token: that token is what
        // the model saw before every document's first token.
        bos_token_id: Some(spec.special.eos.0),
        eos_token_id: Some(json!(spec.special.eos.0)),
        pad_token_id: spec.special.pad.as_ref().map(|p| p.0),
    }
}

/// Write `spec` as a transformers checkpoint directory `dir` (created; files replaced).
pub fn export(spec: &ExportSpec, dir: &Path) -> Result<(), HfError> {
    std::fs::create_dir_all(dir).map_err(|e| err(dir, format!("cannot create: {e}")))?;
    let weights = dir.join("model.safetensors");
    let expected = expected_tensors(&spec.cfg);
    if let Some(extra) = spec
        .tensors
        .keys()
        .find(|k| !expected.iter().any(|(n, _)| n == *k))
    {
        return Err(err(
            &weights,
            format!("tensor `{extra}` is not part of a plain LLaMA; export merged weights"),
        ));
    }
    let mut named: Vec<(String, Tensor)> = Vec::new();
    for (name, shape) in expected {
        let t = spec.tensors.get(&name).ok_or_else(|| {
            err(
                &weights,
                format!("the model has no tensor `{name}` to export"),
            )
        })?;
        if t.dims() != shape.as_slice() {
            return Err(err(
                &weights,
                format!(
                    "tensor `{name}` is {:?}, the config says {shape:?}",
                    t.dims()
                ),
            ));
        }
        let t = t
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&Device::Cpu))
            .map_err(|e| err(&weights, e.to_string()))?;
        named.push((hf_name(&name), t));
    }
    // f32 little-endian bytes; transformers checks the header's `format` before loading.
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = named
        .into_iter()
        .map(|(n, t)| {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            Ok((
                n,
                t.dims().to_vec(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ))
        })
        .collect::<candle_core::Result<_>>()
        .map_err(|e| err(&weights, e.to_string()))?;
    let views = bytes
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (n.as_str(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(&weights, e.to_string()))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), &weights)
        .map_err(|e| err(&weights, format!("cannot write: {e}")))?;

    let config = hf_config(spec);
    write_json(
        &dir.join("config.json"),
        &serde_json::to_value(&config).expect("a config serialises"),
    )?;
    write_json(
        &dir.join("generation_config.json"),
        &json!({
            "bos_token_id": config.bos_token_id,
            "eos_token_id": config.eos_token_id,
            "pad_token_id": config.pad_token_id,
        }),
    )?;
    let tok = dir.join("tokenizer.json");
    std::fs::copy(spec.tokenizer, &tok).map_err(|e| {
        err(
            spec.tokenizer,
            format!("cannot copy to {}: {e}", tok.display()),
        )
    })?;
    let mut special = json!({ "eos_token": spec.special.eos.1 });
    if let Some((_, p)) = &spec.special.pad {
        special["pad_token"] = json!(p);
    }
    if let Some((_, u)) = &spec.special.unk {
        special["unk_token"] = json!(u);
    }
    write_json(&dir.join("special_tokens_map.json"), &special)?;
    let mut tok_config = special.clone();
    tok_config["tokenizer_class"] = json!("PreTrainedTokenizerFast");
    tok_config["model_max_length"] = json!(spec.max_positions);
    tok_config["clean_up_tokenization_spaces"] = json!(false);
    write_json(&dir.join("tokenizer_config.json"), &tok_config)?;
    let card = dir.join("README.md");
    std::fs::write(&card, &spec.card).map_err(|e| err(&card, format!("cannot write: {e}")))?;
    Ok(())
}

/// A checkpoint read by [`import`].
pub struct Imported {
    pub cfg: LlamaConfig,
    /// Plain weights under relora-model's names, f32.
    pub tensors: HashMap<String, Tensor>,
    pub config: HfConfig,
    /// The directory's `tokenizer.json`.
    pub tokenizer: PathBuf,
}

/// Read `dir/config.json`, refusing what relora-model cannot compute exactly.
pub fn read_config(dir: &Path) -> Result<HfConfig, HfError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| {
        err(
            &path,
            format!("cannot read ({e}); is this a Hugging Face model directory?"),
        )
    })?;
    let raw: Value =
        serde_json::from_str(&text).map_err(|e| err(&path, format!("not JSON: {e}")))?;
    let model_type = raw.get("model_type").and_then(Value::as_str).unwrap_or("");
    let archs = raw.get("architectures").cloned().unwrap_or(Value::Null);
    if model_type != "llama" {
        return Err(err(
            &path,
            format!(
                "model_type is `{model_type}` (architectures {archs}), not `llama`: relora-pipe \
                 imports LLaMA-architecture checkpoints (LlamaForCausalLM)"
            ),
        ));
    }
    let c: HfConfig = serde_json::from_value(raw).map_err(|e| err(&path, e.to_string()))?;
    let refuse = |field: &str, value: String, ours: &str| {
        Err(err(
            &path,
            format!(
                "{field} is {value}, but relora-pipe's LLaMA computes with {ours}; importing \
                 it would change the function the model computes"
            ),
        ))
    };
    if c.hidden_act != "silu" {
        return refuse("hidden_act", c.hidden_act.clone(), "silu");
    }
    if c.rms_norm_eps != RMS_EPS {
        return refuse("rms_norm_eps", c.rms_norm_eps.to_string(), "1e-6");
    }
    if c.rope_theta != ROPE_BASE {
        return refuse("rope_theta", c.rope_theta.to_string(), "10000");
    }
    if let Some(s) = c.rope_scaling.as_ref().filter(|s| !s.is_null()) {
        return refuse("rope_scaling", s.to_string(), "none");
    }
    if c.attention_bias || c.mlp_bias {
        return refuse("attention_bias/mlp_bias", "true".into(), "no biases");
    }
    if c.num_key_value_heads
        .is_some_and(|k| k != c.num_attention_heads)
    {
        return refuse(
            "num_key_value_heads",
            format!("{:?}", c.num_key_value_heads),
            "as many key/value heads as query heads",
        );
    }
    if c.head_dim
        .is_some_and(|d| d * c.num_attention_heads != c.hidden_size)
    {
        return refuse(
            "head_dim",
            format!("{:?}", c.head_dim),
            "hidden_size / num_attention_heads",
        );
    }
    Ok(c)
}

/// The safetensors files of `dir`: `model.safetensors`, or the shards an index lists.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, HfError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).map_err(|_| {
        err(
            dir,
            "holds neither model.safetensors nor model.safetensors.index.json (a PyTorch \
             .bin checkpoint must be converted to safetensors first)",
        )
    })?;
    let v: Value = serde_json::from_str(&text).map_err(|e| err(&index, e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| err(&index, "has no `weight_map`"))?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(Value::as_str)
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Read a transformers LLaMA checkpoint directory into relora-model's names, on `dev`.
pub fn import(dir: &Path, dev: &Device) -> Result<Imported, HfError> {
    let config = read_config(dir)?;
    let config_path = dir.join("config.json");
    let cfg = LlamaConfig {
        vocab_size: config.vocab_size,
        hidden: config.hidden_size,
        intermediate: config.intermediate_size,
        heads: config.num_attention_heads,
        layers: config.num_hidden_layers,
    };
    cfg.validate().map_err(|e| err(&config_path, e))?;

    let files = weight_files(dir)?;
    let mut found: HashMap<String, (Tensor, PathBuf)> = HashMap::new();
    for file in &files {
        let tensors = candle_core::safetensors::load(file, dev)
            .map_err(|e| err(file, format!("not a readable safetensors file: {e}")))?;
        for (name, t) in tensors {
            found.insert(name, (t, file.clone()));
        }
    }
    let weights_name = files
        .first()
        .cloned()
        .unwrap_or_else(|| dir.join("model.safetensors"));
    let mut tensors = HashMap::new();
    for (name, shape) in expected_tensors(&cfg) {
        let hf = hf_name(&name);
        let (t, file) = match found.remove(&hf) {
            Some(x) => x,
            None if name == "lm_head.weight" && config.tie_word_embeddings => {
                let embed = tensors
                    .get("embed_tokens.weight")
                    .cloned()
                    .expect("the embedding comes first");
                (embed, weights_name.clone())
            }
            None => {
                return Err(err(
                    &weights_name,
                    format!("has no tensor `{hf}`, which a LLaMA of config.json's sizes needs"),
                ))
            }
        };
        if t.dims() != shape.as_slice() {
            return Err(err(
                &file,
                format!(
                    "tensor `{hf}` is {:?}, but config.json's sizes make it {shape:?}",
                    t.dims()
                ),
            ));
        }
        let t = t
            .to_dtype(DType::F32)
            .map_err(|e| err(&file, format!("tensor `{hf}`: {e}")))?;
        tensors.insert(name, t);
    }
    // Buffers some versions save; they are recomputed, not learnt.
    found.retain(|n, _| !n.ends_with("rotary_emb.inv_freq"));
    if let Some((extra, (_, file))) = found.iter().next() {
        return Err(err(
            file,
            format!(
                "tensor `{extra}` is not part of a LLaMA of config.json's sizes (another \
                 variant, or more layers than num_hidden_layers?)"
            ),
        ));
    }

    let tokenizer = dir.join("tokenizer.json");
    let tok = relora_data::tokenize::load_tokenizer(&tokenizer).map_err(|e| {
        err(
            &tokenizer,
            format!("{e:#}; relora-pipe needs the fast tokenizer file to tokenize data like the model's"),
        )
    })?;
    let n = tok.get_vocab_size(true);
    if n > cfg.vocab_size {
        return Err(err(
            &tokenizer,
            format!(
                "the tokenizer has {n} ids but the embedding (config.json vocab_size) has {} \
                 rows: ids past {} would have no embedding",
                cfg.vocab_size,
                cfg.vocab_size - 1
            ),
        ));
    }
    Ok(Imported {
        cfg,
        tensors,
        config,
        tokenizer,
    })
}

#[cfg(test)]
mod tests;

/// The model the transformers check runs (`scripts/hf/check_transformers.sh`): a small
/// random LLaMA on the bundled T5 vocabulary, the same in the Rust test and in the
/// exported directory the Python script loads.
pub mod fixture {
    use super::*;
    use relora_model::Rng;

    /// Its shape: T5's 32,100 ids, hidden 64, 2 layers of 4 heads.
    pub const CONFIG: LlamaConfig = LlamaConfig {
        vocab_size: 32100,
        hidden: 64,
        intermediate: 176,
        heads: 4,
        layers: 2,
    };

    /// The token sequences whose logits are compared: T5 ids of C4-like text, and ids from
    /// across the vocabulary.
    pub const SEQUENCES: [[u32; 12]; 3] = [
        [37, 1065, 19, 3, 9, 1382, 13, 8, 1234, 5, 1, 0],
        [32099, 5, 17, 31999, 2, 8, 1000, 20000, 30000, 12, 3, 7],
        [1, 1, 1, 100, 200, 300, 400, 500, 600, 700, 800, 900],
    ];
    /// The vocabulary ids whose logits are recorded at every position (all of them would
    /// make a 4 MB fixture; the log-sum-exp over the whole vocabulary is recorded too).
    pub const PROBE_IDS: [u32; 12] = [0, 1, 2, 3, 5, 8, 37, 1000, 12345, 20000, 31999, 32099];

    /// Its weights (norms perturbed too, so that a mapping that swapped them would show).
    pub fn tensors() -> HashMap<String, Tensor> {
        let mut rng = Rng::new(20_231_128);
        expected_tensors(&CONFIG)
            .into_iter()
            .map(|(name, shape)| {
                let n = shape.iter().product();
                let v: Vec<f32> = if name.ends_with("norm.weight") {
                    rng.normal_vec(n, 0.1)
                        .into_iter()
                        .map(|x| 1.0 + x)
                        .collect()
                } else {
                    rng.normal_vec(n, 0.05)
                };
                let t = Tensor::from_vec(v, shape, &Device::Cpu).expect("shapes match");
                (name, t)
            })
            .collect()
    }

    /// Export it to `dir` with `tokenizer` (the bundled T5 `tokenizer.json`).
    pub fn export_to(dir: &Path, tokenizer: &Path) -> Result<(), HfError> {
        let tensors = tensors();
        export(
            &ExportSpec {
                cfg: CONFIG,
                tensors: &tensors,
                tokenizer,
                special: SpecialTokens {
                    eos: (1, "</s>".into()),
                    pad: Some((0, "<pad>".into())),
                    unk: Some((2, "<unk>".into())),
                },
                max_positions: 256,
                card: "A random LLaMA for checking relora-pipe against transformers.\n".into(),
            },
            dir,
        )
    }
}
