//! Tests of the model and the training engine on tiny models.

use crate::checkpoint;
use crate::fused::Ops;
use crate::linear::{Linear, LoraInit};
use crate::llama::Llama;
use crate::optim::{AdamConfig, ResetMode};
use crate::rng::Rng;
use crate::schedule::Schedule;
use crate::train::{batch_loss, eval_loss, evaluate, Restarts, TrainConfig, Trainer};
use crate::LlamaConfig;
use candle_core::{DType, Device, Tensor};
use relora_data::{Batch, Loader, LoaderConfig, Packing, Sequences, Split};

const TINY: LlamaConfig = LlamaConfig {
    vocab_size: 11,
    hidden: 8,
    intermediate: 12,
    heads: 2,
    layers: 2,
};

fn wrap(model: &mut Llama, rank: usize, init: LoraInit, dropout: f32, rng: &mut Rng) {
    for (_, p) in model.projections_mut() {
        p.add_lora(rank, 4.0, dropout, init, rng).unwrap();
    }
}

fn batch(rng: &mut Rng, vocab: u32, b: usize, t: usize) -> Batch {
    let toks: Vec<u32> = (0..b * (t + 1)).map(|_| rng.next_u32() % vocab).collect();
    let mask = vec![1u8; t + 1];
    Batch::from_rows((0..b).map(|i| (&toks[i * (t + 1)..(i + 1) * (t + 1)], &mask[..])))
}

/// Directional finite differences: for each parameter tensor, (L(θ+εd) − L(θ−εd)) / 2ε
/// against ⟨∇L, d⟩ for a random direction d. A missing backward shows up as a zero gradient.
fn gradient_check(model: &Llama) {
    let dev = Device::Cpu;
    let mut rng = Rng::new(11);
    let b = batch(&mut rng, TINY.vocab_size as u32, 2, 5);
    let loss = batch_loss(model, &b, &dev, None).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var, _) in model.trainable() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let d = Tensor::from_vec(rng.normal_vec(var.elem_count(), 1.0), var.shape(), &dev)
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap();
        let analytic = (g * &d)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let eps = 1e-5;
        let at = |s: f64| {
            var.set(&(&orig + (&d * s).unwrap()).unwrap()).unwrap();
            batch_loss(model, &b, &dev, None)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
        var.set(&orig).unwrap();
        let tol = 1e-4 * analytic.abs().max(numeric.abs()).max(1e-2);
        assert!(
            (analytic - numeric).abs() < tol,
            "{name}: analytic {analytic} vs numeric {numeric}"
        );
    }
}

#[test]
fn gradients_match_finite_differences_full_and_lora() {
    let mut rng = Rng::new(1);
    let mut tiny = TINY;
    tiny.hidden = 8;
    let f32_model = Llama::random(tiny, &mut rng, &Device::Cpu).unwrap();
    // In f64, and with larger weights than N(0, 0.02) so every path contributes measurably.
    let tensors = f32_model
        .merged_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = t.to_dtype(candle_core::DType::F64).unwrap();
            let t = if n.contains("norm") {
                (t + 0.3).unwrap()
            } else {
                (t * 10.0).unwrap()
            };
            (n, t)
        })
        .collect();
    let mut model = Llama::from_tensors(tiny, &tensors).unwrap();
    gradient_check(&model);
    wrap(&mut model, 2, LoraInit::KaimingBoth, 0.0, &mut rng);
    gradient_check(&model);
}

#[test]
fn frozen_weight_gets_no_gradient_and_lora_factors_do() {
    let mut rng = Rng::new(2);
    let mut model = Llama::random(TINY, &mut rng, &Device::Cpu).unwrap();
    wrap(&mut model, 2, LoraInit::KaimingAZeroB, 0.1, &mut rng);
    let b = batch(&mut rng, 11, 2, 6);
    let grads = batch_loss(&model, &b, &Device::Cpu, Some(&mut rng))
        .unwrap()
        .backward()
        .unwrap();
    for (name, w) in model.frozen() {
        assert!(grads.get(w.as_tensor()).is_none(), "{name} got a gradient");
    }
    let frozen_ids: Vec<_> = model
        .frozen()
        .iter()
        .map(|(_, w)| w.as_tensor().id())
        .collect();
    for (name, v, is_lora) in model.trainable() {
        assert!(!frozen_ids.contains(&v.as_tensor().id()));
        if is_lora && name.ends_with("lora_b") {
            assert!(grads.get(v.as_tensor()).is_some(), "{name} has no gradient");
        }
    }
}

#[test]
fn merge_leaves_logits_unchanged() {
    let mut rng = Rng::new(3);
    let mut model = Llama::random(TINY, &mut rng, &Device::Cpu).unwrap();
    wrap(&mut model, 2, LoraInit::KaimingBoth, 0.1, &mut rng);
    let ids = Tensor::new(&[[1u32, 5, 7, 2, 9, 3]], &Device::Cpu).unwrap();
    let before = model.forward(&ids, None).unwrap();
    for (_, p) in model.projections_mut() {
        p.merge_and_reinit(&mut rng).unwrap();
        let b = &p.lora.as_ref().unwrap().b;
        assert_eq!(
            b.as_tensor()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
    let after = model.forward(&ids, None).unwrap();
    let diff = (before - after)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "max |Δlogit| = {diff}");
}

fn rank(m: &[Vec<f64>], tol: f64) -> usize {
    let mut a: Vec<Vec<f64>> = m.to_vec();
    let (rows, cols) = (a.len(), a[0].len());
    let mut r = 0;
    for c in 0..cols {
        let Some(p) = (r..rows).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs())) else {
            break;
        };
        if a[p][c].abs() < tol {
            continue;
        }
        a.swap(r, p);
        for i in 0..rows {
            if i != r {
                let f = a[i][c] / a[r][c];
                let pivot = a[r].clone();
                for (x, p) in a[i].iter_mut().zip(&pivot).skip(c) {
                    *x -= f * p;
                }
            }
        }
        r += 1;
    }
    r
}

#[test]
fn restarts_accumulate_a_higher_rank_update() {
    let mut rng = Rng::new(4);
    let w0 = Tensor::from_vec(rng.normal_vec(256, 0.02), (16, 16), &Device::Cpu).unwrap();
    let mut layer = Linear::full(w0.clone()).unwrap();
    layer
        .add_lora(2, 2.0, 0.0, LoraInit::KaimingAZeroB, &mut rng)
        .unwrap();
    for k in 1..=4 {
        // Stand in for a training cycle: B moves away from zero.
        let b = &layer.lora.as_ref().unwrap().b;
        b.set(&Tensor::from_vec(rng.normal_vec(32, 1.0), (16, 2), &Device::Cpu).unwrap())
            .unwrap();
        layer.merge_and_reinit(&mut rng).unwrap();
        let delta = (layer.weight.as_ref().unwrap().as_tensor() - &w0).unwrap();
        let rows: Vec<Vec<f64>> = delta
            .to_vec2::<f32>()
            .unwrap()
            .into_iter()
            .map(|r| r.into_iter().map(f64::from).collect())
            .collect();
        assert_eq!(rank(&rows, 1e-5), 2 * k, "after {k} restarts of rank 2");
    }
}

#[test]
fn trainable_and_frozen_counts_equal_hand_counts() {
    let mut rng = Rng::new(5);
    let mut model = Llama::random(TINY, &mut rng, &Device::Cpu).unwrap();
    // 2·V·h + L·(4h² + 3hi + 2h) + h = 176 + 2·(256 + 288 + 16) + 8
    assert_eq!(model.trainable_count(), 1304);
    assert_eq!(TINY.param_count(), 1304);
    assert_eq!(model.frozen_count(), 0);
    wrap(&mut model, 2, LoraInit::KaimingAZeroB, 0.0, &mut rng);
    // 176 (embed + head) + 40 (norms) + L·(4·r·2h + 2·r·(h+i) + r·(i+h)) = 176 + 40 + 2·248
    assert_eq!(model.trainable_count(), 712);
    assert_eq!(model.frozen_count(), 2 * (4 * 64 + 3 * 96));
}

#[test]
fn perplexity_of_a_uniform_model_is_the_vocabulary_size() {
    let mut rng = Rng::new(6);
    let model = Llama::random(TINY, &mut rng, &Device::Cpu).unwrap();
    model
        .lm_head
        .set(&model.lm_head.as_tensor().zeros_like().unwrap())
        .unwrap();
    let toks: Vec<u32> = (0..64).map(|i| i % 11).collect();
    let seqs = Sequences {
        seq_len: 8,
        tokens: toks,
        mask: vec![1; 64],
    };
    let (loss, n) = evaluate(&model, seqs.batches(100, 3).map(Ok), &Device::Cpu).unwrap();
    assert_eq!(n, 56.0);
    assert!(
        (loss.exp() - 11.0).abs() < 1e-4,
        "perplexity {}",
        loss.exp()
    );
}

/// A loader over documents of a repeating pattern, so a tiny model can learn something;
/// the shards live in the returned folder.
fn synthetic_loader(seed: u64) -> (Loader, tempfile::TempDir) {
    let mut rng = Rng::new(seed);
    let docs: Vec<Vec<u32>> = (0..64)
        .map(|_| {
            let start = rng.next_u32() % 10;
            let mut d: Vec<u32> = (0..15).map(|k| (start + k) % 10 + 1).collect();
            d.push(0);
            d
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let shards =
        relora_data::shards::write_docs(dir.path(), docs.iter().map(Vec::as_slice), 300).unwrap();
    let cfg = LoaderConfig {
        seq_len: 16,
        packing: Packing::Concat,
        pad_id: 0,
        vocab_size: Some(TINY.vocab_size as u32),
        seed,
        window: relora_data::DEFAULT_WINDOW,
        rank: 0,
        world: 1,
        threads: 1,
    };
    (
        Loader::new(Split::new(dir.path(), shards), cfg).unwrap(),
        dir,
    )
}

fn config(steps: u64, restarts: Option<Restarts>) -> TrainConfig {
    TrainConfig {
        micro_batch: 4,
        accum: 2,
        lr: 1e-2,
        schedule: Schedule::Cosine {
            warmup: 2,
            total: steps,
            min_ratio: 0.1,
        },
        clip_grad: Some(1.0),
        adam: AdamConfig::default(),
        restarts,
        galore: None,
        checkpoint_every: 3,
        eval_every: 0,
        eval_sequences: 8,
    }
}

fn relora_trainer(seed: u64, steps: u64) -> Trainer {
    let mut rng = Rng::new(seed);
    let mut model = Llama::random(TINY, &mut rng, &Device::Cpu).unwrap();
    wrap(&mut model, 2, LoraInit::KaimingAZeroB, 0.1, &mut rng);
    let restarts = Restarts {
        merge_every: Some(2),
        reset_every: Some(2),
        reset: ResetMode::Magnitude { fraction: 0.9 },
    };
    Trainer::new(model, config(steps, Some(restarts)), seed, Device::Cpu).unwrap()
}

#[test]
fn a_resumed_run_continues_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    // Uninterrupted.
    let mut a = relora_trainer(7, 8);
    let (mut la, _la_dir) = synthetic_loader(7);
    let ma = dir.path().join("a.jsonl");
    a.run(&mut la, None, &dir.path().join("ca"), &ma, 8, |_| {})
        .unwrap();
    // Interrupted after step 4 (its last checkpoint is step 3), then resumed in a fresh trainer.
    let ckpt = dir.path().join("cb");
    let mb = dir.path().join("b.jsonl");
    let mut b = relora_trainer(7, 8);
    let (mut lb, _lb_dir) = synthetic_loader(7);
    b.run(&mut lb, None, &ckpt, &mb, 4, |_| {}).unwrap();
    let mut c = relora_trainer(7, 8);
    let (mut lc, _lc_dir) = synthetic_loader(7);
    assert_eq!(c.resume(&ckpt, &mut lc, &mb).unwrap(), Some(3));
    c.run(&mut lc, None, &ckpt, &mb, 8, |_| {}).unwrap();
    for ((n, x, _), (_, y, _)) in a.model.trainable().iter().zip(c.model.trainable()) {
        let x = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let y = y
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(x, y, "{n} differs after resume");
    }
    // Byte for byte: no timing reaches metrics.jsonl.
    assert_eq!(std::fs::read(&ma).unwrap(), std::fs::read(&mb).unwrap());
}

#[test]
fn checkpoint_round_trip_restores_every_tensor_and_state() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = relora_trainer(8, 4);
    let (mut l, _l_dir) = synthetic_loader(8);
    t.run(
        &mut l,
        None,
        &dir.path().join("x"),
        &dir.path().join("m.jsonl"),
        4,
        |_| {},
    )
    .unwrap();
    t.state.loader = l.state();
    let path = checkpoint::save(&dir.path().join("c"), &t.model, &t.opt, &t.state).unwrap();
    let mut u = relora_trainer(9, 4);
    let state = checkpoint::load(&path, &mut u.model, &mut u.opt, &Device::Cpu).unwrap();
    assert_eq!(state, t.state);
    assert_eq!(u.opt.step, t.opt.step);
    for (p, q) in t.opt.params.iter().zip(&u.opt.params) {
        assert_eq!(
            p.var
                .as_tensor()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            q.var
                .as_tensor()
                .to_dtype(candle_core::DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        );
        assert_eq!(
            p.v.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            q.v.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    // A truncated file is an error naming the path, not a panic.
    let f = path.join("state.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let e = format!(
        "{:#}",
        checkpoint::load(&path, &mut u.model, &mut u.opt, &Device::Cpu).unwrap_err()
    );
    assert!(e.contains("state.safetensors"), "{e}");
}

#[test]
fn loss_falls_and_non_finite_loss_stops_with_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(10);
    let model = Llama::random(TINY, &mut rng, &Device::Cpu).unwrap();
    let mut t = Trainer::new(model, config(40, None), 10, Device::Cpu).unwrap();
    let (mut l, _l_dir) = synthetic_loader(10);
    let h = t
        .run(
            &mut l,
            None,
            &dir.path().join("c"),
            &dir.path().join("m.jsonl"),
            40,
            |_| {},
        )
        .unwrap();
    let first = h[0].loss;
    let last: f64 = h[35..].iter().map(|m| m.loss).sum::<f64>() / 5.0;
    assert!(first > 2.2 && last < first - 0.8, "loss {first} -> {last}");
    // Poison a weight: the next step's loss is NaN and the error names that step.
    t.model
        .norm
        .set(&(t.model.norm.as_tensor() * f64::NAN).unwrap())
        .unwrap();
    let e = t
        .run(
            &mut l,
            None,
            &dir.path().join("c"),
            &dir.path().join("m.jsonl"),
            45,
            |_| {},
        )
        .unwrap_err();
    assert!(e.to_string().contains("non-finite loss at step 40"), "{e}");
}

/// ‖a − b‖ / ‖b‖ over all elements, in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().sqr().unwrap().sum_all().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap();
    (diff.to_scalar::<f64>().unwrap() / norm.to_scalar::<f64>().unwrap()).sqrt()
}

/// The loss and every trainable parameter's gradient, by name, through `Llama::backward`.
fn grads_of(
    model: &Llama,
    b: &Batch,
    dropout: Option<&mut Rng>,
) -> (Tensor, Vec<(String, Tensor)>) {
    let loss = batch_loss(model, b, &Device::Cpu, dropout).unwrap();
    let store = model.backward(&loss).unwrap();
    let grads = model
        .trainable()
        .into_iter()
        .map(|(n, v, _)| {
            let g = store
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{n}: no gradient"));
            (n, g.clone())
        })
        .collect();
    (loss, grads)
}

/// Loss and every trainable parameter's gradient, by name.
fn loss_and_grads(model: &Llama, b: &Batch) -> (f64, Vec<(String, Tensor)>) {
    let (loss, grads) = grads_of(model, b, None);
    (loss.to_scalar::<f32>().unwrap() as f64, grads)
}

fn small_model(seed: u64, lora: bool) -> (Llama, Rng) {
    let cfg = LlamaConfig {
        vocab_size: 64,
        hidden: 32,
        intermediate: 64,
        heads: 2,
        layers: 2,
    };
    let mut rng = Rng::new(seed);
    let mut model = Llama::random(cfg, &mut rng, &Device::Cpu).unwrap();
    if lora {
        wrap(&mut model, 4, LoraInit::KaimingBoth, 0.0, &mut rng);
    }
    (model, rng)
}

#[test]
fn bf16_compute_tracks_f32_and_keeps_f32_gradients() {
    for lora in [false, true] {
        let (mut model, mut rng) = small_model(3, lora);
        let b = batch(&mut rng, 64, 4, 16);
        let (l32, g32) = loss_and_grads(&model, &b);
        model.compute = DType::BF16;
        let (l16, g16) = loss_and_grads(&model, &b);
        // bf16 is really used (the loss moves), but by well under a percent.
        let dl = (l16 - l32).abs() / l32;
        assert!(dl > 0.0 && dl < 5e-3, "lora {lora}: loss {l32} vs {l16}");
        for ((name, a), (_, b)) in g16.iter().zip(&g32) {
            // Master weights are f32, so their gradients arrive in f32.
            assert_eq!(a.dtype(), DType::F32, "{name}");
            // Measured: ≤ 0.8% full-rank; ≤ 3.1% for LoRA factors, whose gradients pass two
            // more bf16 roundings (x·Aᵀ and ·Bᵀ) and, for q and k, RoPE and the softmax.
            let tol = if lora { 5e-2 } else { 1.5e-2 };
            let e = rel_err(a, b);
            assert!(
                e < tol,
                "lora {lora}: {name} gradient off by {e:.4} (relative)"
            );
        }
    }
}

#[test]
fn relora_trains_in_bf16_as_it_does_in_f32() {
    let dir = tempfile::tempdir().unwrap();
    let mut curves = Vec::new();
    for dtype in [DType::F32, DType::BF16] {
        let mut t = relora_trainer(5, 40);
        t.model.compute = dtype;
        let (mut l, _l_dir) = synthetic_loader(5);
        let sub = dir.path().join(format!("{dtype:?}"));
        std::fs::create_dir_all(&sub).unwrap();
        let h = t
            .run(
                &mut l,
                None,
                &sub.join("c"),
                &sub.join("m.jsonl"),
                40,
                |_| {},
            )
            .unwrap();
        // Merges write f32 weights; no parameter or moment ever becomes bf16.
        assert!(t
            .model
            .trainable()
            .iter()
            .all(|(_, v, _)| v.dtype() == DType::F32));
        assert!(t
            .model
            .frozen()
            .iter()
            .all(|(_, v)| v.dtype() == DType::F32));
        let last: f64 = h[35..].iter().map(|m| m.loss).sum::<f64>() / 5.0;
        curves.push((h[0].loss, last));
    }
    let ((f0, f1), (b0, b1)) = (curves[0], curves[1]);
    assert!(
        f1 < f0 - 0.8 && b1 < b0 - 0.8,
        "f32 {f0}->{f1}, bf16 {b0}->{b1}"
    );
    eprintln!("f32 {f0:.6} -> {f1:.6}, bf16 {b0:.6} -> {b1:.6}");
    assert!((b1 - f1).abs() < 0.1, "final loss f32 {f1} vs bf16 {b1}");
}

#[test]
fn fused_model_matches_the_reference_composition() {
    for lora in [false, true] {
        let (mut model, mut rng) = small_model(8, lora);
        // 70 positions: two of the fused attention's query blocks.
        let b = batch(&mut rng, 64, 3, 70);
        assert_eq!(model.ops, Ops::Fused);
        let (lf, gf) = loss_and_grads(&model, &b);
        let eval = eval_loss(&model, &b, &Device::Cpu).unwrap();
        model.ops = Ops::Reference;
        let (lr, gr) = loss_and_grads(&model, &b);
        // f32 sums in another order: a few units in the last place of the loss.
        assert!(
            (lf - lr).abs() < 1e-5 * lr,
            "lora {lora}: loss {lf} vs {lr}"
        );
        assert_eq!(
            eval as f32, lf as f32,
            "evaluation computes the training loss"
        );
        for ((name, a), (_, b)) in gf.iter().zip(&gr) {
            let e = rel_err(a, b);
            assert!(e < 1e-5, "lora {lora}: {name} gradient off by {e:e}");
        }
    }
}

#[test]
fn evaluation_records_no_autograd_graph() {
    let mut rng = Rng::new(9);
    let model = Llama::random(TINY, &mut rng, &Device::Cpu).unwrap();
    let b = batch(&mut rng, 11, 2, 6);
    let (ids, targets, weights) = crate::train::batch_tensors(&b, &Device::Cpu).unwrap();
    let loss = model.loss_eval(&ids, &targets, &weights).unwrap();
    // A tensor with no graph behind it has no gradient to give.
    let grads = loss.backward().unwrap();
    assert!(model
        .trainable()
        .iter()
        .all(|(_, v, _)| grads.get(v.as_tensor()).is_none()));
    let tracked = model.forward(&ids, None).unwrap();
    let grads = tracked.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(model.embed.as_tensor()).is_some());
}

/// Loss, every trainable gradient's bits, and the dropout RNG afterwards, for one
/// training-mode pass (with dropout) through `Llama::backward`.
fn pass_bits(model: &Llama, b: &Batch, seed: u64) -> (u32, Vec<(String, Vec<u32>)>, Rng) {
    let mut dropout = Rng::new(seed);
    let (loss, grads) = grads_of(model, b, Some(&mut dropout));
    let bits = grads
        .into_iter()
        .map(|(n, g)| {
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (n, g.iter().map(|x| x.to_bits()).collect())
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap().to_bits(), bits, dropout)
}

/// Activation checkpointing recomputes each block in the backward pass; the loss and every
/// gradient must be the same bits as without it (the same ops in the same order), with LoRA
/// dropout (the masks replayed), for full-rank and LoRA models, fused and reference ops.
#[test]
fn checkpointed_activations_give_the_same_gradients_bit_for_bit() {
    for (lora, ops) in [
        (false, Ops::Fused),
        (true, Ops::Fused),
        (true, Ops::Reference),
    ] {
        let (mut model, mut rng) = small_model(12, false);
        if lora {
            wrap(&mut model, 4, LoraInit::KaimingBoth, 0.2, &mut rng);
        }
        model.ops = ops;
        let b = batch(&mut rng, 64, 3, 40);
        let (l0, g0, r0) = pass_bits(&model, &b, 5);
        model.checkpoint_activations = true;
        let (l1, g1, r1) = pass_bits(&model, &b, 5);
        assert_eq!(l0, l1, "lora {lora} {ops:?}: loss");
        assert_eq!(g0.len(), g1.len());
        for ((name, a), (_, b)) in g0.iter().zip(&g1) {
            let differ = a.iter().zip(b).filter(|(x, y)| x != y).count();
            assert_eq!(
                differ, 0,
                "lora {lora} {ops:?}: {name}: {differ} values differ"
            );
        }
        // The dropout stream moves on as it does without checkpointing.
        assert_eq!(r0, r1, "lora {lora} {ops:?}: dropout RNG afterwards");
        // Nothing is left behind for the next pass.
        assert!(model.recomputed_is_empty());
        // The blocks were recomputed: candle's own pass reaches none of their parameters.
        let loss = batch_loss(&model, &b, &Device::Cpu, None).unwrap();
        let plain = loss.backward().unwrap();
        assert!(plain.get(model.blocks[0].attn_norm.as_tensor()).is_none());
        assert!(plain.get(model.lm_head.as_tensor()).is_some());
    }
}

/// The composed path's compact matmul (the one a GPU runs, there with the kernel
/// dequantising) against the dense frozen matmul on the dequantised W: the product and the
/// input's gradient bit for bit, in f32 and in (emulated) bf16.
#[test]
fn compact_frozen_matmul_equals_the_dense_one_on_the_dequantised_w() {
    use crate::frozen::{compact_matmul, frozen_matmul, CompactWeight};
    use crate::quant::{FrozenFormat, QuantWeight};
    let dev = Device::Cpu;
    let mut rng = Rng::new(23);
    let (m, k, n) = (5, 48, 33);
    let x = Tensor::from_vec(rng.normal_vec(m * k, 1.0), (m, k), &dev).unwrap();
    let w: Vec<f32> = rng.normal_vec(n * k, 0.1);
    let r = Tensor::from_vec(rng.normal_vec(m * n, 1.0), (m, n), &dev).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        t.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    for format in [FrozenFormat::Bf16, FrozenFormat::Int8, FrozenFormat::Nf4] {
        let cw = CompactWeight::new(QuantWeight::quantize(&w, (n, k), format, 16), &dev).unwrap();
        for dt in [DType::F32, DType::BF16] {
            let dense = cw.dense(dt, &dev).unwrap();
            let out = |f: &dyn Fn(&Tensor) -> Tensor| {
                let xv = candle_core::Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap();
                let y = f(xv.as_tensor());
                let loss = (y.to_dtype(DType::F32).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                let g = loss.backward().unwrap();
                (bits(&y), bits(g.get(xv.as_tensor()).unwrap()))
            };
            let compact = out(&|x| compact_matmul(x, &cw).unwrap());
            let reference = out(&|x| frozen_matmul(x, &dense).unwrap());
            assert_eq!(compact.0, reference.0, "{format:?} {dt:?}: forward");
            assert_eq!(compact.1, reference.1, "{format:?} {dt:?}: input gradient");
        }
    }
}

/// A model built on one device and moved (as a GPU stage's is, built on the host) is the
/// same model: every state tensor, compact codes included, and the same logits.
#[test]
fn a_moved_model_is_the_same_model() {
    use crate::quant::FrozenFormat;
    let mut rng = Rng::new(5);
    let mut model = Llama::random(TINY, &mut rng, &Device::Cpu).unwrap();
    wrap(&mut model, 2, LoraInit::KaimingBoth, 0.0, &mut rng);
    for (_, p) in model.projections_mut() {
        p.quantize_frozen(FrozenFormat::Nf4, 4).unwrap();
    }
    let b = batch(&mut rng, TINY.vocab_size as u32, 2, 5);
    let ids = Tensor::from_slice(&b.inputs, (b.batch_size, b.len), &Device::Cpu).unwrap();
    let before = model.state_tensors().unwrap();
    let logits = model.forward(&ids, None).unwrap();
    let moved = model.to_device(&Device::Cpu).unwrap();
    let after = moved.state_tensors().unwrap();
    assert_eq!(before.len(), after.len());
    for (name, t) in &before {
        let u = &after[name];
        assert_eq!(
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            u.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap(),
            "{name}"
        );
    }
    assert_eq!(rel_err(&moved.forward(&ids, None).unwrap(), &logits), 0.0);
}
