//! What an input may name besides one stage:
//! - a matrix template (`runs: eval-valid`): every expansion of it, each an input of its own
//!   named after its matrix values (`runs[lr=0.003,seed=0]`), so that a stage such as
//!   `select` can group them without being told their names;
//! - a choice (`model: "train-lr${choose.lr}"`): the stage that another stage, the decider,
//!   picks when it has run. The executor resolves it then, and only the chosen stage's
//!   outputs enter the consumer's key: the same choice re-runs nothing downstream.

use crate::{did_you_mean, scalar_text, Pipeline, SpecErrors, StageSpec};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};

/// An input whose stage a decider picks when it has run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The stage whose outputs say what was chosen.
    pub decider: String,
    /// The decider's variable that completes the name (`lr` in `${choose.lr}`).
    pub variable: String,
    /// The input's target as written, with `${decider.variable}` left in it.
    pub pattern: String,
    /// Every stage the pattern can name, in pipeline order.
    pub candidates: Vec<String>,
}

impl Choice {
    fn placeholder(&self) -> String {
        format!("${{{}.{}}}", self.decider, self.variable)
    }

    /// The stage named when the decider chose `value`.
    pub fn stage_for(&self, value: &str) -> String {
        self.pattern.replace(&self.placeholder(), value)
    }

    fn matches(&self, name: &str) -> bool {
        let (prefix, suffix) = self
            .pattern
            .split_once(&self.placeholder())
            .expect("the pattern holds its placeholder");
        name.len() > prefix.len() + suffix.len()
            && name.starts_with(prefix)
            && name.ends_with(suffix)
    }
}

/// `${DECIDER.VAR}` in an input's target (after the stage's own matrix variables are
/// filled in): `Some((decider, var))`, or an error when there is more than one.
pub(crate) fn parse_choice(target: &str) -> Result<Option<(String, String)>, String> {
    let mut found = None;
    let mut rest = target;
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let j = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{target}`"))?;
        let (decider, var) = after[..j].rsplit_once('.').ok_or_else(|| {
            format!(
                "`${{{}}}` in `{target}` is neither a matrix variable nor a choice",
                &after[..j]
            )
        })?;
        if found.is_some() {
            return Err(format!(
                "`{target}` holds two choices; an input can depend on one decider's choice"
            ));
        }
        found = Some((decider.to_string(), var.to_string()));
        rest = &after[j + 1..];
    }
    Ok(found)
}

/// The name of the input that receives one expansion of a template: `runs[lr=0.003,seed=0]`.
pub fn expansion_input(input: &str, matrix: &BTreeMap<String, Value>) -> String {
    let vars: Vec<String> = matrix
        .iter()
        .map(|(k, v)| format!("{k}={}", scalar_text(v)))
        .collect();
    format!("{input}[{}]", vars.join(","))
}

/// The input name and matrix values of `runs[lr=0.003,seed=0]`; None for a plain input.
pub fn parse_expansion_input(name: &str) -> Option<(&str, BTreeMap<String, String>)> {
    let (input, rest) = name.split_once('[')?;
    let vars = rest.strip_suffix(']')?;
    let mut out = BTreeMap::new();
    for pair in vars.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=')?;
        out.insert(k.to_string(), v.to_string());
    }
    Some((input, out))
}

/// One expansion of a template: its stage name and matrix values.
type Expansion<'a> = (&'a str, &'a BTreeMap<String, Value>);
/// Owned expansions of each swept template.
type Swept = BTreeMap<String, Vec<(String, BTreeMap<String, Value>)>>;

/// Expansions of each swept template: template → (stage name, matrix values).
fn templates(stages: &[StageSpec]) -> BTreeMap<&str, Vec<Expansion<'_>>> {
    let mut t: BTreeMap<&str, Vec<_>> = BTreeMap::new();
    for s in stages.iter().filter(|s| !s.matrix.is_empty()) {
        t.entry(s.template.as_str())
            .or_default()
            .push((s.name.as_str(), &s.matrix));
    }
    t
}

/// Every stage a stage reads from, with templates and choices expanded (for imports, before
/// the references are resolved).
pub(crate) fn targets(p: &Pipeline, s: &StageSpec) -> Vec<String> {
    let t = templates(&p.stages);
    let mut out = Vec::new();
    for (input, target) in &s.inputs {
        if let Some(c) = s.choices.get(input) {
            out.push(target.clone());
            out.extend(
                p.stages
                    .iter()
                    .filter(|x| c.matches(&x.name))
                    .map(|x| x.name.clone()),
            );
        } else if p.stage(target).is_none() && t.contains_key(target.as_str()) {
            out.extend(t[target.as_str()].iter().map(|(n, _)| n.to_string()));
        } else {
            out.push(target.clone());
        }
    }
    out
}

/// Expand template inputs, find every choice's candidates, and reject inputs that name
/// nothing; all problems at once.
pub(crate) fn resolve(p: &mut Pipeline) -> Result<(), SpecErrors> {
    let names: HashSet<String> = p.stages.iter().map(|s| s.name.clone()).collect();
    let swept: Swept = templates(&p.stages)
        .into_iter()
        .map(|(k, v)| {
            let v = v
                .into_iter()
                .map(|(n, m)| (n.to_string(), m.clone()))
                .collect();
            (k.to_string(), v)
        })
        .collect();
    let order: Vec<String> = p.stages.iter().map(|s| s.name.clone()).collect();
    let mut errors = Vec::new();
    for s in &mut p.stages {
        let inputs = std::mem::take(&mut s.inputs);
        for (input, target) in inputs {
            if let Some(mut choice) = s.choices.remove(&input) {
                if !names.contains(&target) {
                    errors.push(s_error(s, &input, missing(&input, &target, &names, &swept)));
                } else {
                    choice.candidates = order
                        .iter()
                        .filter(|n| **n != s.name && choice.matches(n))
                        .cloned()
                        .collect();
                    if choice.candidates.is_empty() {
                        errors.push(s_error(
                            s,
                            &input,
                            format!(
                                "input `{input}` is `{}`, but no stage's name fits it for any \
                                 value `{}` could choose",
                                choice.pattern,
                                choice.placeholder()
                            ),
                        ));
                    }
                }
                s.choices.insert(input.clone(), choice);
                s.inputs.insert(input, target);
            } else if names.contains(&target) {
                s.inputs.insert(input, target);
            } else if let Some(expansions) = swept.get(&target) {
                for (name, matrix) in expansions {
                    s.inputs
                        .insert(expansion_input(&input, matrix), name.clone());
                }
            } else {
                errors.push(s_error(s, &input, missing(&input, &target, &names, &swept)));
                s.inputs.insert(input, target);
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SpecErrors(errors))
    }
}

fn s_error(s: &StageSpec, input: &str, message: String) -> crate::SpecError {
    s.error(&["inputs", input], message)
}

fn missing(input: &str, target: &str, names: &HashSet<String>, swept: &Swept) -> String {
    let all: BTreeSet<&str> = names
        .iter()
        .map(String::as_str)
        .chain(swept.keys().map(String::as_str))
        .collect();
    format!(
        "input `{input}` refers to stage `{target}`, which does not exist{}",
        did_you_mean(target, all.into_iter())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_choice_is_one_placeholder_with_a_decider_and_a_variable() {
        assert_eq!(
            parse_choice("train-lr${choose-lr.lr}-seed0").unwrap(),
            Some(("choose-lr".into(), "lr".into()))
        );
        assert_eq!(parse_choice("plain").unwrap(), None);
        assert!(parse_choice("a${x.y}b${x.z}")
            .unwrap_err()
            .contains("two choices"));
        let c = Choice {
            decider: "choose".into(),
            variable: "lr".into(),
            pattern: "t-lr${choose.lr}-s0".into(),
            candidates: vec![],
        };
        assert!(c.matches("t-lr0.003-s0"));
        assert!(!c.matches("t-lr0.003-s1"));
        assert!(!c.matches("t-lr-s0"));
        assert_eq!(c.stage_for("0.01"), "t-lr0.01-s0");
    }

    #[test]
    fn expansion_input_names_round_trip() {
        let m = BTreeMap::from([
            ("lr".to_string(), serde_json::json!(0.003)),
            ("run".to_string(), serde_json::json!("full")),
        ]);
        let name = expansion_input("runs", &m);
        assert_eq!(name, "runs[lr=0.003,run=full]");
        let (input, vars) = parse_expansion_input(&name).unwrap();
        assert_eq!(input, "runs");
        assert_eq!(vars["lr"], "0.003");
        assert_eq!(vars["run"], "full");
        assert!(parse_expansion_input("data").is_none());
    }
}
