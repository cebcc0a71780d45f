//! Keys and plans: what each stage's key is made of, and why a stage must run.

use crate::choice::resolve_inputs;
use crate::kind::{Estimate, InputEstimate};
use crate::{Dag, Registry};
use anyhow::{Context, Result};
use relora_cache::{Cache, KeyComponents};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

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
    /// Inputs another stage chooses: what was chosen, or who will choose.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub choices: Vec<String>,
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

/// The key components of stage `i`, given its upstream stages' output hashes, and
/// `outputs_of(j)`, the outputs folder of a finished stage (to read what a decider chose).
pub fn components(
    dag: &Dag,
    registry: &Registry,
    i: usize,
    output_hash: &BTreeMap<usize, String>,
    outputs_of: &dyn Fn(usize) -> Option<PathBuf>,
) -> Result<Option<KeyComponents>> {
    let s = &dag.pipeline.stages[i];
    let kind = registry
        .get(&s.kind)
        .with_context(|| format!("unknown kind `{}`", s.kind))?;
    let mut c = KeyComponents::default();
    c.insert("kind", kind.name());
    c.insert("params", key_params(&s.params, kind.cosmetic_params()));
    let salt = code_salt(kind.name());
    for (part, fingerprint) in kind.code() {
        let value = match &salt {
            Some(text) if is_own_module(kind.name(), part) => {
                blake3::hash(format!("{fingerprint}+{text}").as_bytes()).to_hex()[..16].to_string()
            }
            _ => fingerprint.to_string(),
        };
        c.insert(format!("{CODE_PREFIX}{part}"), value);
    }
    let Some(resolved) = resolve_inputs(dag, i, outputs_of)? else {
        return Ok(None);
    };
    for (input, r) in &resolved {
        let Some(h) = output_hash.get(&r.stage) else {
            return Ok(None);
        };
        c.insert(format!("input.{input}"), h.clone());
        // The chosen stage's identity, besides its outputs: a new winner is named as such.
        if let Some(chosen) = &r.chosen {
            c.insert(format!("choice.{input}"), chosen.clone());
        }
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

/// Key components named `code.<part>` hold the fingerprint of one part of a kind's code.
const CODE_PREFIX: &str = "code.";

/// The env var that stands in for a code edit in tests: `KIND=TEXT[,KIND=TEXT]` mixes TEXT
/// into the fingerprint of KIND's own module. It can only make keys differ from the real
/// code's, never match an older fingerprint, so it is no way around the check.
const CODE_SALT_VAR: &str = "RELORA_CODE_SALT";

fn code_salt(kind: &str) -> Option<String> {
    let v = std::env::var(CODE_SALT_VAR).ok()?;
    v.split(',').find_map(|pair| {
        let (k, text) = pair.split_once('=')?;
        (k.trim() == kind).then(|| text.to_string())
    })
}

/// A kind's own module: `crates/stages/src/<kind>.rs`, or the folder `…/src/<kind>`.
fn is_own_module(kind: &str, part: &str) -> bool {
    part.ends_with(&format!("/{kind}.rs")) || part.ends_with(&format!("/src/{kind}"))
}

/// A line for the user when the code-salt test hook is set, so it is never silent.
pub fn code_salt_note() -> Option<String> {
    std::env::var(CODE_SALT_VAR).ok().map(|v| {
        format!("note: {CODE_SALT_VAR}={v} is set: keys of those kinds differ from the code's own")
    })
}

/// The components without the code fingerprints: equal for two entries that differ only in
/// the code that made them.
pub fn components_without_code(c: &KeyComponents) -> KeyComponents {
    KeyComponents(
        c.0.iter()
            .filter(|(k, _)| !k.starts_with(CODE_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// `code of kind train changed (crates/model)`, one line per kind, parts in order.
fn code_changes(old: &KeyComponents, new: &KeyComponents) -> Option<String> {
    let mut parts = Vec::new();
    for (name, value) in &new.0 {
        let Some(part) = name.strip_prefix(CODE_PREFIX) else {
            continue;
        };
        match old.0.get(name) {
            Some(v) if v == value => {}
            Some(v) if part == "dependencies" => parts.push(dependency_change(v, value)),
            _ => parts.push(part.to_string()),
        }
    }
    for name in old.0.keys() {
        if let Some(part) = name.strip_prefix(CODE_PREFIX) {
            if !new.0.contains_key(name) {
                parts.push(format!("{part} no longer used"));
            }
        }
    }
    let kind = new.0.get("kind").map(String::as_str).unwrap_or("?");
    (!parts.is_empty()).then(|| format!("code of kind {kind} changed ({})", parts.join(", ")))
}

/// `dependencies: candle-core 0.11.1 -> 0.12.0`.
fn dependency_change(old: &str, new: &str) -> String {
    let old: BTreeMap<&str, &str> = old.split(", ").filter_map(|d| d.split_once(' ')).collect();
    let moved: Vec<String> = new
        .split(", ")
        .filter_map(|d| d.split_once(' '))
        .filter(|(n, v)| old.get(n) != Some(v))
        .map(|(n, v)| format!("{n} {} -> {v}", old.get(n).unwrap_or(&"absent")))
        .collect();
    format!("dependencies: {}", moved.join(", "))
}

/// Human-readable differences between the recorded and the current key components.
pub fn explain_change(old: &KeyComponents, new: &KeyComponents) -> Vec<String> {
    let mut reasons: Vec<String> = code_changes(old, new).into_iter().collect();
    for (name, value) in &new.0 {
        match old.0.get(name) {
            _ if name.starts_with(CODE_PREFIX) => {}
            None => reasons.push(format!("{name} is new")),
            Some(v) if v == value => {}
            Some(v) if name == "params" => reasons.extend(param_changes(v, value)),
            Some(v) if name == "kind" => reasons.push(format!("kind changed: {v} -> {value}")),
            Some(v) if name.starts_with("choice.") => reasons.push(format!(
                "input `{}` chosen anew: {v} -> {value}",
                &name["choice.".len()..]
            )),
            Some(_) if name.starts_with("input.") => reasons.push(format!(
                "{} changed (upstream output differs)",
                name.replace("input.", "input `") + "`"
            )),
            Some(_) => reasons.push(format!("{name} changed (content differs)")),
        }
    }
    for name in old.0.keys() {
        if !new.0.contains_key(name) && !name.starts_with(CODE_PREFIX) {
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
    let mut cached_keys: BTreeMap<usize, String> = BTreeMap::new();
    let mut plans: BTreeMap<usize, StagePlan> = BTreeMap::new();
    for &i in &dag.order {
        let s = &dag.pipeline.stages[i];
        let waiting: Vec<String> = dag
            .upstream(i)
            .into_iter()
            .filter(|j| !output_hash.contains_key(j))
            .map(|j| dag.pipeline.stages[j].name.clone())
            .collect();
        let outputs_of = |j: usize| {
            cached_keys
                .get(&j)
                .map(|k| cache.entry_dir(k).join("outputs"))
        };
        let comps = components(dag, registry, i, &output_hash, &outputs_of)?;
        let choices = choice_notes(dag, i, &outputs_of)?;
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
                choices,
            },
            Some(c) => {
                let key = c.key();
                let (state, reasons) = match cache.lookup(&key)? {
                    Some(m) => {
                        output_hash.insert(i, m.output_hash);
                        cached_keys.insert(i, key.clone());
                        (State::Cached, Vec::new())
                    }
                    None => match &recorded {
                        Some(old) if old.key() != key => {
                            let mut r = explain_change(old, &c);
                            if r.is_empty() {
                                r.push("key changed".into());
                            }
                            let only_code =
                                components_without_code(old) == components_without_code(&c);
                            if only_code && cache.lookup(&old.key()).ok().flatten().is_some() {
                                r.push(format!(
                                    "if the change cannot alter its outputs: run with \
                                     --accept-code-change {} to reuse the old entry",
                                    s.kind
                                ));
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
                    choices,
                }
            }
        };
        plans.insert(i, plan);
    }
    Ok((0..dag.pipeline.stages.len())
        .filter_map(|i| plans.remove(&i))
        .collect())
}

/// For `plan`: each chosen input of stage `i` (what was chosen, or who will choose among
/// how many), and for a decider, the stages whose inputs it chooses.
fn choice_notes(
    dag: &Dag,
    i: usize,
    outputs_of: &dyn Fn(usize) -> Option<PathBuf>,
) -> Result<Vec<String>> {
    let s = &dag.pipeline.stages[i];
    let mut notes = Vec::new();
    if !s.choices.is_empty() {
        let resolved = resolve_inputs(dag, i, outputs_of)?;
        for (input, c) in &s.choices {
            notes.push(match resolved.as_ref().and_then(|r| r.get(input)) {
                Some(r) => format!(
                    "input `{input}` is `{}`: `{}` chose {}",
                    dag.pipeline.stages[r.stage].name,
                    c.decider,
                    r.chosen.as_deref().unwrap_or("?")
                ),
                None => format!(
                    "input `{input}` is one of {} stages, chosen by `{}` when it has run",
                    c.candidates.len(),
                    c.decider
                ),
            });
        }
    }
    let consumers: Vec<&str> = dag
        .pipeline
        .stages
        .iter()
        .filter(|x| x.choices.values().any(|c| c.decider == s.name))
        .map(|x| x.name.as_str())
        .collect();
    if !consumers.is_empty() {
        let shown = consumers
            .iter()
            .take(6)
            .copied()
            .collect::<Vec<_>>()
            .join(", ");
        let more = consumers.len().saturating_sub(6);
        notes.push(format!(
            "chooses inputs of {} stage(s): {shown}{}",
            consumers.len(),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }
    Ok(notes)
}

/// Each stage's estimate (`plan --estimate`), in stage order: every stage sees its inputs'
/// estimated facts, and the outputs of those already cached.
pub fn estimates(
    dag: &Dag,
    registry: &Registry,
    cache: &Cache,
    plans: &[StagePlan],
) -> Result<Vec<Estimate>> {
    let cached_outputs = |j: usize| match (&plans[j].state, &plans[j].key) {
        (State::Cached, Some(key)) => Some(cache.entry_dir(key).join("outputs")),
        _ => None,
    };
    let mut done: BTreeMap<usize, Estimate> = BTreeMap::new();
    for &i in &dag.order {
        let s = &dag.pipeline.stages[i];
        let kind = registry
            .get(&s.kind)
            .with_context(|| format!("unknown kind `{}`", s.kind))?;
        let mut inputs = BTreeMap::new();
        for (name, target) in &s.inputs {
            let mut j = dag
                .index_of(target)
                .context("input names a missing stage")?;
            // A chosen input: the stage chosen if known, else its first candidate (the
            // candidates of a sweep differ in values such as a learning rate, not in size).
            if let Some(c) = s.choices.get(name) {
                let outputs_of = |k: usize| cached_outputs(k);
                j = match resolve_inputs(dag, i, &outputs_of)? {
                    Some(r) => r[name].stage,
                    None => dag.index_of(&c.candidates[0]).context("a candidate")?,
                };
            }
            let facts = done.get(&j).map(|e| e.facts.clone()).unwrap_or_default();
            let outputs = cached_outputs(j);
            inputs.insert(name.clone(), InputEstimate { facts, outputs });
        }
        let e = kind
            .estimate(s, &inputs, cached_outputs(i).as_deref())
            .with_context(|| format!("estimating stage `{}`", s.name))?;
        done.insert(i, e);
    }
    Ok((0..dag.pipeline.stages.len())
        .map(|i| done.remove(&i).unwrap_or_default())
        .collect())
}
