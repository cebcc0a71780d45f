//! Writes the transformers check's model directory: the fixture LLaMA exported with
//! relora-pipe's code, and `fixture_inputs.json` (token sequences, the vocabulary ids whose
//! logits are recorded, and a text with relora-pipe's T5 ids for it).
//!
//! cargo run --release --example hf_fixture -- DIR   (see scripts/hf/check_transformers.sh)

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: hf_fixture DIR"));
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let tokenizer_path = root.join("examples/data/t5-base/tokenizer.json");
    relora_hf::fixture::export_to(&dir, &tokenizer_path)?;
    let tok = relora_data::tokenize::load_tokenizer(&tokenizer_path)?;
    let text = "ReLoRA merges low-rank updates into the frozen weights, again and again.";
    let text_ids = relora_data::tokenize::encode_doc(&tok, text, 1)?;
    let inputs = serde_json::json!({
        "sequences": relora_hf::fixture::SEQUENCES,
        "probe_ids": relora_hf::fixture::PROBE_IDS,
        "text": text,
        "text_ids": text_ids,
    });
    std::fs::write(
        dir.join("fixture_inputs.json"),
        serde_json::to_vec_pretty(&inputs)?,
    )?;
    Ok(())
}
