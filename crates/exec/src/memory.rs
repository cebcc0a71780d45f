//! Refusing, before anything runs, a stage predicted to need more memory than the machine it
//! would run on has: better a message now, with the numbers, than an out-of-memory kill an
//! hour into a run.
//!
//! The executor knows no stage kind: a kind's estimate may carry `memory_bytes` (its
//! predicted peak, all processes together), `memory_per_process_bytes` (one rank's) and
//! `memory_device` (`cpu` when that peak is in host memory, `gpu` when in a GPU's). Each is
//! held to the limit of where it would run:
//! - a CPU stage run here: this machine's total memory (its ranks share it);
//! - a CPU stage placed on Slurm with a memory request (`resources.memory`, sbatch `--mem`,
//!   which is per node): one rank's peak against the request, since every node holds at
//!   least one rank;
//! - a GPU stage run here: one rank's peak against the smallest visible GPU's memory, as
//!   `nvidia-smi` reports it (each rank has its own GPU).
//!
//! Not checked: a GPU stage on Slurm (its node's GPUs are unknown until it lands), and a
//! Slurm stage without a memory request (the cluster's default applies).

use crate::graph::Dag;
use crate::placement::{placements, resources};
use crate::plan::{StagePlan, State};
use crate::{Estimate, Registry};
use anyhow::Result;
use relora_spec::ExecutorSpec;

/// A stage predicted not to fit.
#[derive(Debug, Clone)]
pub struct OverMemory {
    pub stage: String,
    /// The prediction held to the limit (all ranks, or one: see the module's doc).
    pub predicted_bytes: f64,
    pub limit_bytes: f64,
    /// What the limit is, for the message: "this machine's memory", "its Slurm memory
    /// request (`resources.memory: 8G`)", "the memory of its GPU".
    pub limit: String,
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

/// Bytes in a Slurm memory size (`4000` megabytes, or a number with K, M, G or T; Slurm's
/// units are powers of 1024).
pub fn slurm_memory_bytes(m: &str) -> Option<f64> {
    let (digits, unit) = match m.chars().last()? {
        'K' => (&m[..m.len() - 1], 1024f64),
        'M' => (&m[..m.len() - 1], 1024f64.powi(2)),
        'G' => (&m[..m.len() - 1], 1024f64.powi(3)),
        'T' => (&m[..m.len() - 1], 1024f64.powi(4)),
        _ => (m, 1024f64.powi(2)),
    };
    Some(digits.parse::<f64>().ok()? * unit)
}

/// The smallest memory of the GPUs `nvidia-smi` lists here, in bytes (None without it).
pub fn gpu_memory() -> Option<f64> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|mib| mib * 1024.0 * 1024.0)
        .reduce(f64::min)
}

/// The stages that would run (`selected`, and run or stale in `plans`) whose predicted
/// peak (their `sizes`) exceeds the memory of where they would run.
pub fn over_memory(
    dag: &Dag,
    registry: &Registry,
    executor: &ExecutorSpec,
    plans: &[StagePlan],
    sizes: &[Estimate],
    selected: &[bool],
) -> Result<Vec<OverMemory>> {
    let machine = machine_memory();
    // Asked of nvidia-smi once, and only when a GPU stage would run here.
    let mut gpu: Option<Option<f64>> = None;
    let placed = placements(dag, registry, executor)?;
    let mut out = Vec::new();
    for (i, s) in dag.pipeline.stages.iter().enumerate() {
        let runs = matches!(plans[i].state, State::Run | State::Stale);
        let facts = &sizes[i].facts;
        let (Some(all), true) = (
            facts.get("memory_bytes").and_then(|v| v.as_f64()),
            selected[i] && runs,
        ) else {
            continue;
        };
        let one = facts
            .get("memory_per_process_bytes")
            .and_then(|v| v.as_f64())
            .unwrap_or(all);
        let on_cpu = facts.get("memory_device").and_then(|v| v.as_str()) == Some("cpu");
        let local = placed[i].starts_with("local");
        let limit = match (on_cpu, local) {
            (true, true) => machine.map(|m| (all, m, "this machine's memory".to_string())),
            (true, false) => resources(dag, registry, executor, i).memory.and_then(|m| {
                let bytes = slurm_memory_bytes(&m)?;
                Some((
                    one,
                    bytes,
                    format!("its Slurm memory request (`memory: {m}`)"),
                ))
            }),
            (false, true) => gpu
                .get_or_insert_with(gpu_memory)
                .map(|g| (one, g, "the memory of its GPU".to_string())),
            (false, false) => None,
        };
        let Some((predicted, limit_bytes, limit)) = limit else {
            continue;
        };
        if predicted > limit_bytes {
            let detail = sizes[i]
                .lines
                .iter()
                .find(|l| l.contains("memory"))
                .cloned()
                .unwrap_or_default();
            out.push(OverMemory {
                stage: s.name.clone(),
                predicted_bytes: predicted,
                limit_bytes,
                limit,
                detail,
            });
        }
    }
    Ok(out)
}

/// What `run` says when it refuses: each stage's numbers, then what to do.
pub fn refusal(over: &[OverMemory]) -> String {
    let mut text = String::new();
    for o in over {
        text.push_str(&format!(
            "stage `{}` is predicted to need {:.1} GB, more than {}, {:.1} GB\n  {}\n",
            o.stage,
            o.predicted_bytes / 1e9,
            o.limit,
            o.limit_bytes / 1e9,
            o.detail
        ));
    }
    text.push_str(
        "nothing was run: lower micro_batch, set checkpoint_activations: true, keep the \
         frozen weights in fewer bits (`lora.frozen`), raise the stage's `resources.memory` \
         (Slurm), or pass --force-memory to try anyway",
    );
    text
}

#[cfg(test)]
mod tests {
    use super::slurm_memory_bytes;

    #[test]
    fn slurm_sizes_are_powers_of_1024_and_plain_numbers_megabytes() {
        assert_eq!(slurm_memory_bytes("4000"), Some(4000.0 * 1048576.0));
        assert_eq!(slurm_memory_bytes("64G"), Some(64.0 * 1073741824.0));
        assert_eq!(slurm_memory_bytes("512M"), Some(512.0 * 1048576.0));
        assert_eq!(slurm_memory_bytes("2T"), Some(2.0 * 1099511627776.0));
        assert_eq!(slurm_memory_bytes("G"), None);
    }
}
