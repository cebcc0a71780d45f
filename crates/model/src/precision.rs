//! Mixed precision: f32 master weights and optimizer moments, bf16 compute.
//!
//! The model keeps every parameter in f32. With a bf16 compute dtype each weight is cast to
//! bf16 where it is used; the cast is differentiable, so the gradient comes back to the f32
//! master weight as f32, and AdamW never sees a bf16 number. Matmuls and the elementwise ops
//! between them run in bf16; what needs range or precision stays in f32: the residual
//! stream, RMSNorm (variance and scale), the attention softmax and the cross-entropy over the
//! vocabulary. This is the split PyTorch's autocast makes for the same model.

use candle_core::{DType, Result, Tensor};

/// `a · b` in the operands' dtype.
///
/// candle's CPU backend has no bf16 matmul. There the operands are widened to f32, multiplied,
/// and the product rounded back to bf16: the same numbers a bf16 tensor-core GEMM produces
/// (bf16 inputs, f32 accumulation, bf16 output), up to summation order. So the bf16 path can be
/// tested on a CPU, slowly; on CUDA it is a plain cuBLAS bf16 GEMM.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dtype() == DType::BF16 && a.device().is_cpu() {
        a.to_dtype(DType::F32)?
            .matmul(&b.to_dtype(DType::F32)?)?
            .to_dtype(DType::BF16)
    } else {
        a.matmul(b)
    }
}

/// The compute dtype a stage asks for: `dtype: f32 | bf16`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}
