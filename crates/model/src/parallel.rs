//! Data parallelism as the trainer sees it: this process's rank, the world size, and sums
//! across ranks. Which library carries the sums (MPI on the CPU, NCCL on CUDA) is the
//! implementation's business (crates/parallel); the trainer only calls [`Collective`].
//!
//! Each rank computes the gradients of its own micro-batches; the trainable gradients are
//! summed across ranks before the optimizer step, so every rank applies the same update to
//! the same weights. Between merges ReLoRA trains only the LoRA factors, embeddings, norms
//! and head, and only those are summed: the frozen W never crosses the wire.

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};
use std::time::{Duration, Instant};

/// Sums across the ranks of a data-parallel group.
pub trait Collective {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// How many ranks there are.
    fn world(&self) -> usize;
    /// Replace each element by its sum over all ranks.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Replace each element by its sum over all ranks.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Sum tensors across ranks. The default copies them through host buffers of about
    /// `BUCKET_BYTES`, one collective call per bucket; a device library overrides it.
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        all_reduce_through_host(self, tensors)
    }
}

/// One process, no communication.
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum(&self, _: &mut [Tensor]) -> Result<()> {
        Ok(())
    }
}

/// Gradients are summed in buckets of about this many bytes: few enough calls that latency
/// does not dominate, small enough that a bucket's host copy stays modest.
pub const BUCKET_BYTES: usize = 32 << 20;

/// Sum tensors through host buffers in buckets of whole tensors (f32 on the wire; other
/// dtypes are converted and back).
pub fn all_reduce_through_host<C: Collective + ?Sized>(
    c: &C,
    tensors: &mut [Tensor],
) -> Result<()> {
    let mut start = 0;
    while start < tensors.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < tensors.len()
            && (end == start || bytes + 4 * tensors[end].elem_count() <= BUCKET_BYTES)
        {
            bytes += 4 * tensors[end].elem_count();
            end += 1;
        }
        let mut buf = Vec::with_capacity(bytes / 4);
        for t in &tensors[start..end] {
            buf.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        c.all_reduce_sum_f32(&mut buf)?;
        let mut at = 0;
        for t in &mut tensors[start..end] {
            let n = t.elem_count();
            let summed =
                Tensor::from_slice(&buf[at..at + n], t.shape(), t.device())?.to_dtype(t.dtype())?;
            *t = summed;
            at += n;
        }
        ensure!(at == buf.len(), "bucket size mismatch");
        start = end;
    }
    Ok(())
}

/// Time spent in collectives, for the overhead figure (logs only).
#[derive(Debug, Default, Clone, Copy)]
pub struct CommTime {
    /// Time inside collective calls, waiting for slower ranks included.
    pub total: Duration,
    /// How many steps called them.
    pub calls: u64,
}

impl CommTime {
    /// Run `f`, adding its time.
    pub fn time<T>(&mut self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let t = Instant::now();
        let r = f();
        self.total += t.elapsed();
        self.calls += 1;
        r
    }
}
