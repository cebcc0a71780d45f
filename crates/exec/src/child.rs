//! A stage's own process: how the orchestrator starts it and learns how it ended, and the
//! child's side (`__stage JOB`), which stops itself, and everything it started, when the
//! orchestrator is gone.

use crate::{Progress, Registry, StageContext, PROGRESS_PREFIX};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Run the stage described by `job` in a child process of `exe`, its stderr and plain stdout
/// going to `log_path`, its progress lines to `on_progress`.
pub(crate) fn run_child(
    exe: &Path,
    job: &Path,
    log_path: &Path,
    gpus: &[u32],
    threads: Option<usize>,
    mut on_progress: impl FnMut(Progress),
) -> Result<()> {
    let log = std::fs::File::create(log_path)?;
    let mut cmd = Command::new(exe);
    cmd.arg("__stage")
        .arg(job)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone()?)
        // Its own process group: a terminal's Ctrl-C reaches the orchestrator alone, and the
        // child can take down everything it started (a command stage's shell) in one kill.
        .process_group(0);
    if !gpus.is_empty() {
        let ids: Vec<String> = gpus.iter().map(u32::to_string).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
    }
    if let Some(n) = threads {
        cmd.env("RAYON_NUM_THREADS", n.to_string());
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut log = std::io::BufWriter::new(log);
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if let Some(json) = line.strip_prefix(PROGRESS_PREFIX) {
            if let Ok(p) = serde_json::from_str(json) {
                on_progress(p);
            }
        } else {
            writeln!(log, "{line}")?;
        }
    }
    log.flush()?;
    let status = child.wait()?;
    if !status.success() {
        use std::os::unix::process::ExitStatusExt;
        match status.signal() {
            Some(9) => bail!("the stage was killed (signal 9; out of memory?)"),
            Some(sig) => bail!("the stage died of signal {sig}"),
            None => bail!(
                "the stage failed (exit code {})",
                status.code().unwrap_or(-1)
            ),
        }
    }
    Ok(())
}

/// The child-process side: run one stage from its job file, write its metrics beside it.
pub fn child_main(registry: &Registry, job: &Path) -> Result<()> {
    // If the orchestrator dies, stop, and stop what we started: nobody would commit our
    // work, and an orphaned shell would run on unseen.
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        if std::os::unix::process::parent_id() != parent {
            eprintln!("the orchestrator exited; stopping this stage");
            // SAFETY: kill(2) with pid 0 signals our own process group (set up by
            // run_child); it touches no memory.
            unsafe {
                libc::kill(0, libc::SIGKILL);
            }
            std::process::exit(3);
        }
    });
    let bytes = std::fs::read(job).with_context(|| format!("reading job {}", job.display()))?;
    let mut ctx: StageContext = serde_json::from_slice(&bytes)?;
    let kind = registry
        .get(&ctx.kind)
        .with_context(|| format!("this binary has no stage kind `{}`", ctx.kind))?;
    kind.run(&mut ctx)?;
    let metrics = serde_json::to_vec_pretty(&ctx.metrics)?;
    relora_cache::write_atomic(&job.with_file_name("metrics.json"), &metrics)?;
    Ok(())
}
