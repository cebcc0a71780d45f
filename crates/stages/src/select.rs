//! `select`: picks the winner of a sweep by a declared rule.
//!
//! Its input names a matrix template of eval stages (`runs: eval-valid`), which the spec
//! expands into one input per expansion, named after its matrix values. The rule:
//! `by: valid perplexity` (lower wins), `group_by: [run, layers]` (one winner per group),
//! `over: [seed]` (replicates averaged), and `tie_break: lowest lr` for means equal within
//! `tolerance`. What is left of the matrix variables is what gets chosen.
//!
//! It writes `choice.json`, which the executor reads to resolve inputs such as
//! `model: "train-${run}-lr${choose.lr}"` downstream, `selection.json` with every score,
//! and `table.md`.

use anyhow::{bail, Context, Result};
use relora_analysis::stats::mean_std;
use relora_exec::{parse_params, ChoiceFile, ChosenGroup, StageContext, StageKind, CHOICE_FILE};
use relora_spec::{parse_expansion_input, SpecError, StageSpec};
use serde::Deserialize;
use serde_json::{json, Value};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectParams {
    /// `SPLIT METRIC`: `valid perplexity`, `valid loss`, `test perplexity` or `test loss`;
    /// the lowest mean wins.
    pub by: String,
    /// Matrix variables that make groups: one winner per combination of their values.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Matrix variables of replicates (seeds): a candidate's score is its mean over them.
    #[serde(default)]
    pub over: Vec<String>,
    /// `lowest VAR` or `highest VAR`: which of the candidates whose means tie wins. Without
    /// it, the lowest values of the chosen variables, in their order.
    #[serde(default)]
    pub tie_break: Option<String>,
    /// Means within this fraction of the best one tie with it (0: only equal means tie).
    #[serde(default)]
    pub tolerance: f64,
}

/// The metric `by` names: the split the inputs must score, and the eval.json field.
fn metric(by: &str) -> Option<(&'static str, &'static str)> {
    let (split, what) = by.trim().split_once(' ')?;
    let split = match split {
        "valid" => "valid",
        "test" => "test",
        _ => return None,
    };
    let field = match what.trim() {
        "perplexity" => "perplexity",
        "loss" => "eval_loss",
        _ => return None,
    };
    Some((split, field))
}

/// `(variable, lowest first?)` of a `tie_break`.
fn tie_rule(text: &str) -> Option<(String, bool)> {
    let (dir, var) = text.trim().split_once(' ')?;
    let lowest = match dir {
        "lowest" => true,
        "highest" => false,
        _ => return None,
    };
    Some((var.trim().to_string(), lowest))
}

/// One candidate input: its name and matrix values.
struct Candidate {
    input: String,
    vars: BTreeMap<String, String>,
}

/// The inputs that are expansions of a template, with their matrix values.
fn candidates<'a>(names: impl Iterator<Item = &'a String>) -> Vec<Candidate> {
    names
        .filter_map(|name| {
            let (_, vars) = parse_expansion_input(name)?;
            Some(Candidate {
                input: name.clone(),
                vars,
            })
        })
        .collect()
}

/// Values that sort as numbers when they all are numbers, else as text.
fn cmp_values(a: &str, b: &str) -> Ordering {
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => x.partial_cmp(&y).unwrap_or(Ordering::Equal),
        _ => a.cmp(b),
    }
}

fn cmp_tuples(a: &[String], b: &[String]) -> Ordering {
    a.iter()
        .zip(b)
        .map(|(x, y)| cmp_values(x, y))
        .find(|o| o.is_ne())
        .unwrap_or(Ordering::Equal)
}

fn describe(vars: &[String], values: &[String]) -> String {
    if vars.is_empty() {
        return "all".into();
    }
    vars.iter()
        .zip(values)
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rule's variables: (group_by, over, chosen), each in a fixed order.
struct Roles {
    group: Vec<String>,
    over: Vec<String>,
    chosen: Vec<String>,
}

impl Roles {
    fn of(p: &SelectParams, all: &BTreeSet<String>) -> Roles {
        let chosen = all
            .iter()
            .filter(|v| !p.group_by.contains(v) && !p.over.contains(v))
            .cloned()
            .collect();
        Roles {
            group: p.group_by.clone(),
            over: p.over.clone(),
            chosen,
        }
    }
    fn values(vars: &[String], c: &BTreeMap<String, String>) -> Vec<String> {
        vars.iter().map(|v| c[v].clone()).collect()
    }
}

/// Candidates by group, then by chosen values, then by replicate: the input names.
type Layout = BTreeMap<Vec<String>, BTreeMap<Vec<String>, BTreeMap<Vec<String>, String>>>;

fn layout(roles: &Roles, cands: &[Candidate]) -> Layout {
    let mut l: Layout = BTreeMap::new();
    for c in cands {
        l.entry(Roles::values(&roles.group, &c.vars))
            .or_default()
            .entry(Roles::values(&roles.chosen, &c.vars))
            .or_default()
            .insert(Roles::values(&roles.over, &c.vars), c.input.clone());
    }
    l
}

pub struct Select;

impl StageKind for Select {
    fn name(&self) -> &'static str {
        "select"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::SELECT
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        None
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let p: SelectParams = parse_params(stage)?;
        let mut e = Vec::new();
        if metric(&p.by).is_none() {
            e.push(stage.error(
                &["params", "by"],
                format!(
                    "by: `{}` is not a metric select knows; use `valid perplexity`, `valid \
                     loss`, `test perplexity` or `test loss`",
                    p.by
                ),
            ));
        }
        if !(p.tolerance >= 0.0 && p.tolerance < 1.0) {
            e.push(stage.error(
                &["params", "tolerance"],
                format!("tolerance must be in [0, 1); got {}", p.tolerance),
            ));
        }
        let cands = candidates(stage.inputs.keys());
        let plain: Vec<&String> = stage
            .inputs
            .keys()
            .filter(|n| parse_expansion_input(n).is_none())
            .collect();
        if let Some(n) = plain.first() {
            e.push(stage.error(
                &["inputs", n],
                format!(
                    "a select stage's input names the matrix template of a sweep (every \
                     expansion of it); `{}` is one stage",
                    stage.inputs[n.as_str()]
                ),
            ));
        }
        if cands.is_empty() {
            e.push(stage.error(
                &["inputs"],
                "a select stage needs a swept template as input",
            ));
            return relora_spec::no_errors(e);
        }
        let all: BTreeSet<String> = cands[0].vars.keys().cloned().collect();
        if cands
            .iter()
            .any(|c| c.vars.keys().cloned().collect::<BTreeSet<_>>() != all)
        {
            e.push(stage.error(
                &["inputs"],
                "the inputs do not all sweep the same matrix variables; give select one \
                 template",
            ));
            return relora_spec::no_errors(e);
        }
        let listed = all.iter().cloned().collect::<Vec<_>>().join(", ");
        for (field, vars) in [("group_by", &p.group_by), ("over", &p.over)] {
            for (i, v) in vars.iter().enumerate() {
                if !all.contains(v) {
                    e.push(stage.error(
                        &["params", field, &i.to_string()],
                        format!(
                            "{field} names `{v}`, which is not a matrix variable of the inputs \
                             (they sweep {listed}){}",
                            relora_spec::did_you_mean(v, all.iter().map(String::as_str))
                        ),
                    ));
                }
            }
        }
        if let Some(v) = p.group_by.iter().find(|v| p.over.contains(v)) {
            e.push(stage.error(
                &["params", "over"],
                format!("`{v}` is in both group_by and over"),
            ));
        }
        if !e.is_empty() {
            return relora_spec::no_errors(e);
        }
        let roles = Roles::of(&p, &all);
        if roles.chosen.is_empty() {
            e.push(stage.error(
                &["params", "group_by"],
                format!(
                    "group_by and over take every matrix variable ({listed}): nothing is left \
                     to choose"
                ),
            ));
        }
        if let Some(t) = &p.tie_break {
            match tie_rule(t) {
                Some((v, _)) if roles.chosen.contains(&v) => {}
                Some((v, _)) => e.push(stage.error(
                    &["params", "tie_break"],
                    format!(
                        "tie_break names `{v}`, which is not a chosen variable (chosen: {})",
                        roles.chosen.join(", ")
                    ),
                )),
                None => e.push(stage.error(
                    &["params", "tie_break"],
                    format!("tie_break must be `lowest VAR` or `highest VAR`; got `{t}`"),
                )),
            }
        }
        // Every candidate of a group must have every replicate: a mean over fewer seeds
        // is not comparable with the others.
        let l = layout(&roles, &cands);
        let replicates: BTreeSet<&Vec<String>> = l
            .values()
            .flat_map(|g| g.values())
            .flat_map(|r| r.keys())
            .collect();
        'groups: for (g, choices) in &l {
            for (c, reps) in choices {
                if let Some(missing) = replicates.iter().find(|r| !reps.contains_key(**r)) {
                    e.push(stage.error(
                        &["inputs"],
                        format!(
                            "group {}: {} has no input for {}; every candidate needs every \
                             replicate",
                            describe(&roles.group, g),
                            describe(&roles.chosen, c),
                            describe(&roles.over, missing)
                        ),
                    ));
                    break 'groups;
                }
            }
        }
        relora_spec::no_errors(e)
    }
    fn validate_inputs(
        &self,
        stage: &StageSpec,
        upstream: &BTreeMap<String, &StageSpec>,
    ) -> Result<(), Vec<SpecError>> {
        let p: SelectParams = parse_params(stage)?;
        let Some((split, _)) = metric(&p.by) else {
            return Ok(());
        };
        for (input, up) in upstream {
            if up.kind != "eval" {
                return Err(vec![stage.error(
                    &["inputs"],
                    format!(
                        "input `{input}` is stage `{}`, a `{}` stage; select reads the scores \
                         of eval stages",
                        up.name, up.kind
                    ),
                )]);
            }
            let theirs = up
                .params
                .get("split")
                .and_then(Value::as_str)
                .unwrap_or("valid");
            if theirs != split {
                return Err(vec![stage.error(
                    &["params", "by"],
                    format!(
                        "by: `{}`, but eval stage `{}` scores the {theirs} split, so the \
                         inputs do not report it",
                        p.by, up.name
                    ),
                )]);
            }
        }
        Ok(())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: SelectParams = serde_json::from_value(ctx.params.clone())?;
        let (split, field) = metric(&p.by).context("validated")?;
        let cands = candidates(ctx.inputs.keys());
        let all: BTreeSet<String> = cands
            .first()
            .context("no inputs")?
            .vars
            .keys()
            .cloned()
            .collect();
        let roles = Roles::of(&p, &all);
        let mut score = BTreeMap::new();
        for c in &cands {
            let path = ctx.input(&c.input)?.join("eval.json");
            let v: Value = serde_json::from_slice(
                &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
            )
            .with_context(|| format!("{} is not JSON", path.display()))?;
            let theirs = v.get("split").and_then(Value::as_str).unwrap_or("valid");
            if theirs != split {
                bail!(
                    "{} scored the {theirs} split; `by: {}` needs {split}",
                    ctx.describe_input(&c.input),
                    p.by
                );
            }
            let x = v
                .get(field)
                .and_then(Value::as_f64)
                .with_context(|| format!("{} has no `{field}`", path.display()))?;
            score.insert(c.input.clone(), x);
        }
        let tie = p.tie_break.as_deref().and_then(tie_rule);
        let mut choice = ChoiceFile::default();
        let mut groups_json = Vec::new();
        let mut table = Vec::new();
        for (g, choices) in layout(&roles, &cands) {
            let mut rows: Vec<(Vec<String>, f64, f64, Vec<Value>)> = choices
                .iter()
                .map(|(c, reps)| {
                    let xs: Vec<f64> = reps.values().map(|i| score[i]).collect();
                    let (m, sd) = mean_std(&xs);
                    let per: Vec<Value> = reps
                        .iter()
                        .map(
                            |(r, i)| json!({"replicate": pairs(&roles.over, r), "score": score[i]}),
                        )
                        .collect();
                    (c.clone(), m, sd, per)
                })
                .collect();
            if rows.iter().any(|r| !r.1.is_finite()) {
                bail!(
                    "group {}: a candidate's {} is not finite (a diverged run); select cannot \
                     rank it",
                    describe(&roles.group, &g),
                    p.by
                );
            }
            let best = rows.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
            let tied: Vec<Vec<String>> = rows
                .iter()
                .filter(|r| r.1 <= best + p.tolerance * best.abs())
                .map(|r| r.0.clone())
                .collect();
            let winner = pick(
                &tied.iter().collect::<Vec<_>>(),
                &roles.chosen,
                tie.as_ref(),
            )
            .clone();
            rows.sort_by(|a, b| cmp_tuples(&a.0, &b.0));
            choice.groups.push(ChosenGroup {
                group: pairs(&roles.group, &g),
                chosen: pairs(&roles.chosen, &winner),
            });
            groups_json.push(json!({
                "group": pairs(&roles.group, &g),
                "chosen": pairs(&roles.chosen, &winner),
                "tied": tied.len(),
                "candidates": rows.iter().map(|(c, m, sd, per)| json!({
                    "values": pairs(&roles.chosen, c),
                    "mean": m,
                    "std": sd,
                    "replicates": per,
                })).collect::<Vec<_>>(),
            }));
            println!(
                "group {}: {} (mean {} {best:.4}{})",
                describe(&roles.group, &g),
                describe(&roles.chosen, &winner),
                p.by,
                if tied.len() > 1 {
                    format!(", {} tied: tie broken", tied.len())
                } else {
                    String::new()
                }
            );
            ctx.metric(
                &format!("chosen.{}", describe(&roles.group, &g)),
                describe(&roles.chosen, &winner),
            );
            table.push((g, winner, rows, tied.len()));
        }
        let out = &ctx.out_dir;
        std::fs::write(out.join(CHOICE_FILE), serde_json::to_vec_pretty(&choice)?)?;
        let selection = json!({
            "by": p.by,
            "group_by": roles.group,
            "over": roles.over,
            "chosen": roles.chosen,
            "tie_break": p.tie_break,
            "tolerance": p.tolerance,
            "groups": groups_json,
        });
        std::fs::write(
            out.join("selection.json"),
            serde_json::to_vec_pretty(&selection)?,
        )?;
        std::fs::write(out.join("table.md"), markdown(&p, &roles, &table))?;
        Ok(())
    }
}

/// The winner among tied candidates: by the declared rule, then the lowest values.
fn pick<'a>(
    tied: &[&'a Vec<String>],
    chosen: &[String],
    rule: Option<&(String, bool)>,
) -> &'a Vec<String> {
    let mut t = tied.to_vec();
    t.sort_by(|a, b| {
        let first = match rule {
            Some((var, lowest)) => {
                let k = chosen.iter().position(|c| c == var).expect("validated");
                let o = cmp_values(&a[k], &b[k]);
                if *lowest {
                    o
                } else {
                    o.reverse()
                }
            }
            None => Ordering::Equal,
        };
        first.then_with(|| cmp_tuples(a, b))
    });
    t[0]
}

fn pairs(vars: &[String], values: &[String]) -> BTreeMap<String, String> {
    vars.iter().cloned().zip(values.iter().cloned()).collect()
}

type TableGroup = (
    Vec<String>,
    Vec<String>,
    Vec<(Vec<String>, f64, f64, Vec<Value>)>,
    usize,
);

/// Groups down, chosen values across; the winner's cell in bold.
fn markdown(p: &SelectParams, roles: &Roles, groups: &[TableGroup]) -> String {
    let mut cols: Vec<Vec<String>> = Vec::new();
    for (_, _, rows, _) in groups {
        for r in rows {
            if !cols.contains(&r.0) {
                cols.push(r.0.clone());
            }
        }
    }
    cols.sort_by(|a, b| cmp_tuples(a, b));
    let over = if roles.over.is_empty() {
        String::new()
    } else {
        format!(
            ", mean ± sample standard deviation over {}",
            roles.over.join(", ")
        )
    };
    let mut s = format!(
        "## Selection: {} by {}{over}\n\nThe lowest mean wins (in bold){}.\n\n| {} |",
        roles.chosen.join(", "),
        p.by,
        match &p.tie_break {
            Some(t) => format!("; a tie goes to the {t}"),
            None => String::new(),
        },
        roles.group.join(", ")
    );
    for c in &cols {
        let _ = write!(s, " {} |", describe(&roles.chosen, c));
    }
    let _ = write!(s, "\n|---|{}\n", "---|".repeat(cols.len()));
    for (g, winner, rows, tied) in groups {
        let _ = write!(s, "| {} |", g.join(", "));
        for c in &cols {
            match rows.iter().find(|r| &r.0 == c) {
                Some((_, m, sd, per)) => {
                    let text = if per.len() > 1 {
                        format!("{m:.2} ± {sd:.2}")
                    } else {
                        format!("{m:.2}")
                    };
                    if c == winner {
                        let mark = if *tied > 1 { " (tie)" } else { "" };
                        let _ = write!(s, " **{text}**{mark} |");
                    } else {
                        let _ = write!(s, " {text} |");
                    }
                }
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_by_the_declared_rule_then_the_lowest_values() {
        let a = vec!["0.003".to_string()];
        let b = vec!["0.0015".to_string()];
        let c = vec!["0.012".to_string()];
        let tied = [&a, &b, &c];
        let vars = ["lr".to_string()];
        assert_eq!(pick(&tied, &vars, None), &b);
        assert_eq!(pick(&tied, &vars, Some(&("lr".into(), true))), &b);
        assert_eq!(pick(&tied, &vars, Some(&("lr".into(), false))), &c);
        assert_eq!(metric("valid perplexity"), Some(("valid", "perplexity")));
        assert_eq!(metric("test loss"), Some(("test", "eval_loss")));
        assert_eq!(metric("valid accuracy"), None);
        assert_eq!(tie_rule("highest lr"), Some(("lr".into(), false)));
    }
}
