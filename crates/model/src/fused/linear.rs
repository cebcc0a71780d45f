//! A trainable projection, `y = x·Wᵀ` over `x [.., in]` with `W [out, in]`, as one op whose
//! backward pass writes `dW = dyᵀ·x` directly in W's layout.
//!
//! Composed, the same product is a reshape, a transpose and a matmul, and candle's autograd
//! gives each a zero-filled gradient buffer and a sum: for the LM head that is two extra
//! passes over a [vocab × hidden] and a [tokens × vocab] tensor per step.

use super::gemm::{mm, Threads::All};
use super::host;
use super::lora::out_shape;
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (out, in_dim) = wl.shape().dims2()?;
        if xl.dims().last() != Some(&in_dim) {
            bail!("linear: x {:?} against W {:?}", xl.dims(), wl.dims());
        }
        let m = xl.shape().elem_count() / in_dim.max(1);
        let (x, w) = (
            host::slice(xs, xl, "linear")?,
            host::slice(ws, wl, "linear")?,
        );
        let y = forward(x, w, (m, in_dim, out));
        Ok((CpuStorage::F32(y), out_shape(xl.dims(), out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (out, in_dim) = w.dims2()?;
        let m = x.elem_count() / in_dim.max(1);
        let (dx, dw) = host::read([x, w, dy], "linear", |[x, w, dy]| {
            backward(x, w, dy, (m, in_dim, out))
        })?;
        Ok((
            Some(host::tensor(dx, x.dims())?),
            Some(host::tensor(dw, w.dims())?),
        ))
    }
}

/// `y = x·Wᵀ` for x [m × in] and W [out × in], row-major.
pub(super) fn forward(x: &[f32], w: &[f32], (m, in_dim, out): (usize, usize, usize)) -> Vec<f32> {
    let mut y = vec![0f32; m * out];
    // SAFETY: the buffers have the extents given; y is fresh.
    unsafe {
        mm(
            (m, out, in_dim),
            (y.as_mut_ptr(), 1, out),
            (x.as_ptr(), 1, in_dim),
            (w.as_ptr(), in_dim, 1),
            1.0,
            false,
            All,
        )
    };
    y
}

/// `(dx, dW) = (dy·W, dyᵀ·x)`: the backward pass of [`forward`].
pub(super) fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize),
) -> (Vec<f32>, Vec<f32>) {
    (input_grad(dy, w, dims), weight_grad(x, dy, dims))
}

/// `dx = dy·W`, [m × in].
pub(super) fn input_grad(
    dy: &[f32],
    w: &[f32],
    (m, in_dim, out): (usize, usize, usize),
) -> Vec<f32> {
    let mut dx = vec![0f32; m * in_dim];
    // SAFETY: the buffers have the extents given; dx is fresh.
    unsafe {
        mm(
            (m, in_dim, out),
            (dx.as_mut_ptr(), 1, in_dim),
            (dy.as_ptr(), 1, out),
            (w.as_ptr(), 1, in_dim),
            1.0,
            false,
            All,
        )
    };
    dx
}

/// `dW = dyᵀ·x`, [out × in].
fn weight_grad(x: &[f32], dy: &[f32], (m, in_dim, out): (usize, usize, usize)) -> Vec<f32> {
    let mut dw = vec![0f32; out * in_dim];
    // SAFETY: the buffers have the extents given; dw is fresh.
    unsafe {
        mm(
            (out, in_dim, m),
            (dw.as_mut_ptr(), 1, in_dim),
            (dy.as_ptr(), out, 1),
            (x.as_ptr(), 1, in_dim),
            1.0,
            false,
            All,
        )
    };
    dw
}

/// `x [.., in] · Wᵀ` → [.., out] with W [out, in] trainable, fused (CPU).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let w32 = w.to_dtype(DType::F32)?.contiguous()?;
    host::in_f32(x, |x| x.contiguous()?.apply_op2(&w32, Linear))
}
