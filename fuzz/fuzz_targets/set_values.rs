//! `--set STAGE.KEY=VALUE` values, applied to a small valid pipeline and validated.
#![no_main]
use libfuzzer_sys::fuzz_target;

const PIPELINE: &str = "pipeline: f\nstages:\n  tokens:\n    kind: tokenize\n    params:\n      train_files: c.jsonl\n      valid_docs: 1\n      tokenizer: {type: bpe, vocab_size: 300}\n  train:\n    kind: train\n    inputs: {data: tokens}\n    params: {method: relora, model: llama_9m, steps: 10, lr: 1.0e-3, lora: {rank: 4}, relora: {merge_every: 5}}\n";

fuzz_target!(|data: &[u8]| {
    relora_fuzz::report_caught_panics();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    relora_fuzz::put("c.jsonl", b"{\"text\": \"a\"}\n");
    let path = relora_fuzz::put("set.yaml", PIPELINE.as_bytes());
    let overrides: Vec<_> = text
        .lines()
        .filter_map(|l| relora_spec::Override::parse(l).ok())
        .collect();
    if let Ok(p) = relora_spec::load(&path, &overrides) {
        let _ = relora_exec::Dag::build(p, &relora_stages::registry());
    }
});
