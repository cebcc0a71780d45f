//! The projection layer of every block: full-rank, or frozen W plus a LoRA branch, or a pure
//! low-rank factorisation. The model calls `forward` and never asks which.

use crate::frozen::{compact_matmul, frozen_matmul, CompactWeight};
use crate::fused::{self, Ops};
use crate::precision::matmul;
use crate::quant::{FrozenFormat, QuantWeight};
use crate::rng::Rng;
use candle_core::{Device, Result, Tensor, Var};

/// How a low-rank layer is initialised (§2 of the method reference).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// A ~ Kaiming-uniform(a=√5), B = 0: the wrapped layer computes exactly what W did.
    KaimingAZeroB,
    /// A and B both Kaiming-uniform: for training from scratch (no gradient symmetry).
    KaimingBoth,
}

#[derive(Clone)]
pub struct Lora {
    /// [rank, in]
    pub a: Var,
    /// [out, rank]
    pub b: Var,
    pub scale: f64,
    pub dropout: f32,
}

#[derive(Clone)]
pub struct Linear {
    pub in_dim: usize,
    pub out_dim: usize,
    /// [out, in]. None for a pure factorised layer.
    pub weight: Option<Var>,
    /// Whether W is trained (full-rank) or frozen (LoRA).
    pub weight_trainable: bool,
    /// A frozen W kept in a compact format ([`Linear::quantize_frozen`]); `weight` is then
    /// None.
    pub quantized: Option<CompactWeight>,
    pub lora: Option<Lora>,
}

/// U(-1/√in, 1/√in): Kaiming-uniform with a = √5, as PyTorch's Linear and LoRA's A use.
pub fn kaiming_uniform(rng: &mut Rng, rows: usize, cols: usize, dev: &Device) -> Result<Tensor> {
    let bound = 1.0 / (cols as f32).sqrt();
    Tensor::from_vec(
        rng.uniform_vec(rows * cols, -bound, bound),
        (rows, cols),
        dev,
    )
}

/// An inverted-dropout mask (0 or 1/(1−p)) shaped `shape`, in `like`'s dtype and device.
///
/// On the CPU it is drawn from `rng`, so a resumed run repeats it bit for bit. On a GPU it is
/// drawn by the device's generator, which [`crate::Llama::forward`] re-seeds from `rng` once
/// per forward pass: host draws would be billions of random numbers per step at paper scale
/// (tokens × width × 7 projections × layers), and the masks stay a function of the run's
/// saved RNG state.
pub fn dropout_mask(rng: &mut Rng, shape: (usize, usize), p: f32, like: &Tensor) -> Result<Tensor> {
    let keep = 1.0 - p;
    if !like.device().is_cpu() {
        let u = Tensor::rand(0f32, 1f32, shape, like.device())?;
        return u
            .lt(keep as f64)?
            .to_dtype(like.dtype())?
            .affine(1.0 / keep as f64, 0.0);
    }
    Tensor::from_vec(mask_values(rng, shape.0 * shape.1, p), shape, like.device())?
        .to_dtype(like.dtype())
}

/// `n` inverted-dropout mask values (0 or 1/(1−p)) drawn from `rng`, as the CPU draws them.
pub fn mask_values(rng: &mut Rng, n: usize, p: f32) -> Vec<f32> {
    let keep = 1.0 - p;
    (0..n)
        .map(|_| {
            if rng.uniform() < keep {
                1.0 / keep
            } else {
                0.0
            }
        })
        .collect()
}

/// How a forward pass runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    /// Record the autograd graph (training), or enter every weight detached (evaluation).
    pub track: bool,
    /// Use the fused projections of [`crate::fused`] (trainable, and frozen W with its LoRA
    /// branch), whose kernels exist on the CPU only (the caller checks, with
    /// [`crate::fused::Ops::fused_matmuls_on`]).
    pub fused: bool,
}

impl Linear {
    pub fn full(weight: Tensor) -> Result<Linear> {
        let (out_dim, in_dim) = weight.dims2()?;
        Ok(Linear {
            in_dim,
            out_dim,
            weight: Some(Var::from_tensor(&weight)?),
            weight_trainable: true,
            quantized: None,
            lora: None,
        })
    }

    /// Freeze W and add a rank-`rank` branch.
    pub fn add_lora(
        &mut self,
        rank: usize,
        alpha: f64,
        dropout: f32,
        init: LoraInit,
        rng: &mut Rng,
    ) -> Result<()> {
        let dev = self.device();
        let dtype = self
            .weight
            .as_ref()
            .map_or(candle_core::DType::F32, |w| w.dtype());
        let a = kaiming_uniform(rng, rank, self.in_dim, &dev)?.to_dtype(dtype)?;
        let b = match init {
            LoraInit::KaimingAZeroB => Tensor::zeros((self.out_dim, rank), dtype, &dev)?,
            LoraInit::KaimingBoth => {
                kaiming_uniform(rng, self.out_dim, rank, &dev)?.to_dtype(dtype)?
            }
        };
        self.weight_trainable = false;
        self.lora = Some(Lora {
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            scale: alpha / rank as f64,
            dropout,
        });
        Ok(())
    }

    /// The tensors training updates: (name suffix, tensor, whether it is a LoRA factor).
    pub fn trained(&self) -> Vec<(&'static str, &Var, bool)> {
        let mut out = Vec::new();
        if let (Some(w), true) = (&self.weight, self.weight_trainable) {
            out.push(("weight", w, false));
        }
        if let Some(l) = &self.lora {
            out.extend([("lora_a", &l.a, true), ("lora_b", &l.b, true)]);
        }
        out
    }

    fn device(&self) -> Device {
        match (&self.weight, &self.lora) {
            (Some(w), _) => w.device().clone(),
            (None, Some(l)) => l.a.device().clone(),
            (None, None) => Device::Cpu,
        }
    }

    /// `x [.., in] → [.., out]`, computed in x's dtype (weights are cast to it; see
    /// [`crate::precision`]). `dropout_rng` is Some in training mode.
    pub fn forward(&self, x: &Tensor, dropout_rng: Option<&mut Rng>) -> Result<Tensor> {
        let pass = Pass {
            track: true,
            fused: Ops::default().fused_matmuls_on(x.device(), x.dtype()),
        };
        self.apply(x, dropout_rng, pass)
    }

    /// [`Linear::forward`], run as `pass` says.
    pub fn apply(&self, x: &Tensor, dropout_rng: Option<&mut Rng>, pass: Pass) -> Result<Tensor> {
        let param = |v: &Var| {
            if pass.track {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            }
        };
        let dims = x.dims().to_vec();
        let m: usize = dims[..dims.len() - 1].iter().product();
        let dt = x.dtype();
        // The fused ops take x [.., in] as it is: a reshape would be one more autograd node,
        // and one more zero-filled buffer and sum in the backward pass.
        if pass.fused {
            match (&self.weight, self.weight_trainable, &self.lora) {
                // Full-rank.
                (Some(w), true, None) => return fused::linear(x, &param(w).to_dtype(dt)?),
                // The ReLoRA layer: frozen W plus its branch.
                (Some(w), false, Some(l)) => {
                    let mask = match dropout_rng {
                        Some(rng) if l.dropout > 0.0 => {
                            Some(mask_values(rng, m * self.in_dim, l.dropout))
                        }
                        _ => None,
                    };
                    let (a, b) = (param(&l.a).to_dtype(dt)?, param(&l.b).to_dtype(dt)?);
                    return fused::lora_linear(x, w.as_tensor(), &a, &b, l.scale, mask);
                }
                // The same with W in a compact format, dequantised inside the op.
                (None, false, Some(l)) if self.quantized.is_some() => {
                    let mask = match dropout_rng {
                        Some(rng) if l.dropout > 0.0 => {
                            Some(mask_values(rng, m * self.in_dim, l.dropout))
                        }
                        _ => None,
                    };
                    let (a, b) = (param(&l.a).to_dtype(dt)?, param(&l.b).to_dtype(dt)?);
                    let q = self.quantized.as_ref().expect("checked").host.clone();
                    return fused::lora::lora_linear_quantized(x, q, &a, &b, l.scale, mask);
                }
                // Factorised layers keep the reference composition.
                _ => {}
            }
        }
        let x2 = x.reshape((m, self.in_dim))?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("input has a feature dimension") = self.out_dim;
        let mut y = match &self.weight {
            Some(w) if self.weight_trainable => Some(matmul(&x2, &param(w).to_dtype(dt)?.t()?)?),
            // Detached: the frozen op never differentiates W, so the cast needs no graph.
            Some(w) => Some(frozen_matmul(&x2, &w.as_tensor().detach().to_dtype(dt)?)?),
            // A compact W, dequantised whole inside the op (on a GPU by its kernel) and
            // again in the backward pass: no dense copy lives between them.
            None => match &self.quantized {
                Some(q) => Some(compact_matmul(&x2, q)?),
                None => None,
            },
        };
        if let Some(l) = &self.lora {
            let xd = match dropout_rng {
                Some(rng) if l.dropout > 0.0 => {
                    (&x2 * dropout_mask(rng, (m, self.in_dim), l.dropout, &x2)?)?
                }
                _ => x2.clone(),
            };
            // Scale the [m, rank] intermediate rather than the [m, out] result: far fewer
            // elements, in the forward and in the backward pass.
            let (a, b) = (param(&l.a).to_dtype(dt)?, param(&l.b).to_dtype(dt)?);
            let low = matmul(&matmul(&xd, &a.t()?)?.affine(l.scale, 0.0)?, &b.t()?)?;
            y = Some(match y {
                Some(y) => (y + low)?,
                None => low,
            });
        }
        y.expect("a layer has a weight or a LoRA branch")
            .reshape(out_dims)
    }

    /// Move every tensor of this layer to `dev`.
    pub fn move_to(&mut self, dev: &Device) -> Result<()> {
        let mv = |v: &Var| Var::from_tensor(&v.as_tensor().to_device(dev)?);
        if let Some(w) = &self.weight {
            self.weight = Some(mv(w)?);
        }
        if let Some(l) = &mut self.lora {
            l.a = mv(&l.a)?;
            l.b = mv(&l.b)?;
        }
        if let Some(q) = &self.quantized {
            self.quantized = Some(q.on(dev)?);
        }
        Ok(())
    }

    /// s·B·A, the low-rank update as a dense [out, in] matrix.
    pub fn lora_delta(&self) -> Result<Option<Tensor>> {
        match &self.lora {
            Some(l) => Ok(Some(
                l.b.as_tensor()
                    .matmul(l.a.as_tensor())?
                    .affine(l.scale, 0.0)?,
            )),
            None => Ok(None),
        }
    }

    /// The frozen W as a dense f32 tensor, whatever its format (None without one).
    pub fn frozen_weight(&self) -> Result<Option<Tensor>> {
        match (&self.weight, &self.quantized) {
            (Some(w), _) => Ok(Some(w.as_tensor().clone())),
            (None, Some(q)) => Ok(Some(q.dense(candle_core::DType::F32, &self.device())?)),
            (None, None) => Ok(None),
        }
    }

    /// Keep the frozen W in `format` (bf16, int8, NF4 with `block` weights a scale) instead
    /// of f32; returns ‖W − Q(W)‖ / ‖W‖. A no-op for f32 or a layer without a frozen W.
    pub fn quantize_frozen(&mut self, format: FrozenFormat, block: usize) -> Result<f64> {
        if format == FrozenFormat::F32 || self.weight_trainable {
            return Ok(0.0);
        }
        let Some(w) = self.frozen_weight()? else {
            return Ok(0.0);
        };
        if format == FrozenFormat::Nf4 && block == 0 {
            candle_core::bail!("nf4: a block holds at least one weight");
        }
        let data = w
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let q = QuantWeight::quantize(&data, (self.out_dim, self.in_dim), format, block);
        let err = q.relative_error(&data);
        self.quantized = Some(CompactWeight::new(q, &self.device())?);
        self.weight = None;
        Ok(err)
    }

    /// W + s·B·A, or s·B·A alone for a factorised layer: what this layer computes.
    pub fn effective_weight(&self) -> Result<Tensor> {
        let delta = self.lora_delta()?;
        match (self.frozen_weight()?, delta) {
            (Some(w), Some(d)) => w + d,
            (Some(w), None) => Ok(w),
            (None, Some(d)) => Ok(d),
            (None, None) => candle_core::bail!("a layer with neither W nor LoRA"),
        }
    }

    /// The ReLoRA restart: W ← W + s·B·A, then A re-drawn and B ← 0. A compact W is
    /// dequantised, merged in f32 and quantised again; returns ‖W − Q(W)‖ / ‖W‖ of the new
    /// W (0 for f32).
    pub fn merge_and_reinit(&mut self, rng: &mut Rng) -> Result<f64> {
        let Some(delta) = self.lora_delta()? else {
            return Ok(0.0);
        };
        let mut error = 0.0;
        match (&self.weight, self.quantized.clone()) {
            (Some(w), _) => w.set(&(w.as_tensor() + delta)?)?,
            (None, Some(q)) => {
                let merged = (q.dense(delta.dtype(), delta.device())? + delta)?;
                let data = merged.flatten_all()?.to_vec1::<f32>()?;
                let again = QuantWeight::quantize(&data, (q.rows, q.cols), q.format, q.block);
                error = again.relative_error(&data);
                self.quantized = Some(CompactWeight::new(again, &self.device())?);
            }
            (None, None) => candle_core::bail!("cannot merge into a factorised layer"),
        }
        let l = self.lora.as_ref().expect("delta implies LoRA");
        let (rank, in_dim) = l.a.dims2()?;
        let dev = l.a.device().clone();
        l.a.set(&kaiming_uniform(rng, rank, in_dim, &dev)?.to_dtype(l.a.dtype())?)?;
        l.b.set(&l.b.as_tensor().zeros_like()?)?;
        Ok(error)
    }
}
