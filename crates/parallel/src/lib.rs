//! relora-parallel: the collectives behind data-parallel training, from existing libraries.
//!
//! The trainer knows only relora-model's [`Collective`] trait; this crate joins the group a
//! launcher started and hands back an implementation: MPI (Open MPI through the `mpi` crate,
//! feature `mpi`), whose processes `mpirun` starts locally and `srun` under Slurm. A stage
//! with one rank needs none of it.

use anyhow::Result;
use relora_model::parallel::{Collective, Solo};

/// The data-parallel group this process belongs to, which must have `ranks` members.
pub fn join(ranks: usize) -> Result<Box<dyn Collective>> {
    if ranks <= 1 {
        return Ok(Box::new(Solo));
    }
    join_mpi(ranks)
}

#[cfg(feature = "mpi")]
fn join_mpi(ranks: usize) -> Result<Box<dyn Collective>> {
    let group = mpi_group::MpiGroup::init()?;
    anyhow::ensure!(
        group.world() == ranks,
        "this stage asks for {ranks} data-parallel ranks but was started as one of {}; \
         start it with `mpirun -n {ranks}` (relora-pipe's executors do)",
        group.world()
    );
    Ok(Box::new(group))
}

#[cfg(not(feature = "mpi"))]
fn join_mpi(ranks: usize) -> Result<Box<dyn Collective>> {
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
