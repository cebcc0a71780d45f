//! A Hugging Face checkpoint folder: config.json, then model.safetensors or a sharded
//! model.safetensors.index.json with one shard (the input's parts, cut at 0xff 0x00 0xff).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    relora_fuzz::report_caught_panics();
    let p = relora_fuzz::parts(data, 3);
    let dir = relora_fuzz::scratch().join("hf");
    let _ = std::fs::remove_dir_all(&dir);
    relora_fuzz::put("hf/config.json", p[0]);
    if p[2].is_empty() {
        relora_fuzz::put("hf/model.safetensors", p[1]);
    } else {
        relora_fuzz::put("hf/model.safetensors.index.json", p[2]);
        relora_fuzz::put("hf/model-00001-of-00001.safetensors", p[1]);
    }
    let _ = relora_hf::import(&dir, &candle_core::Device::Cpu);
});
