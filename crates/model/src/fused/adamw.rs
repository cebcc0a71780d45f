//! AdamW as one in-place pass per parameter tensor: the moments and the parameter are
//! updated where they lie, reading the gradient once, with no temporary tensor.

use super::host;
use super::simd::kernel;
use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

/// One step's constants, shared by every tensor.
#[derive(Debug, Clone, Copy)]
pub struct AdamStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    /// 1 − β₁ and 1 − β₂, computed in f64 (1 − 0.999 in f32 is off by 1.3e-5 relative).
    pub one_minus_beta1: f32,
    pub one_minus_beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1 − β₁ᵗ and 1 − β₂ᵗ.
    pub bias1: f32,
    pub bias2: f32,
    /// Multiplies the gradient as it is read (averaging over micro-batches and ranks, and
    /// clipping, folded into this pass).
    pub grad_scale: f32,
}

/// Updates `p`, `m` and `v` in place from gradient `g`: f32 tensors of one shape on one
/// device (the CPU or a GPU), none
/// sharing storage with another.
pub fn step(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, c: AdamStep) -> Result<()> {
    if p.dims() != g.dims() || m.dims() != p.dims() || v.dims() != p.dims() {
        bail!(
            "adamw: parameter {:?}, gradient {:?}, moments {:?} and {:?}",
            p.dims(),
            g.dims(),
            m.dims(),
            v.dims()
        );
    }
    if host::same_storage(m, v) || host::same_storage(p, m) || host::same_storage(p, v) {
        bail!("adamw: a parameter and its moments must not share storage");
    }
    #[cfg(feature = "cuda")]
    if p.device().is_cuda() {
        return super::cuda::read([g], "adamw", |_, [g]| {
            use super::cuda::modify;
            modify(m, "adamw", |_, mut m| {
                modify(v, "adamw", |_, mut v| {
                    modify(p, "adamw", |dev, mut p| {
                        super::cuda::adamw(dev, (&mut p, &mut m, &mut v), &g, &c)
                    })
                })
            })
        });
    }
    host::read([g], "adamw", |[g]| {
        host::modify(m, "adamw", |m| {
            host::modify(v, "adamw", |v| {
                host::modify(p, "adamw", |p| update(p, m, v, g, c))
            })
        })
    })????;
    Ok(())
}

fn update(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: AdamStep) {
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((p, m), v), g)| update_chunk(p, m, v, g, c));
}

kernel! {
    fn update_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], c: AdamStep) {
        let n = p.len();
        let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
        for i in 0..n {
            let g = g[i] * c.grad_scale;
            m[i] = m[i] * c.beta1 + g * c.one_minus_beta1;
            v[i] = v[i] * c.beta2 + g * g * c.one_minus_beta2;
            let denom = (v[i] / c.bias2).sqrt() + c.eps;
            let mut u = (m[i] / c.bias1) / denom;
            if c.weight_decay != 0.0 {
                u += p[i] * c.weight_decay;
            }
            p[i] -= u * c.lr;
        }
    }
}
