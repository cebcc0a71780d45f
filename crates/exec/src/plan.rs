//! Keys and plans: what each stage's key is made of, and why a stage must run.

use crate::{Dag, Registry};
use anyhow::{Context, Result};
use relora_cache::{Cache, KeyComponents};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// What the executor would do with a stage now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Its entry exists: nothing to do.
    Cached,
    /// It was computed before, but its key has changed since.
    Stale,
    /// It has never been computed, or waits on a stage that must run first.
    Run,
}

#[derive(Debug, Clone, Serialize)]
pub struct StagePlan {
    pub name: String,
    pub kind: String,
    /// None while an upstream stage has yet to run (its output hash is unknown).
    pub key: Option<String>,
    pub state: State,
    pub reasons: Vec<String>,
}

/// Parameters with cosmetic keys removed, as canonical JSON (serde_json sorts map keys).
pub fn key_params(params: &Value, cosmetic: &[&str]) -> String {
    let mut p = params.clone();
    if let Value::Object(m) = &mut p {
        for c in cosmetic {
            m.remove(*c);
        }
    }
    p.to_string()
}

/// The key components of stage `i`, given its upstream stages' output hashes.
pub fn components(
    dag: &Dag,
    registry: &Registry,
    i: usize,
    output_hash: &BTreeMap<usize, String>,
) -> Result<Option<KeyComponents>> {
    let s = &dag.pipeline.stages[i];
    let kind = registry
        .get(&s.kind)
        .with_context(|| format!("unknown kind `{}`", s.kind))?;
    let mut c = KeyComponents::default();
    c.insert("kind", format!("{}@{}", kind.name(), kind.version()));
    c.insert("params", key_params(&s.params, kind.cosmetic_params()));
    for (input, target) in &s.inputs {
        let j = dag
            .index_of(target)
            .context("input names a missing stage")?;
        let Some(h) = output_hash.get(&j) else {
            return Ok(None);
        };
        c.insert(format!("input.{input}"), h.clone());
    }
    for (label, path) in kind.external_files(s)? {
        let h = relora_cache::hash_file(&path).with_context(|| {
            format!(
                "stage `{}` reads {} ({label}), which cannot be read",
                s.name,
                path.display()
            )
        })?;
        c.insert(format!("file.{label}"), h);
    }
    Ok(Some(c))
}

/// Human-readable differences between the recorded and the current key components.
pub fn explain_change(old: &KeyComponents, new: &KeyComponents) -> Vec<String> {
    let mut reasons = Vec::new();
    for (name, value) in &new.0 {
        match old.0.get(name) {
            None => reasons.push(format!("{name} is new")),
            Some(v) if v == value => {}
            Some(v) if name == "params" => reasons.extend(param_changes(v, value)),
            Some(v) if name == "kind" => reasons.push(format!("kind changed: {v} -> {value}")),
            Some(_) if name.starts_with("input.") => reasons.push(format!(
                "{} changed (upstream output differs)",
                name.replace("input.", "input `") + "`"
            )),
            Some(_) => reasons.push(format!("{name} changed (content differs)")),
        }
    }
    for name in old.0.keys() {
        if !new.0.contains_key(name) {
            reasons.push(format!("{name} was removed"));
        }
    }
    reasons
}

fn param_changes(old: &str, new: &str) -> Vec<String> {
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) = (
        serde_json::from_str::<Value>(old),
        serde_json::from_str::<Value>(new),
    ) else {
        return vec!["params changed".into()];
    };
    let mut out = Vec::new();
    for (k, v) in &b {
        match a.get(k) {
            None => out.push(format!("param `{k}` added ({v})")),
            Some(w) if w != v => out.push(format!("param `{k}` changed: {w} -> {v}")),
            _ => {}
        }
    }
    for k in a.keys() {
        if !b.contains_key(k) {
            out.push(format!("param `{k}` removed"));
        }
    }
    out
}

/// What would run now, and why, without running anything.
pub fn plan(dag: &Dag, registry: &Registry, cache: &Cache) -> Result<Vec<StagePlan>> {
    let mut output_hash: BTreeMap<usize, String> = BTreeMap::new();
    let mut plans: BTreeMap<usize, StagePlan> = BTreeMap::new();
    for &i in &dag.order {
        let s = &dag.pipeline.stages[i];
        let waiting: Vec<String> = dag
            .upstream(i)
            .into_iter()
            .filter(|j| !output_hash.contains_key(j))
            .map(|j| dag.pipeline.stages[j].name.clone())
            .collect();
        let comps = components(dag, registry, i, &output_hash)?;
        let recorded = cache.read_ref(&dag.pipeline.name, &s.name);
        let plan = match comps {
            None => StagePlan {
                name: s.name.clone(),
                kind: s.kind.clone(),
                key: None,
                state: if recorded.is_some() {
                    State::Stale
                } else {
                    State::Run
                },
                reasons: waiting
                    .iter()
                    .map(|w| format!("upstream `{w}` must run first"))
                    .collect(),
            },
            Some(c) => {
                let key = c.key();
                let (state, reasons) = match cache.lookup(&key)? {
                    Some(m) => {
                        output_hash.insert(i, m.output_hash);
                        (State::Cached, Vec::new())
                    }
                    None => match &recorded {
                        Some(old) if old.key() != key => {
                            let mut r = explain_change(old, &c);
                            if r.is_empty() {
                                r.push("key changed".into());
                            }
                            (State::Stale, r)
                        }
                        Some(_) => (State::Run, vec!["its cache entry was removed".into()]),
                        None => (State::Run, vec!["never run".into()]),
                    },
                };
                StagePlan {
                    name: s.name.clone(),
                    kind: s.kind.clone(),
                    key: Some(key),
                    state,
                    reasons,
                }
            }
        };
        plans.insert(i, plan);
    }
    Ok((0..dag.pipeline.stages.len())
        .filter_map(|i| plans.remove(&i))
        .collect())
}
