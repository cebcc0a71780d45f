//! What verifying an input costs: blake3 over a file, as a stage re-hashes its input entries
//! before it reads them (crates/exec, `verify_inputs`).
//!
//! cargo run --release --example bench_hash -- FILE
//!
//! Prints the file's size, the seconds and GB/s of `relora_cache::hash_file` (one thread,
//! 64 KiB reads). Run it twice to see the page cache's effect: the first read may come from
//! disk.

use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: bench_hash FILE"))?;
    let size = std::fs::metadata(&path)?.len();
    let t = Instant::now();
    let hash = relora_cache::hash_file(std::path::Path::new(&path))?;
    let s = t.elapsed().as_secs_f64();
    println!(
        "HASH bytes={size} seconds={s:.2} gb_per_s={:.2} blake3={}",
        size as f64 / s / 1e9,
        &hash[..16]
    );
    Ok(())
}
