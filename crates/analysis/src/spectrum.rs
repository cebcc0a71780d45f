//! Singular values of weight updates, counted and binned per projection type (§7).

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// All singular values of a row-major `rows × cols` matrix, largest first, computed in f64
/// (faer's f32 SVD is unreliable for matrices whose sides differ by 2× or more).
///
/// Each SVD runs on one thread: faer's parallel SVD gives results whose last bits depend
/// on the thread count, and an svd stage's bytes must not (callers parallelise over
/// matrices instead, which keeps each result the same).
pub fn singular_values(rows: usize, cols: usize, data: &[f32]) -> Result<Vec<f64>> {
    anyhow::ensure!(
        data.len() == rows * cols,
        "matrix data does not match {rows}×{cols}"
    );
    faer::set_global_parallelism(faer::Par::Seq);
    let m = faer::Mat::<f64>::from_fn(rows, cols, |i, j| data[i * cols + j] as f64);
    m.singular_values()
        .map_err(|e| anyhow::anyhow!("SVD did not converge: {e:?}"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MatrixSpectrum {
    /// e.g. `layers.3.q_proj`
    pub name: String,
    pub projection: String,
    pub rows: usize,
    pub cols: usize,
    pub singular_values: Vec<f64>,
    pub below_threshold: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProjectionSummary {
    pub matrices: usize,
    pub values: usize,
    pub below_threshold: usize,
    /// Counts in `bins` equal bins over [range.0, range.1]; values beyond fall in the last.
    pub histogram: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpectrumReport {
    pub threshold: f64,
    pub range: (f64, f64),
    pub matrices: Vec<MatrixSpectrum>,
    pub projections: BTreeMap<String, ProjectionSummary>,
}

/// The projection type of a weight name: `layers.3.q_proj` → `q_proj`.
pub fn projection_of(name: &str) -> String {
    name.rsplit('.').next().unwrap_or(name).to_string()
}

/// Analyse named matrices (`name`, rows, cols, row-major data); SVDs run in parallel.
pub fn analyse(
    matrices: Vec<(String, usize, usize, Vec<f32>)>,
    threshold: f64,
    bins: usize,
    range: (f64, f64),
) -> Result<SpectrumReport> {
    use rayon::prelude::*;
    let mut spectra: Vec<MatrixSpectrum> = matrices
        .into_par_iter()
        .map(|(name, rows, cols, data)| {
            let sv =
                singular_values(rows, cols, &data).with_context(|| format!("matrix {name}"))?;
            Ok(MatrixSpectrum {
                projection: projection_of(&name),
                below_threshold: sv.iter().filter(|&&s| s < threshold).count(),
                name,
                rows,
                cols,
                singular_values: sv,
            })
        })
        .collect::<Result<_>>()?;
    spectra.sort_by_key(|a| natural_key(&a.name));
    let mut projections: BTreeMap<String, ProjectionSummary> = BTreeMap::new();
    for s in &spectra {
        let p = projections
            .entry(s.projection.clone())
            .or_insert(ProjectionSummary {
                matrices: 0,
                values: 0,
                below_threshold: 0,
                histogram: vec![0; bins],
            });
        p.matrices += 1;
        p.values += s.singular_values.len();
        p.below_threshold += s.below_threshold;
        for &v in &s.singular_values {
            let f = (v - range.0) / (range.1 - range.0);
            let b = ((f * bins as f64).floor().max(0.0) as usize).min(bins - 1);
            p.histogram[b] += 1;
        }
    }
    Ok(SpectrumReport {
        threshold,
        range,
        matrices: spectra,
        projections,
    })
}

/// Sort `layers.10.x` after `layers.9.x`.
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, p.to_string()),
        })
        .collect()
}

impl SpectrumReport {
    /// CSV: one row per matrix with its count below threshold and its largest values.
    pub fn to_csv(&self) -> String {
        let mut s =
            String::from("matrix,projection,rows,cols,below_threshold,sigma_max,sigma_min\n");
        for m in &self.matrices {
            s.push_str(&format!(
                "{},{},{},{},{},{:.6},{:.6}\n",
                m.name,
                m.projection,
                m.rows,
                m.cols,
                m.below_threshold,
                m.singular_values.first().copied().unwrap_or(0.0),
                m.singular_values.last().copied().unwrap_or(0.0)
            ));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// U·diag(σ)·Vᵀ with orthogonal U, V built from Householder reflections.
    fn with_spectrum(rows: usize, cols: usize, sigma: &[f64], seed: u64) -> Vec<f32> {
        let mut x = seed;
        let mut rnd = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        };
        let householder = |n: usize, v: Vec<f64>| {
            let norm2: f64 = v.iter().map(|a| a * a).sum();
            let mut q = vec![vec![0.0; n]; n];
            for i in 0..n {
                for j in 0..n {
                    q[i][j] = if i == j { 1.0 } else { 0.0 } - 2.0 * v[i] * v[j] / norm2;
                }
            }
            q
        };
        let u = householder(rows, (0..rows).map(|_| rnd()).collect());
        let v = householder(cols, (0..cols).map(|_| rnd()).collect());
        let mut out = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                let mut s = 0.0;
                for (k, sk) in sigma.iter().enumerate() {
                    s += u[i][k] * sk * v[j][k];
                }
                out[i * cols + j] = s as f32;
            }
        }
        out
    }

    #[test]
    fn singular_values_do_not_depend_on_the_thread_count() {
        let sigma: Vec<f64> = (0..128).map(|k| 3.0 / (1.0 + k as f64)).collect();
        let m = with_spectrum(352, 128, &sigma, 11);
        let on = |threads: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| singular_values(352, 128, &m).unwrap())
        };
        let (one, two) = (on(1), on(2));
        assert!(one
            .iter()
            .zip(&two)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn singular_values_of_known_matrices() {
        let diag = [3.0f32, 0.0, 0.0, 0.0, 2.0, 0.0];
        let sv = singular_values(2, 3, &diag).unwrap();
        assert!((sv[0] - 3.0).abs() < 1e-6 && (sv[1] - 2.0).abs() < 1e-6);
        // A tall matrix (sides differ by 4×) with a spread spectrum, as faer's f32 path got wrong.
        let sigma: Vec<f64> = (0..32).map(|k| 2.0 / (1.0 + k as f64)).collect();
        let m = with_spectrum(128, 32, &sigma, 7);
        let sv = singular_values(128, 32, &m).unwrap();
        for (got, want) in sv.iter().zip(&sigma) {
            assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        }
    }

    #[test]
    fn counts_and_histograms_per_projection() {
        let sigma = [1.5, 0.5, 0.05, 0.01];
        let m = with_spectrum(4, 4, &sigma, 3);
        let r = analyse(
            vec![
                ("layers.0.q_proj".into(), 4, 4, m.clone()),
                ("layers.1.q_proj".into(), 4, 4, m),
            ],
            0.1,
            50,
            (0.0, 2.0),
        )
        .unwrap();
        let q = &r.projections["q_proj"];
        assert_eq!((q.matrices, q.values, q.below_threshold), (2, 8, 4));
        assert_eq!(q.histogram.iter().sum::<u64>(), 8);
        assert_eq!(q.histogram[37], 2, "1.5 falls in bin 37 of 50 on [0, 2]");
        assert_eq!(
            (q.histogram[0], q.histogram[1]),
            (2, 2),
            "0.01 in bin 0, 0.05 in bin 1"
        );
        assert!(r
            .to_csv()
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("layers.0.q_proj,q_proj,4,4,2,"));
    }
}
