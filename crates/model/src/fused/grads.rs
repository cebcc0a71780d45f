//! Gradient bookkeeping without temporaries: accumulating a micro-batch's gradient into the
//! running sum in place, and the squared L2 norm in one read.

use super::host;
use super::simd::kernel;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Elements per rayon task; fixed, so sums do not depend on the thread count.
const CHUNK: usize = 16 * 1024;

/// Whether `acc` can be updated in place from `g` on the CPU.
fn in_place(acc: &Tensor, g: &Tensor) -> bool {
    acc.device().is_cpu()
        && acc.dtype() == DType::F32
        && acc.is_contiguous()
        && acc.dims() == g.dims()
        && !host::same_storage(acc, g)
}

/// `acc += g`, in place where it can be (f32 on the CPU), else as a new tensor. `acc` must
/// be the only holder of its storage (a gradient taken out of a `GradStore` is: candle sums
/// every gradient into a fresh tensor).
pub fn accumulate(acc: &mut Tensor, g: &Tensor) -> Result<()> {
    if !in_place(acc, g) {
        *acc = (&*acc + g)?;
        return Ok(());
    }
    host::read([g], "accumulate", |[g]| {
        host::modify(acc, "accumulate", |acc| {
            acc.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .for_each(|(a, g)| add_to(a, g));
        })
    })??;
    Ok(())
}

kernel! {
    fn add_to(acc: &mut [f32], g: &[f32]) {
        for (a, g) in acc.iter_mut().zip(g) {
            *a += g;
        }
    }
}

/// Σ g², accumulated in f64.
pub fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if !g.device().is_cpu() || g.dtype() == DType::F64 {
        return g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>();
    }
    host::read([g], "sum_of_squares", |[g]| {
        let parts: Vec<f64> = g
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum())
            .collect();
        parts.iter().sum()
    })
}
