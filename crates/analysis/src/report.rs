//! Results tables shaped like the paper's, with the paper's own numbers beside ours.

use std::collections::BTreeMap;
use std::fmt::Write;

/// One evaluated run placed in a table.
#[derive(Debug, Clone)]
pub struct Cell {
    pub row: String,
    pub col: String,
    pub perplexity: f64,
    pub trainable_params: Option<u64>,
    /// Bytes of optimizer state (f32 moments, GaLore's projectors) the run ended with.
    pub optimizer_bytes: Option<u64>,
    /// Which replicate (a seed) this is, when a cell has several; they are shown as
    /// mean ± standard deviation.
    pub replicate: Option<String>,
    /// The split scored: `valid` or `test` (None: valid, for evals from before the test
    /// split existed).
    pub split: Option<String>,
}

pub use crate::stats::mean_std;

/// One table cell's text: a value, or mean ± std over its replicates, with the trainable
/// parameter count and the optimizer state in brackets when known.
fn cell_text(found: &[&Cell]) -> String {
    let trainable = found.iter().find_map(|c| c.trainable_params).map(human);
    let optimizer = found
        .iter()
        .find_map(|c| c.optimizer_bytes)
        .map(|b| format!("{:.1} MB", b as f64 / 1e6));
    let params = match (trainable, optimizer) {
        (Some(t), Some(o)) => format!(" ({t}, {o})"),
        (Some(t), None) => format!(" ({t})"),
        (None, Some(o)) => format!(" ({o})"),
        (None, None) => String::new(),
    };
    match found {
        [] => "–".to_string(),
        [one] if one.replicate.is_none() => format!("{:.2}{params}", one.perplexity),
        many => {
            let xs: Vec<f64> = many.iter().map(|c| c.perplexity).collect();
            let (m, sd) = mean_std(&xs);
            format!("{m:.2} ± {sd:.2} (n={}){params}", xs.len())
        }
    }
}

/// Rows of the paper's Table 2 (C4 validation perplexity): id, label, 60M/130M/250M/350M.
pub const PAPER_TABLE2: [(&str, &str, [f64; 4]); 4] = [
    ("full", "Full training", [33.81, 23.65, 22.39, 20.40]),
    ("control", "Control", [36.52, 27.30, 29.12, 23.65]),
    (
        "lora",
        "Low-rank pre-training with LoRA",
        [47.44, 34.17, 36.60, 57.11],
    ),
    (
        "relora",
        "Low-rank pre-training with ReLoRA",
        [38.28, 25.04, 22.48, 22.48],
    ),
];
pub const PAPER_TABLE2_COLS: [&str; 4] = ["60M", "130M", "250M", "350M"];

/// The GaLore paper's Table 2 (Zhao et al., ICML 2024; C4 validation perplexity, LLaMA
/// 60M/130M/350M/1B, T5 tokenizer): its own runs of each method, GaLore at ranks
/// 128/256/256/512, ReLoRA and LoRA at the same ranks.
pub const GALORE_TABLE2: [(&str, &str, [f64; 4]); 5] = [
    ("full", "Full-Rank", [34.06, 25.08, 18.80, 15.56]),
    ("galore", "GaLore", [34.88, 25.36, 18.95, 15.64]),
    ("low_rank", "Low-Rank", [78.18, 45.51, 37.41, 142.53]),
    ("lora", "LoRA", [34.99, 33.92, 25.58, 19.21]),
    ("relora", "ReLoRA", [37.04, 29.37, 29.08, 18.33]),
];
pub const GALORE_TABLE2_COLS: [&str; 4] = ["60M", "130M", "350M", "1B"];

/// The paper's Table 3 (130M ablations); `None` = diverged. Row membership is partly
/// inferred (see the method reference, §8).
pub const PAPER_TABLE3: [(&str, &str, Option<f64>); 7] = [
    ("lora", "LoRA alone", Some(34.17)),
    ("restarts", "+ restarts", Some(34.25)),
    (
        "restarts_reset",
        "+ restarts + optimizer reset, no jagged schedule",
        None,
    ),
    ("jagged", "+ jagged schedule", Some(34.29)),
    ("high_lr", "+ high learning rate", Some(29.77)),
    (
        "warm_lora",
        "LoRA on a warm start, no restarts",
        Some(25.46),
    ),
    (
        "relora",
        "Full ReLoRA (restarts, jagged, reset, warm start)",
        Some(25.04),
    ),
];

/// Row ids and labels of the paper's tables, the one this table is shaped like first (so a
/// Table 3 lists its rows in the paper's order, and `lora` reads "LoRA alone" there).
fn known_rows(paper: &str) -> Vec<(&'static str, &'static str)> {
    let galore = ("galore", "GaLore (gradient low-rank projection)");
    let t2 = PAPER_TABLE2
        .iter()
        .map(|r| (r.0, r.1))
        .chain(std::iter::once(galore));
    let t3 = PAPER_TABLE3.iter().map(|r| (r.0, r.1));
    if paper == "table3" {
        t3.chain(t2).collect()
    } else {
        t2.chain(t3).collect()
    }
}

pub(crate) fn label_of(row: &str, labels: &BTreeMap<String, String>, paper: &str) -> String {
    if let Some(l) = labels.get(row) {
        return l.clone();
    }
    known_rows(paper)
        .into_iter()
        .find(|(id, _)| *id == row)
        .map(|(_, l)| l.to_string())
        .unwrap_or_else(|| row.to_string())
}

pub(crate) fn order(ids: impl Iterator<Item = String>, paper: &str) -> Vec<String> {
    let known: Vec<&str> = known_rows(paper).into_iter().map(|r| r.0).collect();
    let mut v: Vec<String> = Vec::new();
    for id in ids {
        if !v.contains(&id) {
            v.push(id);
        }
    }
    v.sort_by_key(|id| known.iter().position(|k| k == id).unwrap_or(usize::MAX));
    v
}

/// Our table as Markdown (perplexity, trainable parameters in brackets), then the paper's.
pub fn markdown(
    title: &str,
    cells: &[Cell],
    labels: &BTreeMap<String, String>,
    paper: &str,
) -> String {
    let rows = order(cells.iter().map(|c| c.row.clone()), paper);
    let mut cols: Vec<String> = Vec::new();
    for c in cells {
        if !cols.contains(&c.col) {
            cols.push(c.col.clone());
        }
    }
    let replicated = cells.iter().any(|c| c.replicate.is_some());
    let brackets = if cells.iter().any(|c| c.optimizer_bytes.is_some()) {
        "(trainable parameters, optimizer state in f32)"
    } else {
        "(trainable parameters)"
    };
    let splits: std::collections::BTreeSet<&str> = cells
        .iter()
        .map(|c| c.split.as_deref().unwrap_or("valid"))
        .collect();
    let measure = match splits.into_iter().collect::<Vec<_>>().as_slice() {
        ["test"] => "Test perplexity (a held-out split no choice was made on)",
        ["valid"] | [] => "Validation perplexity",
        _ => "Perplexity (validation and test splits mixed)",
    };
    let what = if replicated {
        format!("{measure}, mean ± sample standard deviation over n replicates {brackets}.")
    } else {
        format!("{measure} {brackets}.")
    };
    let mut s = format!("## {title}\n\n{what}\n\n| |");
    for c in &cols {
        let _ = write!(s, " {c} |");
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(cols.len()));
    s.push('\n');
    for r in &rows {
        let _ = write!(s, "| {} |", label_of(r, labels, paper));
        for c in &cols {
            let found: Vec<&Cell> = cells
                .iter()
                .filter(|x| &x.row == r && &x.col == c)
                .collect();
            let _ = write!(s, " {} |", cell_text(&found));
        }
        s.push('\n');
    }
    if paper == "table2" {
        reference_table(
            &mut s,
            "The paper's Table 2 (C4 validation perplexity)",
            &PAPER_TABLE2_COLS,
            &PAPER_TABLE2,
        );
    }
    // GaLore rows are compared with the GaLore paper's own table, which has other sizes.
    if rows.iter().any(|r| r == "galore") {
        reference_table(
            &mut s,
            "The GaLore paper's Table 2 (Zhao et al. 2024; C4 validation perplexity)",
            &GALORE_TABLE2_COLS,
            &GALORE_TABLE2,
        );
    }
    if paper == "table3" {
        s.push_str("\nThe paper's Table 3 (130M, C4 validation perplexity), for reference:\n\n| | 130M |\n|---|---|\n");
        for (_, label, v) in PAPER_TABLE3 {
            let cell = v.map_or("diverged".to_string(), |p| format!("{p:.2}"));
            let _ = writeln!(s, "| {label} | {cell} |");
        }
    }
    s
}

/// A published table of four columns, appended under `heading`.
fn reference_table(
    s: &mut String,
    heading: &str,
    cols: &[&str; 4],
    rows: &[(&str, &str, [f64; 4])],
) {
    let _ = write!(s, "\n{heading}, for reference:\n\n| |");
    for c in cols {
        let _ = write!(s, " {c} |");
    }
    s.push_str("\n|---|---|---|---|---|\n");
    for (_, label, v) in rows {
        let _ = writeln!(
            s,
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2} |",
            v[0], v[1], v[2], v[3]
        );
    }
}

/// One line per cell (per replicate), rows in the table's order.
pub fn csv(cells: &[Cell], labels: &BTreeMap<String, String>, paper: &str) -> String {
    let mut s = String::from(
        "row,label,column,replicate,perplexity,trainable_params,optimizer_state_bytes\n",
    );
    for r in order(cells.iter().map(|c| c.row.clone()), paper) {
        for c in cells.iter().filter(|c| c.row == r) {
            let _ = writeln!(
                s,
                "{},{:?},{},{},{:.4},{},{}",
                c.row,
                label_of(&c.row, labels, paper),
                c.col,
                c.replicate.as_deref().unwrap_or(""),
                c.perplexity,
                c.trainable_params
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                c.optimizer_bytes.map(|b| b.to_string()).unwrap_or_default()
            );
        }
    }
    s
}

fn human(n: u64) -> String {
    if n >= 1_000_000 {
        format!("{:.1}M", n as f64 / 1e6)
    } else if n >= 1_000 {
        format!("{:.1}K", n as f64 / 1e3)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_expected_table_from_fixture_metrics() {
        let cell = |row: &str, col: &str, p: f64, n: u64| Cell {
            row: row.into(),
            col: col.into(),
            perplexity: p,
            trainable_params: Some(n),
            optimizer_bytes: None,
            replicate: None,
            split: None,
        };
        let cells = vec![
            cell("relora", "9M", 210.456, 1_200_000),
            cell("full", "9M", 180.0, 3_400_000),
            cell("lora", "9M", 330.5, 1_200_000),
            cell("control", "9M", 250.25, 1_100_000),
        ];
        let md = markdown("Quickstart", &cells, &BTreeMap::new(), "table2");
        let want = "## Quickstart\n\nValidation perplexity (trainable parameters).\n\n| | 9M |\n|---|---|\n\
| Full training | 180.00 (3.4M) |\n\
| Control | 250.25 (1.1M) |\n\
| Low-rank pre-training with LoRA | 330.50 (1.2M) |\n\
| Low-rank pre-training with ReLoRA | 210.46 (1.2M) |\n";
        assert!(md.starts_with(want), "{md}");
        assert!(
            md.contains("| Low-rank pre-training with ReLoRA | 38.28 | 25.04 | 22.48 | 22.48 |")
        );
        let c = csv(&cells, &BTreeMap::new(), "table2");
        assert_eq!(
            c.lines().nth(1).unwrap(),
            "full,\"Full training\",9M,,180.0000,3400000,"
        );
        assert!(!md.contains("GaLore"), "no GaLore row, no GaLore table");
        // A GaLore row comes after ReLoRA, and brings the GaLore paper's table.
        let mut with_galore = cells.clone();
        with_galore.push(cell("galore", "9M", 190.0, 3_400_000));
        let md = markdown("Quickstart", &with_galore, &BTreeMap::new(), "table2");
        assert!(
            md.contains(
                "| Low-rank pre-training with ReLoRA | 210.46 (1.2M) |\n\
             | GaLore (gradient low-rank projection) | 190.00 (3.4M) |\n"
            ),
            "{md}"
        );
        assert!(
            md.contains("| GaLore | 34.88 | 25.36 | 18.95 | 15.64 |"),
            "{md}"
        );
    }

    #[test]
    fn replicates_are_shown_as_mean_and_sample_deviation() {
        let rep = |seed: &str, p: f64| Cell {
            row: "relora".into(),
            col: "2 layers".into(),
            perplexity: p,
            trainable_params: Some(603_800),
            optimizer_bytes: None,
            replicate: Some(seed.into()),
            split: None,
        };
        assert_eq!(mean_std(&[2.0, 4.0, 6.0]), (4.0, 2.0));
        assert_eq!(mean_std(&[5.0]), (5.0, 0.0));
        let cells = vec![rep("0", 200.0), rep("1", 220.0), rep("2", 240.0)];
        let md = markdown("Seeds", &cells, &BTreeMap::new(), "none");
        assert!(
            md.contains("| Low-rank pre-training with ReLoRA | 220.00 ± 20.00 (n=3) (603.8K) |"),
            "{md}"
        );
        assert!(md.contains("mean ± sample standard deviation"));
        assert_eq!(csv(&cells, &BTreeMap::new(), "none").lines().count(), 4);
    }

    #[test]
    fn a_table3_lists_its_rows_in_the_papers_order_with_its_labels() {
        let cell = |row: &str, p: f64| Cell {
            row: row.into(),
            col: "4 layers".into(),
            perplexity: p,
            trainable_params: None,
            optimizer_bytes: None,
            replicate: None,
            split: None,
        };
        let cells = vec![cell("relora", 1.0), cell("jagged", 2.0), cell("lora", 3.0)];
        let md = markdown("T3", &cells, &BTreeMap::new(), "table3");
        let rows: Vec<&str> = md
            .lines()
            .filter(|l| l.starts_with("| ") && l.contains(".00"))
            .collect();
        assert_eq!(
            rows,
            [
                "| LoRA alone | 3.00 |",
                "| + jagged schedule | 2.00 |",
                "| Full ReLoRA (restarts, jagged, reset, warm start) | 1.00 |"
            ]
        );
    }
}
