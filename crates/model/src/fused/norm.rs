//! RMSNorm, `y = x · w / sqrt(mean(x²) + eps)` over the last dimension.
//!
//! The forward pass keeps one number per row, the inverse RMS `r`; the backward pass needs
//! nothing else: with `g = dy · w`,
//! `dx = r·g − x · r³ · mean(g·x)` and `dw = Σ_rows dy · x · r`.

#[cfg(feature = "cuda")]
use super::cuda;
use super::host;
use super::simd::{self, kernel};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per task of the weight-gradient sum: fixed, so the sum's order (and its bits) does
/// not depend on the thread count.
const ROWS_PER_TASK: usize = 64;

struct RmsNorm {
    eps: f32,
    /// 1 / RMS of each row, from the forward pass.
    inv_rms: host::Saved<Vec<f32>>,
    /// The same, when the forward pass ran on a GPU.
    #[cfg(feature = "cuda")]
    inv_rms_gpu: host::Saved<cuda::CudaSlice<f32>>,
}

impl RmsNorm {
    /// Rows and row length of `x [.., h]` against a weight of `h`.
    fn dims(x: &[usize], h: usize) -> Result<(usize, usize)> {
        if x.last() != Some(&h) {
            bail!("rms_norm: input {x:?} against a weight of {h}");
        }
        Ok((x.iter().product::<usize>() / h.max(1), h))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            host::slice(xs, xl, "rms_norm")?,
            host::slice(ws, wl, "rms_norm")?,
        );
        let (_, h) = Self::dims(xl.dims(), w.len())?;
        let mut y = vec![0f32; x.len()];
        let mut inv = vec![0f32; x.len() / h];
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .zip(inv.par_iter_mut())
            .for_each(|((y, x), inv)| *inv = forward_row(y, x, w, self.eps));
        self.inv_rms.keep(inv, "rms_norm")?;
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &cuda::CudaStorage,
        xl: &Layout,
        ws: &cuda::CudaStorage,
        wl: &Layout,
    ) -> Result<(cuda::CudaStorage, Shape)> {
        let dims = Self::dims(xl.dims(), wl.shape().elem_count())?;
        let (x, w) = (
            cuda::view(xs, xl, "rms_norm")?,
            cuda::view(ws, wl, "rms_norm")?,
        );
        let dev = cuda::device_of(xs);
        let (y, inv) = cuda::rms_norm_fwd(dev, &x, &w, dims, self.eps)?;
        self.inv_rms_gpu.keep(inv, "rms_norm")?;
        Ok((cuda::storage(y, dev), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let inv = self.inv_rms_gpu.get("rms_norm")?;
            let (rows, h) = Self::dims(x.dims(), w.elem_count())?;
            let both = cuda::read([x, w, dy], "rms_norm", |dev, [x, w, dy]| {
                let buf = cuda::rms_norm_bwd(dev, [&x, &w, &dy], inv, (rows, h))?;
                Ok(cuda::tensor(buf, dev, &[rows * h + h]))
            })?;
            return Ok((
                Some(both.narrow(0, 0, rows * h)?.reshape(x.dims())?),
                Some(both.narrow(0, rows * h, h)?.reshape(w.dims())?),
            ));
        }
        let inv = self.inv_rms.get("rms_norm")?;
        let h = w.elem_count();
        let (dx, dw) = host::read([x, w, dy], "rms_norm", |[x, w, dy]| {
            backward(x, w, dy, inv, h)
        })?;
        Ok((
            Some(host::tensor(dx, x.dims())?),
            Some(host::tensor(dw, w.dims())?),
        ))
    }
}

kernel! {
    /// One row: `y = x · w · r` with `r = 1 / sqrt(mean(x²) + eps)`; returns r.
    fn forward_row(y: &mut [f32], x: &[f32], w: &[f32], eps: f32) -> f32 {
        let ms = simd::sum_map(x, |v| v * v) / x.len() as f32;
        let r = 1.0 / (ms + eps).sqrt();
        for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
            *y = x * r * w;
        }
        r
    }
}

kernel! {
    /// One row's input gradient, and its share of the weight's gradient added to `dw`.
    fn backward_row(dx: &mut [f32], dw: &mut [f32], x: &[f32], dy: &[f32], w: &[f32], r: f32) {
        let h = dx.len();
        let (dw, x, dy, w) = (&mut dw[..h], &x[..h], &dy[..h], &w[..h]);
        let dot = simd::sum_by(h, |i| dy[i] * w[i] * x[i]);
        let c = r * r * r * dot / h as f32;
        for i in 0..h {
            dx[i] = r * dy[i] * w[i] - x[i] * c;
            dw[i] += dy[i] * x[i] * r;
        }
    }
}

fn backward(x: &[f32], w: &[f32], dy: &[f32], inv: &[f32], h: usize) -> (Vec<f32>, Vec<f32>) {
    let mut dx = vec![0f32; x.len()];
    let chunk = ROWS_PER_TASK * h;
    let partial_dw: Vec<Vec<f32>> = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .zip(dy.par_chunks(chunk))
        .zip(inv.par_chunks(ROWS_PER_TASK))
        .map(|(((dx, x), dy), inv)| {
            let mut dw = vec![0f32; h];
            for (((dx, x), dy), &r) in dx.chunks_mut(h).zip(x.chunks(h)).zip(dy.chunks(h)).zip(inv)
            {
                backward_row(dx, &mut dw, x, dy, w, r);
            }
            dw
        })
        .collect();
    let mut dw = vec![0f32; h];
    for p in partial_dw {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dw)
}

/// RMSNorm of `x [.., h]` with weight `w [h]`, fused (CPU and CUDA).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    host::in_f32(x, |x| {
        x.contiguous()?.apply_op2(
            &w.to_dtype(candle_core::DType::F32)?.contiguous()?,
            RmsNorm {
                eps: eps as f32,
                inv_rms: host::Saved::new(),
                #[cfg(feature = "cuda")]
                inv_rms_gpu: host::Saved::new(),
            },
        )
    })
}
