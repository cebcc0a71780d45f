//! relora-exec: runs a pipeline's stages as a DAG, each result cached by content.
//!
//! The executor knows no stage kind: kinds plug in through [`StageKind`] in a [`Registry`].
//! Each stage runs in a process of its own running the same binary (`relora-pipe __stage
//! JOB`), so a crash, an out-of-memory kill or a CUDA error in one stage cannot take the
//! orchestrator down. Stages whose inputs are ready run in parallel up to `jobs`, and each
//! stage that asks for GPUs gets ids no other running stage holds.
//!
//! The scheduler decides what is ready and holds each key's lock; a [`Launcher`] starts the
//! stage's process and reports its end: [`Local`] as a child process, [`Slurm`] as a batch
//! job on a cluster that shares the cache folder. Both speak the same child protocol.
//!
//! The modules follow a stage's path: `graph` (the DAG), [`plan`] (its key: kind, code,
//! params, inputs, files; and why it must run), `run` (the scheduler and one stage's
//! lock → compute → commit), `launch` and `slurm` (where the stage's process runs), `child`
//! (that process, and its end).

mod child;
mod choice;
mod disk;
mod environment;
mod graph;
mod interrupt;
mod kind;
mod launch;
mod memory;
mod placement;
mod plan;
mod progress;
mod run;
mod slurm;

pub use child::child_main;
pub use choice::{resolve_inputs, ChoiceFile, ChosenGroup, Resolved, CHOICE_FILE};
pub use disk::{full_disk_advice, size as disk_size, DiskNeed};
pub use environment::environment;
pub use graph::Dag;
pub use kind::{
    parse_params, Estimate, InputEstimate, Progress, StageContext, StageKind, PROGRESS_PREFIX,
};
pub use launch::{Launch, LaunchEvent, Launcher, Local};
pub use memory::{machine_memory, over_memory, refusal, OverMemory};
pub use placement::{check_executor_block, placements};
pub use plan::{
    code_salt_note, components, estimates, explain_change, key_params, plan, StagePlan, State,
};
pub use run::{run, Outcome, RunOptions, RunReport};
pub use slurm::{jobs_in, Slurm};

use anyhow::Result;
use relora_cache::Cache;
use std::collections::{BTreeMap, HashSet};

/// The version of this tool, recorded in every manifest.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The stage kinds a binary knows.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Box<dyn StageKind>>,
}

impl Registry {
    /// Add a kind; a later kind of the same name replaces an earlier one.
    pub fn register(&mut self, kind: Box<dyn StageKind>) {
        self.kinds.insert(kind.name(), kind);
    }
    /// The kind called `name`, if this binary has it.
    pub fn get(&self, name: &str) -> Option<&dyn StageKind> {
        self.kinds.get(name).map(|k| k.as_ref())
    }
    /// Every kind's name, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.kinds.keys().copied()
    }
}

/// GPU ids visible to this process: RELORA_GPUS, else CUDA_VISIBLE_DEVICES, else those the
/// NVIDIA driver lists.
pub fn visible_gpus() -> Vec<u32> {
    for var in ["RELORA_GPUS", "CUDA_VISIBLE_DEVICES"] {
        if let Ok(v) = std::env::var(var) {
            return v.split(',').filter_map(|s| s.trim().parse().ok()).collect();
        }
    }
    std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|rd| (0..rd.count() as u32).collect())
        .unwrap_or_default()
}

/// The keys of every stage of these pipelines whose key can be known now (for `gc`).
pub fn live_keys(dags: &[Dag], registry: &Registry, cache: &Cache) -> Result<HashSet<String>> {
    let mut keep = HashSet::new();
    for dag in dags {
        for p in plan(dag, registry, cache)? {
            if let Some(k) = p.key {
                keep.insert(k);
            }
        }
    }
    Ok(keep)
}
