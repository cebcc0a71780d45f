//! `relora-pipe compare FILE STAGE...`: runs side by side, as `dvc exp show` shows
//! experiments: the parameters (and inputs) that differ between the stages, then each one's
//! final metrics, read from its cached outputs (a train stage's last loss, last evaluation
//! and tokens; an eval stage's loss and perplexity).

use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// One stage to compare: its name, resolved parameters, inputs and, if cached, its outputs.
pub struct Run<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub params: &'a Value,
    pub inputs: &'a BTreeMap<String, String>,
    pub outputs: Option<&'a Path>,
}

/// Stages `picked` of a planned pipeline side by side, reading the outputs of those cached;
/// with each one's outputs folder (None when not cached), for callers that read more.
pub fn compare_planned(
    dag: &relora_exec::Dag,
    plans: &[relora_exec::StagePlan],
    cache: &relora_cache::Cache,
    picked: &[usize],
) -> (Comparison, Vec<Option<std::path::PathBuf>>) {
    let dirs: Vec<Option<std::path::PathBuf>> = picked
        .iter()
        .map(|&i| match (&plans[i].state, &plans[i].key) {
            (relora_exec::State::Cached, Some(k)) => Some(cache.entry_dir(k).join("outputs")),
            _ => None,
        })
        .collect();
    let runs: Vec<Run> = picked
        .iter()
        .zip(&dirs)
        .map(|(&i, d)| {
            let s = &dag.pipeline.stages[i];
            Run {
                name: &s.name,
                kind: &s.kind,
                params: &s.params,
                inputs: &s.inputs,
                outputs: d.as_deref(),
            }
        })
        .collect();
    (compare(&runs), dirs)
}

/// The comparison: a column per stage.
#[derive(Debug, Serialize, PartialEq)]
pub struct Comparison {
    pub stages: Vec<String>,
    /// Whether each stage's entry is cached (its metrics can be read).
    pub cached: Vec<bool>,
    /// Parameter paths (`lr`, `lora.rank`, `inputs.init`) whose values differ, and each
    /// stage's value (None: not set).
    pub differs: Vec<(String, Vec<Option<Value>>)>,
    /// Metric name and each stage's value (None: not cached, or not reported by its kind).
    pub metrics: Vec<(String, Vec<Option<f64>>)>,
}

/// Leaves of a JSON value as `a.b.c` → value (arrays kept whole).
fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&p, x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

/// The final metrics a stage's outputs hold.
fn metrics(kind: &str, dir: &Path) -> BTreeMap<&'static str, f64> {
    let mut m = BTreeMap::new();
    match kind {
        "train" => {
            let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap_or_default();
            let rows: Vec<Value> = text
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if let Some(last) = rows.last() {
                for (name, key) in [
                    ("final train loss", "loss"),
                    ("steps", "step"),
                    ("tokens", "tokens"),
                ] {
                    if let Some(x) = last.get(key).and_then(Value::as_f64) {
                        m.insert(name, x);
                    }
                }
            }
            if let Some(e) = rows
                .iter()
                .rev()
                .find_map(|r| r.get("eval_loss").and_then(Value::as_f64))
            {
                m.insert("last eval loss", e);
                m.insert("last eval perplexity", e.exp());
            }
        }
        "eval" => {
            let v: Value = std::fs::read(dir.join("eval.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            for (name, key) in [
                ("eval loss", "loss"),
                ("perplexity", "perplexity"),
                ("eval tokens", "tokens"),
            ] {
                if let Some(x) = v.get(key).and_then(Value::as_f64) {
                    m.insert(name, x);
                }
            }
        }
        _ => {}
    }
    m
}

/// Compare `runs`, in the order given.
pub fn compare(runs: &[Run]) -> Comparison {
    let flat: Vec<BTreeMap<String, Value>> = runs
        .iter()
        .map(|r| {
            let mut f = BTreeMap::new();
            flatten("", r.params, &mut f);
            for (name, target) in r.inputs {
                f.insert(format!("inputs.{name}"), Value::String(target.clone()));
            }
            if runs.iter().any(|o| o.kind != r.kind) {
                f.insert("kind".into(), Value::String(r.kind.to_string()));
            }
            f
        })
        .collect();
    let keys: BTreeSet<&String> = flat.iter().flat_map(|f| f.keys()).collect();
    let differs = keys
        .into_iter()
        .filter_map(|k| {
            let vals: Vec<Option<Value>> = flat.iter().map(|f| f.get(k).cloned()).collect();
            vals.iter()
                .any(|v| v != &vals[0])
                .then(|| (k.clone(), vals))
        })
        .collect();
    let per_run: Vec<BTreeMap<&'static str, f64>> = runs
        .iter()
        .map(|r| r.outputs.map(|d| metrics(r.kind, d)).unwrap_or_default())
        .collect();
    let mut names: Vec<&'static str> = Vec::new();
    for m in &per_run {
        for k in m.keys() {
            if !names.contains(k) {
                names.push(k);
            }
        }
    }
    let metrics = names
        .into_iter()
        .map(|n| {
            (
                n.to_string(),
                per_run.iter().map(|m| m.get(n).copied()).collect(),
            )
        })
        .collect();
    Comparison {
        stages: runs.iter().map(|r| r.name.to_string()).collect(),
        cached: runs.iter().map(|r| r.outputs.is_some()).collect(),
        differs,
        metrics,
    }
}

fn number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.0}")
    } else if x.abs() >= 100.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

fn value(v: &Option<Value>) -> String {
    match v {
        None => "–".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

impl Comparison {
    /// A text table: a row per differing parameter, then a row per metric.
    pub fn table(&self) -> String {
        let mut rows: Vec<Vec<String>> = vec![std::iter::once(String::new())
            .chain(self.stages.iter().cloned())
            .collect()];
        for (k, vals) in &self.differs {
            rows.push(
                std::iter::once(k.clone())
                    .chain(vals.iter().map(value))
                    .collect(),
            );
        }
        let split = rows.len();
        for (k, vals) in &self.metrics {
            rows.push(
                std::iter::once(k.clone())
                    .chain(vals.iter().zip(&self.cached).map(|(v, cached)| match v {
                        Some(x) => number(*x),
                        None if *cached => "–".into(),
                        None => "not run".into(),
                    }))
                    .collect(),
            );
        }
        let widths: Vec<usize> = (0..rows[0].len())
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for (i, r) in rows.iter().enumerate() {
            if i == 1 || (i == split && split > 1) {
                let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
                out.push_str(rule.join("  ").trim_end());
                out.push('\n');
            }
            let cells: Vec<String> = r
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (s, w))| {
                    if c == 0 {
                        format!("{s:<w$}")
                    } else {
                        format!("{s:>w$}")
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
        if self.differs.is_empty() {
            out.push_str("(no parameter differs)\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_what_differs_is_listed_and_metrics_come_from_the_outputs() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"step\": 1, \"loss\": 6.0, \"tokens\": 64}\n{\"step\": 2, \"loss\": 5.5, \"tokens\": 128, \"eval_loss\": 5.0}\n",
        )
        .unwrap();
        let (a, b) = (
            json!({"method": "relora", "lr": 0.001, "lora": {"rank": 4, "alpha": 8}}),
            json!({"method": "relora", "lr": 0.002, "lora": {"rank": 4, "alpha": 8}}),
        );
        let inputs = BTreeMap::from([("data".to_string(), "tokens".to_string())]);
        let c = compare(&[
            Run {
                name: "x",
                kind: "train",
                params: &a,
                inputs: &inputs,
                outputs: Some(dir.path()),
            },
            Run {
                name: "y",
                kind: "train",
                params: &b,
                inputs: &inputs,
                outputs: None,
            },
        ]);
        assert_eq!(
            c.differs,
            vec![("lr".into(), vec![Some(json!(0.001)), Some(json!(0.002))])]
        );
        let m: BTreeMap<_, _> = c.metrics.iter().cloned().collect();
        assert_eq!(m["final train loss"], vec![Some(5.5), None]);
        assert_eq!(m["last eval perplexity"], vec![Some(5f64.exp()), None]);
        let t = c.table();
        assert!(
            t.contains("lr ") && t.contains("0.001") && t.contains("not run"),
            "{t}"
        );
    }
}
