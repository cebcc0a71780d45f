//! The scheduler, and one stage's way through the cache: look up, lock, compute in a child
//! process (or adopt an entry the user vouched for), commit.

use crate::choice::resolve_inputs;
use crate::disk::{full_disk_advice, DiskNeed};
use crate::environment::{environment, stage_environment, threads_per_stage};
use crate::launch::{Launch, LaunchEvent, Launcher};
use crate::memory::{over_memory, refusal};
use crate::placement::{check_executor_kinds, resources, Launchers};
use crate::plan::State;
use crate::plan::{components, components_without_code, estimates, explain_change, plan};
use crate::progress::{Display, RunEta};
use crate::{Dag, Progress, Registry, StageContext, TOOL_VERSION};
use anyhow::{bail, Context, Result};
use relora_cache::{now_unix, Adoption, Cache, CommitInfo, KeyComponents, LockHolder, Manifest};
use relora_spec::{ExecutorSpec, ResourceRequest};
use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

/// How `run` behaves.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stages run at once.
    pub jobs: usize,
    /// Stages to recompute even when cached.
    pub force: Vec<String>,
    /// Run only this stage and what it depends on.
    pub until: Option<String>,
    /// After a failure, let independent stages finish.
    pub keep_going: bool,
    /// GPU ids the executor may hand out.
    pub gpus: Vec<u32>,
    /// The binary whose `__stage` entry point runs a stage.
    pub exe: PathBuf,
    /// Kinds whose code change the user declared harmless: a stage of such a kind with no
    /// entry under its key reuses the entry whose key differs only in code, and its manifest
    /// says so.
    pub accept_code_change: Vec<String>,
    /// Where stages run (`executor:`, after the config file and `--executor`).
    pub executor: ExecutorSpec,
    /// Run even stages predicted to need more memory than where they would run has.
    pub force_memory: bool,
}

/// How one stage ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Its entry existed.
    Cached,
    /// It ran and its entry was committed.
    Computed { seconds: f64 },
    /// Its entry was made from another key's outputs (`--accept-code-change`).
    Adopted { from: String },
    /// It ran and failed; nothing was committed.
    Failed { message: String },
    /// An input failed, so it did not run.
    Skipped { because: String },
    /// Outside `--until`'s reach.
    NotSelected,
}

/// Every stage's outcome, in the pipeline's order.
pub struct RunReport {
    pub outcomes: Vec<(String, Outcome)>,
    /// The user pressed Ctrl-C (batch executors only); running jobs were cancelled.
    pub interrupted: bool,
}

impl RunReport {
    /// Whether any stage failed or was skipped.
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
    Waiting(usize, Option<LockHolder>),
    StaleLock(usize, LockHolder),
    Started(usize),
    /// A batch job's state changed.
    Launch(usize, String),
    Done(usize, Result<Finished, String>),
}

/// Run the pipeline: every selected stage that is not cached, in dependency order.
pub fn run(dag: &Dag, registry: &Registry, cache: &Cache, opts: &RunOptions) -> Result<RunReport> {
    cache.check_writable()?;
    let launchers = Launchers::new(&opts.executor);
    let launchers = &launchers;
    let selected = select(dag, registry, opts, launchers)?;
    // One plan and one estimate of every stage, before anything runs: what may not fit in
    // memory is refused, what may not fit on disk is warned of, and the run's ETA is
    // reckoned from the stages' FLOPs.
    let plans = plan(dag, registry, cache)?;
    let sizes = estimates(dag, registry, cache, &plans)?;
    if !opts.force_memory {
        let over = over_memory(dag, registry, &opts.executor, &plans, &sizes, &selected)?;
        if !over.is_empty() {
            bail!("{}", refusal(&over));
        }
    }
    let disk = DiskNeed::new(dag, cache, &plans, &sizes, &selected);
    if let Some(w) = disk.warning(cache) {
        eprintln!("{w}");
    }
    let env = environment(opts.jobs);
    let env = &env;
    if !launchers.main.assigns_gpus() {
        // Its stages are batch jobs, which outlive us unless we cancel them.
        crate::interrupt::install();
    }
    let mut s = Scheduler {
        launchers,
        dag,
        registry,
        opts,
        outcome: selected
            .iter()
            .map(|&sel| (!sel).then_some(Outcome::NotSelected))
            .collect(),
        output_hash: BTreeMap::new(),
        keys: BTreeMap::new(),
        running: BTreeMap::new(),
        free_gpus: opts.gpus.clone(),
        stop: false,
        interrupted: false,
        display: Display::new(),
        verified: Default::default(),
        cache,
        disk_need: disk.per_stage,
        eta: RunEta::new(
            (0..dag.pipeline.stages.len())
                .map(|i| {
                    let runs = selected[i] && matches!(plans[i].state, State::Run | State::Stale);
                    let flops = sizes[i].facts.get("flops").and_then(|f| f.as_f64());
                    if runs {
                        flops.unwrap_or(0.0)
                    } else {
                        0.0
                    }
                })
                .collect(),
        ),
    };
    let (tx, rx) = mpsc::channel::<Event>();
    std::thread::scope(|scope| -> Result<()> {
        loop {
            s.skip_after_failures();
            if !s.stop {
                for (i, job) in s.start_ready()? {
                    let tx = tx.clone();
                    scope.spawn(move || {
                        // A panic here must still end in a Done event, or the loop below
                        // would wait for it forever.
                        let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            run_one(dag, cache, opts, launchers, env, i, job, &tx)
                        }));
                        let r = match r {
                            Ok(r) => r.map_err(|e| format!("{e:#}")),
                            Err(p) => Err(format!(
                                "internal error: the worker for this stage panicked ({}); \
                                 please report it",
                                panic_message(p.as_ref())
                            )),
                        };
                        let _ = tx.send(Event::Done(i, r));
                    });
                }
            }
            if s.running.is_empty() {
                return Ok(());
            }
            match rx.recv_timeout(std::time::Duration::from_millis(250)) {
                Ok(event) => s.handle(event),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("internal error: every stage worker vanished")
                }
            }
            if crate::interrupt::requested() && !s.interrupted {
                s.interrupted = true;
                s.stop = true;
                s.display.note(&format!(
                    "interrupted: cancelling {} running stage(s); press Ctrl-C again to quit at once",
                    s.running.len()
                ));
            }
        }
    })?;
    s.display.clear();
    let interrupted = s.interrupted;
    let outcomes = dag
        .pipeline
        .stages
        .iter()
        .zip(s.outcome)
        .map(|(st, o)| {
            let o = o.unwrap_or(Outcome::Skipped {
                because: "an earlier failure stopped the run".into(),
            });
            (st.name.clone(), o)
        })
        .collect();
    Ok(RunReport {
        outcomes,
        interrupted,
    })
}

/// A panic payload's message.
fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

/// Which stages `--until` selects, after checking the options against the pipeline.
fn select(
    dag: &Dag,
    registry: &Registry,
    opts: &RunOptions,
    launchers: &Launchers,
) -> Result<Vec<bool>> {
    let stage_names = || dag.pipeline.stages.iter().map(|s| s.name.as_str());
    let selected = match &opts.until {
        Some(name) => {
            let i = dag.index_of(name).with_context(|| {
                format!(
                    "--until names stage `{name}`, which this pipeline does not have{}",
                    relora_spec::did_you_mean(name, stage_names())
                )
            })?;
            dag.ancestors(i)
        }
        None => vec![true; dag.pipeline.stages.len()],
    };
    for f in &opts.force {
        if dag.index_of(f).is_none() {
            bail!(
                "--force names stage `{f}`, which this pipeline does not have{}",
                relora_spec::did_you_mean(f, stage_names())
            );
        }
    }
    for k in &opts.accept_code_change {
        if registry.get(k).is_none() {
            bail!(
                "--accept-code-change names kind `{k}`, which this binary does not have{}; \
                 known kinds: {}",
                relora_spec::did_you_mean(k, registry.names()),
                registry.names().collect::<Vec<_>>().join(", ")
            );
        }
    }
    check_executor_kinds(&opts.executor, registry)?;
    for (i, s) in dag.pipeline.stages.iter().enumerate() {
        let r = resources(dag, registry, &opts.executor, i);
        // A batch system finds GPUs on its nodes; this machine's are beside the point.
        if !selected[i] || !launchers.for_kind(&s.kind).assigns_gpus() {
            continue;
        }
        if r.gpus as usize > opts.gpus.len() {
            bail!(
                "stage `{}` needs {} GPU(s) but {} are available; use `device: cpu`, \
                 or set RELORA_GPUS",
                s.name,
                r.gpus,
                opts.gpus.len()
            );
        }
        if let Some(id) = r.gpu_ids.iter().find(|id| !opts.gpus.contains(id)) {
            bail!(
                "stage `{}` asks for GPU {id}, but the GPUs this run may use are {:?} \
                 (from RELORA_GPUS, CUDA_VISIBLE_DEVICES or the driver)",
                s.name,
                opts.gpus
            );
        }
    }
    Ok(selected)
}

/// What a worker needs to run one stage.
struct Job {
    comps: KeyComponents,
    force: bool,
    /// Each input's (name, upstream stage, cache key).
    sources: Vec<(String, String, String)>,
    /// Entries verified so far in this run.
    verified: Arc<Mutex<HashSet<String>>>,
    /// GPU ids as the stage will see them.
    gpus: Vec<u32>,
    resources: ResourceRequest,
}

/// The scheduler's state between events.
struct Scheduler<'a> {
    launchers: &'a Launchers,
    dag: &'a Dag,
    registry: &'a Registry,
    opts: &'a RunOptions,
    outcome: Vec<Option<Outcome>>,
    output_hash: BTreeMap<usize, String>,
    keys: BTreeMap<usize, String>,
    /// Running stages and the GPUs each holds.
    running: BTreeMap<usize, Vec<u32>>,
    free_gpus: Vec<u32>,
    /// A failure without --keep-going, or Ctrl-C: start nothing more.
    stop: bool,
    interrupted: bool,
    display: Display,
    /// Input entries re-hashed so far (each once per run).
    verified: Arc<Mutex<HashSet<String>>>,
    cache: &'a Cache,
    /// What each stage writes into the cache at most (its estimate's `disk_bytes`), for
    /// the message of a stage that fails on a full disk.
    disk_need: Vec<Option<f64>>,
    /// The whole run's time left, from the stages' estimated FLOPs.
    eta: RunEta,
}

impl Scheduler<'_> {
    /// Mark every stage with a failed or skipped input as skipped.
    fn skip_after_failures(&mut self) {
        for &i in &self.dag.order {
            if self.outcome[i].is_some() || self.running.contains_key(&i) {
                continue;
            }
            let failed = self.dag.upstream(i).into_iter().find(|&j| {
                matches!(
                    self.outcome[j],
                    Some(Outcome::Failed { .. } | Outcome::Skipped { .. })
                )
            });
            if let Some(j) = failed {
                self.outcome[i] = Some(Outcome::Skipped {
                    because: self.dag.pipeline.stages[j].name.clone(),
                });
            }
        }
    }

    /// The GPUs stage `i` can have now, if enough of the ones it needs are free.
    fn claim_gpus(&mut self, need: &ResourceRequest) -> Option<Vec<u32>> {
        if !need.gpu_ids.is_empty() {
            if !need.gpu_ids.iter().all(|id| self.free_gpus.contains(id)) {
                return None;
            }
            self.free_gpus.retain(|id| !need.gpu_ids.contains(id));
            return Some(need.gpu_ids.clone());
        }
        let n = need.gpus as usize;
        (n <= self.free_gpus.len()).then(|| self.free_gpus.drain(..n).collect())
    }

    /// Claim slots for every stage whose inputs are ready, up to `jobs` running.
    fn start_ready(&mut self) -> Result<Vec<(usize, Job)>> {
        let mut started = Vec::new();
        for &i in &self.dag.order {
            if self.running.len() >= self.opts.jobs.max(1) {
                break;
            }
            let waiting_on_inputs = !self
                .dag
                .upstream(i)
                .iter()
                .all(|j| self.output_hash.contains_key(j));
            if self.outcome[i].is_some() || self.running.contains_key(&i) || waiting_on_inputs {
                continue;
            }
            let need = resources(self.dag, self.registry, &self.opts.executor, i);
            // Locally the scheduler hands out this machine's GPUs; a batch job's GPUs are
            // those Slurm gives it on its node, numbered from 0 there.
            let kind = &self.dag.pipeline.stages[i].kind;
            let (held, gpus) = if self.launchers.for_kind(kind).assigns_gpus() {
                let Some(gpus) = self.claim_gpus(&need) else {
                    continue;
                };
                (gpus.clone(), gpus)
            } else {
                let n = need.gpus.max(need.gpu_ids.len() as u32);
                (Vec::new(), (0..n).collect())
            };
            self.running.insert(i, held);
            let stage = &self.dag.pipeline.stages[i];
            let outputs_of = |j: usize| {
                self.keys
                    .get(&j)
                    .map(|k| self.cache.entry_dir(k).join("outputs"))
            };
            let comps = components(self.dag, self.registry, i, &self.output_hash, &outputs_of)?
                .context("inputs are ready, so the key is known")?;
            let resolved = resolve_inputs(self.dag, i, &outputs_of)?
                .context("inputs are ready, so every choice is made")?;
            let sources = resolved
                .iter()
                .map(|(name, r)| {
                    let target = self.dag.pipeline.stages[r.stage].name.clone();
                    (name.clone(), target, self.keys[&r.stage].clone())
                })
                .collect();
            let force = self.opts.force.contains(&stage.name);
            started.push((
                i,
                Job {
                    comps,
                    force,
                    sources,
                    verified: self.verified.clone(),
                    gpus,
                    resources: need,
                },
            ));
        }
        Ok(started)
    }

    fn handle(&mut self, event: Event) {
        let name = |i: usize| self.dag.pipeline.stages[i].name.as_str();
        match event {
            Event::Started(i) => self.display.started(name(i)),
            Event::Waiting(i, holder) => self.display.waiting(name(i), holder),
            Event::StaleLock(i, holder) => self.display.stale_lock(name(i), &holder),
            Event::Progress(i, p) => {
                self.display.progress(name(i), &p);
                if p.total > 0 {
                    self.eta.update(i, p.step as f64 / p.total as f64);
                    let left = self.outcome.iter().filter(|o| o.is_none()).count();
                    self.display.run_eta(&mut self.eta, left);
                }
            }
            Event::Launch(i, state) => self.display.note(&format!("[{}] {state}", name(i))),
            Event::Done(i, r) => {
                let gpus = self.running.remove(&i).unwrap_or_default();
                self.free_gpus.extend(gpus);
                let stage = self.dag.pipeline.stages[i].name.clone();
                match r {
                    Ok(f) => {
                        self.eta.update(i, 1.0);
                        self.display.finished(&stage, &f.outcome);
                        self.output_hash.insert(i, f.output_hash);
                        self.keys.insert(i, f.key);
                        self.outcome[i] = Some(f.outcome);
                    }
                    Err(mut message) => {
                        if let Some(advice) =
                            full_disk_advice(&message, &stage, self.disk_need[i], self.cache)
                        {
                            message = format!("{message}\n{advice}");
                        }
                        self.display.failed(&stage, &message);
                        self.outcome[i] = Some(Outcome::Failed { message });
                        if !self.opts.keep_going {
                            self.stop = true;
                        }
                    }
                }
            }
        }
    }
}

/// One stage: cached, adopted, or computed under its key's lock and committed.
#[allow(clippy::too_many_arguments)]
fn run_one(
    dag: &Dag,
    cache: &Cache,
    opts: &RunOptions,
    launchers: &Launchers,
    env: &BTreeMap<String, String>,
    i: usize,
    job: Job,
    tx: &mpsc::Sender<Event>,
) -> Result<Finished> {
    let s = &dag.pipeline.stages[i];
    // A fault the tests inject to check that a panicking worker fails its stage instead of
    // leaving the scheduler waiting forever.
    if std::env::var("RELORA_TEST_WORKER_PANIC").is_ok_and(|v| v == s.name) {
        panic!("injected by RELORA_TEST_WORKER_PANIC");
    }
    let key = job.comps.key();
    let finished = |m: Manifest, outcome: Outcome| -> Result<Finished> {
        cache.record_ref(&dag.pipeline.name, &s.name, &job.comps)?;
        Ok(Finished {
            key: key.clone(),
            output_hash: m.output_hash,
            outcome,
        })
    };
    if !job.force {
        if let Some(m) = cache.lookup(&key)? {
            return finished(m, Outcome::Cached);
        }
    }
    let lock = cache.lock(&key, |holder| {
        let _ = tx.send(Event::Waiting(i, holder));
    })?;
    if let Some(holder) = &lock.stale_holder {
        let _ = tx.send(Event::StaleLock(i, holder.clone()));
    }
    // Another process may have committed it while we waited for the lock.
    if !job.force {
        if let Some(m) = cache.lookup(&key)? {
            return finished(m, Outcome::Cached);
        }
        if opts.accept_code_change.contains(&s.kind) {
            if let Some((m, from)) = adopt(dag, cache, i, &job.comps)? {
                return finished(m, Outcome::Adopted { from });
            }
        }
    }
    verify_inputs(cache, &s.name, &job)?;
    let _ = tx.send(Event::Started(i));
    let launcher = launchers.for_kind(&s.kind);
    let m = compute(dag, cache, opts, launcher, env, i, &job, tx)?;
    let seconds = m.seconds;
    drop(lock);
    finished(m, Outcome::Computed { seconds })
}

/// Re-hashes the entries a stage is about to read against their manifests, each once per
/// run: a file changed on disk since it was committed (a flipped bit, a truncated copy, an
/// edit) is refused by the stage that would read it, with the entry and the file named,
/// rather than trained on. blake3 reads a 5 GB checkpoint in seconds (notes, session 10).
fn verify_inputs(cache: &Cache, stage: &str, job: &Job) -> Result<()> {
    let seen = |key: &String| {
        job.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    };
    for (input, from, key) in &job.sources {
        if seen(key) {
            continue;
        }
        if let Some(why) = cache.check(key)? {
            bail!(
                "stage `{stage}` cannot read its input `{input}`: the cache entry of stage \
                 `{from}` ({}) does not match its manifest ({why}). Run `relora-pipe verify \
                 --repair` to move it to the cache's quarantine; the next `run` computes it \
                 again",
                cache.entry_dir(key).display()
            );
        }
        job.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
    }
    Ok(())
}

/// Run stage `i` through the launcher into a fresh staging folder and commit it. Called
/// with the key's lock held.
#[allow(clippy::too_many_arguments)]
fn compute(
    dag: &Dag,
    cache: &Cache,
    opts: &RunOptions,
    launcher: &dyn Launcher,
    env: &BTreeMap<String, String>,
    i: usize,
    job: &Job,
    tx: &mpsc::Sender<Event>,
) -> Result<Manifest> {
    let s = &dag.pipeline.stages[i];
    let key = job.comps.key();
    let staging = cache.staging(&key)?;
    let scratch = cache.scratch(&key)?;
    let ctx = StageContext {
        stage: s.name.clone(),
        kind: s.kind.clone(),
        params: s.params.clone(),
        base_dir: std::fs::canonicalize(&s.base_dir).unwrap_or_else(|_| s.base_dir.clone()),
        input_stages: job
            .sources
            .iter()
            .map(|(name, stage, _)| (name.clone(), stage.clone()))
            .collect(),
        inputs: job
            .sources
            .iter()
            .map(|(name, _, key)| (name.clone(), cache.entry_dir(key).join("outputs")))
            .collect(),
        out_dir: staging.outputs(),
        scratch_dir: scratch.clone(),
        gpus: job.gpus.clone(),
        metrics: BTreeMap::new(),
    };
    let job_file = staging.dir.join("job.json");
    std::fs::write(&job_file, serde_json::to_vec_pretty(&ctx)?)?;
    let started_unix = now_unix();
    let log_path = staging.log_path();
    let out_dir = staging.outputs();
    let launch = Launch {
        stage: &s.name,
        exe: &opts.exe,
        job_file: &job_file,
        log_path: &log_path,
        out_dir: &out_dir,
        cache_root: cache.root(),
        resources: &job.resources,
        gpus: &job.gpus,
        threads: threads_per_stage(opts.jobs),
    };
    let result = launcher.launch(&launch, &mut |e| {
        let _ = tx.send(match e {
            LaunchEvent::Progress(p) => Event::Progress(i, p),
            LaunchEvent::State(note) => Event::Launch(i, note),
        });
    });
    if let Err(e) = result {
        let kept = scratch.join("last-failure.log");
        let _ = std::fs::copy(&log_path, &kept);
        // How it ended (exit code, signal) goes last, for `ui` and whoever reads the log.
        if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(&kept) {
            use std::io::Write;
            let _ = writeln!(f, "[relora-pipe] {e:#}");
        }
        let tail = log_tail(&log_path, 25);
        cache.discard(staging);
        bail!(
            "{e:#}\n--- last lines of the log (full log: {}) ---\n{tail}",
            kept.display()
        )
    }
    let metrics = std::fs::read(staging.dir.join("metrics.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    let _ = std::fs::remove_file(&job_file);
    let info = CommitInfo {
        stage: s.name.clone(),
        kind: s.kind.clone(),
        components: job.comps.clone(),
        started_unix,
        metrics,
        tool_version: TOOL_VERSION.to_string(),
        environment: stage_environment(env, &job.gpus, launcher.name()),
        adopted_from: None,
    };
    pause_point("commit", &s.name);
    Ok(cache.commit(staging, info, job.force)?)
}

/// A hook for fault tests, to act at an exact moment (fill the disk before a commit): with
/// `RELORA_PAUSE_AT=<point>:<stage>:<file>`, reaching `point` for `stage` creates `file`
/// and waits until it is removed (10 minutes at most). Unset, it costs one lookup.
fn pause_point(point: &str, stage: &str) {
    let Ok(spec) = std::env::var("RELORA_PAUSE_AT") else {
        return;
    };
    let mut parts = spec.splitn(3, ':');
    let (Some(p), Some(st), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    if p != point || st != stage || std::fs::write(file, b"").is_err() {
        return;
    }
    let start = std::time::Instant::now();
    while Path::new(file).exists() && start.elapsed().as_secs() < 600 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `--accept-code-change`: commit, under the new key, the outputs of an entry whose key
/// differs from it only in the code fingerprint (the last one this pipeline's stage used,
/// else any). Called with the key's lock held. Returns the new entry and the old key.
fn adopt(
    dag: &Dag,
    cache: &Cache,
    i: usize,
    comps: &KeyComponents,
) -> Result<Option<(Manifest, String)>> {
    let s = &dag.pipeline.stages[i];
    let wanted = components_without_code(comps);
    let recorded = cache.read_ref(&dag.pipeline.name, &s.name).map(|c| c.key());
    let Some(old) = cache.find(recorded.as_deref(), |m| {
        m.kind == s.kind && components_without_code(&m.components) == wanted
    })?
    else {
        return Ok(None);
    };
    let staging = cache.staging(&comps.key())?;
    cache.stage_copy_of(&old.key, &staging)?;
    let changes = explain_change(&old.components, comps).join("; ");
    let info = CommitInfo {
        stage: s.name.clone(),
        kind: s.kind.clone(),
        components: comps.clone(),
        started_unix: now_unix(),
        metrics: old.metrics.clone(),
        tool_version: TOOL_VERSION.to_string(),
        environment: old.environment.clone(),
        adopted_from: Some(Adoption {
            key: old.key.clone(),
            reason: format!("{changes}; accepted with --accept-code-change {}", s.kind),
        }),
    };
    Ok(Some((cache.commit(staging, info, false)?, old.key)))
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_recovered_for_the_report() {
        let p = std::panic::catch_unwind(|| panic!("index out of bounds: {}", 7)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "index out of bounds: 7");
        let p = std::panic::catch_unwind(|| panic!("plain")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "plain");
    }
}
