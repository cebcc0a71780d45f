//! relora-parallel: the collectives behind data-parallel training, from existing libraries.
//!
//! The trainer knows only relora-model's [`Collective`] trait; this crate joins the group a
//! launcher started and hands back an implementation, with the device this rank computes on:
//! - on the CPU, MPI (Open MPI through the `mpi` crate, feature `mpi`), whose processes
//!   `mpirun` starts locally and `srun` under Slurm;
//! - on GPUs, NCCL (cudarc's bindings, feature `cuda`) for the sums, which stay on the
//!   device. The ranks still meet through MPI: rank 0 asks NCCL for the group's unique id and
//!   broadcasts it over MPI, as torchrun does over its TCP store.
//!
//! A stage with one rank needs none of it.

use anyhow::Result;
use candle_core::Device;
use relora_model::parallel::{Collective, Solo};

#[cfg(feature = "cuda")]
pub mod nccl;

/// A data-parallel group joined: the sums, and the device this rank computes on.
pub struct Joined {
    /// Sums across the group's ranks.
    pub comm: Box<dyn Collective>,
    /// This rank's device, from the `open_device` given to [`join`].
    pub device: Device,
}

/// Join the data-parallel group this process belongs to, which must have `ranks` members.
/// `open_device` gets this process's rank and names its device (on one node, one GPU per
/// local rank); a group on GPUs sums through NCCL, any other through MPI.
pub fn join(ranks: usize, open_device: impl FnOnce(usize) -> Result<Device>) -> Result<Joined> {
    if ranks <= 1 {
        return Ok(Joined {
            comm: Box::new(Solo),
            device: open_device(0)?,
        });
    }
    join_mpi(ranks, open_device)
}

#[cfg(feature = "mpi")]
fn join_mpi(ranks: usize, open_device: impl FnOnce(usize) -> Result<Device>) -> Result<Joined> {
    let group = mpi_group::MpiGroup::init()?;
    anyhow::ensure!(
        group.world() == ranks,
        "this stage asks for {ranks} data-parallel ranks but was started as one of {}; \
         start it with `mpirun -n {ranks}` (relora-pipe's executors do)",
        group.world()
    );
    let device = open_device(group.rank())?;
    if device.is_cuda() {
        return nccl_over_mpi(group, device);
    }
    Ok(Joined {
        comm: Box::new(group),
        device,
    })
}

/// A group whose tensors live on GPUs: NCCL carries the sums, MPI only the unique id.
#[cfg(all(feature = "mpi", feature = "cuda"))]
fn nccl_over_mpi(group: mpi_group::MpiGroup, device: Device) -> Result<Joined> {
    let mut id = [0u8; nccl::ID_BYTES];
    if group.rank() == 0 {
        id = nccl::new_id()?;
    }
    group.broadcast_from_rank0(&mut id);
    let (rank, world) = (group.rank(), group.world());
    // The MPI group lives on inside the NCCL one: dropping it would finalise MPI, which the
    // launcher expects at exit, not before.
    let comm = nccl::NcclGroup::join(rank, world, id, &device, Some(Box::new(group)))?;
    Ok(Joined {
        comm: Box::new(comm),
        device,
    })
}

#[cfg(all(feature = "mpi", not(feature = "cuda")))]
fn nccl_over_mpi(_: mpi_group::MpiGroup, device: Device) -> Result<Joined> {
    anyhow::bail!("the ranks compute on {device:?}, but this binary was built without NCCL")
}

#[cfg(not(feature = "mpi"))]
fn join_mpi(ranks: usize, _: impl FnOnce(usize) -> Result<Device>) -> Result<Joined> {
    anyhow::bail!(
        "this stage asks for {ranks} data-parallel ranks, but this relora-pipe was built \
         without MPI: build it with `cargo build --release --features mpi` (Debian packages \
         libopenmpi-dev, openmpi-bin and libclang-dev)"
    )
}

/// Whether this binary can run stages of several ranks.
pub const HAS_MPI: bool = cfg!(feature = "mpi");

#[cfg(feature = "mpi")]
mod mpi_group {
    use anyhow::{Context, Result};
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;
    use relora_model::parallel::Collective;

    /// `MPI_COMM_WORLD`; finalises MPI when dropped.
    pub struct MpiGroup {
        world: SimpleCommunicator,
        _universe: Universe,
    }

    impl MpiGroup {
        pub fn init() -> Result<MpiGroup> {
            let universe = mpi::initialize().context("MPI was already initialised")?;
            Ok(MpiGroup {
                world: universe.world(),
                _universe: universe,
            })
        }

        /// Rank 0's `bytes`, on every rank.
        #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
        pub fn broadcast_from_rank0(&self, bytes: &mut [u8]) {
            self.world.process_at_rank(0).broadcast_into(bytes);
        }
    }

    impl Collective for MpiGroup {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn world(&self) -> usize {
            self.world.size() as usize
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
    }
}
