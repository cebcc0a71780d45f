//! Tokenizer and parquet throughput on the bundled C4 sample.
//!
//! cargo run --release --example bench_tokenize [-- path/to/tokenizer.json]
//!
//! Encodes all 1000 documents with 1 and 2 threads (best of 3 each), then writes the ids to
//! parquet. Compare with examples/bench/hf_tokenizers.py on the same files.

use relora_data::shards::ShardWriter;
use relora_data::tokenize::{encode_doc, load_tokenizer};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let tok_path = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or(root.join("t5-base/tokenizer.json"));
    let tok = load_tokenizer(&tok_path)?;
    let f = std::fs::File::open(root.join("c4-train.00000-of-01024.first1000.json.gz"))?;
    let texts: Vec<String> = std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map(|l| {
            Ok(serde_json::from_str::<serde_json::Value>(&l?)?["text"]
                .as_str()
                .unwrap_or_default()
                .to_string())
        })
        .collect::<anyhow::Result<_>>()?;
    let eos = tok.token_to_id("</s>").unwrap_or(1);
    let mut ids = Vec::new();
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()?;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let t = Instant::now();
            ids = pool.install(|| {
                use rayon::prelude::*;
                texts
                    .par_iter()
                    .map(|t| encode_doc(&tok, t, eos))
                    .collect::<anyhow::Result<Vec<_>>>()
            })?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        let n: usize = ids.iter().map(Vec::len).sum();
        println!("RESULT rust-tokenizers threads={threads} docs={} tokens={n} seconds={best:.3} tokens_per_s={:.0}", texts.len(), n as f64 / best);
    }
    let dir = tempfile::tempdir()?;
    let n: usize = ids.iter().map(Vec::len).sum();
    let t = Instant::now();
    let mut w = ShardWriter::new(dir.path(), usize::MAX)?;
    for d in &ids {
        w.push(d)?;
    }
    let w = w.finish()?;
    let secs = t.elapsed().as_secs_f64();
    let bytes: u64 = w
        .shards
        .iter()
        .map(|s| std::fs::metadata(dir.path().join(&s.file)).map_or(0, |m| m.len()))
        .sum();
    println!("RESULT parquet-write tokens={n} bytes={bytes} seconds={secs:.4} tokens_per_s={:.0} MiB_per_s={:.1}", n as f64 / secs, (n * 4) as f64 / secs / 1048576.0);
    Ok(())
}
