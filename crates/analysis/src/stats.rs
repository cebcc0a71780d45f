//! Small-sample statistics for comparing runs: means over seeds, and 95% intervals of the
//! difference between two rows, paired (Student's t on the per-seed differences) where the
//! rows share seeds and a warm start, Welch's otherwise.

/// Mean and sample standard deviation (n − 1) of `xs`; the deviation is 0 for one value.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// A difference of means with its two-sided 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interval {
    /// mean(a) − mean(b).
    pub diff: f64,
    pub low: f64,
    pub high: f64,
    /// Degrees of freedom of the t distribution used (Welch's may be fractional).
    pub df: f64,
    pub paired: bool,
}

impl Interval {
    /// Whether the interval leaves out 0: the sign of the difference holds beyond it.
    pub fn excludes_zero(&self) -> bool {
        self.low > 0.0 || self.high < 0.0
    }
}

/// Paired interval: `a[i]` and `b[i]` share a seed. None with fewer than two pairs.
pub fn paired(a: &[f64], b: &[f64]) -> Option<Interval> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let (m, sd) = mean_std(&d);
    let df = (d.len() - 1) as f64;
    let half = t_quantile(0.975, df) * sd / (d.len() as f64).sqrt();
    Some(Interval {
        diff: m,
        low: m - half,
        high: m + half,
        df,
        paired: true,
    })
}

/// Welch's interval for two independent samples. None unless each has two values or more.
pub fn welch(a: &[f64], b: &[f64]) -> Option<Interval> {
    if a.len() < 2 || b.len() < 2 {
        return None;
    }
    let (ma, sa) = mean_std(a);
    let (mb, sb) = mean_std(b);
    let (va, vb) = (sa * sa / a.len() as f64, sb * sb / b.len() as f64);
    let se = (va + vb).sqrt();
    let diff = ma - mb;
    if se == 0.0 {
        return Some(Interval {
            diff,
            low: diff,
            high: diff,
            df: f64::INFINITY,
            paired: false,
        });
    }
    // Welch–Satterthwaite degrees of freedom.
    let df =
        (va + vb).powi(2) / (va * va / (a.len() as f64 - 1.0) + vb * vb / (b.len() as f64 - 1.0));
    let half = t_quantile(0.975, df) * se;
    Some(Interval {
        diff,
        low: diff - half,
        high: diff + half,
        df,
        paired: false,
    })
}

/// The `p` quantile of Student's t with `df` degrees of freedom (p in (0.5, 1)), by bisection
/// on the distribution function.
pub fn t_quantile(p: f64, df: f64) -> f64 {
    if !df.is_finite() {
        return normal_quantile(p);
    }
    let (mut lo, mut hi) = (0.0_f64, 1.0_f64);
    while t_cdf(hi, df) < p {
        hi *= 2.0;
        if hi > 1e12 {
            return f64::INFINITY;
        }
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if t_cdf(mid, df) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

fn normal_quantile(p: f64) -> f64 {
    let (mut lo, mut hi) = (-40.0_f64, 40.0_f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if 0.5 * erfc(-mid / std::f64::consts::SQRT_2) < p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// erfc by its continued-fraction-free Chebyshev fit (relative error below 1.2e-7).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// P(T ≤ t) for Student's t with `df` degrees of freedom.
pub fn t_cdf(t: f64, df: f64) -> f64 {
    let x = df / (df + t * t);
    let tail = 0.5 * incomplete_beta(x, df / 2.0, 0.5);
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// The regularised incomplete beta function I_x(a, b), from its continued fraction
/// (evaluated by the modified Lentz method), using the symmetry I_x(a,b) = 1 − I_{1−x}(b,a)
/// where the fraction converges slowly.
fn incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * beta_fraction(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * beta_fraction(1.0 - x, b, a) / b
    }
}

fn beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut h = d;
    for m in 1..500 {
        let m = m as f64;
        // The even step, then the odd step, of the fraction's terms.
        for num in [
            m * (b - m) * x / ((a + 2.0 * m - 1.0) * (a + 2.0 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2.0 * m) * (a + 2.0 * m + 1.0)),
        ] {
            d = 1.0 + num * d;
            if d.abs() < TINY {
                d = TINY;
            }
            c = 1.0 + num / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, nine terms).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection keeps the series in its accurate range.
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_published_tables() {
        // Two-sided 95% critical values of Student's t (any statistics table).
        for (df, want) in [
            (1.0, 12.7062),
            (2.0, 4.3027),
            (3.0, 3.1824),
            (10.0, 2.2281),
            (30.0, 2.0423),
        ] {
            let got = t_quantile(0.975, df);
            assert!((got - want).abs() < 1e-3, "df {df}: {got} vs {want}");
        }
        assert!((t_quantile(0.975, f64::INFINITY) - 1.95996).abs() < 1e-3);
        assert!((t_cdf(0.0, 5.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn paired_intervals_use_the_per_seed_differences() {
        // Differences 1.0, 1.1, 1.2: mean 1.1, sd 0.1, half-width t(0.975, 2) · 0.1 / √3.
        let (a, b) = ([11.0, 21.1, 31.2], [10.0, 20.0, 30.0]);
        let i = paired(&a, &b).unwrap();
        let half = 4.302_653 * 0.1 / 3f64.sqrt();
        assert!((i.diff - 1.1).abs() < 1e-9);
        assert!((i.high - i.low - 2.0 * half).abs() < 1e-5);
        assert!(i.paired && i.excludes_zero());
        // The same numbers unpaired: the seed-to-seed spread swamps the difference.
        let w = welch(&a, &b).unwrap();
        assert!(!w.paired && !w.excludes_zero());
        assert!(paired(&[1.0], &[2.0]).is_none());
    }

    #[test]
    fn welch_degrees_of_freedom_follow_satterthwaite() {
        // Equal variances and sizes: df = 2(n − 1).
        let w = welch(&[1.0, 2.0, 3.0], &[4.0, 5.0, 6.0]).unwrap();
        assert!((w.df - 4.0).abs() < 1e-9);
        assert!((w.diff + 3.0).abs() < 1e-12);
        let half = t_quantile(0.975, 4.0) * (2.0f64 / 3.0).sqrt();
        assert!((w.high - (-3.0 + half)).abs() < 1e-9);
    }
}
