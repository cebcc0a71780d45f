//! The one matmul helper of the fused kernels: a strided product through the `gemm` crate
//! (the crate candle's own CPU matmul uses).

use gemm::{gemm, Parallelism};

/// Who computes a product: all of rayon's threads, or the calling thread (inside a rayon
/// task that is itself one of many, as attention's per-head tasks are).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Threads {
    All,
    One,
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
    (m, n, k): (usize, usize, usize),
    dst: (*mut f32, usize, usize),
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
    beta: f32,
    accumulate: bool,
    threads: Threads,
) {
    let pool = rayon::current_num_threads();
    // Below ~64³ multiply-adds, splitting costs more than it saves.
    let par = if threads == Threads::All && pool > 1 && m * n * k > 64 * 64 * 64 {
        Parallelism::Rayon(pool)
    } else {
        Parallelism::None
    };
    gemm(
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
        par,
    )
}
