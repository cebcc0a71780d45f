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

fn label_of(row: &str, labels: &BTreeMap<String, String>) -> String {
    if let Some(l) = labels.get(row) {
        return l.clone();
    }
    PAPER_TABLE2
        .iter()
        .map(|r| (r.0, r.1))
        .chain(PAPER_TABLE3.iter().map(|r| (r.0, r.1)))
        .find(|(id, _)| *id == row)
        .map(|(_, l)| l.to_string())
        .unwrap_or_else(|| row.to_string())
}

fn order(ids: impl Iterator<Item = String>) -> Vec<String> {
    let known: Vec<&str> = PAPER_TABLE2
        .iter()
        .map(|r| r.0)
        .chain(PAPER_TABLE3.iter().map(|r| r.0))
        .collect();
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
    let rows = order(cells.iter().map(|c| c.row.clone()));
    let mut cols: Vec<String> = Vec::new();
    for c in cells {
        if !cols.contains(&c.col) {
            cols.push(c.col.clone());
        }
    }
    let mut s = format!("## {title}\n\nValidation perplexity (trainable parameters).\n\n| |");
    for c in &cols {
        let _ = write!(s, " {c} |");
    }
    s.push_str("\n|---|");
    s.push_str(&"---|".repeat(cols.len()));
    s.push('\n');
    for r in &rows {
        let _ = write!(s, "| {} |", label_of(r, labels));
        for c in &cols {
            match cells.iter().find(|x| &x.row == r && &x.col == c) {
                Some(x) => match x.trainable_params {
                    Some(p) => {
                        let _ = write!(s, " {:.2} ({}) |", x.perplexity, human(p));
                    }
                    None => {
                        let _ = write!(s, " {:.2} |", x.perplexity);
                    }
                },
                None => s.push_str(" – |"),
            }
        }
        s.push('\n');
    }
    match paper {
        "table2" => {
            s.push_str("\nThe paper's Table 2 (C4 validation perplexity), for reference:\n\n| |");
            for c in PAPER_TABLE2_COLS {
                let _ = write!(s, " {c} |");
            }
            s.push_str("\n|---|---|---|---|---|\n");
            for (_, label, v) in PAPER_TABLE2 {
                let _ = writeln!(
                    s,
                    "| {label} | {:.2} | {:.2} | {:.2} | {:.2} |",
                    v[0], v[1], v[2], v[3]
                );
            }
        }
        "table3" => {
            s.push_str("\nThe paper's Table 3 (130M, C4 validation perplexity), for reference:\n\n| | 130M |\n|---|---|\n");
            for (_, label, v) in PAPER_TABLE3 {
                let cell = v.map_or("diverged".to_string(), |p| format!("{p:.2}"));
                let _ = writeln!(s, "| {label} | {cell} |");
            }
        }
        _ => {}
    }
    s
}

pub fn csv(cells: &[Cell], labels: &BTreeMap<String, String>) -> String {
    let mut s = String::from("row,label,column,perplexity,trainable_params\n");
    for r in order(cells.iter().map(|c| c.row.clone())) {
        for c in cells.iter().filter(|c| c.row == r) {
            let _ = writeln!(
                s,
                "{},{:?},{},{:.4},{}",
                c.row,
                label_of(&c.row, labels),
                c.col,
                c.perplexity,
                c.trainable_params
                    .map(|p| p.to_string())
                    .unwrap_or_default()
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
        let c = csv(&cells, &BTreeMap::new());
        assert_eq!(
            c.lines().nth(1).unwrap(),
            "full,\"Full training\",9M,180.0000,3400000"
        );
    }
}
