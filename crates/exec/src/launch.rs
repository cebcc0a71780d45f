//! Launchers: where a stage's process runs. The scheduler decides what is ready and holds
//! the key's lock; a launcher starts the stage's process (`relora-pipe __stage JOB`) on
//! this machine or on a cluster, passes on its progress, and says how it ended. Every
//! launcher speaks the same child protocol: the job file in the staging folder, progress
//! lines on stdout, everything else into the stage's log.

use crate::child::run_child;
use crate::{Progress, PROGRESS_PREFIX};
use anyhow::Result;
use relora_spec::ResourceRequest;
use std::io::Write;
use std::path::Path;

/// What a launcher needs to run one stage.
pub struct Launch<'a> {
    /// The stage's name, for job names and messages.
    pub stage: &'a str,
    /// The binary whose `__stage` entry point runs the stage.
    pub exe: &'a Path,
    /// The job file, in the stage's staging folder; `metrics.json` is written beside it.
    pub job_file: &'a Path,
    /// Where the stage's plain output goes.
    pub log_path: &'a Path,
    /// The staging outputs folder; emptied before a job is submitted again.
    pub out_dir: &'a Path,
    /// The cache folder, which a cluster's nodes must see.
    pub cache_root: &'a Path,
    /// What the stage asks for (GPUs, CPUs, memory, time).
    pub resources: &'a ResourceRequest,
    /// GPUs the scheduler assigned on this machine (local launches only).
    pub gpus: &'a [u32],
    /// Compute threads for the stage, when the scheduler shares out this machine's cores.
    pub threads: Option<usize>,
}

/// What a launcher reports while a stage runs.
pub enum LaunchEvent {
    Progress(Progress),
    /// The stage's place in a batch queue changed (`Slurm job 12 RUNNING on node3`).
    State(String),
}

/// Starts stage processes somewhere and reports how they end.
pub trait Launcher: Send + Sync {
    /// `local` or `slurm`, for `plan` and messages.
    fn name(&self) -> &'static str;
    /// Whether the GPUs a stage gets are this machine's, handed out by the scheduler (true),
    /// or the batch system's, allocated on the node the job lands on (false).
    fn assigns_gpus(&self) -> bool;
    /// One line for `plan`: what a stage with these resources would be started with.
    fn describe(&self, r: &ResourceRequest) -> String;
    /// Run the stage to its end: Ok when it succeeded.
    fn launch(&self, l: &Launch, on_event: &mut dyn FnMut(LaunchEvent)) -> Result<()>;
}

/// A child process of the orchestrator, on this machine.
pub struct Local;

impl Launcher for Local {
    fn name(&self) -> &'static str {
        "local"
    }
    fn assigns_gpus(&self) -> bool {
        true
    }
    fn describe(&self, r: &ResourceRequest) -> String {
        let mut s = match (r.gpus, r.gpu_ids.as_slice()) {
            (_, [_, ..]) => format!("local, GPU {:?}", r.gpu_ids),
            (0, _) => "local".into(),
            (n, _) => format!("local, {n} GPU(s)"),
        };
        if r.processes() > 1 {
            s.push_str(&format!(", mpirun -n {}", r.processes()));
        }
        s
    }
    fn launch(&self, l: &Launch, on_event: &mut dyn FnMut(LaunchEvent)) -> Result<()> {
        run_child(
            l.exe,
            l.job_file,
            l.log_path,
            l.gpus,
            l.threads,
            l.resources.processes(),
            |p| on_event(LaunchEvent::Progress(p)),
        )
    }
}

/// One line of a stage's output: a progress report goes to `on_event`, anything else to
/// the log.
pub(crate) fn route_line(
    line: &str,
    log: &mut impl Write,
    on_event: &mut dyn FnMut(LaunchEvent),
) -> std::io::Result<()> {
    if let Some(json) = line.strip_prefix(PROGRESS_PREFIX) {
        if let Ok(p) = serde_json::from_str(json) {
            on_event(LaunchEvent::Progress(p));
        }
        Ok(())
    } else {
        writeln!(log, "{line}")
    }
}
