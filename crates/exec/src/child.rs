//! A stage's own process: how the orchestrator starts it and learns how it ended, and the
//! child's side (`__stage JOB`), which stops itself, and everything it started, when the
//! orchestrator is gone.

use crate::launch::{route_line, LaunchEvent};
use crate::{Progress, Registry, StageContext};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

/// Run the stage described by `job` in a child process of `exe` (or `ranks` of them under
/// `mpirun`), its stderr and plain stdout going to `log_path`, its progress lines to
/// `on_progress`.
pub(crate) fn run_child(
    exe: &Path,
    job: &Path,
    log_path: &Path,
    gpus: &[u32],
    threads: Option<usize>,
    ranks: u32,
    mut on_progress: impl FnMut(Progress),
) -> Result<()> {
    let log = std::fs::File::create(log_path)?;
    let mut cmd = if ranks > 1 {
        let mut c = Command::new("mpirun");
        c.args([
            "-n",
            &ranks.to_string(),
            "--bind-to",
            "none",
            "--oversubscribe",
        ]);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            c.arg("--allow-run-as-root");
        }
        c.arg(exe);
        c
    } else {
        wrapped(exe)
    };
    // The ranks are mpirun's children, not ours: they watch this pid to stop with us.
    cmd.env(ORCHESTRATOR_PID, std::process::id().to_string());
    cmd.arg("__stage")
        .arg(job)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Through us, not straight into the log: on a full disk the log cannot be written,
        // and the stage's last words (which name what it could not write) must still
        // reach the user.
        .stderr(Stdio::piped())
        // Its own process group: a terminal's Ctrl-C reaches the orchestrator alone, and the
        // child can take down everything it started (a command stage's shell) in one kill.
        .process_group(0);
    if !gpus.is_empty() {
        let ids: Vec<String> = gpus.iter().map(u32::to_string).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
    }
    if ranks > 1 {
        // The ranks share this stage's cores.
        let cores =
            threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        cmd.env(
            "RAYON_NUM_THREADS",
            (cores / ranks as usize).max(1).to_string(),
        );
    } else if let Some(n) = threads {
        cmd.env("RAYON_NUM_THREADS", n.to_string());
    }
    let mut child = cmd.spawn().with_context(|| {
        if ranks > 1 {
            "starting mpirun for a stage of several ranks (install Open MPI: openmpi-bin)"
                .to_string()
        } else {
            format!("starting {}", exe.display())
        }
    })?;
    // Under a batch executor Ctrl-C is caught (to cancel jobs), so it no longer ends us, and
    // with us this child: stop it here.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pid = child.id() as libc::pid_t;
    let watch = done.clone();
    std::thread::spawn(move || {
        while !watch.load(std::sync::atomic::Ordering::SeqCst) {
            if crate::interrupt::requested() {
                // SAFETY: kill(2) on the child's process group (it leads one, see above).
                unsafe {
                    libc::kill(-pid, libc::SIGKILL);
                }
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    });
    let stdout = child.stdout.take().context("child stdout")?;
    let stderr = child.stderr.take().context("child stderr")?;
    let log = std::sync::Mutex::new(LogSink::new(log));
    let mut on_event = |e: LaunchEvent| {
        if let LaunchEvent::Progress(p) = e {
            on_progress(p)
        }
    };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                log.lock().expect("log lock").line(&line);
            }
        });
        // Read to the end whatever happens to the log, so the child never blocks on a
        // full pipe and is always waited for.
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let mut sink = log.lock().expect("log lock");
            let mut buf = Vec::new();
            let _ = route_line(&line, &mut buf, &mut on_event);
            if !buf.is_empty() {
                sink.line(String::from_utf8_lossy(&buf).trim_end_matches('\n'));
            }
        }
    });
    let sink = log.into_inner().expect("log lock");
    let status = child.wait()?;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let unwritten = sink.finish(log_path);
    if !status.success() {
        if let Some(note) = unwritten {
            bail!(
                "the stage failed (exit code {}), and {note}",
                status.code().unwrap_or(-1)
            );
        }
        use std::os::unix::process::ExitStatusExt;
        if ranks > 1 {
            if let Some(rank) = failed_rank(log_path) {
                bail!(
                    "rank {rank} of {ranks} failed, and mpirun stopped the others (exit code {})",
                    status.code().unwrap_or(-1)
                );
            }
        }
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

/// A stage's log file, with its last lines kept in memory: when the file cannot be written
/// (a full disk), the failure's message carries them instead.
struct LogSink {
    file: std::io::BufWriter<std::fs::File>,
    tail: std::collections::VecDeque<String>,
    error: Option<std::io::Error>,
}

impl LogSink {
    const TAIL: usize = 25;

    fn new(file: std::fs::File) -> LogSink {
        LogSink {
            file: std::io::BufWriter::new(file),
            tail: Default::default(),
            error: None,
        }
    }

    fn line(&mut self, line: &str) {
        if self.tail.len() == Self::TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
        if self.error.is_none() {
            if let Err(e) = writeln!(self.file, "{line}") {
                self.error = Some(e);
            }
        }
    }

    /// Flush; None when every line reached the file, else what to tell the user.
    fn finish(mut self, path: &Path) -> Option<String> {
        if self.error.is_none() {
            if let Err(e) = self.file.flush() {
                self.error = Some(e);
            }
        }
        let e = self.error?;
        Some(format!(
            "its log {} could not be written ({e}); its last lines:\n{}",
            path.display(),
            Vec::from(self.tail).join("\n")
        ))
    }
}

/// A command that runs each single-process local stage, the stage's own command line after
/// its words: a profiler (`perf record -g -o /tmp/p.data`), `valgrind`, or an emulated CPU
/// (`qemu-x86_64 -cpu Haswell`, to run the AVX2 kernels on an AVX-512 machine). Split at
/// spaces. For checking and profiling; it changes no key.
pub const STAGE_WRAPPER: &str = "RELORA_STAGE_WRAPPER";

/// `exe`, run through [`STAGE_WRAPPER`] when that is set.
fn wrapped(exe: &Path) -> Command {
    let wrapper = std::env::var(STAGE_WRAPPER).unwrap_or_default();
    let mut words = wrapper.split_whitespace();
    match words.next() {
        Some(first) => {
            let mut c = Command::new(first);
            c.args(words).arg(exe);
            c
        }
        None => Command::new(exe),
    }
}

/// Set in a local stage's environment: the orchestrator's pid.
const ORCHESTRATOR_PID: &str = "RELORA_ORCHESTRATOR_PID";

/// The rank mpirun names as the first to fail, from the log it wrote.
fn failed_rank(log_path: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(log_path).ok()?;
    text.lines().find_map(|l| {
        let rest = &l[l.find("process rank ")? + "process rank ".len()..];
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// This process's rank and the world size when a launcher started several (`mpirun`,
/// `srun`); None for a single process.
pub fn launch_rank() -> Option<(u32, u32)> {
    let pairs = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMIX_RANK", "SLURM_NTASKS"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
    ];
    pairs.iter().find_map(|(r, w)| {
        let rank = std::env::var(r).ok()?.parse().ok()?;
        let world: u32 = std::env::var(w).ok()?.parse().ok()?;
        (world > 1).then_some((rank, world))
    })
}

/// Stop, and stop what we started, when nobody will commit our work: when our parent (the
/// local orchestrator, or a batch job's shell) is gone, or when our staging folder is, which
/// happens when another run took the key's lock over from a dead orchestrator whose batch
/// job lived on. An orphaned shell would otherwise run on unseen, and two attempts would
/// write the same scratch folder.
fn watch_for_abandonment(job: &Path) {
    let parent = std::os::unix::process::parent_id();
    let orchestrator = std::env::var(ORCHESTRATOR_PID).ok();
    let staging = job.parent().map(Path::to_path_buf);
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        let gone = |pid: &String| !Path::new(&format!("/proc/{pid}")).exists();
        let why = if std::os::unix::process::parent_id() != parent
            || orchestrator.as_ref().is_some_and(gone)
        {
            "the orchestrator exited"
        } else if staging.as_ref().is_some_and(|d| !d.exists()) {
            "this attempt's staging folder is gone (another run took the stage over)"
        } else {
            continue;
        };
        // Not eprintln!: with the orchestrator gone our stderr is a broken pipe, and a
        // panic here would leave the process group running.
        let _ = writeln!(std::io::stderr(), "{why}; stopping this stage");
        // SAFETY: kill(2) with pid 0 signals our own process group (set up by run_child,
        // or the batch job's); it touches no memory.
        unsafe {
            libc::kill(0, libc::SIGKILL);
        }
        std::process::exit(3);
    });
}

/// This machine's name, for messages.
pub(crate) fn hostname() -> String {
    relora_cache::hostname().unwrap_or_else(|| "?".into())
}

/// One attempt at a time in a stage's scratch folder (its checkpoints, its metrics so far).
///
/// The key's lock is the orchestrator's: when an orchestrator dies, the next run may take
/// the key while the dead one's stage process still runs for up to half a second (until
/// it sees its orchestrator gone). Resuming then, the new attempt would truncate the
/// metrics to its checkpoint while the old one appended a line after it; the kill storm
/// caught exactly that. So the stage process itself holds an flock on the scratch folder,
/// and a new attempt waits for the old process to exit. Rank 0 alone takes it: the other
/// ranks of a data-parallel stage write nothing there.
fn lock_scratch(dir: &Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(".attempt.lock");
    // Opened close-on-exec (Rust's default): a command stage's shell does not inherit it.
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor this function owns; no memory is involved.
    let got = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !got {
        let _ = writeln!(
            std::io::stderr(),
            "waiting for a previous attempt's process to leave {}",
            dir.display()
        );
        // SAFETY: as above.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(f)
}

/// The child-process side: run one stage from its job file, write its metrics beside it.
pub fn child_main(registry: &Registry, job: &Path) -> Result<()> {
    let bytes = std::fs::read(job).with_context(|| {
        format!(
            "reading job {} on host {}: if this runs on a cluster node, the node cannot see \
             the cache folder; put the cache on a filesystem every node mounts",
            job.display(),
            hostname()
        )
    })?;
    watch_for_abandonment(job);
    let mut ctx: StageContext = serde_json::from_slice(&bytes)?;
    let kind = registry
        .get(&ctx.kind)
        .with_context(|| format!("this binary has no stage kind `{}`", ctx.kind))?;
    let rank = launch_rank();
    // Held until this process exits (the kernel drops it then, however it dies).
    let _scratch = if rank.is_none_or(|(r, _)| r == 0) {
        Some(lock_scratch(&ctx.scratch_dir)?)
    } else {
        None
    };
    kind.run(&mut ctx).with_context(|| match rank {
        Some((r, w)) => format!("rank {r} of {w} on {}", hostname()),
        None => format!("stage `{}`", ctx.stage),
    })?;
    // Rank 0 speaks for a data-parallel group.
    if rank.is_none_or(|(r, _)| r == 0) {
        let metrics = serde_json::to_vec_pretty(&ctx.metrics)?;
        relora_cache::write_atomic(&job.with_file_name("metrics.json"), &metrics)?;
    }
    Ok(())
}
