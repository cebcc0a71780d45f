//! `report`: gathers finished runs into the paper's tables and figures.
//!
//! Inputs are named by what they are:
//! - `ROW@COLUMN`: an eval stage, one table cell (e.g. `relora@9m`); rows `full`, `control`,
//!   `lora`, `relora` and the Table 3 ids get the paper's labels; `ROW@COLUMN#REP` names
//!   one replicate (a seed) of a cell, and a cell's replicates are shown as mean ± std;
//! - `curve@LABEL`: a train stage, whose loss and learning rate are plotted;
//! - `svd@LABEL`: an svd stage, whose spectrum joins the histogram and count figures;
//! - `choice@LABEL`: a select stage, whose table of scores and winners is shown.
//!
//! With replicates, every pair of rows in a column gets a 95% interval of its difference
//! (paired for the rows listed in `paired`, Welch's otherwise); see relora-analysis.

use anyhow::{Context, Result};
use relora_analysis::report::{csv, markdown, Cell};
use relora_analysis::{differences, plots, SpectrumReport};
use relora_exec::{parse_params, StageContext, StageKind};
use relora_spec::{SpecError, StageSpec};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::BufRead;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportParams {
    #[serde(default = "d_title")]
    pub title: String,
    /// `table2`, `table3` or `none`: which of the paper's tables to print beside ours.
    #[serde(default = "d_paper")]
    pub paper: String,
    /// Row id → label, for rows the paper does not name.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Rows whose replicates of one seed are paired (they share a warm start): compared
    /// seed by seed. Other pairs of rows are compared with Welch's interval.
    #[serde(default)]
    pub paired: Vec<String>,
}

fn d_title() -> String {
    "Results".into()
}
fn d_paper() -> String {
    "table2".into()
}

pub struct Report;

impl StageKind for Report {
    fn name(&self) -> &'static str {
        "report"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::REPORT
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        None
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let p: ReportParams = parse_params(stage)?;
        let mut e = Vec::new();
        if !["table2", "table3", "none"].contains(&p.paper.as_str()) {
            e.push(stage.error(&["params", "paper"], "paper must be table2, table3 or none"));
        }
        let rows: Vec<&str> = stage
            .inputs
            .keys()
            .filter_map(|n| n.split_once('@').map(|(r, _)| r))
            .collect();
        for (i, r) in p.paired.iter().enumerate() {
            if !rows.contains(&r.as_str()) {
                e.push(stage.error(
                    &["params", "paired", &i.to_string()],
                    format!("`paired` names row `{r}`, which no input `{r}@COLUMN` gives"),
                ));
            }
        }
        for name in stage.inputs.keys() {
            if !name.contains('@') {
                e.push(stage.error(
                    &["inputs", name],
                    format!("report inputs are named ROW@COLUMN (an eval), curve@LABEL (a train), svd@LABEL (an svd) or choice@LABEL (a select), not `{name}`"),
                ));
            }
        }
        relora_spec::no_errors(e)
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: ReportParams = serde_json::from_value(ctx.params.clone())?;
        let out = ctx.out_dir.clone();
        let mut cells = Vec::new();
        let mut loss = Vec::new();
        let mut lr = Vec::new();
        let mut spectra = Vec::new();
        let mut choices = Vec::new();
        for (name, dir) in &ctx.inputs {
            let (row, col) = name.split_once('@').expect("validated");
            match row {
                "curve" => {
                    let path = dir.join("metrics.jsonl");
                    let f = std::fs::File::open(&path).with_context(|| {
                        format!("`{name}` must be a train stage: no {}", path.display())
                    })?;
                    let (mut l, mut r) = (Vec::new(), Vec::new());
                    for line in std::io::BufReader::new(f).lines() {
                        let v: Value = serde_json::from_str(&line?)?;
                        // Tokens seen (warm start included) put every run on one axis.
                        let step = v["tokens"].as_f64().unwrap_or(0.0);
                        l.push((step, v["loss"].as_f64().unwrap_or(f64::NAN)));
                        r.push((step, v["lr"].as_f64().unwrap_or(f64::NAN)));
                    }
                    loss.push((col.to_string(), l));
                    lr.push((col.to_string(), r));
                }
                "choice" => {
                    let path = dir.join("table.md");
                    let text = std::fs::read_to_string(&path).with_context(|| {
                        format!("`{name}` must be a select stage: no {}", path.display())
                    })?;
                    choices.push((col.to_string(), text));
                }
                "svd" => {
                    let path = dir.join("spectrum.json");
                    let bytes = std::fs::read(&path).with_context(|| {
                        format!("`{name}` must be an svd stage: no {}", path.display())
                    })?;
                    let s: SpectrumReport = serde_json::from_slice(&bytes)?;
                    spectra.push((col.to_string(), s));
                }
                _ => {
                    let (col, replicate) = match col.split_once('#') {
                        Some((c, r)) => (c, Some(r.to_string())),
                        None => (col, None),
                    };
                    let path = dir.join("eval.json");
                    let bytes = std::fs::read(&path).with_context(|| {
                        format!("`{name}` must be an eval stage: no {}", path.display())
                    })?;
                    let v: Value = serde_json::from_slice(&bytes)?;
                    cells.push(Cell {
                        row: row.to_string(),
                        col: col.to_string(),
                        perplexity: v["perplexity"]
                            .as_f64()
                            .context("eval.json has no perplexity")?,
                        trainable_params: v["trainable_params"].as_u64(),
                        optimizer_bytes: v["optimizer_state_floats"].as_u64().map(|f| f * 4),
                        replicate,
                        split: v["split"].as_str().map(str::to_string),
                    });
                }
            }
        }
        let mut md = markdown(&p.title, &cells, &p.labels, &p.paper);
        let diffs = differences::differences(&cells, &p.paired, &p.paper);
        md.push_str(&differences::markdown(&cells, &diffs, &p.labels, &p.paper));
        for (label, table) in &choices {
            // The select's own heading, one level down, named by the report's label.
            let body = table.split_once('\n').map_or("", |(_, rest)| rest);
            md.push_str(&format!("\n### {label}{body}"));
        }
        if !spectra.is_empty() {
            md.push_str("\n### Singular values of the weight updates\n\nCount below the threshold, per projection type (all layers).\n\n| |");
            let projs: Vec<String> = spectra[0].1.projections.keys().cloned().collect();
            for pr in &projs {
                md.push_str(&format!(" {pr} |"));
            }
            md.push_str(&format!("\n|---|{}\n", "---|".repeat(projs.len())));
            for (label, s) in &spectra {
                md.push_str(&format!("| {label} |"));
                for pr in &projs {
                    match s.projections.get(pr) {
                        Some(x) => md.push_str(&format!(" {} / {} |", x.below_threshold, x.values)),
                        None => md.push_str(" – |"),
                    }
                }
                md.push('\n');
            }
            plots::svd_histograms(&out.join("svd_histograms"), &spectra)?;
            plots::svd_counts(&out.join("svd_counts"), &spectra)?;
        }
        if !loss.is_empty() {
            plots::line_chart(
                &out.join("loss"),
                "Training loss",
                "training tokens seen",
                "loss",
                &loss,
            )?;
            plots::line_chart(
                &out.join("lr"),
                "Learning rate",
                "training tokens seen",
                "lr",
                &lr,
            )?;
        }
        std::fs::write(out.join("table.md"), &md)?;
        std::fs::write(out.join("table.csv"), csv(&cells, &p.labels, &p.paper))?;
        if !diffs.is_empty() {
            std::fs::write(out.join("differences.csv"), differences::csv(&diffs))?;
        }
        println!("{md}");
        for c in &cells {
            let rep = c
                .replicate
                .as_ref()
                .map(|r| format!("#{r}"))
                .unwrap_or_default();
            ctx.metric(
                &format!("perplexity.{}@{}{rep}", c.row, c.col),
                c.perplexity,
            );
        }
        Ok(())
    }
}
