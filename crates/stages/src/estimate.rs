//! `plan --estimate`: what tokenize, train and eval stages will read and compute, before
//! they run, so a user sees the size of a pipeline such as paper.yaml before starting it.
//!
//! Exact where the inputs are cached (a dataset's manifest), estimated otherwise, and
//! labelled so. No kind's code fingerprint covers this module: estimates never reach outputs.
//!
//! FLOPs follow the usual accounting (Kaplan et al.; PaLM's MFU): a matmul weight costs 2
//! FLOPs per token forward and 4 backward (input and weight gradients), attention
//! `4·layers·hidden·seq_len` forward and twice that backward, counted without the causal
//! mask's saving. A frozen weight (LoRA, ReLoRA) needs no weight gradient: 4 per token, not 6.

use crate::eval::EvalParams;
use crate::tokenize::TokenizeParams;
use crate::train::method::block_and_head;
use crate::train::TrainParams;
use anyhow::Result;
use relora_data::{DatasetManifest, TokenizerSource};
use relora_exec::{Estimate, InputEstimate};
use relora_model::LlamaConfig;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// T5 tokens per byte of C4's gzip JSON lines, measured on the bundled sample (513,612
/// tokens from 911,942 bytes); per uncompressed byte, 0.220.
const TOKENS_PER_GZIP_BYTE: f64 = 0.563;
const TOKENS_PER_TEXT_BYTE: f64 = 0.220;
/// Mean T5 tokens per C4 document in the sample.
const TOKENS_PER_DOC: f64 = 513.6;

/// An H100/H200 SXM's dense bf16 peak, and the utilisation assumed for hours.
const H100_FLOPS: f64 = 989e12;
const ASSUMED_MFU: f64 = 0.4;

fn si(x: f64) -> String {
    let (v, unit) = match x.abs() {
        a if a >= 1e12 => (x / 1e12, "T"),
        a if a >= 1e9 => (x / 1e9, "B"),
        a if a >= 1e6 => (x / 1e6, "M"),
        a if a >= 1e3 => (x / 1e3, "k"),
        _ => return format!("{x:.0}"),
    };
    format!("{v:.3}{unit}")
}

/// Seconds at the assumed utilisation of one H100, in the unit that reads best.
fn h100_time(flops: f64) -> String {
    let secs = flops / (ASSUMED_MFU * H100_FLOPS);
    match secs {
        s if s < 120.0 => format!("{s:.1} s"),
        s if s < 7200.0 => format!("{:.1} min", s / 60.0),
        s => format!("{:.1} h", s / 3600.0),
    }
}

/// What a training process holds besides the model's tensors (the binary, its libraries,
/// the allocator's slack, data-loader windows): measured as the gap between the rest of the
/// estimate and the peak RSS at LLaMA 1B, one micro-batch of 256 tokens (notes, session 9).
const PROCESS_BYTES: f64 = 150e6;

/// Bytes the forward pass keeps for the backward pass, for `tokens` tokens per
/// micro-batch: per token and layer about ten hidden-wide and three MLP-wide f32 vectors
/// (the block's inputs, norms, q, k, v, attention and MLP activations), with the fused ops'
/// savings (attention and the loss keep one number per query or token; no logits tensor).
/// Checked against peak RSS at 20.8M (2,048 tokens) and LLaMA 1B (256 tokens) within 2%; at
/// 1B and 1,024 tokens it fell 5.9% short (notes, session 10).
/// With `checkpointed` activations, each block keeps only its input, and one block's
/// activations exist at a time, while it is recomputed.
fn activation_bytes(cfg: &LlamaConfig, tokens: usize, checkpointed: bool) -> f64 {
    let per_token_layer = 10.0 * cfg.hidden as f64 + 3.0 * cfg.intermediate as f64;
    let per_token = if checkpointed {
        cfg.layers as f64 * cfg.hidden as f64 + per_token_layer
    } else {
        cfg.layers as f64 * per_token_layer
    };
    4.0 * tokens as f64 * per_token
}

/// A number among an input's facts (a data stage's are exact once it is cached).
fn fact(input: Option<&InputEstimate>, name: &str) -> Option<f64> {
    input?.facts.get(name)?.as_f64()
}

/// A tokenize stage: its vocabulary, and its splits' tokens (exact once cached).
pub fn tokenize(
    p: &TokenizeParams,
    base: &Path,
    inputs: &BTreeMap<String, InputEstimate>,
    me_cached: Option<&Path>,
) -> Result<Estimate> {
    if let Some(m) = me_cached.and_then(|d| DatasetManifest::read(d).ok()) {
        return Ok(dataset_estimate(&m));
    }
    let vocab = match (&p.tokenizer, inputs.get("tokenizer")) {
        (Some(TokenizerSource::Bpe { vocab_size, .. }), _)
        | (Some(TokenizerSource::Unigram { vocab_size, .. }), _) => Some(*vocab_size as u64),
        (Some(TokenizerSource::File { path }), _) => {
            relora_data::tokenize::load_tokenizer(&base.join(path))
                .ok()
                .map(|t| t.get_vocab_size(true) as u64)
        }
        (None, Some(i)) => i.facts.get("vocab_size").and_then(Value::as_u64),
        (None, None) => None,
    };
    let mut lines = Vec::new();
    let mut facts = json!({ "vocab_size": vocab });
    if inputs.contains_key("corpus") && inputs["corpus"].outputs.is_none() {
        lines.push("corpus not downloaded yet: its size is known once it runs".into());
        return Ok(Estimate { lines, facts });
    }
    let corpus_dir = inputs
        .get("corpus")
        .and_then(|i| i.outputs.clone())
        .unwrap_or_else(|| base.to_path_buf());
    let files = |globs: Option<&crate::tokenize::Files>| -> Vec<std::path::PathBuf> {
        globs
            .and_then(|g| relora_data::corpus::expand_globs(&g.list(), &corpus_dir).ok())
            .unwrap_or_default()
    };
    // (bytes, estimated tokens) of corpus files.
    let tokens_in = |fs: &[std::path::PathBuf]| -> (u64, f64) {
        fs.iter()
            .filter_map(|f| Some((f, std::fs::metadata(f).ok()?.len())))
            .fold((0, 0.0), |(bytes, tokens), (f, len)| {
                let rate = if f.to_string_lossy().ends_with(".gz") {
                    TOKENS_PER_GZIP_BYTE
                } else {
                    TOKENS_PER_TEXT_BYTE
                };
                (bytes + len, tokens + len as f64 * rate)
            })
    };
    let train_files = files(Some(&p.train_files));
    let (bytes, mut train_tokens) = tokens_in(&train_files);
    if let Some(l) = p.limit_docs {
        train_tokens = train_tokens.min(l as f64 * TOKENS_PER_DOC);
    }
    // A split's tokens: its own files', or documents held out of the training ones.
    let mut split = |own: &Option<crate::tokenize::Files>, held_docs: usize| match own {
        Some(f) => tokens_in(&files(Some(f))).1,
        None => {
            let held = (held_docs as f64 * TOKENS_PER_DOC).min(train_tokens);
            train_tokens -= held;
            held
        }
    };
    let valid_tokens = split(&p.valid_files, p.valid_docs);
    let test_tokens = split(&p.test_files, p.test_docs);
    lines.push(format!(
        "reads {} corpus file(s), {:.1} MB; ≈ {} training and {} validation tokens \
         (estimated at C4/T5's tokens per byte; exact once it runs)",
        train_files.len(),
        bytes as f64 / 1e6,
        si(train_tokens),
        si(valid_tokens)
    ));
    facts["train_tokens"] = json!(train_tokens.round() as u64);
    facts["valid_tokens"] = json!(valid_tokens.round() as u64);
    facts["exact"] = json!(false);
    facts["disk_bytes"] =
        json!((train_tokens + valid_tokens + test_tokens) * SHARD_BYTES_PER_TOKEN);
    Ok(Estimate { lines, facts })
}

/// A token's bytes in a shard, at most: a u32 id (parquet's encoding only shrinks it).
const SHARD_BYTES_PER_TOKEN: f64 = 4.0;

fn dataset_estimate(m: &DatasetManifest) -> Estimate {
    let bytes_per_token = SHARD_BYTES_PER_TOKEN;
    Estimate {
        lines: vec![format!(
            "made {} training tokens in {} shard(s) and {} validation tokens (vocabulary {}; \
             {:.1} GB as u32 ids)",
            si(m.train.tokens as f64),
            m.train.shards.len(),
            si(m.valid.tokens as f64),
            m.vocab_size,
            (m.train.tokens + m.valid.tokens) as f64 * bytes_per_token / 1e9
        )],
        facts: json!({
            "vocab_size": m.vocab_size,
            "train_tokens": m.train.tokens,
            "valid_tokens": m.valid.tokens,
            "exact": true,
            "disk_bytes": (m.train.tokens + m.valid.tokens) as f64 * bytes_per_token,
        }),
    }
}

/// A train stage: its model, tokens, FLOPs and the data it reads.
pub fn train(
    p: &TrainParams,
    cfg: Option<LlamaConfig>,
    inputs: &BTreeMap<String, InputEstimate>,
) -> Result<Estimate> {
    let data = inputs.get("data");
    let Some(cfg) = cfg else {
        return Ok(Estimate {
            lines: vec!["the vocabulary is known once the data stage runs".into()],
            facts: Value::Null,
        });
    };
    let accum = p
        .batch_tokens
        .map_or(1, |b| (b / (p.micro_batch * p.seq_len)).max(1));
    let step_tokens = (accum * p.micro_batch * p.seq_len) as f64;
    let tokens = p.steps as f64 * step_tokens;
    let (trainable, frozen) = p
        .method
        .matmul_weights(p, &cfg, inputs.contains_key("init"));
    let optimizer = p
        .method
        .optimizer_floats(p, &cfg, inputs.contains_key("init"));
    let (trainable_params, frozen_bytes) =
        p.method
            .parameter_bytes(p, &cfg, inputs.contains_key("init"));
    let trainable_bytes = 4.0 * trainable_params;
    let activations = activation_bytes(&cfg, p.micro_batch * p.seq_len, p.checkpoint_activations);
    let memory =
        2.0 * trainable_bytes + frozen_bytes + optimizer * 4.0 + activations + PROCESS_BYTES;
    let s = p.seq_len as f64;
    let attention = 4.0 * cfg.layers as f64 * cfg.hidden as f64 * s;
    let mut per_token = 6.0 * trainable + 4.0 * frozen + 3.0 * attention;
    if p.checkpoint_activations {
        // The blocks' forward pass again (not the head's).
        let head = (cfg.vocab_size * cfg.hidden) as f64;
        per_token += 2.0 * (trainable + frozen - head) + attention;
    }
    let forward = 2.0 * (trainable + frozen) + attention;
    // At every multiple of eval_every, and at the last step.
    let evals = match p.eval_every {
        0 => 1,
        every => p.steps.div_ceil(every),
    };
    let eval_tokens = (evals * p.eval_sequences as u64) as f64 * s;
    let flops = per_token * tokens + forward * eval_tokens;
    let mut lines = vec![
        format!(
            "model: hidden {} × {} layers, vocabulary {}: {} parameters; {} trainable and {} \
             frozen matmul weights",
            cfg.hidden,
            cfg.layers,
            cfg.vocab_size,
            si(cfg.param_count() as f64),
            si(trainable),
            si(frozen)
        ),
        format!(
            "optimizer state: {} floats, {:.1} MB in f32 ({})",
            si(optimizer),
            optimizer * 4.0 / 1e6,
            p.method.summary()
        ),
        format!(
            "peak memory ≈ {:.2} GB{}: trainable weights and their gradients {:.1} MB each \
             (f32), frozen weights {:.1} MB ({}), optimizer state {:.1} MB, activations of a \
             micro-batch {:.1} MB{}, and {:.0} MB for the process",
            memory / 1e9,
            if p.ranks() > 1 {
                format!(
                    " per rank, {:.2} GB for its {} ranks",
                    memory / 1e9 * p.ranks() as f64,
                    p.ranks()
                )
            } else {
                String::new()
            },
            trainable_bytes / 1e6,
            frozen_bytes / 1e6,
            p.method.frozen_format(p).unwrap_or("f32"),
            optimizer * 4.0 / 1e6,
            activations / 1e6,
            if p.checkpoint_activations {
                " (checkpointed: block inputs and one block)"
            } else {
                ""
            },
            PROCESS_BYTES / 1e6,
        ),
        format!(
            "{} tokens: {} steps × {step_tokens} tokens ({}{} sequences of {})",
            si(tokens),
            p.steps,
            if accum > 1 {
                format!("{accum} micro-batches of ")
            } else {
                String::new()
            },
            p.micro_batch,
            p.seq_len
        ),
        format!(
            "{flops:.3e} FLOPs: {} per token (6·trainable + 4·frozen + attention), plus {} \
             evaluation tokens; ≈ {} on one H100 at 40% MFU",
            si(per_token),
            si(eval_tokens),
            h100_time(flops)
        ),
    ];
    let exact = data.and_then(|d| d.facts.get("exact")) == Some(&json!(true));
    let split = fact(data, "train_tokens").map(|t| (t, exact));
    match split {
        Some((t, exact)) => lines.push(format!(
            "reads {} of the {}{} training tokens: {:.2} epoch(s); loader memory ≤ {:.0} MB \
             whatever the split's size",
            si(tokens),
            if exact { "" } else { "≈ " },
            si(t),
            tokens / t.max(1.0),
            relora_data::loader::memory_bound(p.shuffle_window, p.seq_len, p.loader_threads) as f64
                / 1e6
        )),
        None => lines.push("the training split's size is known once the data stage runs".into()),
    }
    // On disk: the merged model and the low-rank update (f32) in the outputs, and the
    // checkpoint twice (the outputs' copy, and the scratch folder's while it is replaced).
    let model_bytes = 4.0 * cfg.param_count() as f64;
    let update_bytes = 4.0 * frozen;
    let checkpoint_bytes = trainable_bytes + frozen_bytes + optimizer * 4.0;
    let disk = model_bytes + update_bytes + 2.0 * checkpoint_bytes;
    lines.push(format!(
        "writes ≈ {:.1} MB to the cache: the merged model {:.1} MB{}, and a checkpoint of \
         {:.1} MB twice (in the outputs, and in the scratch folder while it is replaced)",
        disk / 1e6,
        model_bytes / 1e6,
        if update_bytes > 0.0 {
            format!(", the low-rank update {:.1} MB", update_bytes / 1e6)
        } else {
            String::new()
        },
        checkpoint_bytes / 1e6
    ));
    let (blocks, head) = block_and_head(&cfg);
    Ok(Estimate {
        lines,
        facts: json!({
            "disk_bytes": disk,
            "model_bytes": model_bytes,
            "flops": flops,
            "tokens": tokens,
            "optimizer_bytes": optimizer * 4.0,
            "trainable_bytes": trainable_bytes,
            "frozen_bytes": frozen_bytes,
            "activation_bytes": activations,
            // What `run` checks against the machine's memory (all ranks of a CPU stage
            // share one machine under mpirun).
            "memory_bytes": memory * p.ranks() as f64,
            "memory_per_process_bytes": memory,
            "memory_device": if matches!(p.device, crate::device::DeviceParam::Cpu) { "cpu" } else { "gpu" },
            "seq_len": p.seq_len,
            // Evaluation runs the merged model.
            "forward_flops_per_token": 2.0 * (blocks + head) + attention,
        }),
    })
}

/// An eval stage: the validation tokens it scores and their forward FLOPs.
pub fn eval(p: &EvalParams, inputs: &BTreeMap<String, InputEstimate>) -> Result<Estimate> {
    let valid = fact(inputs.get("data"), "valid_tokens");
    let tokens = valid.map_or(p.tokens as f64, |v| v.min(p.tokens as f64));
    let Some(fwd) = fact(inputs.get("model"), "forward_flops_per_token") else {
        return Ok(Estimate {
            lines: vec![format!("scores up to {} validation tokens", si(tokens))],
            facts: Value::Null,
        });
    };
    let flops = fwd * tokens;
    Ok(Estimate {
        lines: vec![format!(
            "scores {} validation tokens{}, streamed: {flops:.3e} FLOPs",
            si(tokens),
            valid.map_or(String::new(), |v| format!(" (of {})", si(v)))
        )],
        facts: json!({ "flops": flops }),
    })
}
