//! A frozen projection with its LoRA branch as one op:
//! `y = x·Wᵀ + s · ((x ∘ mask)·Aᵀ)·Bᵀ`, W frozen.
//!
//! Composed, the branch is two matmuls, a scale, an addition and (with dropout) a mask, and
//! candle's autograd adds a zero-filled buffer and a sum for every one of them in the
//! backward pass. Here the branch's product is accumulated straight into the output, and the
//! only thing kept for the backward pass is `u = (x ∘ mask)·Aᵀ`, [tokens × rank]. The
//! backward pass, with `v = dy·B`:
//! `dx = dy·W + s · (v·A) ∘ mask`, `dA = s · vᵀ·(x ∘ mask)`, `dB = s · dyᵀ·u`, and no dW:
//! the saving ReLoRA is built on (see also [`crate::frozen`]).

use super::gemm::{mm, Threads::All};
use super::host;
use super::{compact, linear};
use crate::quant::QuantWeight;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// The frozen weight, [out, in]: f32, or compact and dequantised inside the matmuls.
enum Frozen {
    /// Contiguous f32.
    Dense(Tensor),
    Compact(Arc<QuantWeight>),
}

impl Frozen {
    fn dims(&self) -> Vec<usize> {
        match self {
            Frozen::Dense(w) => w.dims().to_vec(),
            Frozen::Compact(q) => vec![q.rows, q.cols],
        }
    }

    /// `x·Wᵀ`, [m × out].
    fn forward(&self, x: &[f32], dims: (usize, usize, usize)) -> Result<Vec<f32>> {
        match self {
            Frozen::Dense(w) => host::read([w], "lora_linear", |[w]| linear::forward(x, w, dims)),
            Frozen::Compact(q) => Ok(compact::forward(x, q, dims.0)),
        }
    }

    /// `dy·W`, [m × in].
    fn input_grad(&self, dy: &[f32], dims: (usize, usize, usize)) -> Result<Vec<f32>> {
        match self {
            Frozen::Dense(w) => {
                host::read([w], "lora_linear", |[w]| linear::input_grad(dy, w, dims))
            }
            Frozen::Compact(q) => Ok(compact::input_grad(dy, q, dims.0)),
        }
    }
}

struct LoraLinear {
    w: Frozen,
    scale: f32,
    /// The inverted-dropout mask over x, [tokens × in], when dropout is on.
    mask: Option<Vec<f32>>,
    /// `(x ∘ mask)·Aᵀ`, [tokens × rank], from the forward pass.
    u: host::Saved<Vec<f32>>,
}

/// `dims` with its last entry replaced by `out`.
pub(super) fn out_shape(dims: &[usize], out: usize) -> Shape {
    let mut d = dims.to_vec();
    if let Some(last) = d.last_mut() {
        *last = out;
    }
    Shape::from(d)
}

fn masked(x: &[f32], mask: &Option<Vec<f32>>) -> Option<Vec<f32>> {
    mask.as_ref()
        .map(|mask| x.iter().zip(mask).map(|(x, m)| x * m).collect())
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "fused-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let in_dim = *xl.dims().last().unwrap_or(&0);
        let m = xl.shape().elem_count() / in_dim.max(1);
        let (rank, in_a) = al.shape().dims2()?;
        let (out, rank_b) = bl.shape().dims2()?;
        if in_a != in_dim || rank_b != rank || self.w.dims() != [out, in_dim] {
            bail!(
                "lora_linear: x {:?}, A {:?}, B {:?}, W {:?}",
                xl.dims(),
                al.dims(),
                bl.dims(),
                self.w.dims()
            );
        }
        if self.mask.as_ref().is_some_and(|k| k.len() != m * in_dim) {
            bail!("lora_linear: dropout mask does not cover x {:?}", xl.dims());
        }
        let x = host::slice(xs, xl, "lora_linear")?;
        let (a, b) = (
            host::slice(a_s, al, "lora_linear")?,
            host::slice(bs, bl, "lora_linear")?,
        );
        let mut u = vec![0f32; m * rank];
        let xd = masked(x, &self.mask);
        let xd = xd.as_deref().unwrap_or(x);
        let mut y = self.w.forward(x, (m, in_dim, out))?;
        // SAFETY: every buffer has the extents given; u is fresh and y this op's own.
        unsafe {
            // u = xd·Aᵀ
            mm(
                (m, rank, in_dim),
                (u.as_mut_ptr(), 1, rank),
                (xd.as_ptr(), 1, in_dim),
                (a.as_ptr(), in_dim, 1),
                1.0,
                false,
                All,
            );
            // y += s · u·Bᵀ
            mm(
                (m, out, rank),
                (y.as_mut_ptr(), 1, out),
                (u.as_ptr(), 1, rank),
                (b.as_ptr(), rank, 1),
                self.scale,
                true,
                All,
            );
        }
        self.u.keep(u, "lora_linear")?;
        Ok((CpuStorage::F32(y), out_shape(xl.dims(), out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let u = self.u.get("lora_linear")?;
        let in_dim = x.dim(candle_core::D::Minus1)?;
        let m = x.elem_count() / in_dim.max(1);
        let (rank, out) = (a.dim(0)?, b.dim(0)?);
        let dims = (m, in_dim, out);
        let (dx, da, db) = host::read([x, a, b, dy], "lora_linear", |[x, a, b, dy]| {
            let dx = self.w.input_grad(dy, dims)?;
            Ok::<_, candle_core::Error>(self.backward([x, a, b, dy], dx, u, (m, in_dim, out, rank)))
        })??;
        Ok((
            Some(host::tensor(dx, x.dims())?),
            Some(host::tensor(da, &[rank, in_dim])?),
            Some(host::tensor(db, &[out, rank])?),
        ))
    }
}

impl LoraLinear {
    /// (dx, dA, dB) from x, A, B and dy (row-major slices), the frozen path's `dx = dy·W`
    /// and the saved u.
    fn backward(
        &self,
        [x, a, b, dy]: [&[f32]; 4],
        mut dx: Vec<f32>,
        u: &[f32],
        (m, in_dim, out, rank): (usize, usize, usize, usize),
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let s = self.scale;
        let mut v = vec![0f32; m * rank];
        let mut da = vec![0f32; rank * in_dim];
        let mut db = vec![0f32; out * rank];
        let xd = masked(x, &self.mask);
        let xd = xd.as_deref().unwrap_or(x);
        // SAFETY: every buffer has the extents given; outputs are fresh.
        unsafe {
            // v = dy·B
            mm(
                (m, rank, out),
                (v.as_mut_ptr(), 1, rank),
                (dy.as_ptr(), 1, out),
                (b.as_ptr(), 1, rank),
                1.0,
                false,
                All,
            );
            match &self.mask {
                // dx += s · v·A
                None => mm(
                    (m, in_dim, rank),
                    (dx.as_mut_ptr(), 1, in_dim),
                    (v.as_ptr(), 1, rank),
                    (a.as_ptr(), 1, in_dim),
                    s,
                    true,
                    All,
                ),
                // dx += (s · v·A) ∘ mask
                Some(mask) => {
                    let mut t = vec![0f32; m * in_dim];
                    mm(
                        (m, in_dim, rank),
                        (t.as_mut_ptr(), 1, in_dim),
                        (v.as_ptr(), 1, rank),
                        (a.as_ptr(), 1, in_dim),
                        s,
                        false,
                        All,
                    );
                    for ((dx, t), k) in dx.iter_mut().zip(&t).zip(mask) {
                        *dx += t * k;
                    }
                }
            }
            // dA = s · vᵀ·xd
            mm(
                (rank, in_dim, m),
                (da.as_mut_ptr(), 1, in_dim),
                (v.as_ptr(), rank, 1),
                (xd.as_ptr(), 1, in_dim),
                s,
                false,
                All,
            );
            // dB = s · dyᵀ·u
            mm(
                (out, rank, m),
                (db.as_mut_ptr(), 1, rank),
                (dy.as_ptr(), out, 1),
                (u.as_ptr(), 1, rank),
                s,
                false,
                All,
            );
        }
        (dx, da, db)
    }
}

/// `x [.., in] · Wᵀ + scale · ((x ∘ mask) · Aᵀ) · Bᵀ` → [.., out], with W frozen (no
/// gradient), fused (CPU). `mask` is the inverted-dropout mask over x, row-major, if any.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
) -> Result<Tensor> {
    let w = Frozen::Dense(w.detach().to_dtype(DType::F32)?.contiguous()?);
    apply(x, w, a, b, scale, mask)
}

/// [`lora_linear`] with the frozen W in a compact format ([`crate::quant`]), dequantised a
/// block of rows at a time inside the matmuls.
pub fn lora_linear_quantized(
    x: &Tensor,
    w: Arc<QuantWeight>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
) -> Result<Tensor> {
    apply(x, Frozen::Compact(w), a, b, scale, mask)
}

fn apply(
    x: &Tensor,
    w: Frozen,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<Vec<f32>>,
) -> Result<Tensor> {
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    let op = LoraLinear {
        w,
        scale: scale as f32,
        mask,
        u: host::Saved::new(),
    };
    host::in_f32(x, |x| {
        x.contiguous()?.apply_op3(&f32_of(a)?, &f32_of(b)?, op)
    })
}
