//! What the GPU check programs (`cuda_parity`, `nccl_check`) share: the tiny model, a
//! random batch, and the gradients of a loss.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use relora_data::Batch;
use relora_model::{Llama, LlamaConfig, Rng};

/// The model every check builds: small enough that the CPU side is quick.
pub const TINY: LlamaConfig = LlamaConfig {
    vocab_size: 512,
    hidden: 64,
    intermediate: 172,
    heads: 4,
    layers: 2,
};

/// `rows` sequences of `len` random tokens of `TINY`'s vocabulary (plus one for the
/// targets), none masked.
pub fn random_batch(seed: u64, rows: usize, len: usize) -> Batch {
    let mut rng = Rng::new(seed);
    let toks: Vec<u32> = (0..rows * (len + 1))
        .map(|_| rng.next_u32() % TINY.vocab_size as u32)
        .collect();
    let mask = vec![1u8; len + 1];
    Batch::from_rows((0..rows).map(|i| (&toks[i * (len + 1)..(i + 1) * (len + 1)], &mask[..])))
}

/// The gradient of every trainable parameter of `model`, in `model.trainable()`'s order.
pub fn trainable_grads(model: &Llama, store: &GradStore) -> anyhow::Result<Vec<Tensor>> {
    model
        .trainable()
        .iter()
        .map(|(n, v, _)| {
            store
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("{n}: no gradient"))
        })
        .collect()
}
