//! Corpus → tokenizer → parquet shards, with a manifest of what was made from what.
//!
//! Files are tokenized in parallel, each into its own shards (`train/FFFFF-NNNNN.parquet`
//! for file F), so the output does not depend on the thread count and memory stays bounded:
//! a file in progress holds one batch of 256 documents, their ids and one open row group
//! (about 1M tokens). Within a file each batch is encoded in parallel too, so one large file
//! also uses every core. About `threads` files are in progress at once; a worker waiting for
//! its batch's encoding may start another file (rayon's work stealing), so the bound is per
//! file in progress, at worst every file.

use crate::corpus::{detect_format, for_each_doc, Format, OnBadRecord};
use crate::shards::{ShardInfo, ShardWriter};
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// Where the tokenizer comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum TokenizerSource {
    /// A Hugging Face `tokenizer.json`.
    File { path: PathBuf },
    /// Byte-level BPE trained on the first `sample_docs` training documents.
    Bpe {
        vocab_size: usize,
        #[serde(default = "default_sample_docs")]
        sample_docs: usize,
    },
    /// Unigram trained on the first `sample_docs` training documents.
    Unigram {
        vocab_size: usize,
        #[serde(default = "default_sample_docs")]
        sample_docs: usize,
    },
}

/// Documents a tokenizer is trained on by default: enough for a stable vocabulary, and a
/// bound on the text held in memory while training it.
pub const DEFAULT_SAMPLE_DOCS: usize = 100_000;

fn default_sample_docs() -> usize {
    DEFAULT_SAMPLE_DOCS
}

pub const SPECIAL_TOKENS: [&str; 3] = ["<pad>", "</s>", "<unk>"];

#[derive(Debug, Clone)]
pub struct TokenizeConfig {
    pub train_files: Vec<PathBuf>,
    pub valid_files: Vec<PathBuf>,
    /// With no valid files: hold out this many documents from the end of the training ones.
    pub valid_docs: usize,
    /// Files of a test split, read by no training or selection (none: no test files).
    pub test_files: Vec<PathBuf>,
    /// With no test files: hold out this many documents from the very end of the training
    /// ones, after the validation documents (0: no test split).
    pub test_docs: usize,
    pub limit_docs: Option<usize>,
    pub format: Option<Format>,
    pub text_field: String,
    pub on_bad_record: OnBadRecord,
    pub tokenizer: TokenizerSource,
    pub threads: usize,
    pub shard_tokens: usize,
}

/// One split of a dataset: its counts and its shards, in reading order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SplitInfo {
    pub documents: u64,
    pub tokens: u64,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceFile {
    pub path: String,
    pub blake3: String,
}

/// `dataset.json`: what a tokenize stage produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetManifest {
    pub train: SplitInfo,
    pub valid: SplitInfo,
    /// Absent when the stage holds out no test split, so that a manifest written before the
    /// split existed keeps its bytes (and every key downstream of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<SplitInfo>,
    pub vocab_size: usize,
    pub eos_id: u32,
    pub pad_id: u32,
    pub tokenizer_blake3: String,
    pub sources: Vec<SourceFile>,
    pub skipped_records: u64,
}

impl DatasetManifest {
    pub fn read(dir: &Path) -> Result<DatasetManifest> {
        let p = dir.join("dataset.json");
        let bytes = std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a dataset manifest", p.display()))
    }
}

pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let mut t = Tokenizer::from_file(path).map_err(|e| {
        anyhow::anyhow!(
            "{} is not a Hugging Face tokenizer.json: {e}",
            path.display()
        )
    })?;
    t.with_truncation(None)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    t.with_padding(None);
    Ok(t)
}

fn special_tokens() -> Vec<AddedToken> {
    SPECIAL_TOKENS
        .iter()
        .map(|s| AddedToken::from(s.to_string(), true))
        .collect()
}

fn train_tokenizer(source: &TokenizerSource, texts: &[String]) -> Result<Tokenizer> {
    let (mut tok, mut trainer) = match source {
        TokenizerSource::Bpe { vocab_size, .. } => {
            let mut t = Tokenizer::new(BPE::default());
            t.with_pre_tokenizer(Some(ByteLevel::default()));
            t.with_decoder(Some(ByteLevel::default()));
            let trainer = BpeTrainerBuilder::new()
                .vocab_size(*vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(special_tokens())
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build();
            (t, TrainerWrapper::BpeTrainer(trainer))
        }
        TokenizerSource::Unigram { vocab_size, .. } => {
            let mut t = Tokenizer::new(Unigram::default());
            t.with_pre_tokenizer(Some(
                tokenizers::pre_tokenizers::metaspace::Metaspace::default(),
            ));
            t.with_decoder(Some(tokenizers::decoders::metaspace::Metaspace::default()));
            let trainer = UnigramTrainerBuilder::default()
                .vocab_size(*vocab_size as u32)
                .show_progress(false)
                .special_tokens(special_tokens())
                .unk_token(Some("<unk>".into()))
                .build()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            (t, TrainerWrapper::UnigramTrainer(trainer))
        }
        TokenizerSource::File { .. } => unreachable!("files are loaded, not trained"),
    };
    tok.train(&mut trainer, texts.iter())
        .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    Ok(tok)
}

/// Ids of one document, ending in exactly one end-of-sequence id (a post-processor such as
/// T5's may have appended it already).
pub fn encode_doc(tok: &Tokenizer, text: &str, eos: u32) -> Result<Vec<u32>> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
    let mut ids = enc.get_ids().to_vec();
    if ids.last() != Some(&eos) {
        ids.push(eos);
    }
    Ok(ids)
}

fn format_of(cfg: &TokenizeConfig, file: &Path) -> Format {
    cfg.format.unwrap_or_else(|| detect_format(file))
}

/// Documents per file, counted in parallel.
fn count_docs(cfg: &TokenizeConfig, files: &[PathBuf]) -> Result<Vec<u64>> {
    files
        .par_iter()
        .map(|f| {
            let fmt = format_of(cfg, f);
            Ok(for_each_doc(f, fmt, &cfg.text_field, cfg.on_bad_record, |_| Ok(true))?.documents)
        })
        .collect()
}

/// The first `n` documents' texts of `files`, in order.
fn first_texts(cfg: &TokenizeConfig, files: &[PathBuf], n: usize) -> Result<Vec<String>> {
    let mut texts = Vec::new();
    for f in files {
        if texts.len() >= n {
            break;
        }
        for_each_doc(
            f,
            format_of(cfg, f),
            &cfg.text_field,
            cfg.on_bad_record,
            |d| {
                texts.push(d.text);
                Ok(texts.len() < n)
            },
        )?;
    }
    Ok(texts)
}

/// What to do with one file's documents: `[0, train)` go to the training split,
/// `[train, valid)` to the validation split, `[valid, keep)` to the test split, the rest are
/// not read.
#[derive(Debug, Clone, Copy)]
struct FilePlan {
    train: u64,
    valid: u64,
    keep: u64,
}

impl FilePlan {
    const ALL_TRAIN: FilePlan = FilePlan {
        train: u64::MAX,
        valid: u64::MAX,
        keep: u64::MAX,
    };
    const ALL_VALID: FilePlan = FilePlan {
        train: 0,
        valid: u64::MAX,
        keep: u64::MAX,
    };
    const ALL_TEST: FilePlan = FilePlan {
        train: 0,
        valid: 0,
        keep: u64::MAX,
    };
}

/// Split the training files' documents: the first `limit` of them, of which the last
/// `valid_docs` then the last `test_docs` are held out when the split has no files of its
/// own. Counts the documents only when needed.
fn plan_train_files(cfg: &TokenizeConfig) -> Result<Vec<FilePlan>> {
    let hold_valid = if cfg.valid_files.is_empty() {
        cfg.valid_docs as u64
    } else {
        0
    };
    let hold_test = if cfg.test_files.is_empty() {
        cfg.test_docs as u64
    } else {
        0
    };
    if hold_valid + hold_test == 0 && cfg.limit_docs.is_none() {
        return Ok(vec![FilePlan::ALL_TRAIN; cfg.train_files.len()]);
    }
    let counts = count_docs(cfg, &cfg.train_files)?;
    let total: u64 = counts.iter().sum();
    let kept = cfg.limit_docs.map_or(total, |l| total.min(l as u64));
    if hold_valid + hold_test >= kept {
        bail!(
            "valid_docs = {hold_valid} and test_docs = {hold_test} held out, but the training \
             files hold only {kept} documents"
        );
    }
    let n_train = kept - hold_valid - hold_test;
    let n_valid_end = n_train + hold_valid;
    let mut before = 0u64;
    Ok(counts
        .iter()
        .map(|&c| {
            let plan = FilePlan {
                train: n_train.saturating_sub(before).min(c),
                valid: n_valid_end.saturating_sub(before).min(c),
                keep: kept.saturating_sub(before).min(c),
            };
            before += c;
            plan
        })
        .collect())
}

/// Everything one file contributed.
struct FileOutput {
    train: Vec<ShardInfo>,
    valid: Vec<ShardInfo>,
    test: Vec<ShardInfo>,
    skipped: u64,
}

/// Documents encoded per parallel batch within a file.
const ENCODE_BATCH: usize = 256;

/// Tokenize one file into its own shards under `out/train`, `out/valid` and `out/test`.
fn tokenize_file(
    cfg: &TokenizeConfig,
    tok: &Tokenizer,
    eos: u32,
    (index, file, plan): (usize, &Path, FilePlan),
    out: &Path,
    (done, total): (&AtomicU64, u64),
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<FileOutput> {
    let prefix = format!("{index:05}");
    let mut train = ShardWriter::with_prefix(&out.join("train"), &prefix, cfg.shard_tokens)?;
    let mut valid = ShardWriter::with_prefix(&out.join("valid"), &prefix, cfg.shard_tokens)?;
    let mut test = ShardWriter::with_prefix(&out.join("test"), &prefix, cfg.shard_tokens)?;
    let mut texts = Vec::with_capacity(ENCODE_BATCH);
    let mut next = 0u64;
    let mut flush = |texts: &mut Vec<String>, next: &mut u64| -> Result<()> {
        let ids: Vec<Vec<u32>> = texts
            .par_iter()
            .map(|t| encode_doc(tok, t, eos))
            .collect::<Result<_>>()
            .with_context(|| format!("{}", file.display()))?;
        for d in &ids {
            if *next < plan.train {
                train.push(d)?;
            } else if *next < plan.valid {
                valid.push(d)?;
            } else {
                test.push(d)?;
            }
            *next += 1;
        }
        let n = ids.len() as u64;
        progress(done.fetch_add(n, Ordering::Relaxed) + n, total);
        texts.clear();
        Ok(())
    };
    let mut read = 0u64;
    let stats = if plan.keep == 0 {
        Default::default()
    } else {
        for_each_doc(
            file,
            format_of(cfg, file),
            &cfg.text_field,
            cfg.on_bad_record,
            |d| {
                texts.push(d.text);
                read += 1;
                if texts.len() == ENCODE_BATCH {
                    flush(&mut texts, &mut next)?;
                }
                Ok(read < plan.keep)
            },
        )?
    };
    flush(&mut texts, &mut next)?;
    let rel = |split: &str, w: ShardWriter| -> Vec<ShardInfo> {
        w.shards
            .into_iter()
            .map(|s| ShardInfo {
                file: format!("{split}/{}", s.file),
                ..s
            })
            .collect()
    };
    Ok(FileOutput {
        train: rel("train", train.finish()?),
        valid: rel("valid", valid.finish()?),
        test: rel("test", test.finish()?),
        skipped: stats.skipped,
    })
}

fn split_info(shards: Vec<ShardInfo>) -> SplitInfo {
    SplitInfo {
        documents: shards.iter().map(|s| s.documents).sum(),
        tokens: shards.iter().map(|s| s.tokens).sum(),
        shards,
    }
}

/// Tokenize the corpus into `out/{train,valid}/*.parquet`, `out/tokenizer.json` and
/// `out/dataset.json`. `progress(docs_done, docs_total)` is called from worker threads as
/// batches finish; the total is 0 when it is not known in advance (it is counted only when
/// documents must be held out or limited).
pub fn tokenize(
    cfg: &TokenizeConfig,
    out: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<DatasetManifest> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(cfg.threads.max(1))
        .build()?;
    pool.install(|| tokenize_in_pool(cfg, out, progress))
}

fn tokenize_in_pool(
    cfg: &TokenizeConfig,
    out: &Path,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<DatasetManifest> {
    let plans = plan_train_files(cfg)?;
    let tok = match &cfg.tokenizer {
        TokenizerSource::File { path } => load_tokenizer(path)?,
        src @ (TokenizerSource::Bpe { sample_docs, .. }
        | TokenizerSource::Unigram { sample_docs, .. }) => {
            let n_train: u64 = plans.iter().map(|p| p.train).fold(0, u64::saturating_add);
            let n = (*sample_docs as u64).min(n_train) as usize;
            train_tokenizer(src, &first_texts(cfg, &cfg.train_files, n)?)?
        }
    };
    let eos = tok
        .token_to_id("</s>")
        .context("the tokenizer has no `</s>` token to end documents with")?;
    let pad = tok.token_to_id("<pad>").unwrap_or(eos);
    let vocab_size = tok.get_vocab_size(true);
    let tok_path = out.join("tokenizer.json");
    tok.save(&tok_path, false)
        .map_err(|e| anyhow::anyhow!("saving tokenizer: {e}"))?;

    // Training files, then validation files, then test files (each wholly of its split).
    let jobs: Vec<(usize, &Path, FilePlan)> = cfg
        .train_files
        .iter()
        .zip(plans)
        .chain(cfg.valid_files.iter().map(|f| (f, FilePlan::ALL_VALID)))
        .chain(cfg.test_files.iter().map(|f| (f, FilePlan::ALL_TEST)))
        .enumerate()
        .map(|(i, (f, p))| (i, f.as_path(), p))
        .collect();
    let done = AtomicU64::new(0);
    let known = jobs.iter().all(|j| j.2.keep < u64::MAX);
    let total = if known {
        jobs.iter().map(|j| j.2.keep).sum()
    } else {
        0
    };
    let outputs: Vec<FileOutput> = jobs
        .par_iter()
        .map(|&job| tokenize_file(cfg, &tok, eos, job, out, (&done, total), progress))
        .collect::<Result<_>>()?;
    let mut train = Vec::new();
    let mut valid = Vec::new();
    let mut test = Vec::new();
    let mut skipped = 0;
    for o in outputs {
        train.extend(o.train);
        valid.extend(o.valid);
        test.extend(o.test);
        skipped += o.skipped;
    }
    let (train, valid, test) = (split_info(train), split_info(valid), split_info(test));
    if test.shards.is_empty() {
        // Every file made its writer's folder; an unused split leaves none behind.
        let _ = std::fs::remove_dir(out.join("test"));
    }
    if valid.documents == 0 {
        bail!("the validation split is empty: set `valid_docs` or `valid_files`");
    }
    let wants_test = !cfg.test_files.is_empty() || cfg.test_docs > 0;
    if wants_test && test.documents == 0 {
        bail!("the test split is empty: its `test_files` hold no documents");
    }
    let sources = cfg
        .train_files
        .iter()
        .chain(&cfg.valid_files)
        .chain(&cfg.test_files)
        .map(|f| {
            Ok(SourceFile {
                path: f
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .to_string(),
                blake3: hash_file(f)?,
            })
        })
        .collect::<Result<_>>()?;
    let manifest = DatasetManifest {
        train,
        valid,
        test: wants_test.then_some(test),
        vocab_size,
        eos_id: eos,
        pad_id: pad,
        tokenizer_blake3: hash_file(&tok_path)?,
        sources,
        skipped_records: skipped,
    };
    std::fs::write(
        out.join("dataset.json"),
        serde_json::to_vec_pretty(&manifest)?,
    )?;
    Ok(manifest)
}

/// blake3 of a file, streamed.
fn hash_file(p: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    let f = std::fs::File::open(p).with_context(|| format!("reading {}", p.display()))?;
    h.update_reader(f)
        .with_context(|| format!("reading {}", p.display()))?;
    Ok(h.finalize().to_hex().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shards::{read_split, ShardWriter};
    use std::io::{BufRead, Write};

    fn data_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data")
    }

    fn config(train: Vec<PathBuf>, tokenizer: TokenizerSource) -> TokenizeConfig {
        TokenizeConfig {
            train_files: train,
            valid_files: vec![],
            valid_docs: 100,
            test_files: vec![],
            test_docs: 0,
            limit_docs: None,
            format: None,
            text_field: "text".into(),
            on_bad_record: OnBadRecord::Error,
            tokenizer,
            threads: 2,
            shard_tokens: 200_000,
        }
    }

    #[test]
    fn t5_ids_equal_the_reference_for_all_1000_documents() {
        let dir = data_dir();
        let out = tempfile::tempdir().unwrap();
        let cfg = config(
            vec![dir.join("c4-train.00000-of-01024.first1000.json.gz")],
            TokenizerSource::File {
                path: dir.join("t5-base/tokenizer.json"),
            },
        );
        let m = tokenize(&cfg, out.path(), &|_, _| {}).unwrap();
        assert_eq!((m.train.documents, m.valid.documents), (900, 100));
        assert_eq!(m.train.tokens + m.valid.tokens, 513_612);
        assert_eq!((m.vocab_size, m.eos_id), (32100, 1));
        assert!(
            m.train.shards.len() >= 2,
            "shard_tokens splits the train split"
        );
        let mut got = read_split(&out.path().join("train")).unwrap();
        let valid = read_split(&out.path().join("valid")).unwrap();
        let base = got.tokens.len();
        got.tokens.extend_from_slice(&valid.tokens);
        got.offsets
            .extend(valid.offsets[1..].iter().map(|o| o + base));
        let f = std::fs::File::open(dir.join("c4-train.00000-of-01024.first1000.t5-ids.jsonl.gz"))
            .unwrap();
        let r = std::io::BufReader::new(flate2::read::GzDecoder::new(f));
        let mut n = 0;
        for (i, line) in r.lines().enumerate() {
            let want: Vec<u32> = serde_json::from_str(&line.unwrap()).unwrap();
            assert_eq!(got.doc(i), &want[..], "document {i}");
            n += 1;
        }
        assert_eq!(n, 1000);
    }

    #[test]
    fn trained_bpe_has_requested_vocab_and_one_eos_per_doc() {
        let dir = data_dir();
        let out = tempfile::tempdir().unwrap();
        let mut cfg = config(
            vec![dir.join("c4-train.00000-of-01024.first1000.json.gz")],
            TokenizerSource::Bpe {
                vocab_size: 1000,
                sample_docs: DEFAULT_SAMPLE_DOCS,
            },
        );
        cfg.limit_docs = Some(300);
        cfg.valid_docs = 30;
        let m = tokenize(&cfg, out.path(), &|_, _| {}).unwrap();
        assert_eq!(m.vocab_size, 1000);
        let docs = read_split(&out.path().join("train")).unwrap();
        assert_eq!(docs.len(), 270);
        for i in 0..docs.len() {
            let d = docs.doc(i);
            assert_eq!(*d.last().unwrap(), m.eos_id);
            assert!(!d[..d.len() - 1].contains(&m.eos_id));
            assert!(d.iter().all(|&t| (t as usize) < m.vocab_size));
        }
    }

    fn bad_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn bad_records_name_file_and_line_or_are_skipped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let tok = TokenizerSource::File {
            path: data_dir().join("t5-base/tokenizer.json"),
        };
        let good = "{\"text\":\"hello world\"}\n";
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "json.jsonl",
                format!("{good}{good}{{oops\n{good}").into_bytes(),
                "json.jsonl:3: invalid JSON",
            ),
            (
                "notext.jsonl",
                format!("{good}{{\"url\":\"x\"}}\n{good}").into_bytes(),
                "notext.jsonl:2: record has no `text`",
            ),
            (
                "utf8.jsonl",
                [
                    good.as_bytes(),
                    b"{\"text\":\"\xff\xfe\"}\n",
                    good.as_bytes(),
                ]
                .concat(),
                "utf8.jsonl:2: not valid UTF-8",
            ),
            ("empty.jsonl", vec![], "holds no documents"),
        ];
        for (name, bytes, want) in cases {
            let p = bad_file(dir.path(), name, &bytes);
            let mut cfg = config(vec![p], tok.clone());
            cfg.valid_docs = 1;
            let e = format!(
                "{:#}",
                tokenize(&cfg, &dir.path().join("o"), &|_, _| {}).unwrap_err()
            );
            assert!(e.contains(want), "{name}: {e}");
        }
        // Truncated gzip.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        for _ in 0..2000 {
            gz.write_all(good.as_bytes()).unwrap();
        }
        let full = gz.finish().unwrap();
        let p = bad_file(dir.path(), "cut.jsonl.gz", &full[..full.len() / 2]);
        let e = format!(
            "{:#}",
            tokenize(
                &config(vec![p], tok.clone()),
                &dir.path().join("o"),
                &|_, _| {}
            )
            .unwrap_err()
        );
        assert!(
            e.contains("cut.jsonl.gz:") && e.contains("truncated"),
            "{e}"
        );
        // Skip mode counts instead.
        let p = bad_file(
            dir.path(),
            "mixed.jsonl",
            format!("{good}{{oops\n{good}{good}").as_bytes(),
        );
        let mut cfg = config(vec![p], tok);
        cfg.valid_docs = 1;
        cfg.on_bad_record = OnBadRecord::Skip;
        let m = tokenize(&cfg, &dir.path().join("ok"), &|_, _| {}).unwrap();
        assert_eq!(
            (m.skipped_records, m.train.documents, m.valid.documents),
            (1, 2, 1)
        );
        // A tokenizer file that is not a tokenizer.
        let p = bad_file(dir.path(), "tok.json", b"{\"not\": \"a tokenizer\"}");
        let e = format!("{:#}", load_tokenizer(&p).unwrap_err());
        assert!(
            e.contains("tok.json is not a Hugging Face tokenizer.json"),
            "{e}"
        );
    }

    #[test]
    fn shards_have_the_documented_schema() {
        use arrow::datatypes::DataType;
        let dir = tempfile::tempdir().unwrap();
        let mut w = ShardWriter::new(dir.path(), 1000).unwrap();
        w.push(&[5, 6, 1]).unwrap();
        let w = w.finish().unwrap();
        let f = std::fs::File::open(dir.path().join(&w.shards[0].file)).unwrap();
        let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
        let field = b.schema().field_with_name("input_ids").unwrap().clone();
        assert!(!field.is_nullable());
        match field.data_type() {
            DataType::List(item) => {
                assert_eq!(item.data_type(), &DataType::UInt32);
                assert!(!item.is_nullable());
            }
            other => panic!("input_ids is {other:?}"),
        }
        assert_eq!(b.schema().fields().len(), 1);
    }

    #[test]
    fn parquet_and_plain_text_corpora_and_a_trained_unigram() {
        use arrow::array::StringArray;
        use arrow::datatypes::{DataType, Field, Schema};
        let dir = tempfile::tempdir().unwrap();
        let texts: Vec<String> = (0..60)
            .map(|i| format!("document number {i} says hello to the world"))
            .collect();
        // Parquet with a `body` column.
        let schema =
            std::sync::Arc::new(Schema::new(vec![Field::new("body", DataType::Utf8, true)]));
        let col = StringArray::from(texts.iter().map(|t| Some(t.as_str())).collect::<Vec<_>>());
        let batch = arrow::record_batch::RecordBatch::try_new(
            schema.clone(),
            vec![std::sync::Arc::new(col)],
        )
        .unwrap();
        let pq = dir.path().join("corpus.parquet");
        let mut w =
            parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&pq).unwrap(), schema, None)
                .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let txt = bad_file(
            dir.path(),
            "corpus.txt",
            (texts.join("\n") + "\n").as_bytes(),
        );
        for (file, field) in [(pq, "body"), (txt, "text")] {
            let mut cfg = config(
                vec![file.clone()],
                TokenizerSource::Unigram {
                    vocab_size: 60,
                    sample_docs: DEFAULT_SAMPLE_DOCS,
                },
            );
            cfg.text_field = field.into();
            cfg.valid_docs = 10;
            let out = dir.path().join(format!("out-{field}"));
            let m = tokenize(&cfg, &out, &|_, _| {}).unwrap();
            assert_eq!(
                (m.train.documents, m.valid.documents),
                (50, 10),
                "{}",
                file.display()
            );
            assert!(m.vocab_size <= 60 && m.vocab_size > 3);
            let docs = read_split(&out.join("valid")).unwrap();
            let tok = load_tokenizer(&out.join("tokenizer.json")).unwrap();
            let ids = docs.doc(0);
            assert_eq!(*ids.last().unwrap(), m.eos_id);
            let text = tok.decode(&ids[..ids.len() - 1], true).unwrap();
            assert_eq!(
                text.trim(),
                texts[50],
                "round trip through the trained Unigram"
            );
        }
    }
}
