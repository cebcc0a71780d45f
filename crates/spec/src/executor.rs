//! Where stages run: the `executor:` block of a pipeline file or of the user's config file,
//! and the batch resources (CPUs, memory, time limit) a stage asks a cluster for.
//!
//! None of this enters a cache key: where and with how much a stage ran does not change
//! what it computes.

use crate::{Resources, Source, SpecError, SpecErrors};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Which launcher runs the stages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorType {
    /// A child process of the orchestrator, on this machine.
    #[default]
    Local,
    /// One `sbatch` job per stage.
    Slurm,
}

impl std::str::FromStr for ExecutorType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "local" => Ok(ExecutorType::Local),
            "slurm" => Ok(ExecutorType::Slurm),
            _ => Err(format!("unknown executor `{s}`: use local or slurm")),
        }
    }
}

/// The `executor:` block. Every field is optional so that a pipeline's block can refine the
/// user's config file field by field.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExecutorSpec {
    /// `local` (the default) or `slurm`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ExecutorType>,
    /// `sbatch --partition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// `sbatch --account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// `sbatch --qos`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// Further `sbatch` flags, passed as they are (`--constraint=h100`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sbatch_args: Vec<String>,
    /// How often a job that ended in TIMEOUT, NODE_FAIL, PREEMPTED, BOOT_FAIL or an outside
    /// cancellation is submitted again (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resubmit: Option<u32>,
    /// Seconds between two looks at a job's state (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll_seconds: Option<f64>,
    /// Resources per stage kind, and under `default` for every other kind; a stage's own
    /// `resources:` and its `device` come first.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resources: BTreeMap<String, ResourceRequest>,
    /// Kinds whose stages run on this machine whatever the executor: a `download` where
    /// compute nodes have no network, a `report` too small to queue for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub local_kinds: Vec<String>,
}

/// An `executor:` block and the file it was read from (for errors at its lines).
#[derive(Debug, Clone)]
pub struct ExecutorBlock {
    /// The block's settings.
    pub spec: ExecutorSpec,
    /// The file it came from.
    pub source: Arc<Source>,
}

impl ExecutorSpec {
    /// This block over `base`: fields set here win, `sbatch_args` add up, and resources
    /// merge kind by kind and field by field.
    pub fn over(&self, base: &ExecutorSpec) -> ExecutorSpec {
        let mut resources = base.resources.clone();
        for (kind, r) in &self.resources {
            let merged = match resources.get(kind) {
                Some(b) => r.or(b),
                None => r.clone(),
            };
            resources.insert(kind.clone(), merged);
        }
        ExecutorSpec {
            kind: self.kind.or(base.kind),
            partition: self.partition.clone().or_else(|| base.partition.clone()),
            account: self.account.clone().or_else(|| base.account.clone()),
            qos: self.qos.clone().or_else(|| base.qos.clone()),
            sbatch_args: base
                .sbatch_args
                .iter()
                .chain(&self.sbatch_args)
                .cloned()
                .collect(),
            resubmit: self.resubmit.or(base.resubmit),
            poll_seconds: self.poll_seconds.or(base.poll_seconds),
            resources,
            local_kinds: if self.local_kinds.is_empty() {
                base.local_kinds.clone()
            } else {
                self.local_kinds.clone()
            },
        }
    }

    /// The executor that runs stages (local unless set).
    pub fn executor_type(&self) -> ExecutorType {
        self.kind.unwrap_or_default()
    }

    /// Problems with values, located in `source` under `executor.…`.
    pub(crate) fn check(&self, source: &Source) -> Vec<SpecError> {
        let mut errors = Vec::new();
        for (kind, r) in &self.resources {
            for (field, msg) in r.problems() {
                errors.push(source.error(&["executor", "resources", kind, field], msg));
            }
        }
        if let Some(p) = self.poll_seconds {
            if !(p.is_finite() && p > 0.0) {
                errors.push(source.error(
                    &["executor", "poll_seconds"],
                    format!("poll_seconds must be a positive number of seconds, not {p}"),
                ));
            }
        }
        errors
    }
}

/// What a stage asks for while it runs, as a `resources:` block writes it (on a stage, or
/// per kind under `executor.resources`): the GPUs a local run hands out, and what a batch
/// job requests besides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceRequest {
    /// How many GPUs the stage holds while it runs.
    #[serde(default)]
    pub gpus: u32,
    /// Which GPUs, when the stage names them (`device: cuda:1`); empty: any free ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_ids: Vec<u32>,
    /// CPUs for a batch job (`sbatch --cpus-per-task`); also its compute threads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory for a batch job, as Slurm writes it (`64G`, or megabytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Wall-clock limit for a batch job, as Slurm writes it (`4:00:00`, `2-00:00:00`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit: Option<String>,
    /// Processes of a data-parallel group, from the kind's params (`parallel.ranks`), not
    /// written in a `resources:` block.
    #[serde(skip)]
    pub ranks: u32,
}

/// What a kind derives from its params (GPUs) as a request.
impl From<Resources> for ResourceRequest {
    fn from(r: Resources) -> ResourceRequest {
        ResourceRequest {
            gpus: r.gpus,
            gpu_ids: r.gpu_ids,
            ranks: r.ranks,
            ..ResourceRequest::default()
        }
    }
}

impl ResourceRequest {
    /// Processes the stage runs as (at least one).
    pub fn processes(&self) -> u32 {
        self.ranks.max(1)
    }

    /// This request, with fields left unset here taken from `base`.
    pub fn or(&self, base: &ResourceRequest) -> ResourceRequest {
        let (gpus, gpu_ids) = if self.gpus > 0 || !self.gpu_ids.is_empty() {
            (self.gpus, self.gpu_ids.clone())
        } else {
            (base.gpus, base.gpu_ids.clone())
        };
        ResourceRequest {
            gpus,
            gpu_ids,
            cpus: self.cpus.or(base.cpus),
            memory: self.memory.clone().or_else(|| base.memory.clone()),
            time_limit: self.time_limit.clone().or_else(|| base.time_limit.clone()),
            ranks: self.ranks.max(base.ranks),
        }
    }

    /// `(field, message)` for each value a batch system would refuse or misread.
    pub(crate) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if self.cpus == Some(0) {
            out.push(("cpus", "cpus must be at least 1".to_string()));
        }
        if let Some(m) = &self.memory {
            if !memory_ok(m) {
                out.push((
                    "memory",
                    format!("memory `{m}` is not a size: write megabytes (`4000`) or a number with K, M, G or T (`64G`)"),
                ));
            }
        }
        if let Some(t) = &self.time_limit {
            if !time_ok(t) {
                out.push((
                    "time_limit",
                    format!("time_limit `{t}` is not a Slurm time: write MINUTES, HH:MM:SS or D-HH:MM:SS (`90`, `4:00:00`, `2-00:00:00`)"),
                ));
            }
        }
        out
    }
}

fn all_digits(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())
}

fn memory_ok(m: &str) -> bool {
    let digits = m.trim_end_matches(['K', 'M', 'G', 'T']);
    m.len() - digits.len() <= 1 && all_digits(digits)
}

/// Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
fn time_ok(t: &str) -> bool {
    let (days, rest) = match t.split_once('-') {
        Some((d, r)) => (Some(d), r),
        None => (None, t),
    };
    if days.is_some_and(|d| !all_digits(d)) {
        return false;
    }
    let parts: Vec<&str> = rest.split(':').collect();
    parts.len() <= 3 && parts.iter().all(|p| all_digits(p))
}

/// The user's config file: `$RELORA_CONFIG`, else `~/.config/relora-pipe/config.yaml`
/// (`$XDG_CONFIG_HOME` when set) if it exists. Its only key is `executor:`.
pub fn config_path() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("RELORA_CONFIG") {
        return Some(p.into());
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))?;
    let p = base.join("relora-pipe/config.yaml");
    p.exists().then_some(p)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    executor: Option<ExecutorSpec>,
}

/// Read a config file's `executor:` block.
pub fn load_config(path: &Path) -> Result<Option<ExecutorBlock>, SpecErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| crate::io_error(path, format!("cannot read config file: {e}")))?;
    let source = Arc::new(Source {
        path: path.to_path_buf(),
        text,
    });
    let raw: RawConfig =
        serde_norway::from_str(&source.text).map_err(|e| crate::yaml_error(&source, e))?;
    let Some(spec) = raw.executor else {
        return Ok(None);
    };
    let errors = spec.check(&source);
    if !errors.is_empty() {
        return Err(SpecErrors(errors));
    }
    Ok(Some(ExecutorBlock { spec, source }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_and_time_formats_are_slurms() {
        for ok in ["4000", "64G", "512M", "1T"] {
            assert!(memory_ok(ok), "{ok}");
        }
        for bad in ["", "64GB", "G", "1.5G", "-3"] {
            assert!(!memory_ok(bad), "{bad}");
        }
        for ok in ["90", "4:00:00", "2-00:00:00", "1-12", "10:30"] {
            assert!(time_ok(ok), "{ok}");
        }
        for bad in ["", "4h", "1:2:3:4", "x-1", "1-"] {
            assert!(!time_ok(bad), "{bad}");
        }
    }

    #[test]
    fn a_pipeline_block_refines_the_config_file_field_by_field() {
        let base: ExecutorSpec = serde_norway::from_str(
            "{type: slurm, partition: cpu, account: lab, sbatch_args: [--exclusive],
              resources: {train: {cpus: 8, memory: 32G}}}",
        )
        .unwrap();
        let mine: ExecutorSpec = serde_norway::from_str(
            "{partition: gpu, sbatch_args: [--constraint=h100],
              resources: {train: {gpus: 1, time_limit: '4:00:00'}}}",
        )
        .unwrap();
        let m = mine.over(&base);
        assert_eq!(m.executor_type(), ExecutorType::Slurm);
        assert_eq!(m.partition.as_deref(), Some("gpu"));
        assert_eq!(m.account.as_deref(), Some("lab"));
        assert_eq!(m.sbatch_args, ["--exclusive", "--constraint=h100"]);
        let t = &m.resources["train"];
        assert_eq!((t.gpus, t.cpus), (1, Some(8)));
        assert_eq!(t.memory.as_deref(), Some("32G"));
        assert_eq!(t.time_limit.as_deref(), Some("4:00:00"));
    }
}
