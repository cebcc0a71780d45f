//! `x · Wᵀ` for a frozen W, with a backward pass that computes only the input's gradient.
//!
//! A plain `x.matmul(&w.t())` with a detached W still makes candle's matmul backward
//! compute and store a full-size dW that nobody reads: about a third of the backward
//! matmul FLOPs of a LoRA layer, and a weight-sized buffer per layer. This op is where
//! ReLoRA's compute saving comes from.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Storage, Tensor};

pub struct FrozenMatmul {
    /// [out, in], contiguous.
    pub w: Tensor,
}

impl FrozenMatmul {
    fn dims(&self, layout: &Layout) -> Result<(usize, usize, usize)> {
        let (m, k) = layout.shape().dims2()?;
        let (n, k2) = self.w.dims2()?;
        if k != k2 {
            candle_core::bail!("frozen matmul: input has {k} features, weight expects {k2}");
        }
        Ok((m, n, k))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = self.dims(layout)?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*w_storage else {
            candle_core::bail!("frozen matmul: weight and input are on different devices");
        };
        let wt = w_layout.transpose(0, 1)?;
        if storage.dtype() == DType::BF16 {
            // No bf16 matmul on candle's CPU: widen, multiply, round (see crate::precision).
            let x32 = storage.to_dtype(layout, DType::F32)?;
            let w32 = w.to_dtype(w_layout, DType::F32)?;
            let x32_layout = Layout::contiguous(layout.shape());
            let w32t = Layout::contiguous(w_layout.shape()).transpose(0, 1)?;
            let out = x32.matmul(&w32, (1, m, n, k), &x32_layout, &w32t)?;
            let out = out.to_dtype(&Layout::contiguous((m, n)), DType::BF16)?;
            return Ok((out, Shape::from((m, n))));
        }
        let out = storage.matmul(w, (1, m, n, k), layout, &wt)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = self.dims(layout)?;
        let (w_storage, w_layout) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*w_storage else {
            candle_core::bail!("frozen matmul: weight and input are on different devices");
        };
        let wt = w_layout.transpose(0, 1)?;
        let out = storage.matmul(w, (1, m, n, k), layout, &wt)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // dX = dY · W; no dW.
        Ok(Some(crate::precision::matmul(grad_res, &self.w)?))
    }
}

/// `x2d [m, in] · wᵀ` with W frozen.
pub fn frozen_matmul(x2d: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x2d = x2d.contiguous()?;
    x2d.apply_op1(FrozenMatmul { w: w.contiguous()? })
}
