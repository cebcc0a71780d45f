//! AdamW with its moments in reach, so ReLoRA can prune them (§4), GaLore's projected
//! moments ([`crate::galore`]), and gradient clipping.

use crate::fused;
use crate::galore::{GaloreConfig, Projector};
use crate::rng::Rng;
use candle_core::{DType, Result, Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdamConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// What happens to the LoRA parameters' moments at a reset.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum ResetMode {
    Zero,
    /// Each element kept with probability 1 - fraction.
    Random {
        fraction: f64,
    },
    /// Per tensor, zero the elements at or below the `fraction`-quantile of |t|.
    Magnitude {
        fraction: f64,
    },
}

pub struct ParamState {
    pub name: String,
    pub var: Var,
    pub is_lora: bool,
    pub m: Tensor,
    pub v: Tensor,
    /// GaLore: the moments are the projected gradient's (see [`AdamW::use_galore`]).
    pub galore: Option<Projector>,
}

pub struct AdamW {
    pub cfg: AdamConfig,
    pub params: Vec<ParamState>,
    /// Optimizer steps taken; a reset does not change it.
    pub step: u64,
    /// One in-place pass per tensor ([`crate::fused::adamw`]) where it can run (f32, on the
    /// CPU or CUDA); false forces the composed reference update everywhere (for tests).
    pub fused: bool,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var, bool)>, cfg: AdamConfig) -> Result<AdamW> {
        let params = params
            .into_iter()
            .map(|(name, var, is_lora)| {
                // Two buffers: the fused update writes each moment in place.
                Ok(ParamState {
                    m: var.as_tensor().zeros_like()?,
                    v: var.as_tensor().zeros_like()?,
                    name,
                    var,
                    is_lora,
                    galore: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            params,
            step: 0,
            fused: true,
        })
    }

    /// GaLore for the 2-D parameters that `project` selects by name: their moments shrink
    /// to the projected shape. Returns how many were selected.
    pub fn use_galore(
        &mut self,
        cfg: GaloreConfig,
        project: impl Fn(&str) -> bool,
    ) -> Result<usize> {
        let mut n = 0;
        for p in self.params.iter_mut().filter(|p| project(&p.name)) {
            let t = p.var.as_tensor();
            let shape = t.dims2()?;
            let proj = Projector::new(cfg, shape);
            p.m = Tensor::zeros(proj.low_shape(), t.dtype(), t.device())?;
            p.v = p.m.clone();
            p.galore = Some(proj);
            n += 1;
        }
        Ok(n)
    }

    /// Floats of state this optimizer keeps: both moments of every parameter, and GaLore's
    /// projectors.
    pub fn state_floats(&self) -> usize {
        self.params
            .iter()
            .map(|p| {
                let projector = p.galore.as_ref().map_or(0, |g| {
                    [&g.left, &g.right]
                        .iter()
                        .filter_map(|t| t.as_ref().map(Tensor::elem_count))
                        .sum()
                });
                p.m.elem_count() + p.v.elem_count() + projector
            })
            .sum()
    }

    /// One update with gradients in parameter order.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step_scaled(grads, lr, 1.0)
    }

    /// One update with gradients `grad_scale · grads`: the scale (averaging over
    /// micro-batches and ranks, and clipping) is applied as each gradient is read.
    pub fn step_scaled(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            candle_core::bail!(
                "adamw: {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            );
        }
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        let constants = fused::adamw::AdamStep {
            lr: lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            one_minus_beta1: (1.0 - c.beta1) as f32,
            one_minus_beta2: (1.0 - c.beta2) as f32,
            eps: c.eps as f32,
            weight_decay: c.weight_decay as f32,
            bias1: bc1 as f32,
            bias2: bc2 as f32,
            grad_scale: grad_scale as f32,
        };
        for (p, g) in self.params.iter_mut().zip(grads) {
            if p.galore.is_some() {
                galore_step(p, g, lr, grad_scale, c, self.step, self.fused)?;
                continue;
            }
            let t = p.var.as_tensor();
            let fusable = [t, &p.m, &p.v, g].iter().all(|x| {
                let dev = x.device();
                (dev.is_cpu() || dev.is_cuda()) && x.dtype() == DType::F32 && x.is_contiguous()
            });
            if self.fused && fusable {
                fused::adamw::step(t, &p.m, &p.v, g, constants)?;
                continue;
            }
            let scaled;
            let g = if grad_scale == 1.0 {
                g
            } else {
                scaled = (g * grad_scale)?;
                &scaled
            };
            p.m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            p.v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&p.v / bc2)?.sqrt()? + c.eps)?;
            let mut update = ((&p.m / bc1)? / denom)?;
            if c.weight_decay != 0.0 {
                update = (update + (p.var.as_tensor() * c.weight_decay)?)?;
            }
            p.var.set(&(p.var.as_tensor() - (update * lr)?)?)?;
        }
        Ok(())
    }

    /// Reset the moments of the LoRA parameters only; everything else keeps its state.
    pub fn reset_lora(&mut self, mode: ResetMode, rng: &mut Rng) -> Result<()> {
        for p in self.params.iter_mut().filter(|p| p.is_lora) {
            let m = prune(&p.m, mode, rng)?;
            p.v = prune(&p.v, mode, rng)?;
            // Each moment gets its own mask (§4), but an element that keeps its first moment
            // while its second is pruned takes a step of m / (0 + eps): right after a restart
            // B = 0, so A's gradient is exactly 0 and v stays 0 while m decays slowly, and
            // such elements of A jump by ~1e4·lr. So a first moment survives only where its
            // second moment does. (A deviation from the reference code, which has this hazard.)
            let keep_m = p.v.ne(0.0)?.to_dtype(m.dtype())?;
            p.m = (m * keep_m)?;
        }
        Ok(())
    }
}

/// One GaLore update of a projected weight, in galore-torch's order of operations (see
/// [`crate::galore`]); `step` counts this update.
fn galore_step(
    p: &mut ParamState,
    g: &Tensor,
    lr: f64,
    grad_scale: f64,
    c: AdamConfig,
    step: u64,
    fused: bool,
) -> Result<()> {
    let g = if grad_scale == 1.0 {
        g.clone()
    } else {
        (g * grad_scale)?
    };
    let proj = p
        .galore
        .as_mut()
        .expect("only called for projected weights");
    if proj.refreshes_at(step - 1) {
        proj.refresh(&g)?;
    }
    let low = proj.project(&g)?;
    p.m = ((&p.m * c.beta1)? + (&low * (1.0 - c.beta1))?)?;
    p.v = ((&p.v * c.beta2)? + (low.sqr()? * (1.0 - c.beta2))?)?;
    let normalised = (&p.m / (p.v.sqrt()? + c.eps)?)?;
    let step_size =
        lr * (1.0 - c.beta2.powi(step as i32)).sqrt() / (1.0 - c.beta1.powi(step as i32));
    // galore-torch: p -= step_size · back(m / denom); then p -= lr · wd · p.
    proj.apply(
        &p.var,
        &normalised,
        step_size,
        1.0 - lr * c.weight_decay,
        fused,
    )
}

/// The `q`-quantile of `values` with linear interpolation between order statistics.
pub fn quantile(values: &mut [f32], q: f64) -> f32 {
    values.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = (pos - lo as f64) as f32;
    values[lo] + frac * (values[hi] - values[lo])
}

pub fn prune(t: &Tensor, mode: ResetMode, rng: &mut Rng) -> Result<Tensor> {
    match mode {
        ResetMode::Zero => t.zeros_like(),
        ResetMode::Random { fraction } => {
            let keep: Vec<f32> = (0..t.elem_count())
                .map(|_| {
                    if (rng.uniform() as f64) < 1.0 - fraction {
                        1.0
                    } else {
                        0.0
                    }
                })
                .collect();
            t * Tensor::from_vec(keep, t.shape(), t.device())?
        }
        ResetMode::Magnitude { fraction } => {
            let abs = t.abs()?;
            let mut vals = abs.flatten_all()?.to_vec1::<f32>()?;
            if vals.is_empty() {
                return Ok(t.clone());
            }
            let tau = quantile(&mut vals, fraction);
            t * abs.gt(tau as f64)?.to_dtype(t.dtype())?
        }
    }
}

/// The global L2 norm of `grads`.
pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads {
        sq += fused::grads::sum_of_squares(g)?;
    }
    Ok(sq.sqrt())
}

/// What gradients of global norm `norm` are multiplied by so it is at most `max` (PyTorch's
/// `clip_grad_norm_`: max / (norm + 1e-6) when over, else 1).
pub fn clip_factor(norm: f64, max: Option<f64>) -> f64 {
    match max {
        Some(max) if norm > max && norm.is_finite() => max / (norm + 1e-6),
        _ => 1.0,
    }
}

/// Scale gradients so their global L2 norm is at most `max`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max: Option<f64>) -> Result<f64> {
    let norm = grad_norm(grads)?;
    let s = clip_factor(norm, max);
    if s != 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn magnitude_pruning_zeroes_exactly_the_fraction_and_keeps_the_largest() {
        let mut rng = Rng::new(3);
        for (n, frac) in [(1000usize, 0.9), (1000, 0.99), (4000, 0.7)] {
            let x = Tensor::from_vec(rng.normal_vec(n, 1.0), (n / 10, 10), &Device::Cpu).unwrap();
            let y = prune(&x, ResetMode::Magnitude { fraction: frac }, &mut rng).unwrap();
            let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let ys = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let zeros = ys.iter().filter(|v| **v == 0.0).count();
            assert_eq!(
                zeros,
                (n as f64 * frac).round() as usize,
                "n={n} frac={frac}"
            );
            let mut sorted: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kept_min = ys
                .iter()
                .filter(|v| **v != 0.0)
                .map(|v| v.abs())
                .fold(f32::MAX, f32::min);
            assert_eq!(
                kept_min,
                sorted[n - zeros - 1],
                "the kept ones are the largest"
            );
            for (a, b) in xs.iter().zip(&ys) {
                assert!(*b == 0.0 || a == b);
            }
        }
    }

    #[test]
    fn after_a_reset_no_element_keeps_momentum_without_second_moment() {
        let mut rng = Rng::new(9);
        let dev = Device::Cpu;
        let var =
            Var::from_tensor(&Tensor::zeros(1000, candle_core::DType::F32, &dev).unwrap()).unwrap();
        let mut opt = AdamW::new(vec![("a".into(), var, true)], AdamConfig::default()).unwrap();
        // Moments whose magnitudes are unrelated, so the two masks differ.
        opt.params[0].m = Tensor::from_vec(rng.normal_vec(1000, 1.0), 1000, &dev).unwrap();
        opt.params[0].v = Tensor::from_vec(rng.normal_vec(1000, 1.0), 1000, &dev)
            .unwrap()
            .sqr()
            .unwrap();
        opt.step = 100;
        opt.reset_lora(ResetMode::Magnitude { fraction: 0.9 }, &mut rng)
            .unwrap();
        let m = opt.params[0].m.to_vec1::<f32>().unwrap();
        let v = opt.params[0].v.to_vec1::<f32>().unwrap();
        assert_eq!(v.iter().filter(|x| **x != 0.0).count(), 100);
        assert!(m.iter().zip(&v).all(|(m, v)| *m == 0.0 || *v != 0.0));
        // With a zero gradient (B = 0 right after a restart) the next step stays small.
        let before = opt.params[0].var.as_tensor().to_vec1::<f32>().unwrap();
        opt.step(
            &[Tensor::zeros(1000, candle_core::DType::F32, &dev).unwrap()],
            1e-3,
        )
        .unwrap();
        let after = opt.params[0].var.as_tensor().to_vec1::<f32>().unwrap();
        let max_step = before
            .iter()
            .zip(&after)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(max_step < 0.1, "an update of {max_step} after the reset");
    }

    #[test]
    fn random_pruning_keeps_about_one_minus_p() {
        let mut rng = Rng::new(5);
        let x = Tensor::ones((100, 100), candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = prune(&x, ResetMode::Random { fraction: 0.9 }, &mut rng).unwrap();
        let kept = y.sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((kept - 1000.0).abs() < 100.0, "{kept}");
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr() {
        let v =
            Var::from_tensor(&Tensor::new(&[1.0f32, -2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let mut opt =
            AdamW::new(vec![("w".into(), v.clone(), false)], AdamConfig::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -0.1, 2.0], &Device::Cpu).unwrap();
        opt.step(&[g], 0.01).unwrap();
        let got = v.as_tensor().to_vec1::<f32>().unwrap();
        for (a, b) in got.iter().zip([0.99f32, -1.99, 2.99]) {
            assert!((a - b).abs() < 1e-5, "{got:?}");
        }
    }

    #[test]
    fn fused_adamw_matches_the_composed_update() {
        let mut rng = Rng::new(12);
        let dev = Device::Cpu;
        let cfg = AdamConfig {
            weight_decay: 0.1,
            ..AdamConfig::default()
        };
        let init = Tensor::from_vec(rng.normal_vec(40_000, 1.0), (200, 200), &dev).unwrap();
        let grads: Vec<Tensor> = (0..5)
            .map(|_| Tensor::from_vec(rng.normal_vec(40_000, 1.0), (200, 200), &dev).unwrap())
            .collect();
        let mut finals = Vec::new();
        for fused in [true, false] {
            let var = Var::from_tensor(&init).unwrap();
            let mut opt = AdamW::new(vec![("w".into(), var.clone(), false)], cfg).unwrap();
            opt.fused = fused;
            for g in &grads {
                opt.step_scaled(std::slice::from_ref(g), 1e-2, 0.5).unwrap();
            }
            let p = &opt.params[0];
            finals.push([var.as_tensor().clone(), p.m.clone(), p.v.clone()]);
        }
        for (what, (a, b)) in ["weight", "m", "v"]
            .iter()
            .zip(finals[0].iter().zip(&finals[1]))
        {
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = d.to_scalar::<f32>().unwrap();
            // The same f32 formula per element; only the order of a few roundings differs.
            assert!(
                d <= 1e-6 * scale,
                "{what}: max difference {d} (scale {scale})"
            );
        }
    }
}
