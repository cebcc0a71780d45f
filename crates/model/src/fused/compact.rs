//! `x·Wᵀ` and `dy·W` with W in a compact format ([`crate::quant`]): W is dequantised a
//! block of rows at a time into a small f32 buffer that the matmul reads, so no f32 copy of
//! W exists beyond that buffer (8 MB: smaller blocks make the matmul pack x again for
//! every few rows, which doubled the forward pass's time at LLaMA 1B's shapes).
//!
//! Splitting W by rows splits `x·Wᵀ` by output columns, which leaves every output's sum in
//! the order the whole product would use: the forward pass equals the dense one on the
//! dequantised W bit for bit. `dy·W` sums over W's rows, so there each block adds a
//! partial sum: the same values to rounding, in another order.

use super::gemm::{mm, Threads::All};
use super::simd::kernel;
use crate::quant::{FrozenFormat, QuantWeight};
use rayon::prelude::*;

/// Floats in the dequantisation buffer.
const BUFFER: usize = 1 << 21;

/// Rows of W per block, and the buffer.
fn blocks(q: &QuantWeight) -> (usize, Vec<f32>) {
    let rows = (BUFFER / q.cols.max(1)).clamp(1, q.rows.max(1));
    (rows, vec![0f32; rows * q.cols])
}

/// Rows `first..` of W into `w` (whole rows), on all of rayon's threads: at a micro-batch
/// of a few hundred tokens dequantising costs as much as the product it feeds.
fn fill(q: &QuantWeight, first: usize, w: &mut [f32]) {
    const ROWS_PER_TASK: usize = 8;
    w.par_chunks_mut(q.cols * ROWS_PER_TASK)
        .enumerate()
        .for_each(|(i, rows)| {
            let first = first + i * ROWS_PER_TASK;
            if q.format == FrozenFormat::Nf4 {
                // Wider vectors turn NF4's table lookups into gathers, which measured slower
                // than scalar loads (bench_step --frozen nf4 --kernels: 1,149 tokens/s at
                // AVX-512 against 1,658 at the baseline, 20.8M, this AMD EPYC).
                q.dequantize_rows(first, rows)
            } else {
                dequantize(q, first, rows)
            }
        });
}

kernel! {
    fn dequantize(q: &QuantWeight, first: usize, rows: &mut [f32]) {
        q.dequantize_rows(first, rows)
    }
}

/// `f(first, rows, w)` for each block of W's rows, `w` those rows in f32.
fn for_each_block(q: &QuantWeight, mut f: impl FnMut(usize, usize, &[f32])) {
    let (per, mut buf) = blocks(q);
    for first in (0..q.rows).step_by(per) {
        let rows = per.min(q.rows - first);
        let w = &mut buf[..rows * q.cols];
        fill(q, first, w);
        f(first, rows, w);
    }
}

/// `y = x·Wᵀ` for x [m × in] and W [out × in].
pub fn forward(x: &[f32], q: &QuantWeight, m: usize) -> Vec<f32> {
    let (out, in_dim) = (q.rows, q.cols);
    let mut y = vec![0f32; m * out];
    for_each_block(q, |first, rows, w| {
        // SAFETY: y is m × out and this writes its columns first..first + rows; x is
        // m × in; w is rows × in, read transposed.
        unsafe {
            mm(
                (m, rows, in_dim),
                (y.as_mut_ptr().add(first), 1, out),
                (x.as_ptr(), 1, in_dim),
                (w.as_ptr(), in_dim, 1),
                1.0,
                false,
                All,
            )
        }
    });
    y
}

/// `dx = dy·W` for dy [m × out], [m × in].
pub fn input_grad(dy: &[f32], q: &QuantWeight, m: usize) -> Vec<f32> {
    let (out, in_dim) = (q.rows, q.cols);
    let mut dx = vec![0f32; m * in_dim];
    for_each_block(q, |first, rows, w| {
        // SAFETY: dx is m × in; dy's columns first..first + rows are m × rows with row
        // stride out; w is rows × in.
        unsafe {
            mm(
                (m, in_dim, rows),
                (dx.as_mut_ptr(), 1, in_dim),
                (dy.as_ptr().add(first), 1, out),
                (w.as_ptr(), 1, in_dim),
                1.0,
                first > 0,
                All,
            )
        }
    });
    dx
}
