//! The weighted mean token cross-entropy, fused with the log-softmax over the vocabulary.
//!
//! The forward pass reads each row of logits once (its maximum, then the sum of exponentials:
//! two sweeps of one row, which stays in cache) and keeps one log-sum-exp per token. The
//! backward pass writes the logits' gradient directly, `(softmax − onehot) · wᵢ / Σw`, so no
//! [tokens × vocab] tensor exists besides the logits and their gradient.
//!
//! [`head_cross_entropy`] goes one step further for training: the LM head's matmul and the
//! loss are one op, the logits live in a buffer of the op, and the backward pass turns that
//! buffer into the logits' gradient in place before the two matmuls of the head's backward
//! pass. No [tokens × vocab] tensor ever enters the autograd graph, so candle allocates no
//! zero-filled [tokens × vocab] gradient and sums nothing into it.

#[cfg(feature = "cuda")]
use super::cuda;
use super::exp::exp;
use super::host;
use super::linear;
use super::simd::{self, kernel};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

kernel! {
    /// log Σ exp(z) over a row, shifted by the row's maximum.
    fn log_sum_exp(row: &[f32]) -> f32 {
        let max = simd::max(row);
        max + simd::sum_map(row, |z| exp(z - max)).ln()
    }
}

kernel! {
    /// A row of logits turned into `c · softmax(row)` in place, from its log-sum-exp.
    fn scaled_softmax(row: &mut [f32], c: f32, lse: f32) {
        for z in row.iter_mut() {
            *z = c * exp(*z - lse);
        }
    }
}

/// The targets and weights of one loss, checked against the vocabulary.
struct Targets {
    targets: Vec<u32>,
    weights: Vec<f32>,
    total_weight: f64,
}

impl Targets {
    fn new(targets: &Tensor, weights: &Tensor, rows: usize) -> Result<Targets> {
        let targets = targets
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?;
        let weights = weights
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if targets.len() != rows || weights.len() != rows {
            bail!(
                "cross_entropy: {rows} rows of logits, {} targets, {} weights",
                targets.len(),
                weights.len()
            );
        }
        let total_weight = weights.iter().map(|&w| f64::from(w)).sum();
        Ok(Targets {
            targets,
            weights,
            total_weight,
        })
    }

    fn check(&self, vocab: usize) -> Result<()> {
        match self
            .targets
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= vocab)
        {
            Some((i, t)) => {
                bail!("cross_entropy: target {t} of token {i} is outside the vocabulary of {vocab}")
            }
            None => Ok(()),
        }
    }

    /// The mean loss over `x [n, vocab]`, and each row's log-sum-exp.
    fn loss(&self, x: &[f32], vocab: usize) -> (f64, Vec<f32>) {
        let mut lse = vec![0f32; x.len() / vocab.max(1)];
        let losses: Vec<f64> = x
            .par_chunks(vocab)
            .zip(lse.par_iter_mut())
            .enumerate()
            .map(|(i, (row, lse))| {
                *lse = log_sum_exp(row);
                let w = self.weights[i];
                if w == 0.0 {
                    0.0
                } else {
                    f64::from((*lse - row[self.targets[i] as usize]) * w)
                }
            })
            .collect();
        // A fixed-order sum: the loss's bits do not depend on the thread count.
        (losses.iter().sum::<f64>() / self.total_weight, lse)
    }

    /// Turns logits `x [n, vocab]` into their gradient in place, for a loss gradient `g`.
    fn gradient_in_place(&self, x: &mut [f32], vocab: usize, lse: &[f32], g: f64) {
        let g = g / self.total_weight;
        x.par_chunks_mut(vocab).enumerate().for_each(|(i, row)| {
            let c = (g * f64::from(self.weights[i])) as f32;
            if c == 0.0 {
                row.fill(0.0);
                return;
            }
            scaled_softmax(row, c, lse[i]);
            row[self.targets[i] as usize] -= c;
        });
    }
}

struct CrossEntropy {
    targets: Targets,
    /// log Σ exp(logits) of each row, from the forward pass.
    lse: host::Saved<Vec<f32>>,
    /// On a GPU: the targets (u32) and weights (f32) there, and the forward pass's lse.
    #[cfg(feature = "cuda")]
    gpu: Option<(Tensor, Tensor)>,
    #[cfg(feature = "cuda")]
    lse_gpu: host::Saved<cuda::CudaSlice<f32>>,
}

#[cfg(feature = "cuda")]
impl CrossEntropy {
    /// Runs `f` on the device's targets and weights.
    fn with_targets<R>(
        &self,
        f: impl FnOnce(cuda::CudaView<'_, u32>, cuda::CudaView<'_, f32>) -> Result<R>,
    ) -> Result<R> {
        let Some((targets, weights)) = &self.gpu else {
            bail!("cross_entropy: the targets are not on the logits' GPU");
        };
        cuda::with_view::<u32, _>(targets, "cross_entropy", |_, t| {
            cuda::with_view::<f32, _>(weights, "cross_entropy", |_, w| f(t, w))
        })
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, v) = l.shape().dims2()?;
        self.targets.check(v)?;
        let (loss, lse) = self.targets.loss(host::slice(s, l, "cross_entropy")?, v);
        self.lse.keep(lse, "cross_entropy")?;
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &cuda::CudaStorage, l: &Layout) -> Result<(cuda::CudaStorage, Shape)> {
        let dims = l.shape().dims2()?;
        self.targets.check(dims.1)?;
        let x = cuda::view(s, l, "cross_entropy")?;
        let dev = cuda::device_of(s);
        let total = self.targets.total_weight;
        let (loss, lse) = self.with_targets(|t, w| cuda::xent_fwd(dev, &x, &t, &w, dims, total))?;
        self.lse_gpu.keep(lse, "cross_entropy")?;
        Ok((cuda::storage(loss, dev), Shape::from(())))
    }

    fn bwd(&self, logits: &Tensor, _loss: &Tensor, dloss: &Tensor) -> Result<Option<Tensor>> {
        let g = dloss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let v = logits.dim(1)?;
        #[cfg(feature = "cuda")]
        if logits.device().is_cuda() {
            let lse = self.lse_gpu.get("cross_entropy")?;
            let dims = logits.dims2()?;
            let g_over_total = g / self.targets.total_weight;
            let dx = cuda::read([logits], "cross_entropy", |dev, [x]| {
                let buf = self.with_targets(|t, w| {
                    cuda::xent_bwd(dev, &x, &t, &w, lse, dims, g_over_total)
                })?;
                Ok(cuda::tensor(buf, dev, logits.dims()))
            })?;
            return Ok(Some(dx));
        }
        let lse = self.lse.get("cross_entropy")?;
        let mut dx = host::read([logits], "cross_entropy", |[x]| x.to_vec())?;
        self.targets.gradient_in_place(&mut dx, v, lse, g);
        Ok(Some(host::tensor(dx, logits.dims())?))
    }
}

/// Weighted mean token cross-entropy of `logits [n, vocab]` against `targets [n]` (u32) with
/// `weights [n]`, fused (CPU and CUDA). The result is a scalar in the logits' dtype.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let op = CrossEntropy {
        targets: Targets::new(targets, weights, logits.dim(0)?)?,
        lse: host::Saved::new(),
        #[cfg(feature = "cuda")]
        gpu: match logits.device() {
            dev @ candle_core::Device::Cuda(_) => {
                let on =
                    |t: &Tensor, dt| t.to_device(dev)?.to_dtype(dt)?.flatten_all()?.contiguous();
                Some((on(targets, DType::U32)?, on(weights, DType::F32)?))
            }
            _ => None,
        },
        #[cfg(feature = "cuda")]
        lse_gpu: host::Saved::new(),
    };
    logits
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(op)?
        .to_dtype(logits.dtype())
}

struct HeadCrossEntropy {
    targets: Targets,
    /// The logits [n, vocab] and their log-sum-exps, from the forward pass; the backward pass
    /// takes the logits and overwrites them with their gradient.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp2 for HeadCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, h) = xl.shape().dims2()?;
        let (v, h2) = wl.shape().dims2()?;
        if h != h2 {
            bail!(
                "head_cross_entropy: x {:?} against head {:?}",
                xl.dims(),
                wl.dims()
            );
        }
        self.targets.check(v)?;
        let (x, w) = (host::slice(xs, xl, "head")?, host::slice(ws, wl, "head")?);
        let logits = linear::forward(x, w, (n, h, v));
        let (loss, lse) = self.targets.loss(&logits, v);
        *self.saved.lock().expect("not poisoned") = Some((logits, lse));
        Ok((CpuStorage::F32(vec![loss as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some((mut dlogits, lse)) = self.saved.lock().expect("not poisoned").take() else {
            bail!("head_cross_entropy: backward before forward, or twice");
        };
        let (n, h) = x.dims2()?;
        let v = w.dim(0)?;
        let g = dloss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        self.targets.gradient_in_place(&mut dlogits, v, &lse, g);
        let (dx, dw) = host::read([x, w], "head", |[x, w]| {
            linear::backward(x, w, &dlogits, (n, h, v))
        })?;
        Ok((
            Some(host::tensor(dx, x.dims())?),
            Some(host::tensor(dw, w.dims())?),
        ))
    }
}

/// The weighted mean token cross-entropy of the logits `x [n, hidden] · headᵀ`, with the
/// head's matmul and the loss as one op (CPU): see the module's documentation. The loss is
/// an f32 scalar whatever x's dtype (the reference path, too, takes it in f32).
pub fn head_cross_entropy(
    x: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    let op = HeadCrossEntropy {
        targets: Targets::new(targets, weights, x.dim(0)?)?,
        saved: Mutex::new(None),
    };
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
    f32_of(x)?.apply_op2(&f32_of(head)?, op)
}
