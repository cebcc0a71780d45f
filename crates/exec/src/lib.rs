//! relora-exec: runs a pipeline's stages as a DAG, each result cached by content.
//!
//! The executor knows no stage kind: kinds plug in through [`StageKind`] in a [`Registry`].
//! Each stage runs in a child process of the same binary (`relora-pipe __stage JOB`), so a
//! crash, an out-of-memory kill or a CUDA error in one stage cannot take the orchestrator
//! down. Stages whose inputs are ready run in parallel up to `jobs`, and each stage that
//! asks for GPUs gets ids no other running stage holds.

mod graph;
mod kind;
mod plan;
mod progress;

pub use graph::Dag;
pub use kind::{parse_params, Progress, StageContext, StageKind, PROGRESS_PREFIX};
pub use plan::{components, explain_change, key_params, plan, StagePlan, State};

use anyhow::{bail, Context, Result};
use relora_cache::{Cache, KeyComponents};
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;

pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The stage kinds a binary knows.
#[derive(Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Box<dyn StageKind>>,
}

impl Registry {
    pub fn register(&mut self, kind: Box<dyn StageKind>) {
        self.kinds.insert(kind.name(), kind);
    }
    pub fn get(&self, name: &str) -> Option<&dyn StageKind> {
        self.kinds.get(name).map(|k| k.as_ref())
    }
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.kinds.keys().copied()
    }
}

/// How `run` behaves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub jobs: usize,
    /// Stages to recompute even when cached.
    pub force: Vec<String>,
    /// Run only this stage and what it depends on.
    pub until: Option<String>,
    pub keep_going: bool,
    /// GPU ids the executor may hand out.
    pub gpus: Vec<u32>,
    /// The binary whose `__stage` entry point runs a stage.
    pub exe: PathBuf,
}

/// How one stage ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Cached,
    Computed { seconds: f64 },
    Failed { message: String },
    Skipped { because: String },
    NotSelected,
}

pub struct RunReport {
    pub outcomes: Vec<(String, Outcome)>,
}

impl RunReport {
    pub fn failed(&self) -> bool {
        self.outcomes
            .iter()
            .any(|(_, o)| matches!(o, Outcome::Failed { .. } | Outcome::Skipped { .. }))
    }
}

/// A stage's result as downstream stages need it.
struct Finished {
    key: String,
    output_hash: String,
    outcome: Outcome,
}

enum Event {
    Progress(usize, Progress),
    Waiting(usize, Option<u32>),
    StaleLock(usize, u32),
    Started(usize),
    Done(usize, Result<Finished, String>),
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

/// Run the pipeline: every selected stage that is not cached, in dependency order.
pub fn run(dag: &Dag, registry: &Registry, cache: &Cache, opts: &RunOptions) -> Result<RunReport> {
    let n = dag.pipeline.stages.len();
    let selected = match &opts.until {
        Some(name) => {
            let i = dag.index_of(name).with_context(|| {
                format!(
                    "--until names stage `{name}`, which this pipeline does not have{}",
                    relora_spec::did_you_mean(
                        name,
                        dag.pipeline.stages.iter().map(|s| s.name.as_str())
                    )
                )
            })?;
            dag.ancestors(i)
        }
        None => vec![true; n],
    };
    for f in &opts.force {
        if dag.index_of(f).is_none() {
            bail!("--force names stage `{f}`, which this pipeline does not have");
        }
    }
    for (i, s) in dag.pipeline.stages.iter().enumerate() {
        let need = resources(dag, registry, i).gpus as usize;
        if selected[i] && need > opts.gpus.len() {
            bail!(
                "stage `{}` needs {need} GPU(s) but {} are available; use `device: cpu`, \
                 or set RELORA_GPUS",
                s.name,
                opts.gpus.len()
            );
        }
    }

    let mut outcome: Vec<Option<Outcome>> = vec![None; n];
    let mut output_hash: BTreeMap<usize, String> = BTreeMap::new();
    let mut keys: BTreeMap<usize, String> = BTreeMap::new();
    let mut running: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    let mut free_gpus: Vec<u32> = opts.gpus.clone();
    let mut stop = false;
    let (tx, rx) = mpsc::channel::<Event>();
    let mut display = progress::Display::new();

    for (i, sel) in selected.iter().enumerate() {
        if !sel {
            outcome[i] = Some(Outcome::NotSelected);
        }
    }

    std::thread::scope(|scope| -> Result<()> {
        loop {
            // Skip stages whose inputs failed.
            for &i in &dag.order {
                if outcome[i].is_some() || running.contains_key(&i) {
                    continue;
                }
                if let Some(j) = dag.upstream(i).into_iter().find(|j| {
                    matches!(
                        outcome[*j],
                        Some(Outcome::Failed { .. }) | Some(Outcome::Skipped { .. })
                    )
                }) {
                    outcome[i] = Some(Outcome::Skipped {
                        because: dag.pipeline.stages[j].name.clone(),
                    });
                }
            }
            // Start what is ready.
            if !stop {
                for &i in &dag.order {
                    if running.len() >= opts.jobs.max(1) {
                        break;
                    }
                    if outcome[i].is_some() || running.contains_key(&i) {
                        continue;
                    }
                    if !dag.upstream(i).iter().all(|j| output_hash.contains_key(j)) {
                        continue;
                    }
                    let need = resources(dag, registry, i).gpus as usize;
                    if need > free_gpus.len() {
                        continue;
                    }
                    let gpus: Vec<u32> = free_gpus.drain(..need).collect();
                    running.insert(i, gpus.clone());
                    let comps = components(dag, registry, i, &output_hash)?
                        .context("inputs are ready, so the key is known")?;
                    let force = opts.force.contains(&dag.pipeline.stages[i].name);
                    let tx = tx.clone();
                    let inputs: BTreeMap<String, PathBuf> = dag.pipeline.stages[i]
                        .inputs
                        .iter()
                        .map(|(name, target)| {
                            let j = dag.index_of(target).expect("validated");
                            (name.clone(), cache.entry_dir(&keys[&j]).join("outputs"))
                        })
                        .collect();
                    scope.spawn(move || {
                        let r = run_one(dag, cache, opts, i, comps, force, inputs, gpus, &tx)
                            .map_err(|e| format!("{e:#}"));
                        let _ = tx.send(Event::Done(i, r));
                    });
                }
            }
            if running.is_empty() {
                break;
            }
            match rx.recv().expect("a worker holds a sender") {
                Event::Started(i) => display.started(&dag.pipeline.stages[i].name),
                Event::Waiting(i, pid) => display.waiting(&dag.pipeline.stages[i].name, pid),
                Event::StaleLock(i, pid) => display.stale_lock(&dag.pipeline.stages[i].name, pid),
                Event::Progress(i, p) => display.progress(&dag.pipeline.stages[i].name, &p),
                Event::Done(i, r) => {
                    let gpus = running.remove(&i).unwrap_or_default();
                    free_gpus.extend(gpus);
                    let name = &dag.pipeline.stages[i].name;
                    match r {
                        Ok(f) => {
                            display.finished(name, &f.outcome);
                            output_hash.insert(i, f.output_hash);
                            keys.insert(i, f.key);
                            outcome[i] = Some(f.outcome);
                        }
                        Err(message) => {
                            display.failed(name, &message);
                            outcome[i] = Some(Outcome::Failed { message });
                            if !opts.keep_going {
                                stop = true;
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    })?;
    display.clear();
    let outcomes = dag
        .pipeline
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let o = outcome[i].clone().unwrap_or(Outcome::Skipped {
                because: "an earlier failure stopped the run".into(),
            });
            (s.name.clone(), o)
        })
        .collect();
    Ok(RunReport { outcomes })
}

fn resources(dag: &Dag, registry: &Registry, i: usize) -> relora_spec::Resources {
    let s = &dag.pipeline.stages[i];
    s.resources
        .clone()
        .or_else(|| registry.get(&s.kind).map(|k| k.resources(&s.params)))
        .unwrap_or_default()
}

#[allow(clippy::too_many_arguments)]
fn run_one(
    dag: &Dag,
    cache: &Cache,
    opts: &RunOptions,
    i: usize,
    comps: KeyComponents,
    force: bool,
    inputs: BTreeMap<String, PathBuf>,
    gpus: Vec<u32>,
    tx: &mpsc::Sender<Event>,
) -> Result<Finished> {
    let s = &dag.pipeline.stages[i];
    let key = comps.key();
    let done = |output_hash: String, outcome: Outcome| Finished {
        key: key.clone(),
        output_hash,
        outcome,
    };
    let record = || cache.record_ref(&dag.pipeline.name, &s.name, &comps);
    if !force {
        if let Some(m) = cache.lookup(&key)? {
            record()?;
            return Ok(done(m.output_hash, Outcome::Cached));
        }
    }
    let lock = cache.lock(&key, |pid| {
        let _ = tx.send(Event::Waiting(i, pid));
    })?;
    if let Some(pid) = lock.stale_pid {
        let _ = tx.send(Event::StaleLock(i, pid));
    }
    if let Some(m) = cache.lookup(&key)? {
        if force {
            std::fs::remove_dir_all(cache.entry_dir(&key))
                .with_context(|| format!("removing the entry of `{}` to recompute it", s.name))?;
        } else {
            record()?;
            return Ok(done(m.output_hash, Outcome::Cached));
        }
    }
    let _ = tx.send(Event::Started(i));
    let staging = cache.staging(&key)?;
    let scratch = cache.scratch(&key)?;
    let ctx = StageContext {
        stage: s.name.clone(),
        kind: s.kind.clone(),
        params: s.params.clone(),
        base_dir: std::fs::canonicalize(&s.base_dir).unwrap_or_else(|_| s.base_dir.clone()),
        inputs,
        out_dir: staging.outputs(),
        scratch_dir: scratch.clone(),
        gpus: gpus.clone(),
        metrics: BTreeMap::new(),
    };
    let job = staging.dir.join("job.json");
    std::fs::write(&job, serde_json::to_vec_pretty(&ctx)?)?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let log_path = staging.log_path();
    let result = run_child(opts, &job, &log_path, &gpus, |p| {
        let _ = tx.send(Event::Progress(i, p));
    });
    match result {
        Ok(()) => {
            let metrics = std::fs::read(staging.dir.join("metrics.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or(serde_json::Value::Null);
            let _ = std::fs::remove_file(&job);
            let m = cache.commit(
                staging,
                &s.name,
                &s.kind,
                &comps,
                started,
                metrics,
                TOOL_VERSION,
            )?;
            record()?;
            Ok(done(
                m.output_hash,
                Outcome::Computed { seconds: m.seconds },
            ))
        }
        Err(e) => {
            let kept = scratch.join("last-failure.log");
            let _ = std::fs::copy(&log_path, &kept);
            let tail = log_tail(&log_path, 25);
            cache.discard(staging);
            bail!(
                "{e:#}\n--- last lines of the log (full log: {}) ---\n{tail}",
                kept.display()
            )
        }
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn run_child(
    opts: &RunOptions,
    job: &Path,
    log_path: &Path,
    gpus: &[u32],
    mut on_progress: impl FnMut(Progress),
) -> Result<()> {
    let log = std::fs::File::create(log_path)?;
    let mut cmd = Command::new(&opts.exe);
    cmd.arg("__stage")
        .arg(job)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log.try_clone()?);
    if !gpus.is_empty() {
        let ids: Vec<String> = gpus.iter().map(u32::to_string).collect();
        cmd.env("CUDA_VISIBLE_DEVICES", ids.join(","));
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", opts.exe.display()))?;
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
    // If the orchestrator dies, stop too: nobody would commit our work.
    let parent = std::os::unix::process::parent_id();
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(500));
        if std::os::unix::process::parent_id() != parent {
            eprintln!("the orchestrator exited; stopping this stage");
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
