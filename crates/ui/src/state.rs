//! What the dashboard shows, read from the pipeline files and the cache, never written:
//! each stage's state (cached, stale, never run, running with its step, queued, failed with
//! its log's last lines), and a stage's details (parameters, key, inputs, outputs, log,
//! curves, a report's tables and figures).
//!
//! A running stage is one whose key's lock file names a live process on this host; its
//! progress is the last line of the `metrics.jsonl` it keeps in its scratch folder. A failed
//! stage left `last-failure.log` in its scratch folder.

use anyhow::{Context, Result};
use relora_cache::Cache;
use relora_exec::{plan, Dag, Registry, State};
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

/// Progress samples seen by earlier polls: the first (time, step) of each running key, for
/// a rate and an ETA without anything the stage must write.
#[derive(Default)]
pub struct Rates {
    first: Mutex<HashMap<String, (Instant, u64, u64)>>,
}

impl Rates {
    /// (tokens per second, seconds left) from the first sample of this key to now.
    fn update(&self, key: &str, step: u64, tokens: u64, total: u64) -> (Option<f64>, Option<f64>) {
        let mut m = self.first.lock().expect("not poisoned");
        let (t0, s0, k0) = *m
            .entry(key.to_string())
            .or_insert((Instant::now(), step, tokens));
        let dt = t0.elapsed().as_secs_f64();
        if dt < 0.5 || step <= s0 {
            return (None, None);
        }
        let rate = (tokens.saturating_sub(k0)) as f64 / dt;
        let eta = (total.saturating_sub(step)) as f64 * dt / (step - s0) as f64;
        (Some(rate), Some(eta))
    }
}

pub fn load(file: &Path, registry: &Registry) -> Result<Dag> {
    let pipeline = relora_spec::load(file, &[]).map_err(|e| anyhow::anyhow!("{e}"))?;
    Dag::build(pipeline, registry).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The last `n` lines of a text file.
pub fn tail(path: &Path, n: usize) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("@@relora-progress"))
        .collect();
    Some(lines[lines.len().saturating_sub(n)..].join("\n"))
}

fn last_line(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(text.lines().last()?).ok()
}

/// Every stage of the pipeline with its state, and the stages' templates.
pub fn snapshot(file: &Path, registry: &Registry, cache: &Cache, rates: &Rates) -> Result<Vec<u8>> {
    let dag = load(file, registry)?;
    let plans = plan(&dag, registry, cache).context("planning")?;
    let mut live: Vec<Option<&'static str>> = vec![None; plans.len()];
    let mut extra: Vec<Map<String, Value>> = vec![Map::new(); plans.len()];
    for (i, p) in plans.iter().enumerate() {
        let Some(key) = &p.key else { continue };
        if p.state == State::Cached {
            continue;
        }
        let scratch = cache.scratch_path(key);
        if cache.live_holder(key).is_some() {
            live[i] = Some("running");
            let s = &dag.pipeline.stages[i];
            if let Some(m) = last_line(&scratch.join("metrics.jsonl")) {
                let step = m["step"].as_u64().unwrap_or(0);
                let total = s.params["steps"].as_u64().unwrap_or(0);
                let tokens = m["tokens"].as_u64().unwrap_or(0);
                let (rate, eta) = rates.update(key, step, tokens, total);
                extra[i].insert(
                    "progress".into(),
                    json!({"step": step, "total": total, "loss": m["loss"],
                           "tokens_per_s": rate, "eta_s": eta}),
                );
            }
            let jobs = relora_exec::jobs_in(&cache.attempts(key));
            if !jobs.is_empty() {
                extra[i].insert("slurm".into(), json!(jobs));
            }
        } else if let Some(t) = tail(&scratch.join("last-failure.log"), 15) {
            live[i] = Some("failed");
            extra[i].insert("failure".into(), json!(t));
        }
    }
    let any_running = live.contains(&Some("running"));
    let stages: Vec<StageView> = plans
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let s = &dag.pipeline.stages[i];
            let state = match (live[i], p.state) {
                (Some(l), _) => l,
                (None, State::Cached) => "cached",
                (None, _) if any_running => "queued",
                (None, State::Stale) => "stale",
                (None, State::Run) => "never run",
            };
            StageView {
                name: &s.name,
                kind: &s.kind,
                template: &s.template,
                state,
                key: p.key.as_deref(),
                reasons: &p.reasons,
                choices: &p.choices,
                inputs: dag
                    .upstream(i)
                    .into_iter()
                    .map(|j| dag.pipeline.stages[j].name.as_str())
                    .collect(),
                extra: std::mem::take(&mut extra[i]),
            }
        })
        .collect();
    // Serialised from borrowed views: a 10,000-stage pipeline never becomes a JSON tree.
    Ok(serde_json::to_vec(&Snapshot {
        pipeline: &dag.pipeline.name,
        file: file.display().to_string(),
        stages,
    })?)
}

#[derive(serde::Serialize)]
struct Snapshot<'a> {
    pipeline: &'a str,
    file: String,
    stages: Vec<StageView<'a>>,
}

#[derive(serde::Serialize)]
struct StageView<'a> {
    name: &'a str,
    kind: &'a str,
    template: &'a str,
    state: &'static str,
    key: Option<&'a str>,
    reasons: &'a [String],
    choices: &'a [String],
    inputs: std::collections::BTreeSet<&'a str>,
    /// progress, slurm, failure: only where there is one.
    #[serde(flatten)]
    extra: Map<String, Value>,
}

/// Where a stage's files are now: its entry when cached, else its newest attempt.
fn places(cache: &Cache, key: &str, cached: bool) -> (PathBuf, Option<PathBuf>) {
    let scratch = cache.scratch_path(key);
    if cached {
        (cache.entry_dir(key), Some(scratch))
    } else {
        let attempt = cache.attempts(key).into_iter().next_back();
        (attempt.unwrap_or_else(|| scratch.clone()), Some(scratch))
    }
}

/// One stage's page: parameters, key, inputs, outputs with sizes, log, curves, tables.
pub fn stage(file: &Path, name: &str, registry: &Registry, cache: &Cache) -> Result<Option<Value>> {
    let dag = load(file, registry)?;
    let Some(i) = dag.index_of(name) else {
        return Ok(None);
    };
    let plans = plan(&dag, registry, cache)?;
    let p = &plans[i];
    let s = &dag.pipeline.stages[i];
    let mut v = json!({
        "name": s.name, "kind": s.kind, "template": s.template, "params": s.params,
        "matrix": s.matrix, "inputs": s.inputs, "key": p.key,
        "state": match p.state { State::Cached => "cached", State::Stale => "stale", State::Run => "run" },
        "reasons": p.reasons, "choices": p.choices,
    });
    let Some(key) = &p.key else {
        return Ok(Some(v));
    };
    let cached = p.state == State::Cached;
    let (dir, scratch) = places(cache, key, cached);
    let o = v.as_object_mut().expect("an object");
    if cached {
        let m = cache.lookup(key)?.context("cached")?;
        o.insert("manifest_metrics".into(), m.metrics.clone());
        o.insert("seconds".into(), json!(m.seconds));
        o.insert(
            "outputs".into(),
            json!(m
                .outputs
                .iter()
                .map(|f| json!({"path": f.path, "size": f.size}))
                .collect::<Vec<_>>()),
        );
    }
    let log = if cached || dir.join("log.txt").exists() {
        tail(&dir.join("log.txt"), 40)
    } else {
        scratch
            .as_ref()
            .and_then(|s| tail(&s.join("last-failure.log"), 40))
    };
    o.insert("log".into(), json!(log));
    let metrics = if cached {
        dir.join("outputs/metrics.jsonl")
    } else {
        scratch.clone().unwrap_or_default().join("metrics.jsonl")
    };
    if let Ok(text) = std::fs::read_to_string(&metrics) {
        let mut series: BTreeMap<&str, Vec<[f64; 2]>> = BTreeMap::new();
        let rows: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        for r in &rows {
            let Some(step) = r["step"].as_f64() else {
                continue;
            };
            for k in ["loss", "lr", "grad_norm", "eval_loss", "perplexity"] {
                if let Some(y) = r[k].as_f64() {
                    series.entry(k).or_default().push([step, y]);
                }
            }
        }
        o.insert("curves".into(), json!(series));
        o.insert("metrics_lines".into(), json!(rows.len()));
    }
    if cached {
        let out = dir.join("outputs");
        for md in ["table.md"] {
            if let Ok(t) = std::fs::read_to_string(out.join(md)) {
                o.insert("table".into(), json!(t));
            }
        }
        let figures: Vec<String> = std::fs::read_dir(&out)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".svg"))
            .collect();
        o.insert("figures".into(), json!(figures));
    }
    Ok(Some(v))
}

/// A file of a cached stage's outputs, if `rel` is a plain relative path that stays inside
/// them (no `..`, no absolute path, no link out).
pub fn output_file(
    file: &Path,
    name: &str,
    rel: &str,
    registry: &Registry,
    cache: &Cache,
) -> Result<Option<PathBuf>> {
    let plain = !rel.is_empty()
        && !rel.starts_with('/')
        && !rel.contains('\\')
        && !rel.contains('\0')
        && Path::new(rel)
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !plain {
        return Ok(None);
    }
    let dag = load(file, registry)?;
    let Some(i) = dag.index_of(name) else {
        return Ok(None);
    };
    let plans = plan(&dag, registry, cache)?;
    let (Some(key), State::Cached) = (&plans[i].key, plans[i].state) else {
        return Ok(None);
    };
    let root = match cache.entry_dir(key).join("outputs").canonicalize() {
        Ok(r) => r,
        Err(_) => return Ok(None),
    };
    match root.join(rel).canonicalize() {
        Ok(p) if p.starts_with(&root) && p.is_file() => Ok(Some(p)),
        _ => Ok(None),
    }
}

/// Stages side by side: relora-pipe's `compare`, plus each train stage's loss curve.
pub fn compare(file: &Path, names: &[String], registry: &Registry, cache: &Cache) -> Result<Value> {
    let dag = load(file, registry)?;
    let plans = plan(&dag, registry, cache)?;
    let mut idx = Vec::new();
    for n in names {
        match dag.index_of(n) {
            Some(i) => idx.push(i),
            None => anyhow::bail!("no stage `{n}`"),
        }
    }
    let (table, outputs) = relora_stages::compare::compare_planned(&dag, &plans, cache, &idx);
    let curves: Vec<Value> = idx
        .iter()
        .zip(&outputs)
        .map(|(&i, out)| {
            let pts: Vec<[f64; 2]> = out
                .as_ref()
                .and_then(|o| std::fs::read_to_string(o.join("metrics.jsonl")).ok())
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|r| Some([r["tokens"].as_f64()?, r["loss"].as_f64()?]))
                .collect();
            json!({"name": dag.pipeline.stages[i].name, "points": pts})
        })
        .collect();
    Ok(json!({"table": table, "curves": curves}))
}
