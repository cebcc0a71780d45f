//! SwiGLU's gate, `silu(g) · u`, in one pass, and both input gradients in one more:
//! with `σ = sigmoid(g)`, `du = dy · g·σ` and `dg = dy · u · σ · (1 + g·(1 − σ))`.

use super::host;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 16 * 1024;

struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        gl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if gl.dims() != ul.dims() {
            bail!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims());
        }
        let (g, u) = (
            host::slice(gs, gl, "swiglu")?,
            host::slice(us, ul, "swiglu")?,
        );
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(y, (g, u))| {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    *y = g * sigmoid(g) * u;
                }
            });
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = host::read([g, u, dy], "swiglu", |[g, u, dy]| {
            let mut dg = vec![0f32; g.len()];
            let mut du = vec![0f32; g.len()];
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .zip(dy.par_chunks(CHUNK))
                .for_each(|(((dg, du), (g, u)), dy)| {
                    for i in 0..g.len() {
                        let s = sigmoid(g[i]);
                        du[i] = dy[i] * g[i] * s;
                        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                    }
                });
            (dg, du)
        })?;
        Ok((
            Some(host::tensor(dg, g.dims())?),
            Some(host::tensor(du, u.dims())?),
        ))
    }
}

/// `silu(gate) · up`, fused (CPU).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    host::in_f32(gate, |g| {
        g.contiguous()?
            .apply_op2(&up.to_dtype(candle_core::DType::F32)?.contiguous()?, SwiGlu)
    })
}
