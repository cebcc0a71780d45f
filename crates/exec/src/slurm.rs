//! The Slurm launcher: one `sbatch` job per stage. Its outcome is learnt by polling
//! `scontrol -o show job` (no accounting database needed); its output is followed in the
//! job's output file in the staging folder, which must therefore be on a filesystem the
//! nodes and the orchestrator share, as the whole cache must.
//!
//! A job that ends in TIMEOUT, NODE_FAIL, PREEMPTED, BOOT_FAIL, or cancelled by someone
//! other than this run, is submitted again (up to `resubmit` times); a training stage then
//! resumes from the checkpoint in its scratch folder. Ctrl-C cancels the run's jobs.

use crate::interrupt;
use crate::launch::{route_line, Launch, LaunchEvent, Launcher};
use anyhow::{bail, Context, Result};
use relora_cache::{now_unix, write_atomic};
use relora_spec::{ExecutorSpec, ResourceRequest};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the controller may be unreachable before a stage gives up on its job.
const CONTROLLER_PATIENCE: Duration = Duration::from_secs(300);

/// Submits each stage as a batch job.
pub struct Slurm {
    spec: ExecutorSpec,
    resubmit: u32,
    poll: Duration,
}

/// A job's state as `scontrol` reports it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct JobInfo {
    /// `JobState=` (PENDING, RUNNING, COMPLETED, …).
    pub state: String,
    /// `Reason=`: why a job pends.
    pub reason: String,
    /// `ExitCode=code:signal`.
    pub exit_code: i32,
    pub signal: i32,
    /// `NodeList=`.
    pub nodes: String,
}

const TERMINAL: &[&str] = &[
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
];

/// Ends that say nothing against the stage: run it again.
const RESUBMIT: &[&str] = &[
    "TIMEOUT",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "CANCELLED",
];

/// The value of `key=` in one line of `scontrol -o` output.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|t| t.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Parse `scontrol -o show job ID`.
pub(crate) fn parse_job(line: &str) -> Option<JobInfo> {
    let state = field(line, "JobState")?.to_string();
    let (code, signal) = field(line, "ExitCode")
        .and_then(|e| e.split_once(':'))
        .map(|(c, s)| (c.parse().unwrap_or(0), s.parse().unwrap_or(0)))
        .unwrap_or((0, 0));
    Some(JobInfo {
        state,
        reason: field(line, "Reason").unwrap_or("None").to_string(),
        exit_code: code,
        signal,
        nodes: field(line, "NodeList").unwrap_or("").to_string(),
    })
}

/// A job's current state; `Ok(None)` when Slurm no longer knows the job (purged).
pub(crate) fn query(id: &str) -> Result<Option<JobInfo>> {
    let out = Command::new("scontrol")
        .args(["-o", "show", "job", id])
        .output()
        .context("running scontrol (is Slurm's client installed and SLURM_CONF set?)")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("Invalid job id") {
            return Ok(None);
        }
        bail!("scontrol show job {id}: {}", stderr.trim());
    }
    parse_job(stdout.lines().next().unwrap_or(""))
        .with_context(|| format!("scontrol show job {id}: no JobState in {stdout:?}"))
        .map(Some)
}

/// Quote for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The batch script: check the node can run the binary, run the stage through the child
/// protocol, and leave its exit status and times beside the job file (Slurm forgets
/// finished jobs after MinJobAge; this file does not).
fn job_script(l: &Launch) -> String {
    let exe = sh_quote(&l.exe.display().to_string());
    let job = sh_quote(&l.job_file.display().to_string());
    format!(
        r#"#!/bin/bash
# relora-pipe stage `{stage}`, submitted by relora-pipe from {host}.
exe={exe}
job={job}
if [ ! -x "$exe" ]; then
    echo "relora-pipe: node $(hostname) cannot run $exe: put the relora-pipe binary on a filesystem every node mounts" >&2
    exit 98
fi
export RAYON_NUM_THREADS="${{SLURM_CPUS_PER_TASK:-${{SLURM_CPUS_ON_NODE:-1}}}}"
start=$(date +%s.%N)
{run} "$exe" __stage "$job"
rc=$?
echo "$rc $start $(date +%s.%N)" > "${{job%/*}}/exit-status.$SLURM_JOB_ID"
exit $rc
"#,
        stage = l.stage,
        host = crate::child::hostname(),
        // A data-parallel stage: one task per rank, wired up by Slurm's PMIx.
        run = if l.resources.processes() > 1 {
            "srun --mpi=pmix"
        } else {
            ""
        },
    )
}

/// Follows a growing output file, one complete line at a time.
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
}

impl Tail {
    fn new(path: PathBuf) -> Tail {
        Tail {
            path,
            offset: 0,
            partial: Vec::new(),
        }
    }

    /// Pass on every line completed since the last call (all of them, with `end`).
    fn read(&mut self, end: bool, mut on_line: impl FnMut(&str)) -> std::io::Result<()> {
        match std::fs::File::open(&self.path) {
            Ok(mut f) => {
                f.seek(std::io::SeekFrom::Start(self.offset))?;
                let n = f.read_to_end(&mut self.partial)?;
                self.offset += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        while let Some(nl) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=nl).collect();
            on_line(String::from_utf8_lossy(&line[..nl]).trim_end_matches('\r'));
        }
        if end && !self.partial.is_empty() {
            on_line(&String::from_utf8_lossy(&std::mem::take(&mut self.partial)));
        }
        Ok(())
    }
}

/// How one job ended, with the times the batch script recorded.
struct Ended {
    id: String,
    info: JobInfo,
    /// We cancelled it (Ctrl-C).
    cancelled_by_us: bool,
    /// Exit status and start and end times written by the batch script, if it got that far.
    status: Option<(i32, f64, f64)>,
    submitted: f64,
    noticed: f64,
}

impl Slurm {
    /// A launcher with the `executor:` block's settings.
    pub fn new(spec: &ExecutorSpec) -> Slurm {
        Slurm {
            spec: spec.clone(),
            resubmit: spec.resubmit.unwrap_or(2),
            poll: Duration::from_secs_f64(spec.poll_seconds.unwrap_or(1.0)),
        }
    }

    /// The sbatch flags for a stage with these resources (the script's path comes last).
    fn flags(&self, r: &ResourceRequest) -> Vec<String> {
        let mut a = Vec::new();
        let mut opt = |flag: &str, v: &Option<String>| {
            if let Some(v) = v {
                a.push(format!("--{flag}={v}"));
            }
        };
        opt("partition", &self.spec.partition);
        opt("account", &self.spec.account);
        opt("qos", &self.spec.qos);
        opt("mem", &r.memory);
        opt("time", &r.time_limit);
        if r.processes() > 1 {
            a.push(format!("--ntasks={}", r.processes()));
        }
        if let Some(c) = r.cpus {
            a.push(format!("--cpus-per-task={c}"));
        }
        // A stage naming its GPU (`cuda:1`) gets one; which one is the node's business.
        let gpus = r.gpus.max(r.gpu_ids.len() as u32);
        if gpus > 0 && r.processes() > 1 {
            // Data-parallel tasks may land on several nodes: GPUs go with each task.
            a.push(format!("--gpus-per-task={}", (gpus / r.processes()).max(1)));
        } else if gpus > 0 {
            a.push(format!("--gres=gpu:{gpus}"));
        }
        a.extend(self.spec.sbatch_args.iter().cloned());
        a
    }

    fn submit(&self, l: &Launch, script: &Path) -> Result<String> {
        let dir = staging_dir(l);
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name=relora:{}", l.stage),
            format!("--output={}/slurm-%j.out", dir.display()),
        ];
        args.extend(self.flags(l.resources));
        args.push(script.display().to_string());
        let out = Command::new("sbatch")
            .args(&args)
            .output()
            .context("running sbatch (is Slurm's client installed, and SLURM_CONF set?)")?;
        if !out.status.success() {
            bail!(
                "Slurm refused the job for stage `{}`: {}\n(sbatch {})",
                l.stage,
                String::from_utf8_lossy(&out.stderr).trim(),
                args.join(" ")
            );
        }
        // `--parsable` prints `id` or `id;cluster`.
        let text = String::from_utf8_lossy(&out.stdout);
        let id = text.trim().split(';').next().unwrap_or("").to_string();
        if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
            bail!("sbatch printed no job id: {text:?}");
        }
        Ok(id)
    }

    /// Watch job `id` to its end, passing on its output; cancel it on Ctrl-C.
    fn follow(
        &self,
        l: &Launch,
        id: &str,
        submitted: f64,
        log: &mut impl Write,
        on_event: &mut dyn FnMut(LaunchEvent),
    ) -> Result<Ended> {
        let dir = staging_dir(l);
        let mut tail = Tail::new(dir.join(format!("slurm-{id}.out")));
        let mut last_shown = String::new();
        let mut unreachable_since: Option<Instant> = None;
        let mut cancelled_by_us = false;
        loop {
            if interrupt::requested() && !cancelled_by_us {
                on_event(LaunchEvent::State(format!("cancelling Slurm job {id}")));
                let _ = Command::new("scancel").arg(id).status();
                cancelled_by_us = true;
            }
            let info = match query(id) {
                Ok(Some(info)) => {
                    unreachable_since = None;
                    info
                }
                // Purged: the batch script's status file says how it ended.
                Ok(None) => JobInfo {
                    state: "UNKNOWN".into(),
                    reason: "purged".into(),
                    exit_code: 0,
                    signal: 0,
                    nodes: String::new(),
                },
                Err(e) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > CONTROLLER_PATIENCE {
                        return Err(e.context(format!(
                            "Slurm's controller did not answer for {} s about job {id}",
                            CONTROLLER_PATIENCE.as_secs()
                        )));
                    }
                    on_event(LaunchEvent::State(format!("{e:#}; retrying")));
                    std::thread::sleep(self.poll);
                    continue;
                }
            };
            tail.read(false, |line| {
                let _ = route_line(line, log, on_event);
            })?;
            let shown = match info.state.as_str() {
                "PENDING" => format!("Slurm job {id} PENDING ({})", info.reason),
                s => format!("Slurm job {id} {s} on {}", info.nodes),
            };
            if shown != last_shown {
                on_event(LaunchEvent::State(shown.clone()));
                last_shown = shown;
            }
            if TERMINAL.contains(&info.state.as_str()) || info.state == "UNKNOWN" {
                let noticed = now_unix();
                // The output file can trail the job's end on a network filesystem.
                std::thread::sleep(Duration::from_millis(100));
                tail.read(true, |line| {
                    let _ = route_line(line, log, on_event);
                })?;
                let status = read_status(&dir.join(format!("exit-status.{id}")));
                return Ok(Ended {
                    id: id.to_string(),
                    info,
                    cancelled_by_us,
                    status,
                    submitted,
                    noticed,
                });
            }
            std::thread::sleep(self.poll);
        }
    }
}

fn staging_dir<'a>(l: &'a Launch) -> &'a Path {
    l.job_file.parent().unwrap_or(Path::new("."))
}

/// `rc start end` as the batch script writes it.
fn read_status(path: &Path) -> Option<(i32, f64, f64)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut it = text.split_whitespace();
    Some((
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
        it.next()?.parse().ok()?,
    ))
}

/// What went wrong with a job that did not succeed, for the user.
fn failure(e: &Ended, r: &ResourceRequest, attempts: u32) -> String {
    let i = &e.info;
    let on = if i.nodes.is_empty() {
        String::new()
    } else {
        format!(" on {}", i.nodes)
    };
    let tries = if attempts > 1 {
        format!(" (after {attempts} submissions)")
    } else {
        String::new()
    };
    let id = &e.id;
    match i.state.as_str() {
        "TIMEOUT" => format!(
            "Slurm job {id} reached its time limit ({}){on}{tries}; raise the stage's \
             resources.time_limit",
            r.time_limit.as_deref().unwrap_or("the partition's default")
        ),
        "OUT_OF_MEMORY" => format!(
            "Slurm job {id} ran out of memory ({}){on}; raise the stage's resources.memory",
            r.memory.as_deref().unwrap_or("the partition's default")
        ),
        "CANCELLED" if e.cancelled_by_us => format!("Slurm job {id} cancelled (interrupted)"),
        "UNKNOWN" => match e.status {
            Some((rc, ..)) => format!("Slurm job {id} failed (exit code {rc})"),
            None => format!(
                "Slurm no longer knows job {id} and it left no exit status: it was lost{tries}"
            ),
        },
        s if i.signal != 0 => {
            format!(
                "Slurm job {id} {s}{on}: killed by signal {}{tries}",
                i.signal
            )
        }
        s => format!("Slurm job {id} {s}{on} (exit code {}){tries}", i.exit_code),
    }
}

impl Launcher for Slurm {
    fn name(&self) -> &'static str {
        "slurm"
    }

    fn assigns_gpus(&self) -> bool {
        false
    }

    fn describe(&self, r: &ResourceRequest) -> String {
        let flags = self.flags(r);
        if flags.is_empty() {
            "slurm".into()
        } else {
            format!("slurm: sbatch {}", flags.join(" "))
        }
    }

    fn launch(&self, l: &Launch, on_event: &mut dyn FnMut(LaunchEvent)) -> Result<()> {
        let dir = staging_dir(l);
        let script = dir.join("job.sh");
        std::fs::write(&script, job_script(l))
            .with_context(|| format!("writing {}", script.display()))?;
        let mut log = std::io::BufWriter::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(l.log_path)?,
        );
        let mut attempt = 1;
        loop {
            let submitted = now_unix();
            let id = self.submit(l, &script)?;
            // For `status`, which shows the jobs of a run in progress.
            write_atomic(&dir.join("slurm-job"), id.as_bytes())?;
            on_event(LaunchEvent::State(format!("Slurm job {id} submitted")));
            let end = self.follow(l, &id, submitted, &mut log, on_event)?;
            let i = &end.info;
            if let Some((_, start, stop)) = end.status {
                // Timings go to the log, never into outputs.
                writeln!(
                    log,
                    "slurm: job {} on {}: {:.2} s from submission to start, {:.2} s from \
                     its end until noticed",
                    end.id,
                    i.nodes,
                    start - end.submitted,
                    end.noticed - stop
                )?;
            }
            let succeeded = match i.state.as_str() {
                "COMPLETED" => i.exit_code == 0,
                "UNKNOWN" => end.status.is_some_and(|(rc, ..)| rc == 0),
                _ => false,
            };
            if succeeded {
                log.flush()?;
                clean_up(dir);
                return Ok(());
            }
            // A purged job that left no exit status was lost with its node; one that left
            // a status ended by itself, and its status says how.
            let lost = i.state == "UNKNOWN" && end.status.is_none();
            let again = (RESUBMIT.contains(&i.state.as_str()) || lost)
                && !end.cancelled_by_us
                && !interrupt::requested()
                && attempt <= self.resubmit;
            if !again {
                log.flush()?;
                if i.state == "FAILED" && !tail_exists(dir, &end.id) {
                    bail!(
                        "Slurm job {} failed on node {} before the stage started, and wrote \
                         no output to {}: that node cannot see the cache folder {}. Put the \
                         cache on a filesystem every node mounts (RELORA_CACHE or \
                         --cache-dir)",
                        end.id,
                        i.nodes,
                        dir.display(),
                        l.cache_root.display()
                    );
                }
                bail!("{}", failure(&end, l.resources, attempt));
            }
            attempt += 1;
            let note = format!(
                "Slurm job {} ended {}; submitting it again ({attempt} of {})",
                end.id,
                i.state,
                self.resubmit + 1
            );
            writeln!(log, "slurm: {note}")?;
            on_event(LaunchEvent::State(note));
            // A fresh attempt starts from clean outputs; scratch (checkpoints) stays.
            let _ = std::fs::remove_dir_all(l.out_dir);
            std::fs::create_dir_all(l.out_dir)?;
            let _ = std::fs::remove_file(dir.join("metrics.json"));
        }
    }
}

/// Remove the batch files from a staging folder about to become an entry: their text is in
/// the log already, and an entry holds outputs, log and manifest only.
fn clean_up(dir: &Path) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == "job.sh"
            || name == "slurm-job"
            || name.starts_with("slurm-")
            || name.starts_with("exit-status.")
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

fn tail_exists(dir: &Path, id: &str) -> bool {
    dir.join(format!("slurm-{id}.out")).exists()
}

/// The Slurm job of each attempt at a key now in the cache's staging folders, with its
/// state: `(job id, "RUNNING on node3")`.
pub fn jobs_in(staging_dirs: &[PathBuf]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for d in staging_dirs {
        let Ok(id) = std::fs::read_to_string(d.join("slurm-job")) else {
            continue;
        };
        let id = id.trim().to_string();
        let state = match query(&id) {
            Ok(Some(i)) if i.state == "PENDING" => format!("PENDING ({})", i.reason),
            Ok(Some(i)) => format!("{} on {}", i.state, i.nodes),
            Ok(None) => "no longer known to Slurm".into(),
            Err(e) => format!("state unknown: {e:#}"),
        };
        out.push((id, state));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scontrol_lines_give_state_exit_code_and_node() {
        let line = "JobId=12 JobName=relora:warm UserId=root(0) JobState=FAILED \
                    Reason=NonZeroExitCode Dependency=(null) ExitCode=3:0 NodeList=ci";
        let j = parse_job(line).unwrap();
        assert_eq!(j.state, "FAILED");
        assert_eq!((j.exit_code, j.signal), (3, 0));
        assert_eq!(j.nodes, "ci");
        let j = parse_job("JobId=3 JobState=CANCELLED Reason=None ExitCode=0:15").unwrap();
        assert_eq!((j.state.as_str(), j.signal), ("CANCELLED", 15));
        assert!(parse_job("garbage").is_none());
    }

    #[test]
    fn a_tail_passes_on_whole_lines_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out");
        let mut t = Tail::new(p.clone());
        let mut seen = Vec::new();
        t.read(false, |l| seen.push(l.to_string())).unwrap();
        std::fs::write(&p, "one\ntw").unwrap();
        t.read(false, |l| seen.push(l.to_string())).unwrap();
        std::fs::write(&p, "one\ntwo\nthr").unwrap();
        t.read(false, |l| seen.push(l.to_string())).unwrap();
        t.read(true, |l| seen.push(l.to_string())).unwrap();
        assert_eq!(seen, ["one", "two", "thr"]);
    }

    #[test]
    fn resources_become_sbatch_flags() {
        let spec: ExecutorSpec = serde_norway::from_str(
            "{type: slurm, partition: gpu, account: lab, sbatch_args: [--exclusive]}",
        )
        .unwrap();
        let r = ResourceRequest {
            gpus: 2,
            cpus: Some(8),
            memory: Some("64G".into()),
            time_limit: Some("4:00:00".into()),
            ..ResourceRequest::default()
        };
        assert_eq!(
            Slurm::new(&spec).flags(&r),
            [
                "--partition=gpu",
                "--account=lab",
                "--mem=64G",
                "--time=4:00:00",
                "--cpus-per-task=8",
                "--gres=gpu:2",
                "--exclusive"
            ]
        );
        // Two data-parallel ranks on GPUs: two tasks, a GPU with each.
        let dp = ResourceRequest {
            gpus: 2,
            ranks: 2,
            ..ResourceRequest::default()
        };
        let flags = Slurm::new(&spec).flags(&dp);
        assert!(
            flags.contains(&"--ntasks=2".to_string())
                && flags.contains(&"--gpus-per-task=1".to_string())
                && !flags.iter().any(|f| f.starts_with("--gres")),
            "{flags:?}"
        );
    }
}
