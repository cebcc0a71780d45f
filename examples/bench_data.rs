//! Data at paper scale, measured: a synthetic dataset of random token ids (1B tokens in 400
//! shards by default; generated, no download), then on it the loader alone, a tiny model
//! trained for 300 steps and an evaluation over 200k tokens, each in a process of its own so
//! that its peak
//! RSS is its own; the same on the bundled C4 sample, for comparison; and the tokenize
//! stage's throughput on 1 and 2 threads.
//!
//! cargo run --release --example bench_data -- [--tokens 1000000000] [--dir DIR]
//!
//! The dataset is kept in DIR (default /tmp/relora-bench-data, about 2 GB at 1B tokens) and
//! reused by the next run. Compare the tokenize figures with
//! `RAYON_NUM_THREADS=N python3 examples/bench/hf_tokenizers.py` (Hugging Face tokenizers).

use anyhow::{Context, Result};
use candle_core::Device;
use rayon::prelude::*;
use relora_data::shards::ShardWriter;
use relora_data::tokenize::SplitInfo;
use relora_data::{
    tokenize, DatasetManifest, Loader, LoaderConfig, PackSpec, Packing, SequenceReader, ShardInfo,
    Split, TokenizeConfig, TokenizerSource,
};
use relora_model::{AdamConfig, Llama, LlamaConfig, Rng, Schedule, TrainConfig, Trainer};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const VOCAB: u32 = 32100;
const SHARDS: u64 = 400;
const VALID_TOKENS: u64 = 10_000_000;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// This process's peak resident memory, in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One shard of random documents (1–1000 tokens, mean about C4's 500, ending in EOS = 1).
fn synthetic_shard(dir: &Path, index: u64, tokens: u64) -> Result<ShardInfo> {
    let mut w = ShardWriter::with_prefix(dir, &format!("{index:05}"), usize::MAX)?;
    let mut s = index.wrapping_mul(0xA24B_AED4_963E_E407) ^ 0x5EED;
    let mut written = 0;
    let mut doc = Vec::with_capacity(1000);
    while written < tokens {
        let len = (1 + splitmix(&mut s) % 1000).min(tokens - written) as usize;
        doc.clear();
        doc.extend((1..len).map(|_| 3 + (splitmix(&mut s) % (VOCAB as u64 - 3)) as u32));
        doc.push(1);
        w.push(&doc)?;
        written += len as u64;
    }
    let mut info = w.finish()?.shards.remove(0);
    info.file = format!(
        "{}/{}",
        dir.file_name().unwrap().to_string_lossy(),
        info.file
    );
    Ok(info)
}

/// The synthetic dataset in the layout a tokenize stage makes; reused when present.
fn synthetic(dir: &Path, tokens: u64) -> Result<()> {
    if DatasetManifest::read(dir).is_ok_and(|m| m.train.tokens == tokens) {
        println!("reusing the synthetic dataset in {}", dir.display());
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    let started = Instant::now();
    let make = |split: &str, shards: u64, total: u64| -> Result<SplitInfo> {
        let per = total / shards;
        let infos: Vec<ShardInfo> = (0..shards)
            .into_par_iter()
            .map(|i| synthetic_shard(&dir.join(split), i, per))
            .collect::<Result<_>>()?;
        Ok(SplitInfo {
            documents: infos.iter().map(|s| s.documents).sum(),
            tokens: infos.iter().map(|s| s.tokens).sum(),
            shards: infos,
        })
    };
    let train = make("train", SHARDS, tokens)?;
    let valid = make("valid", 4, VALID_TOKENS)?;
    let bytes: u64 = walk_bytes(dir);
    println!(
        "RESULT generate tokens={} shards={} bytes={bytes} seconds={:.1}",
        train.tokens,
        train.shards.len(),
        started.elapsed().as_secs_f64()
    );
    let m = DatasetManifest {
        train,
        valid,
        test: None,
        vocab_size: VOCAB as usize,
        eos_id: 1,
        pad_id: 0,
        tokenizer_blake3: "synthetic".into(),
        sources: Vec::new(),
        skipped_records: 0,
    };
    std::fs::write(dir.join("dataset.json"), serde_json::to_vec_pretty(&m)?)?;
    Ok(())
}

fn walk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                walk_bytes(&p)
            } else {
                e.metadata().map_or(0, |m| m.len())
            }
        })
        .sum()
}

fn tokenize_config(threads: usize) -> TokenizeConfig {
    let data = repo().join("examples/data");
    TokenizeConfig {
        train_files: vec![data.join("c4-train.00000-of-01024.first1000.json.gz")],
        valid_files: vec![],
        valid_docs: 100,
        test_files: vec![],
        test_docs: 0,
        limit_docs: None,
        format: None,
        text_field: "text".into(),
        on_bad_record: Default::default(),
        tokenizer: TokenizerSource::File {
            path: data.join("t5-base/tokenizer.json"),
        },
        threads,
        shard_tokens: 50_000_000,
    }
}

/// The bundled sample, tokenized with T5 as a tokenize stage would.
fn sample(dir: &Path) -> Result<()> {
    if DatasetManifest::read(dir).is_err() {
        tokenize(&tokenize_config(2), dir, &|_, _| {})?;
    }
    Ok(())
}

fn loader_for(dir: &Path, threads: usize, seq_len: usize) -> Result<Loader> {
    let m = DatasetManifest::read(dir)?;
    Loader::new(
        Split::new(dir, m.train.shards),
        LoaderConfig {
            seq_len,
            packing: Packing::Concat,
            pad_id: m.pad_id,
            vocab_size: Some(m.vocab_size as u32),
            seed: 0,
            window: relora_data::DEFAULT_WINDOW,
            rank: 0,
            world: 1,
            threads,
        },
    )
}

/// The loader alone: batches of 64 × 256 as fast as it gives them.
fn phase_loader(dir: &Path, threads: usize, read: u64) -> Result<String> {
    let mut l = loader_for(dir, threads, 256)?;
    let started = Instant::now();
    let mut n = 0u64;
    let mut check = 0u64;
    while n < read {
        let b = l.next_batch(64)?;
        check = check.wrapping_add(b.inputs[0] as u64);
        n += (b.batch_size * (b.len + 1)) as u64;
    }
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "tokens={n} seconds={secs:.2} tokens_per_s={:.0} (checksum {check})",
        n as f64 / secs
    ))
}

fn tiny_model(vocab: usize) -> Result<Llama> {
    let cfg = LlamaConfig {
        vocab_size: vocab,
        hidden: 64,
        intermediate: 172,
        heads: 2,
        layers: 2,
    };
    Ok(Llama::random(cfg, &mut Rng::new(0), &Device::Cpu)?)
}

/// A tiny model trained for 300 steps of 4 × 128 tokens, evaluated at the end.
fn phase_train(dir: &Path) -> Result<String> {
    let m = DatasetManifest::read(dir)?;
    let mut loader = loader_for(dir, 1, 128)?;
    let spec = PackSpec {
        seq_len: 128,
        packing: Packing::Concat,
        pad_id: m.pad_id,
        vocab_size: Some(m.vocab_size as u32),
    };
    let valid = relora_data::read_sequences(&Split::new(dir, m.valid.shards.clone()), &spec, 16)?;
    let cfg = TrainConfig {
        micro_batch: 4,
        accum: 1,
        lr: 1e-3,
        schedule: Schedule::Cosine {
            warmup: 10,
            total: 300,
            min_ratio: 0.1,
        },
        clip_grad: Some(1.0),
        adam: AdamConfig::default(),
        restarts: None,
        galore: None,
        checkpoint_every: 0,
        eval_every: 0,
        eval_sequences: 16,
    };
    let mut t = Trainer::new(tiny_model(m.vocab_size)?, cfg, 0, Device::Cpu)?;
    let scratch = tempfile::tempdir()?;
    let started = Instant::now();
    let h = t.run(
        &mut loader,
        Some(&valid),
        scratch.path(),
        &scratch.path().join("metrics.jsonl"),
        300,
        |_| {},
    )?;
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "steps=300 tokens={} seconds={secs:.1} tokens_per_s={:.0} waited_for_data_s={:.3} final_loss={:.3}",
        t.state.tokens,
        t.state.tokens as f64 / secs,
        loader.waited().as_secs_f64(),
        h.last().map_or(f64::NAN, |m| m.loss)
    ))
}

/// An evaluation streamed over up to `tokens` validation tokens.
fn phase_eval(dir: &Path, tokens: usize) -> Result<String> {
    let m = DatasetManifest::read(dir)?;
    let spec = PackSpec {
        seq_len: 256,
        packing: Packing::Concat,
        pad_id: m.pad_id,
        vocab_size: Some(m.vocab_size as u32),
    };
    let model = tiny_model(m.vocab_size)?;
    let reader = SequenceReader::new(&Split::new(dir, m.valid.shards), spec, 1)?;
    let started = Instant::now();
    let (loss, n) = relora_model::evaluate(&model, reader.prefetch(tokens / 256, 4), &Device::Cpu)?;
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "tokens={n} seconds={secs:.1} tokens_per_s={:.0} loss={loss:.3}",
        n / secs
    ))
}

/// The whole tokenize stage on the bundled sample: read gzip JSON, encode with T5, write
/// parquet.
fn phase_tokenize(threads: usize) -> Result<String> {
    let out = tempfile::tempdir()?;
    let started = Instant::now();
    let m = tokenize(&tokenize_config(threads), out.path(), &|_, _| {})?;
    let secs = started.elapsed().as_secs_f64();
    let n = m.train.tokens + m.valid.tokens;
    Ok(format!(
        "tokens={n} seconds={secs:.2} tokens_per_s={:.0}",
        n as f64 / secs
    ))
}

/// Run one phase in a child process (its own peak RSS) and print its result line.
fn child(args: &[&str]) -> Result<()> {
    let exe = std::env::current_exe()?;
    let out = Command::new(&exe)
        .arg("phase")
        .args(args)
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        anyhow::bail!(
            "phase {args:?} failed:\n{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    print!("{text}");
    Ok(())
}

fn run_phase() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let (name, rest) = args.split_first().context("phase name")?;
    let get = |k: &str| -> Option<&String> {
        rest.iter()
            .position(|a| a == k)
            .and_then(|i| rest.get(i + 1))
    };
    let dir = get("--data").map(PathBuf::from);
    let label = get("--label").cloned().unwrap_or_default();
    let result = match name.as_str() {
        "loader" => phase_loader(
            dir.as_deref().context("--data")?,
            get("--threads").map_or(Ok(1), |t| t.parse())?,
            get("--read").map_or(Ok(100_000_000), |t| t.parse())?,
        )?,
        "train" => phase_train(dir.as_deref().context("--data")?)?,
        "eval" => phase_eval(dir.as_deref().context("--data")?, 200_000)?,
        "tokenize" => phase_tokenize(get("--threads").map_or(Ok(1), |t| t.parse())?)?,
        other => anyhow::bail!("unknown phase {other}"),
    };
    println!(
        "RESULT {name} {label} {result} peak_rss_mib={:.0}",
        peak_rss_mib()
    );
    Ok(())
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("phase") {
        return run_phase();
    }
    let tokens: u64 =
        arg("--tokens").map_or(Ok(1_000_000_000), |t| t.parse::<f64>().map(|x| x as u64))?;
    let root = PathBuf::from(arg("--dir").unwrap_or("/tmp/relora-bench-data".into()));
    std::fs::create_dir_all(&root)?;
    let (syn, smp) = (root.join("synthetic"), root.join("sample"));
    synthetic(&syn, tokens)?;
    sample(&smp)?;
    for (label, dir) in [("sample", &smp), ("synthetic", &syn)] {
        let d = dir.to_str().context("a UTF-8 path")?;
        for threads in ["1", "2"] {
            child(&[
                "loader",
                "--data",
                d,
                "--label",
                &format!("{label} threads={threads}"),
                "--threads",
                threads,
            ])?;
        }
        child(&["train", "--data", d, "--label", label])?;
        child(&["eval", "--data", d, "--label", label])?;
    }
    for threads in ["1", "2"] {
        child(&[
            "tokenize",
            "--label",
            &format!("threads={threads}"),
            "--threads",
            threads,
        ])?;
    }
    Ok(())
}
