//! Access to CPU tensors as f32 slices, for the kernels of this module.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Storage, Tensor};
use std::cell::RefCell;
use std::sync::OnceLock;

/// The elements of a contiguous f32 CPU storage.
pub fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: input is not contiguous");
    };
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        other => bail!("{op}: expects f32, got {:?}", other.dtype()),
    }
}

/// Runs `f` on the tensors' elements as f32 slices, in the order given. Borrowed when a
/// tensor is already a contiguous f32 CPU tensor (a backward pass's usual input), copied
/// otherwise.
pub fn read<R, const N: usize>(
    ts: [&Tensor; N],
    op: &str,
    f: impl FnOnce([&[f32]; N]) -> R,
) -> Result<R> {
    let owned = ts
        .iter()
        .map(|t| {
            if t.dtype() == DType::F32 {
                t.contiguous()
            } else {
                t.to_dtype(DType::F32)?.contiguous()
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = owned.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (s, l) in &guards {
        let Storage::Cpu(cpu) = &**s else {
            bail!("{op}: the fused CPU kernel got a tensor on another device");
        };
        slices.push(slice(cpu, l, op)?);
    }
    let slices: [&[f32]; N] = slices.try_into().expect("one slice per tensor");
    Ok(f(slices))
}

/// An f32 CPU tensor of `shape` from a vector the kernel filled.
pub fn tensor(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &candle_core::Device::Cpu)
}

/// Runs `f` on `t`'s elements, mutably, in place: `t` must be a contiguous f32 CPU tensor.
/// Calls nest, giving mutable access to several tensors at once (they must not share
/// storage: each call holds its tensor's write lock).
pub fn modify<R>(t: &Tensor, op: &'static str, f: impl FnOnce(&mut [f32]) -> R) -> Result<R> {
    struct Modify<F, R> {
        op: &'static str,
        f: RefCell<Option<F>>,
        out: RefCell<Option<R>>,
    }
    impl<F: FnOnce(&mut [f32]) -> R, R> InplaceOp1 for Modify<F, R> {
        fn name(&self) -> &'static str {
            self.op
        }
        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let Some((a, b)) = l.contiguous_offsets() else {
                bail!("{}: tensor is not contiguous", self.op);
            };
            let CpuStorage::F32(v) = s else {
                bail!("{}: expects f32, got {:?}", self.op, s.dtype());
            };
            let f = self.f.borrow_mut().take().expect("called once");
            *self.out.borrow_mut() = Some(f(&mut v[a..b]));
            Ok(())
        }
    }
    let m = Modify {
        op,
        f: RefCell::new(Some(f)),
        out: RefCell::new(None),
    };
    t.inplace_op1(&m)?;
    Ok(m.out.into_inner().expect("cpu_fwd ran"))
}

/// Whether two tensors share one storage (writing one in place would change the other).
pub fn same_storage(a: &Tensor, b: &Tensor) -> bool {
    let (sa, _) = a.storage_and_layout();
    let (sb, _) = b.storage_and_layout();
    std::ptr::eq(&*sa, &*sb)
}

/// Raw pointer that kernels share across rayon tasks which write disjoint elements.
#[derive(Clone, Copy)]
pub struct SharedMut(pub *mut f32);
// SAFETY: every user writes a set of elements no other task touches (documented at each use).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// Runs `f` on `x` widened to f32, and rounds the result back to `x`'s dtype: the bf16 path
/// of every fused op (the conversions are differentiable, so gradients flow as usual).
pub fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return f(x);
    }
    f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

/// What an op's forward pass keeps for its backward pass: set once, read after.
pub struct Saved<T>(OnceLock<T>);

impl<T> Saved<T> {
    pub fn new() -> Saved<T> {
        Saved(OnceLock::new())
    }

    /// Keeps `v` (once: an op struct serves one forward pass).
    pub fn keep(&self, v: T, op: &str) -> Result<()> {
        self.0
            .set(v)
            .map_err(|_| candle_core::Error::Msg(format!("{op}: op applied twice")))
    }

    /// What the forward pass kept.
    pub fn get(&self, op: &str) -> Result<&T> {
        self.0
            .get()
            .ok_or_else(|| candle_core::Error::Msg(format!("{op}: backward before forward")))
    }
}
