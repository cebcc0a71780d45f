//! Fused operations with hand-written backward passes: RMSNorm, RoPE, SwiGLU, causal
//! attention, the projections (trainable, and frozen W with its LoRA branch), the LM head
//! with the cross-entropy over the vocabulary; plus AdamW and gradient accumulation in place.
//!
//! Composed from candle's differentiable primitives, each of these is several full passes
//! over memory, each with a fresh buffer, and its backward pass several more (see
//! notes/measurements.md). Here each is one candle custom op whose forward pass makes one
//! pass over its input and keeps only what its backward pass needs (RMSNorm: one inverse
//! RMS per row; attention: one log-sum-exp per query, the probabilities are recomputed;
//! cross-entropy: one log-sum-exp per token; a ReLoRA layer: its [tokens × rank] product),
//! and whose backward pass is one more. Fewer autograd nodes matter as much as fewer passes:
//! candle's backward pass gives every node's input a zero-filled gradient buffer and sums
//! into it, so even a reshape costs two passes over its tensor. The fused ops take
//! [.., features] tensors as they come, and the loss never forms a logits tensor.
//!
//! The kernels here are CPU kernels, threaded with rayon over rows (or over batch × head for
//! attention, whose tiles go through the `gemm` crate, the one candle's CPU matmul uses).
//! With the `cuda` feature the ops other than the matmuls also have CUDA kernels
//! (`kernels.cu`, launched by `cuda.rs`; see there for what runs where), which the tests
//! check on the CPU through an emulation of their threads (`emulate/`).
//! Every reduction is split at fixed boundaries and summed in a fixed order, so results do
//! not depend on the number of threads: same inputs, same bytes. On other devices, and
//! whenever [`Ops::Reference`] is chosen, the model uses the reference composition of
//! candle primitives (`crate::llama`), against which every op here is tested.
//!
//! bf16 inputs are widened to f32 for the op and its output rounded back, which is what a
//! bf16 GPU kernel does (f32 arithmetic inside, bf16 in memory).

pub mod adamw;
pub mod attention;
pub mod compact;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod exp;
pub mod gemm;
pub mod grads;
pub(crate) mod host;
pub mod linear;
pub mod lora;
pub mod norm;
pub mod rope;
pub mod simd;
pub mod swiglu;
pub mod xent;

pub use attention::causal_attention;
pub use linear::linear;
pub use lora::lora_linear;
pub use norm::rms_norm;
pub use rope::{rope, RopeTables};
pub use swiglu::swiglu;
pub use xent::{cross_entropy, head_cross_entropy};

/// Which implementation of the model's elementwise, attention and loss ops to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ops {
    /// The fused ops of this module where they exist (f32 and bf16, on the CPU and, built
    /// with `cuda`, on GPUs), the reference composition elsewhere (f64 models in gradient
    /// checks).
    #[default]
    Fused,
    /// The composition of candle's differentiable primitives, everywhere: the yardstick the
    /// fused ops are tested against.
    Reference,
}

impl Ops {
    /// Whether the fused RMSNorm, RoPE, SwiGLU, attention and cross-entropy run for `dtype`
    /// tensors on `dev`.
    pub fn fused_on(self, dev: &candle_core::Device, dtype: candle_core::DType) -> bool {
        use candle_core::DType::{BF16, F32};
        self == Ops::Fused
            && (dev.is_cpu() || (cfg!(feature = "cuda") && dev.is_cuda()))
            && matches!(dtype, F32 | BF16)
    }

    /// Whether the fused projections (trainable, and frozen W with its LoRA branch) and the
    /// LM head fused with the loss run: on the CPU only. On a GPU these are cuBLAS matmuls,
    /// which a fused op would not beat.
    pub fn fused_matmuls_on(self, dev: &candle_core::Device, dtype: candle_core::DType) -> bool {
        self.fused_on(dev, dtype) && dev.is_cpu()
    }
}

#[cfg(test)]
mod tests;
