//! Which differences in a replicated table are real: for each column, every pair of rows
//! with a 95% interval of the difference of their mean perplexities, and the rows' order
//! by mean with the steps that hold beyond the interval marked.
//!
//! Rows declared `paired` (their replicates of one seed share a warm start, an
//! initialisation and a data order) are compared seed by seed with Student's t on the
//! differences; every other pair gets Welch's interval.

use crate::report::{label_of, order, Cell};
use crate::stats::{mean_std, paired, welch, Interval};
use std::collections::BTreeMap;
use std::fmt::Write;

/// One compared pair of rows in one column.
#[derive(Debug, Clone)]
pub struct Difference {
    pub col: String,
    /// The row of the higher mean first, so that differences read as positive.
    pub worse: String,
    pub better: String,
    pub n: (usize, usize),
    pub interval: Interval,
}

/// Every pair of rows of each column that has at least two replicates on both sides.
pub fn differences(cells: &[Cell], paired_rows: &[String], paper: &str) -> Vec<Difference> {
    let rows = order(cells.iter().map(|c| c.row.clone()), paper);
    let mut cols: Vec<&str> = Vec::new();
    for c in cells {
        if !cols.contains(&c.col.as_str()) {
            cols.push(&c.col);
        }
    }
    let mut out = Vec::new();
    for col in cols {
        // Row → replicate id → perplexity.
        let by_row: BTreeMap<&str, BTreeMap<&str, f64>> = rows
            .iter()
            .map(|r| {
                let reps = cells
                    .iter()
                    .filter(|c| &c.row == r && c.col == col)
                    .map(|c| (c.replicate.as_deref().unwrap_or(""), c.perplexity))
                    .collect();
                (r.as_str(), reps)
            })
            .collect();
        for (i, a) in rows.iter().enumerate() {
            for b in &rows[i + 1..] {
                let (ra, rb) = (&by_row[a.as_str()], &by_row[b.as_str()]);
                let is_paired =
                    paired_rows.contains(a) && paired_rows.contains(b) && ra.keys().eq(rb.keys());
                let (xa, xb): (Vec<f64>, Vec<f64>) = if is_paired {
                    ra.iter().map(|(k, x)| (*x, rb[k])).unzip()
                } else {
                    (
                        ra.values().copied().collect(),
                        rb.values().copied().collect(),
                    )
                };
                let interval = if is_paired {
                    paired(&xa, &xb)
                } else {
                    welch(&xa, &xb)
                };
                let Some(mut interval) = interval else {
                    continue;
                };
                let (mut worse, mut better, mut n) = (a, b, (xa.len(), xb.len()));
                if interval.diff < 0.0 {
                    std::mem::swap(&mut worse, &mut better);
                    n = (n.1, n.0);
                    interval = Interval {
                        diff: -interval.diff,
                        low: -interval.high,
                        high: -interval.low,
                        ..interval
                    };
                }
                out.push(Difference {
                    col: col.to_string(),
                    worse: worse.clone(),
                    better: better.clone(),
                    n,
                    interval,
                });
            }
        }
    }
    out
}

/// The Markdown section: per column, the ordering, then every pair's interval.
pub fn markdown(
    cells: &[Cell],
    diffs: &[Difference],
    labels: &BTreeMap<String, String>,
    paper: &str,
) -> String {
    if diffs.is_empty() {
        return String::new();
    }
    let label = |r: &str| label_of(r, labels, paper);
    let mut s = String::from(
        "\n### Which differences hold\n\nFor each pair of rows, the difference of mean \
         perplexities with its 95% interval: paired Student's t on the per-seed differences \
         where the rows share their seeds' warm starts (\"paired\"), Welch's t otherwise. \
         In each ordering, `<` marks a step whose interval leaves out 0 and `≈` one whose \
         interval does not.\n",
    );
    let mut cols: Vec<&str> = Vec::new();
    for d in diffs {
        if !cols.contains(&d.col.as_str()) {
            cols.push(&d.col);
        }
    }
    for col in cols {
        let mut means: Vec<(String, f64)> = order(cells.iter().map(|c| c.row.clone()), paper)
            .into_iter()
            .filter_map(|r| {
                let xs: Vec<f64> = cells
                    .iter()
                    .filter(|c| c.row == r && c.col == col)
                    .map(|c| c.perplexity)
                    .collect();
                (!xs.is_empty()).then(|| (r, mean_std(&xs).0))
            })
            .collect();
        means.sort_by(|a, b| a.1.total_cmp(&b.1));
        let find = |a: &str, b: &str| {
            diffs
                .iter()
                .find(|d| d.col == col && d.worse == a && d.better == b)
        };
        let mut chain = String::new();
        for (k, (r, m)) in means.iter().enumerate() {
            if k > 0 {
                let holds = find(r, &means[k - 1].0).is_some_and(|d| d.interval.excludes_zero());
                chain.push_str(if holds { " < " } else { " ≈ " });
            }
            let _ = write!(chain, "{} ({m:.2})", label(r));
        }
        let _ = write!(
            s,
            "\n**{col}**: {chain}\n\n| | difference | 95% interval | interval | holds |\n|---|---|---|---|---|\n"
        );
        for d in diffs.iter().filter(|d| d.col == col) {
            let i = &d.interval;
            let how = if i.paired {
                format!("paired t, n={}", d.n.0)
            } else {
                format!("Welch, n={}+{}, df {:.1}", d.n.0, d.n.1, i.df)
            };
            let _ = writeln!(
                s,
                "| {} − {} | {:+.2} | [{:+.2}, {:+.2}] | {how} | {} |",
                label(&d.worse),
                label(&d.better),
                i.diff,
                i.low,
                i.high,
                if i.excludes_zero() { "yes" } else { "no" }
            );
        }
    }
    s
}

/// One line per compared pair, for `differences.csv`.
pub fn csv(diffs: &[Difference]) -> String {
    let mut s =
        String::from("column,higher,lower,difference,low,high,test,df,n_higher,n_lower,holds\n");
    for d in diffs {
        let i = &d.interval;
        let _ = writeln!(
            s,
            "{},{},{},{:.4},{:.4},{:.4},{},{:.3},{},{},{}",
            d.col,
            d.worse,
            d.better,
            i.diff,
            i.low,
            i.high,
            if i.paired { "paired-t" } else { "welch" },
            i.df,
            d.n.0,
            d.n.1,
            i.excludes_zero()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rep(row: &str, seed: &str, p: f64) -> Cell {
        Cell {
            row: row.into(),
            col: "2 layers".into(),
            perplexity: p,
            trainable_params: None,
            optimizer_bytes: None,
            replicate: Some(seed.into()),
            split: Some("test".into()),
        }
    }

    #[test]
    fn paired_rows_are_compared_seed_by_seed_and_others_by_welch() {
        // ReLoRA is worse than full by 1.0–1.2 at every seed, while the seeds themselves
        // differ by 10: only the paired interval sees it.
        let cells = vec![
            rep("full", "0", 100.0),
            rep("full", "1", 110.0),
            rep("full", "2", 120.0),
            rep("relora", "0", 101.0),
            rep("relora", "1", 111.1),
            rep("relora", "2", 121.2),
            rep("lora", "0", 150.0),
            rep("lora", "1", 160.0),
            rep("lora", "2", 170.0),
        ];
        let paired_rows = vec!["full".to_string(), "relora".to_string()];
        let d = differences(&cells, &paired_rows, "table2");
        assert_eq!(d.len(), 3);
        let fr = d.iter().find(|d| d.worse == "relora").unwrap();
        assert_eq!(fr.better, "full");
        assert!(fr.interval.paired && fr.interval.excludes_zero());
        assert!((fr.interval.diff - 1.1).abs() < 1e-9);
        let lf = d
            .iter()
            .find(|d| d.worse == "lora" && d.better == "full")
            .unwrap();
        assert!(!lf.interval.paired && lf.interval.excludes_zero());
        // Unpaired, the same ReLoRA − full numbers do not hold.
        let unpaired = differences(&cells, &[], "table2");
        let fr = unpaired.iter().find(|d| d.worse == "relora").unwrap();
        assert!(!fr.interval.paired && !fr.interval.excludes_zero());

        let md = markdown(&cells, &d, &BTreeMap::new(), "table2");
        assert!(
            md.contains("Full training (110.00) < Low-rank pre-training with ReLoRA (111.10) < Low-rank pre-training with LoRA (160.00)"),
            "{md}"
        );
        assert!(md.contains("| paired t, n=3 | yes |"), "{md}");
        let md = markdown(&cells, &unpaired, &BTreeMap::new(), "table2");
        assert!(md.contains("Full training (110.00) ≈ Low-rank"), "{md}");
        assert_eq!(csv(&d).lines().count(), 4);
    }
}
