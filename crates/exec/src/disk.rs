//! Disk space: what the stages that would run write into the cache, against the free space
//! of the cache's filesystem.
//!
//! The executor knows no stage kind: a kind's estimate may carry `disk_bytes`, an upper
//! bound on what the stage writes into the cache (its outputs, and what it keeps in its
//! scratch folder while it runs). `plan --estimate` and `run` warn when the stages that
//! would run need more than is free; they do not refuse, since the bounds are generous and
//! another job may free space meanwhile. When a stage does fail on a full disk, its error
//! says so, with the numbers and what to do.

use crate::plan::{StagePlan, State};
use crate::Dag;
use crate::Estimate;
use relora_cache::Cache;

/// The cache's free space against what the stages that would run write.
#[derive(Debug, Clone)]
pub struct DiskNeed {
    /// Each stage's `disk_bytes`, where its estimate gives one.
    pub per_stage: Vec<Option<f64>>,
    /// The sum over the stages that would run (and are selected).
    pub needed: f64,
    /// Free on the cache's filesystem now, if the system says.
    pub free: Option<u64>,
}

impl DiskNeed {
    /// `selected[i]`: whether stage i is part of this run (`--until`); `plans` say which
    /// would run.
    pub fn new(
        dag: &Dag,
        cache: &Cache,
        plans: &[StagePlan],
        sizes: &[Estimate],
        selected: &[bool],
    ) -> DiskNeed {
        let per_stage: Vec<Option<f64>> = sizes
            .iter()
            .map(|e| e.facts.get("disk_bytes").and_then(|v| v.as_f64()))
            .collect();
        let needed = (0..dag.pipeline.stages.len())
            .filter(|&i| selected[i] && matches!(plans[i].state, State::Run | State::Stale))
            .filter_map(|i| per_stage[i])
            .sum();
        DiskNeed {
            per_stage,
            needed,
            free: cache.free_bytes(),
        }
    }

    /// A warning when the run would write more than is free.
    pub fn warning(&self, cache: &Cache) -> Option<String> {
        let free = self.free? as f64;
        (self.needed > free).then(|| {
            format!(
                "warning: the stages that would run write up to {} into the cache, and its \
                 filesystem ({}) has {} free; free space (`relora-pipe gc`) or give a cache \
                 on a bigger disk (--cache-dir)",
                size(self.needed),
                cache.root().display(),
                size(free)
            )
        })
    }
}

/// What to add to a stage's failure when the cache's filesystem is (or was) full: the
/// numbers, and what to do. None when the failure was not for want of space.
pub fn full_disk_advice(
    message: &str,
    stage: &str,
    need: Option<f64>,
    cache: &Cache,
) -> Option<String> {
    let free = cache.free_bytes();
    // A message that says so, or a filesystem with (next to) nothing left: a stage's own
    // message may be lost when its log could not be written.
    let full = relora_cache::says_disk_full(message) || free.is_some_and(|f| f < 1 << 20);
    if !full {
        return None;
    }
    Some(format!(
        "the cache's filesystem ({}) is full: {} free now; stage `{stage}` writes up to {} \
         (`plan --estimate`). Entries already committed are intact, and a train stage keeps \
         its last checkpoint: free space (`relora-pipe gc` removes what no pipeline uses) or \
         move the cache to a bigger disk (--cache-dir), then run again, and it resumes",
        cache.root().display(),
        free.map_or("an unknown amount".into(), |f| size(f as f64)),
        need.map_or("an amount its estimate does not give".into(), size),
    ))
}

/// Bytes for people: "1.2 GB", "350.0 MB", "12.0 kB".
pub fn size(bytes: f64) -> String {
    if bytes >= 1e9 {
        format!("{:.1} GB", bytes / 1e9)
    } else if bytes >= 1e6 {
        format!("{:.1} MB", bytes / 1e6)
    } else {
        format!("{:.1} kB", bytes / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::size;

    #[test]
    fn sizes_read_in_the_unit_that_fits() {
        assert_eq!(size(1.25e9), "1.2 GB");
        assert_eq!(size(350e6), "350.0 MB");
        assert_eq!(size(12_345.0), "12.3 kB");
    }
}
