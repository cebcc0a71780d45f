//! Refusing, before anything runs, a stage predicted to need more memory than the machine it
//! would run on has: better a message now, with the numbers, than an out-of-memory kill an
//! hour into a run.
//!
//! The executor knows no stage kind: a kind's estimate may carry `memory_bytes` (its
//! predicted peak) and `memory_device` (`cpu` when that peak is in this machine's RAM);
//! stages that run here, on the CPU, are held to this machine's total memory. Stages placed
//! on Slurm, and GPU memory, are not checked.

use crate::graph::Dag;
use crate::placement::placements;
use crate::plan::{estimates, plan, State};
use crate::Registry;
use anyhow::Result;
use relora_cache::Cache;
use relora_spec::ExecutorSpec;

/// A stage predicted not to fit.
#[derive(Debug, Clone)]
pub struct OverMemory {
    pub stage: String,
    pub predicted_bytes: f64,
    pub machine_bytes: f64,
    /// The estimate's own account of the prediction.
    pub detail: String,
}

/// This machine's memory in bytes (Linux's MemTotal), if known.
pub fn machine_memory() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0)
}

/// The stages that would run locally (selected by `until`, not cached) whose predicted peak
/// exceeds this machine's memory.
pub fn over_memory(
    dag: &Dag,
    registry: &Registry,
    cache: &Cache,
    executor: &ExecutorSpec,
    until: Option<&str>,
) -> Result<Vec<OverMemory>> {
    let Some(machine) = machine_memory() else {
        return Ok(Vec::new());
    };
    let plans = plan(dag, registry, cache)?;
    let sizes = estimates(dag, registry, cache, &plans)?;
    let placed = placements(dag, registry, executor)?;
    let selected = match until.and_then(|u| dag.index_of(u)) {
        Some(i) => dag.ancestors(i),
        None => vec![true; dag.pipeline.stages.len()],
    };
    let mut out = Vec::new();
    for (i, s) in dag.pipeline.stages.iter().enumerate() {
        let runs = matches!(plans[i].state, State::Run | State::Stale);
        let facts = &sizes[i].facts;
        let bytes = facts.get("memory_bytes").and_then(|v| v.as_f64());
        let on_cpu = facts.get("memory_device").and_then(|v| v.as_str()) == Some("cpu");
        if let (true, true, true, Some(bytes)) = (
            selected[i] && runs,
            on_cpu,
            placed[i].starts_with("local"),
            bytes,
        ) {
            if bytes > machine {
                let detail = sizes[i]
                    .lines
                    .iter()
                    .find(|l| l.contains("memory"))
                    .cloned()
                    .unwrap_or_default();
                out.push(OverMemory {
                    stage: s.name.clone(),
                    predicted_bytes: bytes,
                    machine_bytes: machine,
                    detail,
                });
            }
        }
    }
    Ok(out)
}
