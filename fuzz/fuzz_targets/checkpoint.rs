//! A training checkpoint folder (state.json, state.safetensors, optim.safetensors: the
//! input's parts), loaded into a tiny ReLoRA model and its optimizer as a resume loads it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relora_model::{AdamConfig, AdamW, Llama, LlamaConfig, LoraInit, Rng};

fuzz_target!(|data: &[u8]| {
    relora_fuzz::report_caught_panics();
    let p = relora_fuzz::parts(data, 3);
    let dir = relora_fuzz::scratch().join("ckpt");
    let _ = std::fs::remove_dir_all(&dir);
    relora_fuzz::put("ckpt/state.json", p[0]);
    relora_fuzz::put("ckpt/state.safetensors", p[1]);
    relora_fuzz::put("ckpt/optim.safetensors", p[2]);
    let cfg = LlamaConfig {
        vocab_size: 11,
        hidden: 8,
        intermediate: 12,
        heads: 2,
        layers: 1,
    };
    let dev = candle_core::Device::Cpu;
    let mut rng = Rng::new(1);
    let mut model = Llama::random(cfg, &mut rng, &dev).expect("a model");
    for (_, l) in model.projections_mut() {
        l.add_lora(2, 4.0, 0.0, LoraInit::KaimingAZeroB, &mut rng)
            .expect("a branch");
    }
    let mut opt = AdamW::new(model.trainable(), AdamConfig::default()).expect("an optimizer");
    let _ = relora_model::checkpoint::load(&dir, &mut model, &mut opt, &dev);
});
