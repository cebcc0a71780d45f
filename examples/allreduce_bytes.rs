//! What data parallelism sends per optimizer step: the bytes each rank all-reduces for
//! full-rank training and for ReLoRA (rank 128; only LoRA factors, embeddings, norms and head
//! are trainable between merges) at the paper's sizes, with the T5 vocabulary, and the time
//! a ring all-reduce of them takes over NVLink and over InfiniBand.
//!
//!   cargo run --release --example allreduce_bytes [RANKS]
//!
//! A ring all-reduce moves 2·(N−1)/N of the buffer through each rank's link; NCCL's "bus
//! bandwidth" is defined against the same factor, so time = bytes · 2(N−1)/N / bus bandwidth.
//! Gradients go on the wire in f32 (4 bytes), as this project's MPI path sends them; bf16
//! gradients would halve every figure.

use relora_model::LlamaConfig;
use relora_stages::train::relora_trainable;

/// H100 SXM NVLink bus bandwidth as NCCL reports it for all-reduce (about 450 GB/s).
const NVLINK: f64 = 450e9;
/// One 400 Gb/s InfiniBand link per node.
const INFINIBAND: f64 = 400e9 / 8.0;

fn main() {
    let ranks: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(8.0);
    let ring = 2.0 * (ranks - 1.0) / ranks;
    println!(
        "per optimizer step, f32 gradients, {ranks} ranks (ring factor {ring:.2}); time at \
         {:.0} GB/s (NVLink) and {:.0} GB/s (IB 400 Gb/s)\n",
        NVLINK / 1e9,
        INFINIBAND / 1e9
    );
    println!(
        "| model | params | ReLoRA trainable (r=128) | full-rank MB | ReLoRA MB | ratio | \
         full NVLink ms | ReLoRA NVLink ms | full IB ms | ReLoRA IB ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for (name, label) in [
        ("llama_60m", "60M"),
        ("llama_130m", "130M"),
        ("llama_250m", "250M"),
        ("llama_350m", "350M"),
        ("llama_1b", "1.3B"),
    ] {
        let cfg = LlamaConfig::named(name, 32100).expect("a named config");
        let full = cfg.param_count() as f64;
        let relora = relora_trainable(&cfg, 128) as f64;
        let (fb, rb) = (4.0 * full, 4.0 * relora);
        let ms = |bytes: f64, bw: f64| bytes * ring / bw * 1e3;
        println!(
            "| {label} | {:.1}M | {:.1}M | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} |",
            full / 1e6,
            relora / 1e6,
            fb / 1e6,
            rb / 1e6,
            rb / fb,
            ms(fb, NVLINK),
            ms(rb, NVLINK),
            ms(fb, INFINIBAND),
            ms(rb, INFINIBAND)
        );
    }
}
