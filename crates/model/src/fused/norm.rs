//! RMSNorm, `y = x · w / sqrt(mean(x²) + eps)` over the last dimension.
//!
//! The forward pass keeps one number per row, the inverse RMS `r`; the backward pass needs
//! nothing else: with `g = dy · w`,
//! `dx = r·g − x · r³ · mean(g·x)` and `dw = Σ_rows dy · x · r`.

use super::host;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Rows per task of the weight-gradient sum: fixed, so the sum's order (and its bits) does
/// not depend on the thread count.
const ROWS_PER_TASK: usize = 64;

struct RmsNorm {
    eps: f32,
    /// 1 / RMS of each row, from the forward pass.
    inv_rms: host::Saved<Vec<f32>>,
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
        let h = w.len();
        if xl.dims().last() != Some(&h) {
            bail!("rms_norm: input {:?} against a weight of {h}", xl.dims());
        }
        let mut y = vec![0f32; x.len()];
        let mut inv = vec![0f32; x.len() / h];
        y.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .zip(inv.par_iter_mut())
            .for_each(|((y, x), inv)| {
                let ms = x.iter().map(|v| v * v).sum::<f32>() / h as f32;
                let r = 1.0 / (ms + self.eps).sqrt();
                *inv = r;
                for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                    *y = x * r * w;
                }
            });
        self.inv_rms.keep(inv, "rms_norm")?;
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
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
                let mut dot = 0f32;
                for ((dy, x), w) in dy.iter().zip(x).zip(w) {
                    dot += dy * w * x;
                }
                let c = r * r * r * dot / h as f32;
                for ((((dx, x), dy), w), dw) in dx.iter_mut().zip(x).zip(dy).zip(w).zip(&mut dw) {
                    *dx = r * dy * w - x * c;
                    *dw += dy * x * r;
                }
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

/// RMSNorm of `x [.., h]` with weight `w [h]`, fused (CPU).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    host::in_f32(x, |x| {
        x.contiguous()?.apply_op2(
            &w.to_dtype(candle_core::DType::F32)?.contiguous()?,
            RmsNorm {
                eps: eps as f32,
                inv_rms: host::Saved::new(),
            },
        )
    })
}
