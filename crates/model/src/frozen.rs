//! `x · Wᵀ` for a frozen W, with a backward pass that computes only the input's gradient;
//! W dense, or in a compact format ([`crate::quant`]) dequantised inside the op.
//!
//! A plain `x.matmul(&w.t())` with a detached W still makes candle's matmul backward
//! compute and store a full-size dW that nobody reads: about a third of the backward
//! matmul FLOPs of a LoRA layer, and a weight-sized buffer per layer. This op is where
//! ReLoRA's compute saving comes from.

use crate::quant::QuantWeight;
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor};
use std::sync::Arc;

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
        cpu_matmul(storage, layout, w, w_layout, (m, n, k))
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

/// `x [m, k] · wᵀ` for w [n, k] on the CPU, in x's dtype.
fn cpu_matmul(
    x: &CpuStorage,
    layout: &Layout,
    w: &CpuStorage,
    w_layout: &Layout,
    (m, n, k): (usize, usize, usize),
) -> Result<(CpuStorage, Shape)> {
    if x.dtype() == DType::BF16 {
        // No bf16 matmul on candle's CPU: widen, multiply, round (see crate::precision).
        let x32 = x.to_dtype(layout, DType::F32)?;
        let w32 = w.to_dtype(w_layout, DType::F32)?;
        let x32_layout = Layout::contiguous(layout.shape());
        let w32t = Layout::contiguous(w_layout.shape()).transpose(0, 1)?;
        let out = x32.matmul(&w32, (1, m, n, k), &x32_layout, &w32t)?;
        let out = out.to_dtype(&Layout::contiguous((m, n)), DType::BF16)?;
        return Ok((out, Shape::from((m, n))));
    }
    let out = x.matmul(w, (1, m, n, k), layout, &w_layout.transpose(0, 1)?)?;
    Ok((out, Shape::from((m, n))))
}

/// `x2d [m, in] · wᵀ` with W frozen.
pub fn frozen_matmul(x2d: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x2d = x2d.contiguous()?;
    x2d.apply_op1(FrozenMatmul { w: w.contiguous()? })
}

/// A frozen W in a compact format, where the matmuls can read it: the codes and scales on
/// the host (checkpoints, merges and the CPU kernels read them there) and, for a layer on a
/// GPU, a copy of both on it for the dequantising kernel. The host copy costs host memory,
/// not the GPU's: a merge dequantises and quantises on the host, every `merge_every` steps.
#[derive(Clone)]
pub struct CompactWeight {
    pub host: Arc<QuantWeight>,
    /// (codes as u8, scales as f32) on the layer's GPU; None on the CPU.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    on_gpu: Option<(Tensor, Tensor)>,
}

impl std::ops::Deref for CompactWeight {
    type Target = QuantWeight;
    fn deref(&self) -> &QuantWeight {
        &self.host
    }
}

impl CompactWeight {
    /// `q` for a layer on `dev`.
    pub fn new(q: QuantWeight, dev: &Device) -> Result<CompactWeight> {
        CompactWeight::shared(Arc::new(q), dev)
    }

    /// This W for a layer on `dev` (the host copy shared).
    pub fn on(&self, dev: &Device) -> Result<CompactWeight> {
        CompactWeight::shared(self.host.clone(), dev)
    }

    fn shared(q: Arc<QuantWeight>, dev: &Device) -> Result<CompactWeight> {
        let on_gpu = if dev.is_cpu() {
            None
        } else {
            let scales = if q.scales.is_empty() {
                vec![0f32] // a kernel argument needs a buffer, even an unread one
            } else {
                q.scales.clone()
            };
            Some((
                Tensor::from_slice(&q.codes, q.codes.len(), dev)?,
                Tensor::from_vec(scales.clone(), scales.len(), dev)?,
            ))
        };
        Ok(CompactWeight { host: q, on_gpu })
    }

    /// W as a dense `[rows, cols]` tensor in `dtype` on `dev`, for one product: dequantised
    /// on the host, or by the CUDA kernel where W is on a GPU.
    pub fn dense(&self, dtype: DType, dev: &Device) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let (Some((codes, scales)), Device::Cuda(_)) = (&self.on_gpu, dev) {
            let storage = crate::fused::cuda::with_view::<u8, _>(codes, "dequantize", |d, c| {
                crate::fused::cuda::with_view::<f32, _>(scales, "dequantize", |_, s| {
                    crate::fused::cuda::dequantize(d, &c, &s, &self.host, dtype)
                })
            })?;
            return Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                (self.host.rows, self.host.cols),
                candle_core::op::BackpropOp::none(),
                false,
            ));
        }
        let q = &self.host;
        Tensor::from_vec(q.dequantize(), (q.rows, q.cols), dev)?.to_dtype(dtype)
    }
}

/// [`FrozenMatmul`] with W compact: W is dequantised in the forward pass and again in the
/// backward pass, so no dense W outlives the product that reads it (the autograd graph
/// holds the compact codes only).
struct CompactMatmul {
    w: CompactWeight,
}

impl CustomOp1 for CompactMatmul {
    fn name(&self) -> &'static str {
        "compact-frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = self.w.dense(storage.dtype(), &Device::Cpu)?;
        FrozenMatmul { w }.cpu_fwd(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let dev = Device::Cuda(storage.device().clone());
        let w = self.w.dense(storage.dtype(), &dev)?;
        FrozenMatmul { w }.cuda_fwd(storage, layout)
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // dX = dY · W, W dequantised again; no dW.
        let w = self.w.dense(grad_res.dtype(), grad_res.device())?;
        Ok(Some(crate::precision::matmul(grad_res, &w)?))
    }
}

/// `x2d [m, in] · Wᵀ` with W frozen in a compact format.
pub fn compact_matmul(x2d: &Tensor, w: &CompactWeight) -> Result<Tensor> {
    x2d.contiguous()?.apply_op1(CompactMatmul { w: w.clone() })
}
