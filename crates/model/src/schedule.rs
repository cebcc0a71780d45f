//! Learning-rate schedules: warmup + cosine, and ReLoRA's jagged cosine (§5).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Schedule {
    /// Linear warmup over `warmup` steps, then cosine down to `min_ratio` at `total`.
    Cosine {
        warmup: u64,
        total: u64,
        min_ratio: f64,
    },
    /// The cosine above, but falling to 0 at every multiple of `cycle` and climbing back
    /// linearly over `restart_warmup` steps.
    Jagged {
        warmup: u64,
        restart_warmup: u64,
        cycle: u64,
        total: u64,
        min_ratio: f64,
    },
    Constant {
        warmup: u64,
    },
}

fn cosine(x: f64, m: f64) -> f64 {
    let x = x.clamp(0.0, 1.0);
    m + (1.0 - m) * (1.0 + (std::f64::consts::PI * x).cos()) / 2.0
}

impl Schedule {
    /// The multiplier of the peak learning rate at step `c` (0-based).
    pub fn lambda(&self, c: u64) -> f64 {
        match *self {
            Schedule::Constant { warmup } => {
                if c < warmup {
                    c as f64 / warmup as f64
                } else {
                    1.0
                }
            }
            Schedule::Cosine {
                warmup,
                total,
                min_ratio,
            } => {
                if c < warmup {
                    c as f64 / warmup as f64
                } else {
                    cosine(
                        (c - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64,
                        min_ratio,
                    )
                }
            }
            Schedule::Jagged {
                warmup,
                restart_warmup,
                cycle,
                total,
                min_ratio,
            } => {
                let span = total.saturating_sub(warmup).max(1) as f64;
                if c < warmup {
                    return c as f64 / warmup as f64;
                }
                let (r, k) = (c % cycle, c / cycle);
                if r < restart_warmup && c >= cycle {
                    let at = (k * cycle + restart_warmup) as f64 - warmup as f64;
                    (r as f64 / restart_warmup as f64) * cosine(at / span, min_ratio)
                } else {
                    cosine((c - warmup) as f64 / span, min_ratio)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jagged_matches_the_reference_table() {
        let s = Schedule::Jagged {
            warmup: 500,
            restart_warmup: 100,
            cycle: 5000,
            total: 15000,
            min_ratio: 0.1,
        };
        let table = [
            (0, 0.0),
            (250, 0.5),
            (500, 1.0),
            (2500, 0.958409),
            (4999, 0.802615),
            (5000, 0.0),
            (5001, 0.007944),
            (5050, 0.397203),
            (5099, 0.786462),
            (5100, 0.794406),
            (10000, 0.0),
            (10100, 0.330652),
            (14999, 0.1),
        ];
        for (c, want) in table {
            let got = s.lambda(c);
            assert!((got - want).abs() < 1e-6, "c={c}: {got} vs {want}");
        }
    }

    #[test]
    fn cosine_warms_up_and_ends_at_min() {
        let s = Schedule::Cosine {
            warmup: 10,
            total: 110,
            min_ratio: 0.1,
        };
        assert_eq!(s.lambda(5), 0.5);
        assert!((s.lambda(10) - 1.0).abs() < 1e-12);
        assert!((s.lambda(60) - 0.55).abs() < 1e-12);
        assert!((s.lambda(110) - 0.1).abs() < 1e-12);
    }
}
