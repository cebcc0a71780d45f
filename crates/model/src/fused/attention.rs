//! Causal self-attention, `softmax(q·kᵀ·scale + mask) · v`, as one op over
//! `q, k, v [b, t, heads · head_dim]` (the projections' layout: no reshapes, no transposes).
//!
//! Flash-attention style: queries go in blocks of [`BLOCK`] rows, each against the keys up to
//! its last row; the [heads × t × t] probabilities are never stored. The forward pass keeps
//! one log-sum-exp per query; the backward pass recomputes each block's probabilities from
//! it (`P = exp(S − lse)`), then, with `Dᵢ = Σ dOᵢ·Oᵢ`:
//! `dV += Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − D)`, `dQ = scale · dS·K`, `dK += scale · dSᵀ·Q`.
//!
//! One rayon task per (sequence, head); the tiles' products go through `gemm` single-threaded
//! within a task, so each output element is computed in a fixed order, whatever the threads.

#[cfg(feature = "cuda")]
use super::cuda;
use super::exp::exp;
use super::gemm::{mm, Threads::One};
use super::host::{self, SharedMut};
use super::simd::{self, kernel};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Query rows per block: the score tile is BLOCK × t floats (128 KiB at t = 256). 128 rows
/// measured faster than 64 (more work per product: the products of a tile are small) and
/// than 256 (whole rows of the causal upper triangle computed and thrown away).
const BLOCK: usize = 128;

struct Attention {
    heads: usize,
    scale: f32,
    /// log Σ exp of each query's scaled scores, [b, heads, t], from the forward pass.
    lse: host::Saved<Vec<f32>>,
    /// The same, when the forward pass ran on a GPU.
    #[cfg(feature = "cuda")]
    lse_gpu: host::Saved<cuda::CudaSlice<f32>>,
}

/// Sizes of one call, read off `q`'s [b, t, heads · head_dim].
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    d: usize,
}

impl Dims {
    fn of(dims: &[usize], h: usize) -> Result<Dims> {
        match *dims {
            [b, t, hidden] if h > 0 && hidden % h == 0 => Ok(Dims {
                b,
                t,
                h,
                d: hidden / h,
            }),
            _ => bail!("attention: expected [b, t, {h} heads × head_dim], got {dims:?}"),
        }
    }
    #[cfg(feature = "cuda")]
    fn gpu(&self) -> cuda::AttnDims {
        cuda::AttnDims {
            b: self.b,
            t: self.t,
            h: self.h,
            d: self.d,
        }
    }
    /// Distance between consecutive positions of one head.
    fn row(&self) -> usize {
        self.h * self.d
    }
    /// Offset of (sequence, head)'s first element.
    fn base(&self, task: usize) -> usize {
        let (bi, hi) = (task / self.h, task % self.h);
        bi * self.t * self.row() + hi * self.d
    }
}

/// Scores of queries `q0..q1` against keys `0..q1`, scaled, into `s` ([q1−q0] × q1).
fn scores(q: &[f32], k: &[f32], base: usize, dm: Dims, (q0, q1): (usize, usize), s: &mut [f32]) {
    let row = dm.row();
    // SAFETY: q and k cover rows 0..t of this head; s is this task's own buffer.
    unsafe {
        mm(
            (q1 - q0, q1, dm.d),
            (s.as_mut_ptr(), 1, q1),
            (q.as_ptr().add(base + q0 * row), 1, row),
            // kᵀ: element (i, j) is k[j, i].
            (k.as_ptr().add(base), row, 1),
            1.0,
            false,
            One,
        )
    }
}

kernel! {
    /// Scaled scores `s` of one query turned into its probabilities in place; returns their
    /// log-sum-exp.
    fn softmax(s: &mut [f32], scale: f32) -> f32 {
        let max = simd::max(s) * scale;
        for x in s.iter_mut() {
            *x = exp(*x * scale - max);
        }
        let sum = simd::sum_map(s, |x| x);
        for x in s.iter_mut() {
            *x /= sum;
        }
        max + sum.ln()
    }
}

kernel! {
    /// One query's probabilities recomputed in place from its scores and log-sum-exp.
    fn probabilities(s: &mut [f32], scale: f32, lse: f32) {
        for x in s.iter_mut() {
            *x = exp(*x * scale - lse);
        }
    }
}

kernel! {
    /// One query's score gradient in place: `dS = P ∘ (dP − D)`.
    fn score_grad(ds: &mut [f32], p: &[f32], d: f32) {
        for (ds, &p) in ds.iter_mut().zip(p) {
            *ds = p * (*ds - d);
        }
    }
}

kernel! {
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        simd::sum_map2(a, b, |x, y| x * y)
    }
}

impl Attention {
    /// The sizes of a call, after checking q, k and v agree.
    fn dims(&self, [ql, kl, vl]: [&Layout; 3]) -> Result<Dims> {
        if ql.dims() != kl.dims() || ql.dims() != vl.dims() {
            bail!(
                "attention: q {:?}, k {:?} and v {:?} differ",
                ql.dims(),
                kl.dims(),
                vl.dims()
            );
        }
        Dims::of(ql.dims(), self.heads)
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dm = self.dims([ql, kl, vl])?;
        let q = host::slice(qs, ql, "attention")?;
        let k = host::slice(ks, kl, "attention")?;
        let v = host::slice(vs, vl, "attention")?;
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; dm.b * dm.h * dm.t];
        let out_ptr = SharedMut(out.as_mut_ptr());
        let row = dm.row();
        lse.par_chunks_mut(dm.t.max(1))
            .enumerate()
            .for_each(|(task, lse)| {
                let base = dm.base(task);
                let mut p = vec![0f32; BLOCK * dm.t];
                for q0 in (0..dm.t).step_by(BLOCK) {
                    let q1 = (q0 + BLOCK).min(dm.t);
                    let p = &mut p[..(q1 - q0) * q1];
                    scores(q, k, base, dm, (q0, q1), p);
                    for (r, p) in p.chunks_mut(q1).enumerate() {
                        let i = q0 + r;
                        let (live, masked) = p.split_at_mut(i + 1);
                        lse[i] = softmax(live, self.scale);
                        masked.fill(0.0);
                    }
                    let out = out_ptr;
                    // SAFETY: this task alone writes this head's rows q0..q1 of `out`.
                    unsafe {
                        mm(
                            (q1 - q0, dm.d, q1),
                            (out.0.add(base + q0 * row), 1, row),
                            (p.as_ptr(), 1, q1),
                            (v.as_ptr().add(base), 1, row),
                            1.0,
                            false,
                            One,
                        )
                    }
                }
            });
        self.lse.keep(lse, "attention")?;
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        qs: &cuda::CudaStorage,
        ql: &Layout,
        ks: &cuda::CudaStorage,
        kl: &Layout,
        vs: &cuda::CudaStorage,
        vl: &Layout,
    ) -> Result<(cuda::CudaStorage, Shape)> {
        let dm = self.dims([ql, kl, vl])?;
        let view = |s, l| cuda::view(s, l, "attention");
        let (q, k, v) = (view(qs, ql)?, view(ks, kl)?, view(vs, vl)?);
        let dev = cuda::device_of(qs);
        let (o, lse) = cuda::attention_fwd(dev, [&q, &k, &v], dm.gpu(), self.scale)?;
        self.lse_gpu.keep(lse, "attention")?;
        Ok((cuda::storage(o, dev), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dm = Dims::of(q.dims(), self.heads)?;
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() {
            let lse = self.lse_gpu.get("attention")?;
            let n = q.elem_count();
            let all = cuda::read(
                [q, k, v, out, dout],
                "attention",
                |dev, [q, k, v, o, d_o]| {
                    let buf = cuda::attention_bwd(
                        dev,
                        [&q, &k, &v, &o, &d_o],
                        lse,
                        dm.gpu(),
                        self.scale,
                    )?;
                    Ok(cuda::tensor(buf, dev, &[3 * n]))
                },
            )?;
            let part = |i: usize| all.narrow(0, i * n, n)?.reshape(q.dims());
            return Ok((Some(part(0)?), Some(part(1)?), Some(part(2)?)));
        }
        let lse = self.lse.get("attention")?;
        let (dq, dk, dv) = host::read([q, k, v, out, dout], "attention", |qkvod| {
            self.backward(dm, lse, qkvod)
        })?;
        let shape = q.dims();
        Ok((
            Some(host::tensor(dq, shape)?),
            Some(host::tensor(dk, shape)?),
            Some(host::tensor(dv, shape)?),
        ))
    }
}

impl Attention {
    fn backward(
        &self,
        dm: Dims,
        lse: &[f32],
        [q, k, v, o, d_o]: [&[f32]; 5],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let n = q.len();
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let (dq_ptr, dk_ptr, dv_ptr) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        let row = dm.row();
        let scale = self.scale;
        (0..dm.b * dm.h).into_par_iter().for_each(|task| {
            let base = dm.base(task);
            let lse = &lse[task * dm.t..(task + 1) * dm.t];
            // Dᵢ = dOᵢ · Oᵢ for every query of this head.
            let dsum: Vec<f32> = (0..dm.t)
                .map(|i| {
                    let at = base + i * row;
                    dot(&d_o[at..at + dm.d], &o[at..at + dm.d])
                })
                .collect();
            let mut p = vec![0f32; BLOCK * dm.t];
            let mut ds = vec![0f32; BLOCK * dm.t];
            let (dq, dk, dv) = (dq_ptr, dk_ptr, dv_ptr);
            for q0 in (0..dm.t).step_by(BLOCK) {
                let q1 = (q0 + BLOCK).min(dm.t);
                let (p, ds) = (&mut p[..(q1 - q0) * q1], &mut ds[..(q1 - q0) * q1]);
                scores(q, k, base, dm, (q0, q1), p);
                for (r, p) in p.chunks_mut(q1).enumerate() {
                    let i = q0 + r;
                    let (live, masked) = p.split_at_mut(i + 1);
                    probabilities(live, scale, lse[i]);
                    masked.fill(0.0);
                }
                // SAFETY (all four products): this task alone writes this head's elements
                // of dq, dk and dv; p and ds are its own buffers.
                unsafe {
                    // dV[0..q1] += Pᵀ · dO[q0..q1]
                    mm(
                        (q1, dm.d, q1 - q0),
                        (dv.0.add(base), 1, row),
                        (p.as_ptr(), q1, 1),
                        (d_o.as_ptr().add(base + q0 * row), 1, row),
                        1.0,
                        true,
                        One,
                    );
                    // dP = dO[q0..q1] · V[0..q1]ᵀ
                    mm(
                        (q1 - q0, q1, dm.d),
                        (ds.as_mut_ptr(), 1, q1),
                        (d_o.as_ptr().add(base + q0 * row), 1, row),
                        (v.as_ptr().add(base), row, 1),
                        1.0,
                        false,
                        One,
                    );
                }
                for (r, (ds, p)) in ds.chunks_mut(q1).zip(p.chunks(q1)).enumerate() {
                    score_grad(ds, p, dsum[q0 + r]);
                }
                unsafe {
                    // dQ[q0..q1] = scale · dS · K[0..q1]
                    mm(
                        (q1 - q0, dm.d, q1),
                        (dq.0.add(base + q0 * row), 1, row),
                        (ds.as_ptr(), 1, q1),
                        (k.as_ptr().add(base), 1, row),
                        scale,
                        false,
                        One,
                    );
                    // dK[0..q1] += scale · dSᵀ · Q[q0..q1]
                    mm(
                        (q1, dm.d, q1 - q0),
                        (dk.0.add(base), 1, row),
                        (ds.as_ptr(), q1, 1),
                        (q.as_ptr().add(base + q0 * row), 1, row),
                        scale,
                        true,
                        One,
                    );
                }
            }
        });
        (dq, dk, dv)
    }
}

/// Causal attention of `heads` heads over `q, k, v [b, t, heads · head_dim]` with scores
/// scaled by `scale`; returns [b, t, heads · head_dim]. Fused (CPU and CUDA).
pub fn causal_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    let f32_of = |x: &Tensor| x.to_dtype(candle_core::DType::F32)?.contiguous();
    host::in_f32(q, |q| {
        q.contiguous()?.apply_op3(
            &f32_of(k)?,
            &f32_of(v)?,
            Attention {
                heads,
                scale: scale as f32,
                lse: host::Saved::new(),
                #[cfg(feature = "cuda")]
                lse_gpu: host::Saved::new(),
            },
        )
    })
}
