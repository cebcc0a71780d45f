//! Model shapes: the paper's LLaMA configs by name, or explicit dimensions.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
}

/// (name, hidden, intermediate, heads, layers), from §1 of the method reference.
pub const NAMED: [(&str, usize, usize, usize, usize); 9] = [
    ("llama_9m", 128, 352, 4, 4),
    ("llama_20m", 256, 688, 4, 4),
    ("llama_35m", 384, 1024, 8, 6),
    ("llama_60m", 512, 1376, 8, 8),
    ("llama_71m", 512, 1368, 8, 12),
    ("llama_130m", 768, 2048, 12, 12),
    ("llama_250m", 768, 2560, 16, 24),
    ("llama_350m", 1024, 2736, 16, 24),
    ("llama_1b", 2048, 5461, 32, 24),
];

impl LlamaConfig {
    pub fn named(name: &str, vocab_size: usize) -> Option<LlamaConfig> {
        NAMED
            .iter()
            .find(|c| c.0 == name)
            .map(|&(_, hidden, intermediate, heads, layers)| LlamaConfig {
                vocab_size,
                hidden,
                intermediate,
                heads,
                layers,
            })
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.hidden == 0 || self.heads == 0 || self.layers == 0 || self.vocab_size == 0 {
            return Err("model dimensions must be positive".into());
        }
        if !self.hidden.is_multiple_of(self.heads) || !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "hidden ({}) must split into {} heads of even size",
                self.hidden, self.heads
            ));
        }
        Ok(())
    }

    /// Parameters of the full-rank model (embeddings, blocks, final norm, LM head).
    pub fn param_count(&self) -> usize {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab_size);
        let block = 4 * h * h + 3 * h * i + 2 * h;
        2 * v * h + self.layers * block + h
    }

    /// Matmul FLOPs per token for forward + backward: 6·N (non-embedding) + attention.
    pub fn flops_per_token(&self, seq_len: usize) -> f64 {
        let n = (self.param_count() - self.vocab_size * self.hidden) as f64;
        6.0 * n + 12.0 * (self.layers * self.hidden * seq_len) as f64
    }
}
