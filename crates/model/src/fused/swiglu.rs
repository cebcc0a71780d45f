//! SwiGLU's gate, `silu(g) · u`, in one pass, and both input gradients in one more:
//! with `σ = sigmoid(g)`, `du = dy · g·σ` and `dg = dy · u · σ · (1 + g·(1 − σ))`.

#[cfg(feature = "cuda")]
use super::cuda;
use super::exp::exp;
use super::host;
use super::simd::kernel;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per rayon task: big enough to amortise scheduling, small enough to balance.
const CHUNK: usize = 16 * 1024;

struct SwiGlu;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

kernel! {
    fn forward(y: &mut [f32], g: &[f32], u: &[f32]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            *y = g * sigmoid(g) * u;
        }
    }
}

kernel! {
    fn backward(dg: &mut [f32], du: &mut [f32], g: &[f32], u: &[f32], dy: &[f32]) {
        let n = dg.len();
        let (du, g, u, dy) = (&mut du[..n], &g[..n], &u[..n], &dy[..n]);
        for i in 0..n {
            let s = sigmoid(g[i]);
            du[i] = dy[i] * g[i] * s;
            dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
        }
    }
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
            .for_each(|(y, (g, u))| forward(y, g, u));
        Ok((CpuStorage::F32(y), gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        gs: &cuda::CudaStorage,
        gl: &Layout,
        us: &cuda::CudaStorage,
        ul: &Layout,
    ) -> Result<(cuda::CudaStorage, Shape)> {
        if gl.dims() != ul.dims() {
            bail!("swiglu: gate {:?} and up {:?} differ", gl.dims(), ul.dims());
        }
        let (g, u) = (cuda::view(gs, gl, "swiglu")?, cuda::view(us, ul, "swiglu")?);
        let dev = cuda::device_of(gs);
        let y = cuda::swiglu_fwd(dev, &g, &u, gl.shape().elem_count())?;
        Ok((cuda::storage(y, dev), gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if g.device().is_cuda() {
            let n = g.elem_count();
            let both = cuda::read([g, u, dy], "swiglu", |dev, [g, u, dy]| {
                let buf = cuda::swiglu_bwd(dev, [&g, &u, &dy], n)?;
                Ok(cuda::tensor(buf, dev, &[2 * n]))
            })?;
            return Ok((
                Some(both.narrow(0, 0, n)?.reshape(g.dims())?),
                Some(both.narrow(0, n, n)?.reshape(u.dims())?),
            ));
        }
        let (dg, du) = host::read([g, u, dy], "swiglu", |[g, u, dy]| {
            let mut dg = vec![0f32; g.len()];
            let mut du = vec![0f32; g.len()];
            dg.par_chunks_mut(CHUNK)
                .zip(du.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
                .zip(dy.par_chunks(CHUNK))
                .for_each(|(((dg, du), (g, u)), dy)| backward(dg, du, g, u, dy));
            (dg, du)
        })?;
        Ok((
            Some(host::tensor(dg, g.dims())?),
            Some(host::tensor(du, u.dims())?),
        ))
    }
}

/// `silu(gate) · up`, fused (CPU and CUDA).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    host::in_f32(gate, |g| {
        g.contiguous()?
            .apply_op2(&up.to_dtype(candle_core::DType::F32)?.contiguous()?, SwiGlu)
    })
}
