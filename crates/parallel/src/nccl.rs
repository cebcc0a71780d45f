//! NCCL sums for ranks whose tensors live on GPUs (feature `cuda`).
//!
//! The gradients never leave the device: each is summed in place by `ncclAllReduce` on the
//! stream candle computes on, so the sum is ordered after the backward pass that wrote it
//! and before the optimizer step that reads it, with no host synchronisation between. One
//! step's tensors go in one NCCL group call, which NCCL packs into as few transfers as their
//! sizes allow (the bucketing that the host path does by hand).

use anyhow::{anyhow, ensure, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda::cudarc::driver::CudaSlice;
use candle_core::cuda::cudarc::driver::DeviceRepr;
use candle_core::cuda::cudarc::nccl::result::{group_end, group_start};
use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, NcclType, ReduceOp};
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};
use relora_model::parallel::Collective;
use std::ffi::c_char;

/// The size of NCCL's unique id, which every rank of a group must be given.
pub const ID_BYTES: usize = 128;

/// A fresh unique id for a group (made by one rank, then sent to the others).
pub fn new_id() -> Result<[u8; ID_BYTES]> {
    let id = Id::new().map_err(|e| {
        anyhow!("NCCL could not make a group id ({e:?}); is libnccl.so.2 on LD_LIBRARY_PATH?")
    })?;
    Ok(id.internal().map(|c| c as u8))
}

/// One rank of an NCCL group, on one GPU.
pub struct NcclGroup {
    comm: Comm,
    device: CudaDevice,
    /// Whatever brought the ranks together (the MPI group), kept alive as long as this.
    _launcher: Option<Box<dyn Collective>>,
}

impl NcclGroup {
    /// Join the group of `world` ranks named by `id` as `rank`, summing on `device`'s
    /// stream. Blocks until every rank has joined.
    pub fn join(
        rank: usize,
        world: usize,
        id: [u8; ID_BYTES],
        device: &Device,
        launcher: Option<Box<dyn Collective>>,
    ) -> Result<NcclGroup> {
        let Device::Cuda(dev) = device else {
            anyhow::bail!("NCCL sums tensors on GPUs; this rank computes on {device:?}");
        };
        let id = Id::uninit(id.map(|b| b as c_char));
        let comm = Comm::from_rank(dev.cuda_stream(), rank, world, id)
            .map_err(|e| anyhow!("rank {rank} of {world} could not join the NCCL group: {e:?}"))?;
        Ok(NcclGroup {
            comm,
            device: dev.clone(),
            _launcher: launcher,
        })
    }

    /// Sum a host buffer across ranks, through the device.
    fn sum_host<T: NcclType + DeviceRepr>(&self, buf: &mut [T]) -> Result<()> {
        let stream = self.comm.stream();
        let mut dev = stream.clone_htod(buf)?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| anyhow!("NCCL all-reduce of {} values: {e:?}", buf.len()))?;
        stream.memcpy_dtoh(&dev, buf)?;
        stream.synchronize()?;
        Ok(())
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.sum_host(buf)
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.sum_host(buf)
    }
    fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<()> {
        let here = Device::Cuda(self.device.clone());
        for t in tensors.iter() {
            ensure!(
                t.device().same_device(&here),
                "a gradient on {:?} reached the NCCL group of {here:?}",
                t.device()
            );
        }
        // Each sum is written in place, into a copy: a gradient may share its storage with
        // another tensor, which must not change.
        let owned = tensors
            .iter()
            .map(|t| t.copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        group_start().map_err(|e| anyhow!("ncclGroupStart: {e:?}"))?;
        let queued: candle_core::Result<()> = owned
            .iter()
            .try_for_each(|t| t.inplace_op1(&SumInPlace { comm: &self.comm }));
        // The group must be closed even when queueing failed, or NCCL stays in group mode.
        let ended = group_end().map_err(|e| anyhow!("ncclGroupEnd: {e:?}"));
        queued?;
        ended?;
        for (t, summed) in tensors.iter_mut().zip(owned) {
            *t = summed;
        }
        Ok(())
    }
}

/// Queues the in-place sum of one contiguous tensor.
struct SumInPlace<'a> {
    comm: &'a Comm,
}

impl SumInPlace<'_> {
    fn queue<T: NcclType>(
        &self,
        s: &mut CudaSlice<T>,
        from: usize,
        to: usize,
    ) -> candle_core::Result<()> {
        self.comm
            .all_reduce_in_place(&mut s.slice_mut(from..to), &ReduceOp::Sum)
            .map(|_| ())
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))
    }
}

impl InplaceOp1 for SumInPlace<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL sums tensors on GPUs, not on the CPU")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((from, to)) = l.contiguous_offsets() else {
            candle_core::bail!("NCCL all-reduce: the tensor is not contiguous");
        };
        match s.dtype() {
            DType::F32 => self.queue(s.as_cuda_slice_mut::<f32>()?, from, to),
            DType::F64 => self.queue(s.as_cuda_slice_mut::<f64>()?, from, to),
            DType::BF16 => self.queue(s.as_cuda_slice_mut::<half::bf16>()?, from, to),
            other => candle_core::bail!("NCCL all-reduce: no sum of {other:?} gradients"),
        }
    }
}
