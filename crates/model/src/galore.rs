//! GaLore (Zhao et al., ICML 2024, "GaLore: Memory-Efficient LLM Training by Gradient
//! Low-Rank Projection"): the weights stay full-rank, but each projected weight's gradient
//! G (m×n) is mapped onto a rank-r subspace, Adam's moments live there (r×n or m×r instead
//! of m×n), and the normalised update is mapped back and scaled. The subspace is the top-r
//! singular vectors of the gradient, recomputed every `update_proj_gap` optimizer steps.
//!
//! Every choice follows the authors' `galore-torch` package (its `GaLoreProjector` and
//! `AdamW`), which `scripts/galore/check.sh` compares this code against:
//! - the side: `std` projects onto the right singular vectors when m ≥ n (G·Qᵀ, m×r) and
//!   onto the left ones otherwise (Pᵀ·G, r×n), so the moments take the smaller shape;
//!   `reverse_std` the opposite; `right`, `left` and `full` (both sides, r×r) as named;
//! - the refresh happens on the optimizer's 1st step and every `update_proj_gap` steps
//!   after (galore-torch: `iter % update_proj_gap == 0` with `iter` counting from 0);
//! - the moments are kept as they are when the subspace changes (neither reset nor
//!   rotated into the new basis), as galore-torch does;
//! - Adam in the Hugging Face form: denominator √v + ε, step size lr·√(1−β₂ᵗ)/(1−β₁ᵗ), and
//!   decoupled weight decay applied after the update, W ← W − lr·wd·W.
//!
//! Where this code differs, deliberately:
//! - the SVD runs in f64 on the host (faer, one thread), not in f32: singular vectors of
//!   close singular values are ill-conditioned, and in f64 the subspace is the same to f32
//!   precision on every machine and every data-parallel rank. It is copied to the host once
//!   every `update_proj_gap` steps; the per-step products stay on the device;
//! - each singular pair's sign is fixed (the largest-magnitude entry of its left vector is
//!   positive). An SVD's signs are arbitrary, and because the moments outlive a refresh
//!   they change the result: two correct SVDs with other signs train differently. The
//!   comparison with galore-torch applies the same rule to torch's SVD;
//! - galore-torch picks the back-projection's side from the low-rank matrix's shape, which
//!   fails for `reverse_std` when the rank equals the smaller side; here the side chosen at
//!   projection is used both ways.

use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Which singular vectors the gradient is projected onto (galore-torch's `proj_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProjType {
    /// Right singular vectors for a tall or square weight, left for a wide one.
    Std,
    /// Left for tall or square, right for wide.
    ReverseStd,
    Right,
    Left,
    /// Both: the moments are r×r.
    Full,
}

/// GaLore's settings for every projected weight.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GaloreConfig {
    pub rank: usize,
    /// Optimizer steps between two SVDs of the gradient (the paper's T).
    pub update_proj_gap: u64,
    /// Multiplies the back-projected update (the paper's α).
    pub scale: f64,
    pub proj_type: ProjType,
}

/// The side (or sides) a weight's gradient is projected on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Pᵀ·G with P the top-r left singular vectors (m×r): moments r×n.
    Left,
    /// G·Qᵀ with Q the top-r right singular vectors as rows (r×n): moments m×r.
    Right,
    /// Pᵀ·G·Qᵀ: moments r×r.
    Both,
}

/// One weight's projector: the subspace it projects onto, once the first step has set it.
#[derive(Debug, Clone)]
pub struct Projector {
    pub cfg: GaloreConfig,
    pub side: Side,
    /// The weight's shape (m, n).
    pub shape: (usize, usize),
    /// P, m×r (sides Left and Both).
    pub left: Option<Tensor>,
    /// Q, r×n (sides Right and Both).
    pub right: Option<Tensor>,
}

impl Projector {
    pub fn new(cfg: GaloreConfig, shape: (usize, usize)) -> Projector {
        let tall = shape.0 >= shape.1;
        let side = match cfg.proj_type {
            ProjType::Std if tall => Side::Right,
            ProjType::Std => Side::Left,
            ProjType::ReverseStd if tall => Side::Left,
            ProjType::ReverseStd => Side::Right,
            ProjType::Right => Side::Right,
            ProjType::Left => Side::Left,
            ProjType::Full => Side::Both,
        };
        Projector {
            cfg,
            side,
            shape,
            left: None,
            right: None,
        }
    }

    /// The projected gradient's shape, which Adam's moments take.
    pub fn low_shape(&self) -> (usize, usize) {
        let ((m, n), r) = (self.shape, self.cfg.rank);
        match self.side {
            Side::Left => (r, n),
            Side::Right => (m, r),
            Side::Both => (r, r),
        }
    }

    /// Whether the subspace is set.
    pub fn is_set(&self) -> bool {
        match self.side {
            Side::Left => self.left.is_some(),
            Side::Right => self.right.is_some(),
            Side::Both => self.left.is_some() && self.right.is_some(),
        }
    }

    /// Whether the step that follows `steps_taken` optimizer steps computes a new subspace.
    pub fn refreshes_at(&self, steps_taken: u64) -> bool {
        !self.is_set() || steps_taken.is_multiple_of(self.cfg.update_proj_gap.max(1))
    }

    /// A new subspace: the top-r singular vectors of the gradient `g`.
    pub fn refresh(&mut self, g: &Tensor) -> Result<()> {
        let (p, q) = top_singular_vectors(g, self.cfg.rank)?;
        match self.side {
            Side::Left => self.left = Some(p),
            Side::Right => self.right = Some(q),
            Side::Both => {
                self.left = Some(p);
                self.right = Some(q);
            }
        }
        Ok(())
    }

    fn parts(&self) -> Result<(Option<&Tensor>, Option<&Tensor>)> {
        if !self.is_set() {
            candle_core::bail!("galore: the projector is used before its first refresh");
        }
        Ok(match self.side {
            Side::Left => (self.left.as_ref(), None),
            Side::Right => (None, self.right.as_ref()),
            Side::Both => (self.left.as_ref(), self.right.as_ref()),
        })
    }

    /// The gradient in the subspace.
    pub fn project(&self, g: &Tensor) -> Result<Tensor> {
        let (p, q) = self.parts()?;
        let mut low = g.clone();
        if let Some(p) = p {
            low = p.t()?.matmul(&low)?;
        }
        if let Some(q) = q {
            low = low.matmul(&q.t()?)?;
        }
        Ok(low)
    }

    /// `w ← (w − step · project_back(low)) · keep`, galore-torch's update followed by its
    /// decoupled weight decay (`keep` = 1 − lr·wd). On the CPU the back-projection is one
    /// matmul accumulated into the weight in place, with no m×n temporary; elsewhere (CUDA),
    /// or without `fused`, the composed ops.
    pub fn apply(&self, var: &Var, low: &Tensor, step: f64, keep: f64, fused: bool) -> Result<()> {
        let w = var.as_tensor();
        let fusable = fused
            && [w, low]
                .iter()
                .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
            && w.is_contiguous();
        if !fusable {
            let mut next = (w - (self.project_back(low)? * step)?)?;
            if keep != 1.0 {
                next = (next * keep)?;
            }
            return var.set(&next);
        }
        let (p, q) = self.parts()?;
        // Both sides: P·low first (m×r), then the product with Q goes into w.
        let left = match (p, q) {
            (Some(p), Some(_)) => p.matmul(low)?,
            _ => low.clone(),
        };
        let (lhs, rhs) = match (p, q) {
            (Some(p), None) => (p.clone(), left),
            (_, Some(q)) => (left, q.clone()),
            (None, None) => unreachable!("a projector has a side"),
        };
        let (m, k) = lhs.dims2()?;
        let n = rhs.dims2()?.1;
        let beta = (-step * self.cfg.scale) as f32;
        super::fused::host::read([&lhs, &rhs], "galore", |[a, b]| {
            super::fused::host::modify(w, "galore", |out| {
                // SAFETY: `out` is m×n, `a` m×k and `b` k×n, all row-major and contiguous,
                // and `out` shares no memory with them (the weight is not a projector).
                unsafe {
                    super::fused::gemm::mm(
                        (m, n, k),
                        (out.as_mut_ptr(), 1, n),
                        (a.as_ptr(), 1, k),
                        (b.as_ptr(), 1, n),
                        beta,
                        true,
                        super::fused::gemm::Threads::All,
                    )
                }
                if keep != 1.0 {
                    let keep = keep as f32;
                    out.iter_mut().for_each(|x| *x *= keep);
                }
            })
        })??;
        Ok(())
    }

    /// A low-rank update mapped back to the weight's shape, times `scale`.
    pub fn project_back(&self, low: &Tensor) -> Result<Tensor> {
        let (p, q) = self.parts()?;
        let mut full = low.clone();
        if let Some(p) = p {
            full = p.matmul(&full)?;
        }
        if let Some(q) = q {
            full = full.matmul(q)?;
        }
        full * self.cfg.scale
    }
}

/// The top-`r` singular vectors of an m×n matrix: P (m×r, columns) and Q (r×n, rows),
/// largest singular value first, each pair's sign fixed so that the largest-magnitude entry
/// of its left vector is positive (the first such entry on a tie). Computed in f64 on one
/// thread (the module doc says why); returned in f32 on `g`'s device.
pub fn top_singular_vectors(g: &Tensor, r: usize) -> Result<(Tensor, Tensor)> {
    let (m, n) = g.dims2()?;
    if r == 0 || r > m.min(n) {
        candle_core::bail!(
            "galore: rank {r} for a {m}×{n} weight (it must be 1 to {})",
            m.min(n)
        );
    }
    let data = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    faer::set_global_parallelism(faer::Par::Seq);
    let a = faer::Mat::<f64>::from_fn(m, n, |i, j| data[i * n + j] as f64);
    let svd = a.thin_svd().map_err(|e| {
        candle_core::Error::Msg(format!(
            "galore: the SVD of a {m}×{n} gradient did not converge ({e:?})"
        ))
    })?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let mut order: Vec<usize> = (0..m.min(n)).collect();
    // Stable, so equal singular values keep faer's order.
    order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    let mut p = vec![0f32; m * r];
    let mut q = vec![0f32; r * n];
    for (k, &i) in order.iter().take(r).enumerate() {
        let mut largest = 0;
        for row in 1..m {
            if u[(row, i)].abs() > u[(largest, i)].abs() {
                largest = row;
            }
        }
        let sign = if u[(largest, i)] < 0.0 { -1.0 } else { 1.0 };
        for row in 0..m {
            p[row * r + k] = (sign * u[(row, i)]) as f32;
        }
        for col in 0..n {
            q[k * n + col] = (sign * v[(col, i)]) as f32;
        }
    }
    Ok((
        Tensor::from_vec(p, (m, r), g.device())?,
        Tensor::from_vec(q, (r, n), g.device())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::{AdamConfig, AdamW};
    use crate::rng::Rng;
    use candle_core::Device;

    fn host(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
    }

    fn matmul(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
        let (n, k, m) = (a.len(), b.len(), b[0].len());
        (0..n)
            .map(|i| {
                (0..m)
                    .map(|j| (0..k).map(|l| a[i][l] * b[l][j]).sum())
                    .collect()
            })
            .collect()
    }

    fn transpose(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
        (0..a[0].len())
            .map(|j| a.iter().map(|row| row[j]).collect())
            .collect()
    }

    #[test]
    fn the_subspace_is_orthonormal_optimal_and_signed_by_rule() {
        let mut rng = Rng::new(4);
        let (m, n, r) = (40, 24, 5);
        let g = Tensor::from_vec(rng.normal_vec(m * n, 1.0), (m, n), &Device::Cpu).unwrap();
        let (p, q) = top_singular_vectors(&g, r).unwrap();
        let (ph, qh, gh) = (host(&p), host(&q), host(&g));
        let eye = |a: Vec<Vec<f64>>| {
            for (i, row) in a.iter().enumerate() {
                for (j, x) in row.iter().enumerate() {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((x - want).abs() < 1e-5, "({i},{j}) = {x}");
                }
            }
        };
        eye(matmul(&transpose(&ph), &ph));
        eye(matmul(&qh, &transpose(&qh)));
        // The best rank-r approximation: what P·Pᵀ·G leaves is the trailing singular values.
        let sv = {
            let a = faer::Mat::<f64>::from_fn(m, n, |i, j| gh[i][j]);
            a.singular_values().unwrap()
        };
        let approx = matmul(&ph, &matmul(&transpose(&ph), &gh));
        let residual: f64 = (0..m)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| (gh[i][j] - approx[i][j]).powi(2))
            .sum();
        let trailing: f64 = sv[r..].iter().map(|s| s * s).sum();
        assert!(
            (residual - trailing).abs() < 1e-4 * trailing,
            "{residual} vs {trailing}"
        );
        // Pᵀ·G·Qᵀ is diagonal with the top singular values: P and Q belong together.
        let core = matmul(&matmul(&transpose(&ph), &gh), &transpose(&qh));
        for k in 0..r {
            assert!((core[k][k] - sv[k]).abs() < 1e-4 * sv[0], "σ{k}");
            let col: Vec<f64> = ph.iter().map(|row| row[k]).collect();
            let big = col
                .iter()
                .cloned()
                .fold(0f64, |a, x| if x.abs() > a.abs() { x } else { a });
            assert!(big > 0.0, "the largest entry of p{k} is positive");
        }
        // Negating the gradient gives the same subspace, signs included.
        let (p2, q2) = top_singular_vectors(&g.neg().unwrap(), r).unwrap();
        assert_eq!(host(&p2), ph);
        assert_eq!(
            host(&q2).iter().flatten().map(|x| -x).collect::<Vec<_>>(),
            qh.iter().flatten().cloned().collect::<Vec<_>>()
        );
    }

    /// galore-torch's AdamW step, written out on the host in f64: the reference the
    /// candle version (f32) is held to.
    #[test]
    fn projected_adam_follows_galore_torch_step_by_step() {
        let mut rng = Rng::new(9);
        let dev = Device::Cpu;
        for ((shape, proj_type), fused) in [
            ((12, 20), ProjType::Std),
            ((20, 12), ProjType::Std),
            ((12, 20), ProjType::ReverseStd),
            ((16, 16), ProjType::Full),
        ]
        .into_iter()
        .flat_map(|c| [(c, true), (c, false)])
        {
            let (m, n) = shape;
            let cfg = GaloreConfig {
                rank: 4,
                update_proj_gap: 3,
                scale: 0.25,
                proj_type,
            };
            // `full`'s r×r core of a fresh SVD is diagonal in exact arithmetic; its
            // off-diagonal entries are rounding noise (1e-7 in f32, 1e-16 in f64), which
            // m/(√v + ε) turns into values of order one unless ε dwarfs them. Both sides
            // are right; with a larger ε they agree.
            let eps = if proj_type == ProjType::Full {
                1e-3
            } else {
                1e-6
            };
            let adam = AdamConfig {
                beta1: 0.9,
                beta2: 0.99,
                eps,
                weight_decay: 0.1,
            };
            let w0 = rng.normal_vec(m * n, 1.0);
            let var = Var::from_vec(w0.clone(), shape, &dev).unwrap();
            let mut opt = AdamW::new(vec![("w".into(), var.clone(), false)], adam).unwrap();
            opt.use_galore(cfg, |_| true).unwrap();
            opt.fused = fused;
            let low = Projector::new(cfg, shape).low_shape();
            assert_eq!(opt.params[0].m.dims2().unwrap(), low);

            let mut w: Vec<Vec<f64>> = w0
                .chunks(n)
                .map(|r| r.iter().map(|x| *x as f64).collect())
                .collect();
            let (mut mm, mut vv) = (
                vec![vec![0f64; low.1]; low.0],
                vec![vec![0f64; low.1]; low.0],
            );
            let mut proj = Projector::new(cfg, shape);
            let lr = 0.01;
            for step in 1..=8u64 {
                let g = Tensor::from_vec(rng.normal_vec(m * n, 1.0), shape, &dev).unwrap();
                let before = proj.left.clone().or(proj.right.clone()).map(|t| host(&t));
                opt.step_scaled(std::slice::from_ref(&g), lr, 0.5).unwrap();
                // The reference: the same SVD rule, at the same steps.
                let gs = (&g * 0.5).unwrap();
                if (step - 1) % 3 == 0 {
                    proj.refresh(&gs).unwrap();
                }
                let after = proj.left.clone().or(proj.right.clone()).map(|t| host(&t));
                assert_eq!(
                    before != after,
                    (step - 1) % 3 == 0 || step == 1,
                    "refresh at {step}"
                );
                let p = proj.left.as_ref().map(host);
                let q = proj.right.as_ref().map(host);
                let mut lo = host(&gs);
                if let Some(p) = &p {
                    lo = matmul(&transpose(p), &lo);
                }
                if let Some(q) = &q {
                    lo = matmul(&lo, &transpose(q));
                }
                let mut norm = lo.clone();
                for i in 0..low.0 {
                    for j in 0..low.1 {
                        mm[i][j] = 0.9 * mm[i][j] + 0.1 * lo[i][j];
                        vv[i][j] = 0.99 * vv[i][j] + 0.01 * lo[i][j] * lo[i][j];
                        norm[i][j] = mm[i][j] / (vv[i][j].sqrt() + eps);
                    }
                }
                if let Some(p) = &p {
                    norm = matmul(p, &norm);
                }
                if let Some(q) = &q {
                    norm = matmul(&norm, q);
                }
                let size = lr * (1.0 - 0.99f64.powi(step as i32)).sqrt()
                    / (1.0 - 0.9f64.powi(step as i32));
                for i in 0..m {
                    for j in 0..n {
                        w[i][j] -= size * 0.25 * norm[i][j];
                        w[i][j] -= lr * 0.1 * w[i][j];
                    }
                }
                let got = host(var.as_tensor());
                let worst = (0..m)
                    .flat_map(|i| (0..n).map(move |j| (i, j)))
                    .map(|(i, j)| (got[i][j] - w[i][j]).abs())
                    .fold(0f64, f64::max);
                assert!(
                    worst < 1e-5,
                    "{proj_type:?} {shape:?} step {step}: off by {worst}"
                );
            }
        }
    }
}
