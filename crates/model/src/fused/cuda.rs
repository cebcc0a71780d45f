//! The fused ops on CUDA (feature `cuda`): launching the kernels of `kernels.cu`, which
//! crates/model/build.rs compiles to PTX and candle loads once per device.
//!
//! Kernels exist for the ops whose cost on a GPU is memory traffic and launches rather than
//! arithmetic: RMSNorm, RoPE, SwiGLU, causal attention, the cross-entropy over the vocabulary
//! and AdamW. The projections and the LM head stay cuBLAS matmuls through candle (a fused
//! CPU op saves passes over memory that a GPU's matmul does not make), so on CUDA the loss
//! takes logits from the head's matmul and the ReLoRA layer is candle's composition.
//!
//! The launch shapes below are the ones `emulate/check_kernels.cpp` runs the kernels with.

use crate::quant::{FrozenFormat, QuantWeight};
use candle_core::backend::BackendStorage;
pub use candle_core::cuda::cudarc::driver::CudaSlice;
pub use candle_core::cuda::cudarc::driver::CudaView;
use candle_core::cuda::cudarc::driver::{CudaViewMut, LaunchConfig, PushKernelArg};
use candle_core::cuda::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
pub use candle_core::CudaStorage;
use candle_core::{
    bail, CpuStorage, CudaDevice, DType, InplaceOp1, Layout, Result, Storage, Tensor,
};
use std::cell::RefCell;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused_kernels.ptx"));
const MODULE: &str = "relora_fused";

/// Rows per block for the kernels that give each row one warp.
const ROWS_PER_BLOCK: usize = 4;
/// Threads per block of the element-wise and per-column kernels.
const BLOCK: usize = 256;
/// Rows per chunk of a column sum (RMSNorm's dw): chunks in parallel, then summed in order.
const ROWS_PER_CHUNK: usize = 64;
/// The largest head_dim the attention kernels hold in registers (`MAX_PER_LANE` × 32).
pub const MAX_HEAD_DIM: usize = 128;

fn rows_config(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ROWS_PER_BLOCK).max(1) as u32, 1, 1),
        block_dim: ((ROWS_PER_BLOCK * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Grid-stride kernels: enough blocks to fill a large GPU, no more.
fn elems_config(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(BLOCK).clamp(1, 16 * 1024) as u32, 1, 1),
        block_dim: (BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

fn columns_config(columns: usize, chunks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (columns.div_ceil(BLOCK).max(1) as u32, chunks as u32, 1),
        block_dim: (BLOCK as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Launches kernel `$name` of kernels.cu on `$dev` with the arguments in order (scalars as
/// references to locals: the launch reads them after the macro's statements).
macro_rules! launch {
    ($dev:expr, $name:literal, $cfg:expr, $($arg:expr),+ $(,)?) => {{
        let func = $dev.get_or_load_custom_func($name, MODULE, PTX)?;
        let mut b = func.builder();
        $(b.arg($arg);)+
        // SAFETY: the arguments match the kernel's signature in kernels.cu, in order and
        // type, and every buffer holds the elements the kernel indexes (sizes from the
        // same shapes the caller checked).
        unsafe { b.launch($cfg) }.w()?;
    }};
}

/// A buffer for `n` floats every element of which a kernel writes.
fn alloc(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: the kernel that receives it writes all n elements before anything reads them.
    unsafe { dev.alloc::<f32>(n.max(1)) }
}

/// The elements of a contiguous f32 CUDA storage.
pub fn view<'a>(s: &'a CudaStorage, l: &Layout, op: &str) -> Result<CudaView<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: input is not contiguous");
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

/// The device a storage lives on.
pub fn device_of(s: &CudaStorage) -> &CudaDevice {
    s.device()
}

/// A storage holding a buffer a kernel filled.
pub fn storage(buf: CudaSlice<f32>, dev: &CudaDevice) -> CudaStorage {
    CudaStorage::wrap_cuda_slice(buf, dev.clone())
}

/// A tensor of `shape` from a buffer a kernel filled (for backward passes, which return
/// tensors, not storages).
pub fn tensor(buf: CudaSlice<f32>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(storage(buf, dev)),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// Runs `f` on a contiguous CUDA tensor's elements, as `T`.
pub fn with_view<T: CudaDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&CudaDevice, CudaView<'_, T>) -> Result<R>,
) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*s else {
        bail!("{op}: the CUDA kernel got a tensor on another device");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: input is not contiguous");
    };
    f(cs.device(), cs.as_cuda_slice::<T>()?.slice(a..b))
}

/// Runs `f` on the tensors' elements as f32 device views, in the order given (converted to
/// contiguous f32 first where they are not): the CUDA counterpart of `host::read`.
pub fn read<R, const N: usize>(
    ts: [&Tensor; N],
    op: &str,
    f: impl FnOnce(&CudaDevice, [CudaView<'_, f32>; N]) -> Result<R>,
) -> Result<R> {
    let owned = ts
        .iter()
        .map(|t| t.to_dtype(candle_core::DType::F32)?.contiguous())
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut views = Vec::with_capacity(N);
    let mut dev = None;
    for (s, l) in &guards {
        let Storage::Cuda(cs) = &**s else {
            bail!("{op}: the CUDA kernel got a tensor on another device");
        };
        dev.get_or_insert_with(|| cs.device().clone());
        views.push(view(cs, l, op)?);
    }
    let Some(dev) = dev else {
        bail!("{op}: no tensors");
    };
    let views: [CudaView<'_, f32>; N] = match views.try_into() {
        Ok(v) => v,
        Err(_) => bail!("{op}: one view per tensor"),
    };
    f(&dev, views)
}

/// Runs `f` on a contiguous f32 CUDA tensor's elements, mutably, in place (nested calls
/// give several at once; they must not share storage).
pub fn modify<R>(
    t: &Tensor,
    op: &'static str,
    f: impl FnOnce(&CudaDevice, CudaViewMut<'_, f32>) -> Result<R>,
) -> Result<R> {
    struct Modify<F, R> {
        op: &'static str,
        f: RefCell<Option<F>>,
        out: RefCell<Option<Result<R>>>,
    }
    impl<F: FnOnce(&CudaDevice, CudaViewMut<'_, f32>) -> Result<R>, R> InplaceOp1 for Modify<F, R> {
        fn name(&self) -> &'static str {
            self.op
        }
        fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> Result<()> {
            bail!("{}: the CUDA kernel got a CPU tensor", self.op)
        }
        fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
            let Some((a, b)) = l.contiguous_offsets() else {
                bail!("{}: tensor is not contiguous", self.op);
            };
            let dev = s.device().clone();
            let f = self.f.borrow_mut().take().expect("called once");
            let slice = s.as_cuda_slice_mut::<f32>()?;
            *self.out.borrow_mut() = Some(f(&dev, slice.slice_mut(a..b)));
            Ok(())
        }
    }
    let m = Modify {
        op,
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
    };
    t.inplace_op1(&m)?;
    m.out.into_inner().expect("cuda_fwd ran")
}

fn u32_of(n: usize, what: &str) -> Result<u32> {
    u32::try_from(n).map_err(|_| candle_core::Error::Msg(format!("{what} {n} exceeds u32")))
}

/// RMSNorm of `rows` rows of `h`: y, and the inverse RMS per row.
pub fn rms_norm_fwd(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    w: &CudaView<'_, f32>,
    (rows, h): (usize, usize),
    eps: f32,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let (mut y, mut inv) = (alloc(dev, rows * h)?, alloc(dev, rows)?);
    let (r, hh) = (u32_of(rows, "rows")?, u32_of(h, "hidden")?);
    launch!(
        dev,
        "rms_norm_fwd",
        rows_config(rows),
        x,
        w,
        &mut y,
        &mut inv,
        &r,
        &hh,
        &eps
    );
    Ok((y, inv))
}

/// RMSNorm's backward pass: dx then dw, in one buffer of rows·h + h.
pub fn rms_norm_bwd(
    dev: &CudaDevice,
    [x, w, dy]: [&CudaView<'_, f32>; 3],
    inv: &CudaSlice<f32>,
    (rows, h): (usize, usize),
) -> Result<CudaSlice<f32>> {
    let n = rows * h;
    let chunks = rows.div_ceil(ROWS_PER_CHUNK).max(1);
    let (mut out, mut partial) = (alloc(dev, n + h)?, alloc(dev, chunks * h)?);
    let (r, hh) = (u32_of(rows, "rows")?, u32_of(h, "hidden")?);
    let (c, per) = (chunks as u32, ROWS_PER_CHUNK as u32);
    {
        let mut dx = out.slice_mut(0..n);
        launch!(
            dev,
            "rms_norm_bwd_x",
            rows_config(rows),
            x,
            w,
            dy,
            inv,
            &mut dx,
            &r,
            &hh
        );
    }
    launch!(
        dev,
        "rms_norm_bwd_w_partial",
        columns_config(h, chunks),
        x,
        dy,
        inv,
        &mut partial,
        &r,
        &hh,
        &per
    );
    let mut dw = out.slice_mut(n..n + h);
    launch!(
        dev,
        "sum_chunks",
        columns_config(h, 1),
        &partial,
        &mut dw,
        &c,
        &hh
    );
    Ok(out)
}

/// A compact W ([`crate::quant`]; its codes and scales on the device) dequantised into a
/// new `rows × cols` buffer for cuBLAS: f32, or bf16 for a bf16 matmul (rounded as a cast
/// rounds). The same bits as the CPU's dequantisation, then cast.
pub fn dequantize(
    dev: &CudaDevice,
    codes: &CudaView<'_, u8>,
    scales: &CudaView<'_, f32>,
    q: &QuantWeight,
    dtype: DType,
) -> Result<CudaStorage> {
    let format: u32 = match q.format {
        FrozenFormat::Bf16 => 1,
        FrozenFormat::Int8 => 2,
        FrozenFormat::Nf4 => 3,
        FrozenFormat::F32 => bail!("dequantize: an f32 W is not compact"),
    };
    let n = q.rows * q.cols;
    let (nn, cols, block) = (
        n as u64,
        u32_of(q.cols, "columns")?,
        u32_of(q.block, "block")?,
    );
    let cfg = elems_config(n);
    match dtype {
        DType::F32 => {
            let mut w = alloc(dev, n)?;
            launch!(
                dev,
                "dequantize_f32",
                cfg,
                codes,
                scales,
                &mut w,
                &nn,
                &cols,
                &block,
                &format
            );
            Ok(storage(w, dev))
        }
        DType::BF16 => {
            // SAFETY: the kernel writes all n elements.
            let mut w = unsafe { dev.alloc::<half::bf16>(n.max(1)) }?;
            launch!(
                dev,
                "dequantize_bf16",
                cfg,
                codes,
                scales,
                &mut w,
                &nn,
                &cols,
                &block,
                &format
            );
            Ok(CudaStorage::wrap_cuda_slice(w, dev.clone()))
        }
        other => bail!("dequantize: no kernel writes {other:?}"),
    }
}

/// `silu(g) · u` over n elements.
pub fn swiglu_fwd(
    dev: &CudaDevice,
    g: &CudaView<'_, f32>,
    u: &CudaView<'_, f32>,
    n: usize,
) -> Result<CudaSlice<f32>> {
    let mut y = alloc(dev, n)?;
    let nn = n as u64;
    launch!(dev, "swiglu_fwd", elems_config(n), g, u, &mut y, &nn);
    Ok(y)
}

/// SwiGLU's backward pass: dg then du, in one buffer of 2n.
pub fn swiglu_bwd(
    dev: &CudaDevice,
    [g, u, dy]: [&CudaView<'_, f32>; 3],
    n: usize,
) -> Result<CudaSlice<f32>> {
    let mut out = alloc(dev, 2 * n)?;
    let nn = n as u64;
    launch!(dev, "swiglu_bwd", elems_config(n), g, u, dy, &mut out, &nn);
    Ok(out)
}

/// RoPE of `rows` = b·t rows of `row` = heads·d values by `sign ×` each position's angles;
/// `cos` and `sin` are [t, d/2] on the device.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    cos: &CudaSlice<f32>,
    sin: &CudaSlice<f32>,
    (rows, t, row, d): (usize, usize, usize, usize),
    sign: f32,
) -> Result<CudaSlice<f32>> {
    let mut y = alloc(dev, rows * row)?;
    let (r, tt, rr, dd) = (
        u32_of(rows, "rows")?,
        u32_of(t, "positions")?,
        u32_of(row, "row")?,
        u32_of(d, "head_dim")?,
    );
    let cfg = elems_config(rows * row / 2);
    launch!(dev, "rope", cfg, x, cos, sin, &mut y, &r, &tt, &rr, &dd, &sign);
    Ok(y)
}

/// The cos and sin tables on the device.
pub fn upload(dev: &CudaDevice, v: &[f32]) -> Result<CudaSlice<f32>> {
    dev.cuda_stream().clone_htod(v).w()
}

/// The mean weighted cross-entropy of logits [rows, vocab] (a one-element buffer), and
/// each row's log-sum-exp.
pub fn xent_fwd(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    targets: &CudaView<'_, u32>,
    weights: &CudaView<'_, f32>,
    (rows, vocab): (usize, usize),
    total_weight: f64,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let (mut loss, mut lse) = (alloc(dev, 1)?, alloc(dev, rows)?);
    // SAFETY: xent_fwd writes every row's loss before sum_rows_f64 reads them.
    let mut row_loss = unsafe { dev.alloc::<f64>(rows.max(1)) }?;
    let (r, v) = (u32_of(rows, "rows")?, u32_of(vocab, "vocabulary")?);
    let scale = 1.0 / total_weight;
    launch!(
        dev,
        "xent_fwd",
        rows_config(rows),
        x,
        targets,
        weights,
        &mut lse,
        &mut row_loss,
        &r,
        &v
    );
    launch!(
        dev,
        "sum_rows_f64",
        rows_config(1),
        &row_loss,
        &mut loss,
        &r,
        &scale
    );
    Ok((loss, lse))
}

/// The logits' gradient for the loss's gradient `g`.
pub fn xent_bwd(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    targets: &CudaView<'_, u32>,
    weights: &CudaView<'_, f32>,
    lse: &CudaSlice<f32>,
    (rows, vocab): (usize, usize),
    g_over_total: f64,
) -> Result<CudaSlice<f32>> {
    let mut dx = alloc(dev, rows * vocab)?;
    let (r, v) = (u32_of(rows, "rows")?, u32_of(vocab, "vocabulary")?);
    launch!(
        dev,
        "xent_bwd",
        rows_config(rows),
        x,
        targets,
        weights,
        lse,
        &mut dx,
        &r,
        &v,
        &g_over_total
    );
    Ok(dx)
}

/// Sizes of an attention call: sequences, positions, heads, head_dim.
#[derive(Clone, Copy)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub d: usize,
}

impl AttnDims {
    fn args(&self) -> Result<[u32; 4]> {
        if self.d > MAX_HEAD_DIM {
            bail!(
                "attention: the CUDA kernel takes head_dim up to {MAX_HEAD_DIM}, got {}",
                self.d
            );
        }
        Ok([
            u32_of(self.b, "batch")?,
            u32_of(self.t, "positions")?,
            u32_of(self.h, "heads")?,
            self.d as u32,
        ])
    }
    fn queries(&self) -> usize {
        self.b * self.h * self.t
    }
}

/// Causal attention's output and each query's log-sum-exp.
pub fn attention_fwd(
    dev: &CudaDevice,
    [q, k, v]: [&CudaView<'_, f32>; 3],
    dm: AttnDims,
    scale: f32,
) -> Result<(CudaSlice<f32>, CudaSlice<f32>)> {
    let [b, t, h, d] = dm.args()?;
    let (mut o, mut lse) = (alloc(dev, q.len())?, alloc(dev, dm.queries())?);
    let cfg = rows_config(dm.queries());
    launch!(dev, "attn_fwd", cfg, q, k, v, &mut o, &mut lse, &b, &t, &h, &d, &scale);
    Ok((o, lse))
}

/// Causal attention's backward pass: dq, dk, dv one after another in one buffer.
pub fn attention_bwd(
    dev: &CudaDevice,
    [q, k, v, o, d_o]: [&CudaView<'_, f32>; 5],
    lse: &CudaSlice<f32>,
    dm: AttnDims,
    scale: f32,
) -> Result<CudaSlice<f32>> {
    let [b, t, h, d] = dm.args()?;
    let (mut grads, mut big_d) = (alloc(dev, 3 * q.len())?, alloc(dev, dm.queries())?);
    let cfg = rows_config(dm.queries());
    launch!(
        dev,
        "attn_bwd_q",
        cfg,
        q,
        k,
        v,
        o,
        d_o,
        lse,
        &mut big_d,
        &mut grads,
        &b,
        &t,
        &h,
        &d,
        &scale
    );
    launch!(
        dev,
        "attn_bwd_kv",
        cfg,
        q,
        k,
        v,
        d_o,
        lse,
        &big_d,
        &mut grads,
        &b,
        &t,
        &h,
        &d,
        &scale
    );
    Ok(grads)
}

/// One AdamW step over a parameter and its moments, in place.
pub fn adamw(
    dev: &CudaDevice,
    (p, m, v): (
        &mut CudaViewMut<'_, f32>,
        &mut CudaViewMut<'_, f32>,
        &mut CudaViewMut<'_, f32>,
    ),
    g: &CudaView<'_, f32>,
    c: &super::adamw::AdamStep,
) -> Result<()> {
    let n = g.len() as u64;
    let cfg = elems_config(g.len());
    launch!(
        dev,
        "adamw",
        cfg,
        p,
        m,
        v,
        g,
        &n,
        &c.lr,
        &c.beta1,
        &c.beta2,
        &c.one_minus_beta1,
        &c.one_minus_beta2,
        &c.eps,
        &c.weight_decay,
        &c.bias1,
        &c.bias2,
        &c.grad_scale
    );
    Ok(())
}
