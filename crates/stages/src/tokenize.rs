//! `tokenize`: corpus files → tokenizer → parquet shards of token ids.

use anyhow::Result;
use relora_data::corpus::{expand_globs, Format, OnBadRecord};
use relora_data::{tokenize, TokenizeConfig, TokenizerSource};
use relora_exec::{parse_params, Estimate, InputEstimate, Progress, StageContext, StageKind};
use relora_spec::{SpecError, StageSpec};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Files {
    One(String),
    Many(Vec<String>),
}

impl Files {
    pub(crate) fn list(&self) -> Vec<String> {
        match self {
            Files::One(s) => vec![s.clone()],
            Files::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatParam {
    Auto,
    Jsonl,
    Parquet,
    Text,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizeParams {
    /// Glob(s) of training corpus files, relative to the pipeline file, or to the `corpus`
    /// input's folder when the stage has one (a `download` stage).
    pub train_files: Files,
    /// Glob(s) of validation files; without them `valid_docs` are held out.
    #[serde(default)]
    pub valid_files: Option<Files>,
    #[serde(default = "default_valid_docs")]
    pub valid_docs: usize,
    /// Glob(s) of test files; without them `test_docs` are held out (after the validation
    /// documents). The test split is read only by `eval` stages with `split: test`.
    #[serde(default)]
    pub test_files: Option<Files>,
    #[serde(default)]
    pub test_docs: usize,
    #[serde(default)]
    pub limit_docs: Option<usize>,
    #[serde(default = "default_format")]
    pub format: FormatParam,
    #[serde(default = "default_text_field")]
    pub text_field: String,
    #[serde(default)]
    pub on_bad_record: OnBadRecord,
    /// Where the tokenizer comes from; absent when a `tokenizer` input supplies it (the
    /// `tokenizer.json` of another stage's outputs, such as another tokenize stage).
    #[serde(default)]
    pub tokenizer: Option<TokenizerSource>,
    /// Tokenizer threads (does not change the output).
    #[serde(default = "default_threads")]
    pub threads: usize,
    #[serde(default = "default_shard_tokens")]
    pub shard_tokens: usize,
}

fn default_valid_docs() -> usize {
    100
}
fn default_format() -> FormatParam {
    FormatParam::Auto
}
fn default_text_field() -> String {
    "text".into()
}
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
fn default_shard_tokens() -> usize {
    50_000_000
}

pub struct Tokenize;

/// The corpus files of each split: train, valid, test.
type SplitFiles = (Vec<PathBuf>, Vec<PathBuf>, Vec<PathBuf>);

fn files(p: &TokenizeParams, base: &Path) -> Result<SplitFiles> {
    let train = expand_globs(&p.train_files.list(), base)?;
    let some = |f: &Option<Files>| match f {
        Some(v) => expand_globs(&v.list(), base),
        None => Ok(Vec::new()),
    };
    Ok((train, some(&p.valid_files)?, some(&p.test_files)?))
}

/// A file named by two splits (after the globs), for the plan-time error.
fn overlapping_file(split: &SplitFiles) -> Option<(PathBuf, &'static str, &'static str)> {
    let named = [("train", &split.0), ("valid", &split.1), ("test", &split.2)];
    let canon = |f: &PathBuf| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
    for (a, (na, fa)) in named.iter().enumerate() {
        for (nb, fb) in &named[a + 1..] {
            if let Some(f) = fa.iter().find(|f| fb.iter().any(|g| canon(g) == canon(f))) {
                return Some((f.clone(), na, nb));
            }
        }
    }
    None
}

impl StageKind for Tokenize {
    fn name(&self) -> &'static str {
        "tokenize"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::TOKENIZE
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        Some(&[("corpus", false), ("tokenizer", false)])
    }
    fn cosmetic_params(&self) -> &'static [&'static str] {
        &["threads"]
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let p: TokenizeParams = parse_params(stage)?;
        let mut c = crate::check::Checks::new(stage);
        c.at_least(
            &["shard_tokens"],
            p.shard_tokens as u64,
            1,
            "tokens per parquet shard",
        );
        c.at_least(&["threads"], p.threads as u64, 1, "tokenizer threads");
        if let Some(n) = p.limit_docs {
            c.at_least(&["limit_docs"], n as u64, 1, "documents to read");
        }
        if p.test_files.is_some() && p.test_docs > 0 {
            c.require(
                false,
                &["test_docs"],
                "`test_docs` holds documents out of the training files, but `test_files` are \
                 given: set one of them"
                    .to_string(),
            );
        }
        let held_test = if p.test_files.is_none() {
            p.test_docs
        } else {
            0
        };
        if p.valid_files.is_none() {
            c.at_least(
                &["valid_docs"],
                p.valid_docs as u64,
                1,
                "without `valid_files` the validation split is these held-out documents, and \
                 training and evaluation need one",
            );
            if let Some(n) = p.limit_docs {
                c.require(
                    n > p.valid_docs + held_test,
                    &["limit_docs"],
                    format!(
                        "limit_docs ({n}) leaves no training documents once valid_docs ({}) \
                         and test_docs ({held_test}) are held out",
                        p.valid_docs
                    ),
                );
            }
        }
        // A trained tokenizer: its vocabulary's floor, and documents to train it on.
        let trained = match p.tokenizer {
            Some(TokenizerSource::Bpe {
                vocab_size,
                sample_docs,
            }) => Some((
                vocab_size,
                sample_docs,
                259,
                "byte-level BPE starts from 256 byte tokens and 3 special tokens",
            )),
            Some(TokenizerSource::Unigram {
                vocab_size,
                sample_docs,
            }) => Some((
                vocab_size,
                sample_docs,
                8,
                "the 3 special tokens and at least a few pieces",
            )),
            Some(TokenizerSource::File { .. }) | None => None,
        };
        if let Some((vocab_size, sample_docs, floor, why)) = trained {
            c.at_least(&["tokenizer", "vocab_size"], vocab_size as u64, floor, why);
            c.at_least(
                &["tokenizer", "sample_docs"],
                sample_docs as u64,
                1,
                "documents to train the tokenizer on",
            );
        }
        // Files from a `corpus` input are not known until it has run.
        if !stage.inputs.contains_key("corpus") {
            if let Some((f, a, b)) = files(&p, &stage.base_dir)
                .ok()
                .and_then(|split| overlapping_file(&split))
            {
                let key = if b == "test" {
                    "test_files"
                } else {
                    "valid_files"
                };
                c.require(
                    false,
                    &[key],
                    format!(
                        "{} is in both the {a} and the {b} split; a held-out split must share \
                         no file with another",
                        f.display()
                    ),
                );
            }
        }
        let from_input = stage.inputs.contains_key("tokenizer");
        match (&p.tokenizer, from_input) {
            (Some(_), true) => c.extend(vec![stage.error(
                &["params", "tokenizer"],
                "the tokenizer comes from the `tokenizer` input; drop `params.tokenizer` or \
                 the input",
            )]),
            (None, false) => c.extend(vec![stage.error(
                &["params"],
                "say where the tokenizer comes from: `tokenizer: {type: file, path: …}`, \
                 `{type: bpe, vocab_size: N}` or `{type: unigram, vocab_size: N}`, or an \
                 input `tokenizer: STAGE` to reuse another stage's tokenizer",
            )]),
            _ => {}
        }
        let mut errors = match c.finish() {
            Ok(()) => Vec::new(),
            Err(e) => e,
        };
        // Files from a `corpus` input do not exist until it has run.
        if stage.inputs.contains_key("corpus") {
        } else if let Err(e) = files(&p, &stage.base_dir) {
            errors.push(stage.error(&["params", "train_files"], format!("{e:#}")));
        }
        if let Some(TokenizerSource::File { path }) = &p.tokenizer {
            if !stage.base_dir.join(path).is_file() {
                errors.push(stage.error(
                    &["params", "tokenizer", "path"],
                    format!(
                        "tokenizer file `{}` does not exist (relative to {})",
                        path.display(),
                        stage.base_dir.display()
                    ),
                ));
            }
        }
        relora_spec::no_errors(errors)
    }
    fn external_files(&self, stage: &StageSpec) -> Result<Vec<(String, PathBuf)>> {
        let p: TokenizeParams = serde_json::from_value(stage.params.clone())?;
        let mut out: Vec<(String, PathBuf)> = Vec::new();
        if let Some(TokenizerSource::File { path }) = &p.tokenizer {
            out.push(("tokenizer".into(), stage.base_dir.join(path)));
        }
        // Files from a `corpus` input are covered by its output hash.
        if stage.inputs.contains_key("corpus") {
            return Ok(out);
        }
        let (train, valid, test) = files(&p, &stage.base_dir)?;
        let label = |split: &str, f: &Path| {
            format!(
                "{split}:{}",
                f.file_name().unwrap_or_default().to_string_lossy()
            )
        };
        out.extend(train.iter().map(|f| (label("train", f), f.clone())));
        out.extend(valid.iter().map(|f| (label("valid", f), f.clone())));
        out.extend(test.iter().map(|f| (label("test", f), f.clone())));
        Ok(out)
    }
    fn estimate(
        &self,
        stage: &StageSpec,
        inputs: &BTreeMap<String, InputEstimate>,
        cached: Option<&Path>,
    ) -> Result<Estimate> {
        let p: TokenizeParams = serde_json::from_value(stage.params.clone())?;
        crate::estimate::tokenize(&p, &stage.base_dir, inputs, cached)
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: TokenizeParams = serde_json::from_value(ctx.params.clone())?;
        let corpus_dir = match ctx.inputs.get("corpus") {
            Some(dir) => dir.clone(),
            None => ctx.base_dir.clone(),
        };
        let (train_files, valid_files, test_files) = files(&p, &corpus_dir)?;
        let tokenizer = match p.tokenizer {
            Some(TokenizerSource::File { path }) => TokenizerSource::File {
                path: ctx.resolve(&path.to_string_lossy()),
            },
            Some(other) => other,
            None => {
                let path = ctx.input("tokenizer")?.join("tokenizer.json");
                if !path.is_file() {
                    anyhow::bail!(
                        "{} has no tokenizer.json in its outputs; a `tokenizer` input must be a \
                         stage that writes one (a tokenize stage)",
                        ctx.describe_input("tokenizer")
                    );
                }
                TokenizerSource::File { path }
            }
        };
        let cfg = TokenizeConfig {
            train_files,
            valid_files,
            valid_docs: p.valid_docs,
            test_files,
            test_docs: p.test_docs,
            limit_docs: p.limit_docs,
            format: match p.format {
                FormatParam::Auto => None,
                FormatParam::Jsonl => Some(Format::Jsonl),
                FormatParam::Parquet => Some(Format::Parquet),
                FormatParam::Text => Some(Format::Text),
            },
            text_field: p.text_field,
            on_bad_record: p.on_bad_record,
            tokenizer,
            threads: p.threads,
            shard_tokens: p.shard_tokens,
        };
        let started = std::time::Instant::now();
        let m = tokenize(&cfg, &ctx.out_dir, &|done, total| {
            ctx.progress(&Progress {
                step: done,
                total,
                note: Some("documents".into()),
                ..Default::default()
            })
        })?;
        // Timings go to the log and the manifest, never into outputs: same key, same bytes.
        let tokens_per_s =
            (m.train.tokens + m.valid.tokens) as f64 / started.elapsed().as_secs_f64().max(1e-9);
        println!(
            "tokenized {} train + {} valid documents: {} + {} tokens, vocabulary {}, {:.0} tokens/s, {} bad records skipped",
            m.train.documents, m.valid.documents, m.train.tokens, m.valid.tokens, m.vocab_size, tokens_per_s, m.skipped_records
        );
        ctx.metric("train_tokens", m.train.tokens);
        ctx.metric("valid_tokens", m.valid.tokens);
        let test = m.test.as_ref().map_or((0, 0), |t| (t.documents, t.tokens));
        if test.0 > 0 {
            println!("held out {} test documents: {} tokens", test.0, test.1);
            ctx.metric("test_tokens", test.1);
        }
        ctx.metric("documents", m.train.documents + m.valid.documents + test.0);
        ctx.metric("vocab_size", m.vocab_size);
        ctx.metric("skipped_records", m.skipped_records);
        ctx.metric("tokens_per_s", tokens_per_s);
        Ok(())
    }
}
