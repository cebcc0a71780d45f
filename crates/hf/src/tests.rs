use super::*;
use relora_model::Llama;

fn t5_tokenizer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/data/t5-base/tokenizer.json")
}

fn exported() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fixture::export_to(dir.path(), &t5_tokenizer()).unwrap();
    dir
}

/// Logits [b, t, v] of our model on `seqs`, as f64 rows.
fn logits(tensors: &HashMap<String, Tensor>, seqs: &[Vec<u32>]) -> Vec<Vec<Vec<f64>>> {
    let model = Llama::from_tensors(fixture::CONFIG, tensors).unwrap();
    let (b, t) = (seqs.len(), seqs[0].len());
    let ids = Tensor::from_vec(seqs.concat(), (b, t), &Device::Cpu).unwrap();
    let out = model.forward(&ids, None).unwrap();
    out.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap()
}

#[test]
fn export_then_import_gives_back_the_same_tensors_and_function() {
    let dir = exported();
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
    ] {
        assert!(dir.path().join(f).is_file(), "{f} missing");
    }
    let back = import(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(back.cfg, fixture::CONFIG);
    let original = fixture::tensors();
    assert_eq!(back.tensors.len(), original.len());
    for (name, t) in &original {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = back.tensors[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(a == b, "{name} changed on the way");
    }
    let seqs: Vec<Vec<u32>> = fixture::SEQUENCES.iter().map(|s| s.to_vec()).collect();
    assert_eq!(logits(&original, &seqs), logits(&back.tensors, &seqs));
    // transformers' names, and the header transformers checks.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    let names: Vec<String> = meta.tensors().keys().cloned().collect();
    for n in [
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
    ] {
        assert!(names.iter().any(|m| m == n), "{n} not in {names:?}");
    }
}

#[test]
fn transformers_logits_are_reproduced() {
    let fixture_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/transformers.json");
    let fx: Value = serde_json::from_slice(&std::fs::read(&fixture_path).unwrap()).unwrap();
    let dir = exported();
    let back = import(dir.path(), &Device::Cpu).unwrap();
    let seqs: Vec<Vec<u32>> = serde_json::from_value(fx["sequences"].clone()).unwrap();
    let probes: Vec<usize> = serde_json::from_value(fx["probe_ids"].clone()).unwrap();
    let want_probe: Vec<Vec<Vec<f64>>> =
        serde_json::from_value(fx["probe_logits"].clone()).unwrap();
    let want_lse: Vec<Vec<f64>> = serde_json::from_value(fx["logsumexp"].clone()).unwrap();
    let want_argmax: Vec<Vec<usize>> = serde_json::from_value(fx["argmax"].clone()).unwrap();
    let got = logits(&back.tensors, &seqs);
    let mut worst = 0f64;
    for (b, rows) in got.iter().enumerate() {
        for (t, row) in rows.iter().enumerate() {
            let max = row.iter().cloned().fold(f64::MIN, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1.0);
            worst = worst.max(rel(lse, want_lse[b][t]));
            for (k, &id) in probes.iter().enumerate() {
                worst = worst.max(rel(row[id], want_probe[b][t][k]));
            }
            let argmax = (0..row.len())
                .max_by(|&i, &j| row[i].total_cmp(&row[j]))
                .unwrap();
            assert_eq!(argmax, want_argmax[b][t], "sequence {b}, position {t}");
        }
    }
    println!("largest relative difference from transformers: {worst:e}");
    assert!(
        worst <= 1e-5,
        "logits differ from transformers {} by {worst:e}",
        fx["transformers"]
    );
}

fn expect_err(dir: &Path, want: &[&str]) {
    let e = match import(dir, &Device::Cpu) {
        Ok(_) => panic!("{} imported", dir.display()),
        Err(e) => e.to_string(),
    };
    for w in want {
        assert!(e.contains(w), "`{w}` not in: {e}");
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[test]
fn bad_checkpoints_are_errors_naming_the_file_and_the_field_or_tensor() {
    // Another architecture.
    let d = exported();
    std::fs::write(
        d.path().join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768}"#,
    )
    .unwrap();
    expect_err(
        d.path(),
        &["config.json: model_type is `gpt2`", "GPT2LMHeadModel"],
    );
    // A missing tensor.
    let d = exported();
    let path = d.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    t.remove("model.layers.1.mlp.up_proj.weight");
    candle_core::safetensors::save(&t, &path).unwrap();
    expect_err(
        d.path(),
        &["model.safetensors: has no tensor `model.layers.1.mlp.up_proj.weight`"],
    );
    // Sizes that disagree with the tensors.
    let d = exported();
    edit_config(d.path(), |v| v["intermediate_size"] = json!(180));
    expect_err(
        d.path(),
        &[
            "model.safetensors: tensor `model.layers.0.mlp.gate_proj.weight` is [176, 64]",
            "[180, 64]",
        ],
    );
    // A tokenizer with more ids than the embedding has rows.
    let d = exported();
    edit_config(d.path(), |v| v["vocab_size"] = json!(32000));
    let path = d.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let x = t[name].narrow(0, 0, 32000).unwrap();
        t.insert(name.to_string(), x);
    }
    candle_core::safetensors::save(&t, &path).unwrap();
    expect_err(
        d.path(),
        &["tokenizer.json: the tokenizer has 32100 ids but the embedding (config.json vocab_size) has 32000 rows"],
    );
    // A design this LLaMA does not compute.
    let d = exported();
    edit_config(d.path(), |v| v["rms_norm_eps"] = json!(1e-5));
    expect_err(d.path(), &["config.json: rms_norm_eps is 0.00001", "1e-6"]);
    let d = exported();
    edit_config(d.path(), |v| v["num_key_value_heads"] = json!(2));
    expect_err(d.path(), &["config.json: num_key_value_heads"]);
    // No weights at all.
    let d = exported();
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    expect_err(
        d.path(),
        &["holds neither model.safetensors nor model.safetensors.index.json"],
    );
    // A tied head is read from the embedding.
    let d = exported();
    edit_config(d.path(), |v| v["tie_word_embeddings"] = json!(true));
    let path = d.path().join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    t.remove("lm_head.weight");
    candle_core::safetensors::save(&t, &path).unwrap();
    let back = import(d.path(), &Device::Cpu).unwrap();
    let (a, b) = (
        &back.tensors["lm_head.weight"],
        &back.tensors["embed_tokens.weight"],
    );
    assert_eq!(
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn a_sharded_checkpoint_is_read_through_its_index() {
    let d = exported();
    let path = d.path().join("model.safetensors");
    let all = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut shards: [HashMap<String, Tensor>; 2] = Default::default();
    let mut weight_map = serde_json::Map::new();
    for (k, (name, t)) in all.iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", k % 2 + 1);
        shards[k % 2].insert(name.clone(), t.to_dtype(DType::BF16).unwrap());
        weight_map.insert(name.clone(), json!(file));
    }
    for (k, s) in shards.iter().enumerate() {
        let file = d
            .path()
            .join(format!("model-0000{}-of-00002.safetensors", k + 1));
        candle_core::safetensors::save(s, file).unwrap();
    }
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        serde_json::to_vec(&json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    let back = import(d.path(), &Device::Cpu).unwrap();
    // bf16 on disk, f32 in memory: each weight rounded to bf16 and no further.
    for (name, t) in fixture::tensors() {
        let want: Vec<f32> = t
            .to_dtype(DType::BF16)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .unwrap();
        let got: Vec<f32> = back.tensors[&name]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(want == got, "{name}");
    }
}
