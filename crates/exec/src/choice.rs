//! Inputs that another stage chooses (`model: "train-lr${choose.lr}"`): what the deciding
//! stage writes, and how the executor turns it into the one stage the input reads.
//!
//! The consumer waits for its decider and for every stage the choice could name. Once the
//! decider has run, the executor reads its `choice.json`, finds the group whose variables
//! equal the consumer's own matrix values, and fills the chosen value into the input's
//! name. Only that stage's output hash enters the consumer's key, so the same choice made
//! again from other scores re-runs nothing downstream, and a new winner re-runs what follows.

use crate::Dag;
use anyhow::{bail, Context, Result};
use relora_spec::{scalar_text, Choice};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The file in a deciding stage's outputs that says what it chose.
pub const CHOICE_FILE: &str = "choice.json";

/// `choice.json`: for each group (values of the variables it was grouped by), the values of
/// the variables chosen in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChoiceFile {
    pub groups: Vec<ChosenGroup>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChosenGroup {
    pub group: BTreeMap<String, String>,
    pub chosen: BTreeMap<String, String>,
}

impl ChoiceFile {
    pub fn read(outputs: &Path) -> Result<ChoiceFile> {
        let path = outputs.join(CHOICE_FILE);
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "{} cannot be read: an input chosen by a stage needs that stage to write it \
                 (a `select` stage does)",
                path.display()
            )
        })?;
        serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a choice file", path.display()))
    }
}

/// One input resolved to the stage it reads, with what was chosen when a stage chose it.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub stage: usize,
    /// `lr=0.003`, for a chosen input.
    pub chosen: Option<String>,
}

/// The stage each input of stage `i` reads, or None while a decider has not run.
/// `outputs_of(j)` is the outputs folder of stage `j` when it is done.
pub fn resolve_inputs(
    dag: &Dag,
    i: usize,
    outputs_of: &dyn Fn(usize) -> Option<PathBuf>,
) -> Result<Option<BTreeMap<String, Resolved>>> {
    let s = &dag.pipeline.stages[i];
    let mut out = BTreeMap::new();
    for (input, target) in &s.inputs {
        let d = dag
            .index_of(target)
            .with_context(|| format!("input `{input}` names a missing stage `{target}`"))?;
        let resolved = match s.choices.get(input) {
            None => Resolved {
                stage: d,
                chosen: None,
            },
            Some(choice) => {
                let Some(outputs) = outputs_of(d) else {
                    return Ok(None);
                };
                let (name, value) = chosen_stage(dag, i, input, choice, &outputs)?;
                Resolved {
                    stage: dag.index_of(&name).expect("a candidate is a stage"),
                    chosen: Some(format!("{}={value}", choice.variable)),
                }
            }
        };
        out.insert(input.clone(), resolved);
    }
    Ok(Some(out))
}

/// The stage a decider's outputs choose for input `input` of stage `i`, and the value.
fn chosen_stage(
    dag: &Dag,
    i: usize,
    input: &str,
    choice: &Choice,
    outputs: &Path,
) -> Result<(String, String)> {
    let s = &dag.pipeline.stages[i];
    let file = ChoiceFile::read(outputs)?;
    let mine: BTreeMap<&str, String> = s
        .matrix
        .iter()
        .map(|(k, v)| (k.as_str(), scalar_text(v)))
        .collect();
    let fits = |g: &&ChosenGroup| g.group.iter().all(|(k, v)| mine.get(k.as_str()) == Some(v));
    let groups: Vec<&ChosenGroup> = file.groups.iter().filter(fits).collect();
    let group = match groups.as_slice() {
        [one] => one,
        [] => bail!(
            "stage `{}`: `{}` chose in {} group(s), and none fits this stage's matrix values \
             ({}); the decider must group by variables this stage sweeps too",
            s.name,
            choice.decider,
            file.groups.len(),
            describe(&mine)
        ),
        _ => bail!(
            "stage `{}`: {} of `{}`'s groups fit this stage's matrix values ({}); it must \
             group by every variable that tells them apart",
            s.name,
            groups.len(),
            choice.decider,
            describe(&mine)
        ),
    };
    let value = group.chosen.get(&choice.variable).with_context(|| {
        format!(
            "stage `{}`, input `{input}`: `{}` chose {} but not `{}`",
            s.name,
            choice.decider,
            group.chosen.keys().cloned().collect::<Vec<_>>().join(", "),
            choice.variable
        )
    })?;
    let name = choice.stage_for(value);
    if !choice.candidates.contains(&name) {
        bail!(
            "stage `{}`, input `{input}`: `{}` chose {}={value}, which names stage `{name}`; \
             the pipeline has no such stage",
            s.name,
            choice.decider,
            choice.variable
        );
    }
    Ok((name, value.clone()))
}

fn describe(vars: &BTreeMap<&str, String>) -> String {
    if vars.is_empty() {
        return "it has none".into();
    }
    vars.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}
