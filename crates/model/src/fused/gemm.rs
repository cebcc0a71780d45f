//! The one matmul helper of the fused kernels: a strided f32 product, computed by the best
//! kernel this CPU has, chosen at run time.
//!
//! The kernels are the `gemm` crate's (the one candle's CPU matmul uses). It picks AVX-512,
//! AVX2+FMA or scalar code when the program starts, from what the CPU reports, so one binary
//! runs on every x86-64 CPU; its AVX-512 kernels are compiled in through the workspace's
//! `x86-v4` feature. `faer`'s matmul (private-gemm-x86 kernels, dispatched the same way) was
//! measured beside it on every product a training step makes, skinny LoRA ones included
//! (`examples/bench_matmul.rs`, notes/measurements.md), and did not beat it, so [`mm`] uses
//! gemm; [`mm_with`] keeps both for that benchmark. gemm does not split the inner dimension
//! across threads, so each output element is summed in one order whatever the thread count:
//! same inputs, same bytes on one machine. Another ISA (AVX2 against AVX-512) blocks the
//! sums differently and may change the last bits.

use gemm::{gemm, Parallelism};

/// Who computes a product: all of rayon's threads, or the calling thread (inside a rayon
/// task that is itself one of many, as attention's per-head tasks are).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Threads {
    All,
    One,
}

/// The crate whose kernels compute a product.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Backend {
    Gemm,
    Faer,
}

/// An operand: (pointer, column stride, row stride), in elements.
pub type Operand<P> = (P, usize, usize);

/// `dst[m × n] (+)= beta · lhs[m × k] · rhs[k × n]` by `backend`; see [`mm`].
///
/// # Safety
/// As [`mm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn mm_with(
    backend: Backend,
    (m, n, k): (usize, usize, usize),
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    beta: f32,
    accumulate: bool,
    threads: Threads,
) {
    let pool = rayon::current_num_threads();
    // Below ~64³ multiply-adds, splitting costs more than it saves.
    let split = threads == Threads::All && pool > 1 && m * n * k > 64 * 64 * 64;
    match backend {
        Backend::Gemm => gemm(
            m,
            n,
            k,
            dst.0,
            dst.1 as isize,
            dst.2 as isize,
            accumulate,
            lhs.0,
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0,
            rhs.1 as isize,
            rhs.2 as isize,
            1.0,
            beta,
            false,
            false,
            false,
            if split {
                Parallelism::Rayon(pool)
            } else {
                Parallelism::None
            },
        ),
        Backend::Faer => {
            use faer::{Accum, MatMut, MatRef, Par};
            let d = MatMut::from_raw_parts_mut(dst.0, m, n, dst.2 as isize, dst.1 as isize);
            let l = MatRef::from_raw_parts(lhs.0, m, k, lhs.2 as isize, lhs.1 as isize);
            let r = MatRef::from_raw_parts(rhs.0, k, n, rhs.2 as isize, rhs.1 as isize);
            let accum = if accumulate {
                Accum::Add
            } else {
                Accum::Replace
            };
            let par = if split { Par::rayon(pool) } else { Par::Seq };
            faer::linalg::matmul::matmul(d, accum, l, r, beta, par);
        }
    }
}

/// `dst[m × n] (+)= beta · lhs[m × k] · rhs[k × n]`, every operand given as
/// (pointer, column stride, row stride); `accumulate` keeps what `dst` holds. Each output
/// element is computed by one thread in one order, so results do not depend on the thread
/// count.
///
/// # Safety
/// The pointers must cover the strided extents; no other thread may write `dst`'s elements
/// meanwhile, and `dst` must not alias the operands.
pub unsafe fn mm(
    dims: (usize, usize, usize),
    dst: Operand<*mut f32>,
    lhs: Operand<*const f32>,
    rhs: Operand<*const f32>,
    beta: f32,
    accumulate: bool,
    threads: Threads,
) {
    mm_with(
        Backend::Gemm,
        dims,
        dst,
        lhs,
        rhs,
        beta,
        accumulate,
        threads,
    )
}

/// The vector instruction set the matmul kernels dispatch to on this CPU: `avx512f`,
/// `avx2+fma` or `scalar` (on x86-64; other architectures report their own name).
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "avx512f"
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            "avx2+fma"
        } else {
            "scalar"
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH
    }
}
