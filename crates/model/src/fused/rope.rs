//! Rotate-half RoPE on `x [b, t, heads · head_dim]` (or `[b, t, heads, head_dim]`), the
//! layout a projection's output has, so neither q nor k is reshaped, transposed or copied
//! before it.
//!
//! Each pair `(x₁, x₂) = (x[i], x[i + d/2])` turns by the angle `pos · θ_i`. The backward pass
//! is the same rotation by the opposite angle (a rotation's inverse is its transpose).

#[cfg(feature = "cuda")]
use super::cuda;
use super::host;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// cos and sin of every (position, frequency): [t, head_dim / 2], row-major.
#[derive(Clone)]
pub struct RopeTables {
    pub t: usize,
    pub head_dim: usize,
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    /// The same on the GPU the pass runs on, uploaded by the first call that needs them:
    /// one upload per forward pass, shared by every layer's q and k and their backward
    /// passes (clones share it). An upload from pageable memory is a synchronous copy, and
    /// one per call would stall the host between kernel launches.
    #[cfg(feature = "cuda")]
    gpu: Arc<std::sync::Mutex<Option<GpuTables>>>,
}

#[cfg(feature = "cuda")]
type GpuTables = (
    candle_core::CudaDevice,
    cuda::CudaSlice<f32>,
    cuda::CudaSlice<f32>,
);

impl RopeTables {
    /// Tables for positions 0..t with base `base` (10,000 for LLaMA).
    pub fn new(t: usize, head_dim: usize, base: f64) -> RopeTables {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for pos in 0..t {
            for i in 0..half {
                let freq = 1.0 / base.powf(2.0 * i as f64 / head_dim as f64);
                let a = pos as f64 * freq;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        RopeTables {
            t,
            head_dim,
            cos: Arc::new(cos),
            sin: Arc::new(sin),
            #[cfg(feature = "cuda")]
            gpu: Arc::default(),
        }
    }

    /// The tables as [t, head_dim / 2] tensors (for the reference composition).
    pub fn tensors(&self, dev: &candle_core::Device) -> Result<(Tensor, Tensor)> {
        let shape = (self.t, self.head_dim / 2);
        Ok((
            Tensor::from_slice(&self.cos, shape, dev)?,
            Tensor::from_slice(&self.sin, shape, dev)?,
        ))
    }

    /// Rotates every head of `src` by `sign ×` its position's angles into `dst`; both are
    /// [b, t, heads, head_dim] with `heads × head_dim = row`.
    fn rotate(&self, src: &[f32], dst: &mut [f32], row: usize, sign: f32) {
        let (d, half) = (self.head_dim, self.head_dim / 2);
        // One task per (sequence, position): the heads × head_dim values of one token.
        dst.par_chunks_mut(row)
            .zip(src.par_chunks(row))
            .enumerate()
            .for_each(|(r, (dst, src))| {
                let pos = r % self.t;
                let cos = &self.cos[pos * half..(pos + 1) * half];
                let sin = &self.sin[pos * half..(pos + 1) * half];
                for (dst, src) in dst.chunks_mut(d).zip(src.chunks(d)) {
                    let (x1, x2) = src.split_at(half);
                    let (y1, y2) = dst.split_at_mut(half);
                    for i in 0..half {
                        let (c, s) = (cos[i], sign * sin[i]);
                        y1[i] = x1[i] * c - x2[i] * s;
                        y2[i] = x2[i] * c + x1[i] * s;
                    }
                }
            });
    }
}

struct Rope(RopeTables);

impl Rope {
    /// The values per token (heads × head_dim), after checking `dims` is [b, t, ..].
    fn row(&self, dims: &[usize]) -> Result<usize> {
        let d = self.0.head_dim;
        let row: usize = dims.iter().skip(2).product();
        if dims.len() < 3 || dims[1] != self.0.t || !d.is_multiple_of(2) || !row.is_multiple_of(d) {
            bail!(
                "rope: input {dims:?}, expected [b, {}, heads × {d}]",
                self.0.t
            );
        }
        Ok(row)
    }
}

#[cfg(feature = "cuda")]
impl Rope {
    /// `src` rotated by `sign ×` the angles, on the GPU.
    fn on_gpu(
        &self,
        dev: &candle_core::CudaDevice,
        src: &cuda::CudaView<'_, f32>,
        row: usize,
        sign: f32,
    ) -> Result<cuda::CudaSlice<f32>> {
        use candle_core::backend::BackendDevice;
        let t = &self.0;
        let mut gpu = t.gpu.lock().expect("no panic while the tables are held");
        if !matches!(&*gpu, Some((d, _, _)) if d.same_device(dev)) {
            *gpu = Some((
                dev.clone(),
                cuda::upload(dev, &t.cos)?,
                cuda::upload(dev, &t.sin)?,
            ));
        }
        let Some((_, cos, sin)) = gpu.as_ref() else {
            bail!("rope: the tables were not uploaded");
        };
        let dims = (src.len() / row.max(1), t.t, row, t.head_dim);
        cuda::rope(dev, src, cos, sin, dims, sign)
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let row = self.row(l.dims())?;
        let x = host::slice(s, l, "rope")?;
        let mut y = vec![0f32; x.len()];
        self.0.rotate(x, &mut y, row, 1.0);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &cuda::CudaStorage, l: &Layout) -> Result<(cuda::CudaStorage, Shape)> {
        let row = self.row(l.dims())?;
        let dev = cuda::device_of(s);
        let y = self.on_gpu(dev, &cuda::view(s, l, "rope")?, row, 1.0)?;
        Ok((cuda::storage(y, dev), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let row = self.row(x.dims())?;
        #[cfg(feature = "cuda")]
        if dy.device().is_cuda() {
            let dx = cuda::read([dy], "rope", |dev, [dy]| {
                Ok(cuda::tensor(
                    self.on_gpu(dev, &dy, row, -1.0)?,
                    dev,
                    x.dims(),
                ))
            })?;
            return Ok(Some(dx));
        }
        let dx = host::read([dy], "rope", |[dy]| {
            let mut dx = vec![0f32; dy.len()];
            self.0.rotate(dy, &mut dx, row, -1.0);
            dx
        })?;
        Ok(Some(host::tensor(dx, x.dims())?))
    }
}

/// RoPE on `x [b, t, heads · head_dim]` with `tables` for t positions, fused (CPU and CUDA).
pub fn rope(x: &Tensor, tables: &RopeTables) -> Result<Tensor> {
    host::in_f32(x, |x| x.contiguous()?.apply_op1(Rope(tables.clone())))
}
