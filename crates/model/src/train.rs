//! The training loop every method shares, read top to bottom: schedule, accumulate
//! gradients (and sum them across data-parallel ranks), check they are finite, clip, step,
//! then the ReLoRA restart and reset, logging, evaluation and checkpoints.

use crate::checkpoint::{self, TrainState};
use crate::fused::grads::accumulate;
use crate::galore::GaloreConfig;
use crate::llama::Llama;
use crate::optim::{clip_factor, grad_norm, AdamConfig, AdamW, ResetMode};
use crate::parallel::{Collective, CommTime, Solo};
use crate::rng::Rng;
use crate::schedule::Schedule;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use relora_data::{Batch, Loader, Sequences};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// ReLoRA's restarts: merge every `merge_every` steps, reset LoRA moments every `reset_every`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Restarts {
    /// None: no merges (the "no restarts" ablation).
    pub merge_every: Option<u64>,
    /// None: never reset the optimizer.
    pub reset_every: Option<u64>,
    pub reset: ResetMode,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Sequences per forward pass.
    pub micro_batch: usize,
    /// Forward/backward passes per optimizer step.
    pub accum: usize,
    pub lr: f64,
    pub schedule: Schedule,
    pub clip_grad: Option<f64>,
    pub adam: AdamConfig,
    pub restarts: Option<Restarts>,
    /// GaLore's projected moments for every projection weight (attention and MLP); the
    /// embeddings, norms and LM head keep plain AdamW, as in the GaLore authors' code.
    #[serde(default)]
    pub galore: Option<GaloreConfig>,
    pub checkpoint_every: u64,
    pub eval_every: u64,
    pub eval_sequences: usize,
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: u64,
    /// Throughput of this step: shown and logged, never written to metrics.jsonl, whose
    /// bytes must depend only on what the stage's key covers.
    #[serde(skip)]
    pub tokens_per_s: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    /// After a merge into a compact frozen W: the largest ‖W − Q(W)‖ / ‖W‖ over layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant_error: Option<f64>,
}

pub struct Trainer {
    pub model: Llama,
    pub opt: AdamW,
    pub state: TrainState,
    pub cfg: TrainConfig,
    pub device: Device,
    /// The data-parallel group ([`Solo`] unless set with [`Trainer::with_collective`]).
    pub comm: Box<dyn Collective>,
    /// Time spent summing gradients across ranks.
    pub comm_time: CommTime,
    seed: u64,
}

pub fn batch_tensors(b: &Batch, dev: &Device) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    Ok((
        Tensor::from_slice(&b.inputs, (b.batch_size, b.len), dev)?,
        Tensor::from_slice(&b.targets, b.batch_size * b.len, dev)?,
        Tensor::from_slice(&b.weights, b.batch_size * b.len, dev)?,
    ))
}

/// Mean token loss of a batch, and its gradient graph.
pub fn batch_loss(
    model: &Llama,
    b: &Batch,
    dev: &Device,
    dropout: Option<&mut Rng>,
) -> candle_core::Result<Tensor> {
    let (ids, targets, weights) = batch_tensors(b, dev)?;
    model.loss(&ids, &targets, &weights, dropout)
}

/// Mean token loss of a batch in evaluation mode: no dropout, no autograd graph.
pub fn eval_loss(model: &Llama, b: &Batch, dev: &Device) -> candle_core::Result<f64> {
    let (ids, targets, weights) = batch_tensors(b, dev)?;
    model
        .loss_eval(&ids, &targets, &weights)?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()
}

/// exp(mean token cross-entropy) over `batches`, with dropout off. Returns (mean loss,
/// tokens scored). The batches may be streamed: nothing is kept but two sums.
pub fn evaluate(
    model: &Llama,
    batches: impl IntoIterator<Item = Result<Batch>>,
    dev: &Device,
) -> Result<(f64, f64)> {
    let (mut sum, mut count) = (0f64, 0f64);
    for b in batches {
        let b = b?;
        let tokens = b.target_tokens();
        let loss = eval_loss(model, &b, dev)?;
        sum += loss * tokens;
        count += tokens;
    }
    if count == 0.0 {
        bail!("the validation set has no tokens to score");
    }
    Ok((sum / count, count))
}

impl Trainer {
    pub fn new(model: Llama, cfg: TrainConfig, seed: u64, device: Device) -> Result<Trainer> {
        let mut opt = AdamW::new(model.trainable(), cfg.adam)?;
        if let Some(g) = cfg.galore {
            let projections: std::collections::HashSet<String> = model
                .projections()
                .map(|(name, _)| format!("{name}.weight"))
                .collect();
            opt.use_galore(g, |name| projections.contains(name))?;
        }
        let state = TrainState {
            step: 0,
            opt_step: 0,
            tokens: 0,
            loader: Default::default(),
            dropout_rng: Rng::derive(seed, "dropout"),
            restart_rng: Rng::derive(seed, "lora-reinit"),
            reset_rng: Rng::derive(seed, "optimizer-reset"),
            metrics_len: 0,
        };
        Ok(Trainer {
            model,
            opt,
            state,
            cfg,
            device,
            comm: Box::new(Solo),
            comm_time: CommTime::default(),
            seed,
        })
    }

    /// Train as one rank of a data-parallel group. Every rank must build the same model
    /// from the same seed; rank 0 alone writes checkpoints and metrics.
    pub fn with_collective(mut self, comm: Box<dyn Collective>) -> Trainer {
        self.comm = comm;
        self
    }

    fn checkpoint(&mut self, dir: &Path, loader: &Loader, metrics: &Path) -> Result<PathBuf> {
        self.state.loader = loader.state();
        self.state.opt_step = self.opt.step;
        self.state.metrics_len = std::fs::metadata(metrics).map(|m| m.len()).unwrap_or(0);
        checkpoint::save(dir, &self.model, &self.opt, &self.state)
    }

    /// Resume from the newest checkpoint in `dir`, if there is one; returns its step.
    pub fn resume(
        &mut self,
        dir: &Path,
        loader: &mut Loader,
        metrics: &Path,
    ) -> Result<Option<u64>> {
        let Some(ckpt) = checkpoint::latest(dir) else {
            return Ok(None);
        };
        self.state = checkpoint::load(&ckpt, &mut self.model, &mut self.opt, &self.device)?;
        loader.restore(&self.state.loader)?;
        // Drop metrics lines written after the checkpoint; they will be written again.
        if self.comm.rank() == 0 {
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(metrics) {
                f.set_len(self.state.metrics_len)?;
            }
        }
        Ok(Some(self.state.step))
    }

    /// Train until the step counter reaches `end_step`.
    pub fn run(
        &mut self,
        loader: &mut Loader,
        valid: Option<&Sequences>,
        ckpt_dir: &Path,
        metrics_path: &Path,
        end_step: u64,
        mut on_step: impl FnMut(&StepMetrics),
    ) -> Result<Vec<StepMetrics>> {
        let (rank, world) = (self.comm.rank(), self.comm.world());
        // Rank 0 alone writes the metrics (and checkpoints); the others compute.
        let mut metrics = if rank == 0 {
            Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(metrics_path)?,
            )
        } else {
            None
        };
        let mut history = Vec::new();
        let mut last_ckpt_step = self.state.step;
        while self.state.step < end_step {
            let started = Instant::now();
            let step = self.state.step;
            let lr = self.cfg.lr * self.cfg.schedule.lambda(step);

            // Forward and backward over the micro-batches, summing gradients. Every rank
            // reads the whole stream and computes micro-batches rank, rank + world, …, so
            // the ranks together see what one process accumulating them all would.
            let params = self.model.trainable();
            let mut grads: Vec<Tensor> = Vec::new();
            let mut loss_sum = 0f64;
            let mut tokens = 0u64;
            // With several ranks each draws its own dropout masks, from a stream that
            // depends on the step alone, so a resumed run needs no per-rank state.
            let mut rank_dropout =
                (world > 1).then(|| Rng::derive(self.seed, &format!("dropout/{rank}/{step}")));
            for j in 0..self.cfg.accum * world {
                let b = loader.next_batch(self.cfg.micro_batch)?;
                tokens += (b.batch_size * b.len) as u64;
                if j % world != rank {
                    continue;
                }
                let dropout = match &mut rank_dropout {
                    Some(r) => r,
                    None => &mut self.state.dropout_rng,
                };
                let loss = batch_loss(&self.model, &b, &self.device, Some(dropout))?;
                loss_sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
                let mut store = self.model.backward(&loss)?;
                for (k, (_, var, _)) in params.iter().enumerate() {
                    let g = match store.remove(var.as_tensor()) {
                        Some(g) => g,
                        None => var.as_tensor().zeros_like()?,
                    };
                    if grads.len() <= k {
                        grads.push(g);
                    } else {
                        accumulate(&mut grads[k], &g)?;
                    }
                }
            }
            if world > 1 {
                let comm = &self.comm;
                self.comm_time.time(|| {
                    comm.all_reduce_sum(&mut grads)?;
                    let mut l = [loss_sum];
                    comm.all_reduce_sum_f64(&mut l)?;
                    loss_sum = l[0];
                    Ok(())
                })?;
            }
            // The gradients are sums over micro-batches; averaging and clipping become one
            // factor that the optimizer applies as it reads them.
            let average = 1.0 / (self.cfg.accum * world) as f64;
            let loss = loss_sum * average;
            let grad_norm = grad_norm(&grads)? * average;
            if !loss.is_finite() || !grad_norm.is_finite() {
                bail!(
                    "non-finite {} at step {step} (loss {loss}, gradient norm {grad_norm}); \
                     stopping. The last good checkpoint (step {last_ckpt_step}) is kept in {}; \
                     lower the learning rate or enable clip_grad",
                    if loss.is_finite() { "gradient" } else { "loss" },
                    ckpt_dir.display()
                );
            }
            let clip = clip_factor(grad_norm, self.cfg.clip_grad);
            self.opt.step_scaled(&grads, lr, average * clip)?;
            drop(grads);
            self.state.step += 1;
            self.state.tokens += tokens;

            // ReLoRA: merge the low-rank factors into W and start them afresh.
            let mut event = Vec::new();
            let mut quant_error = None;
            if let Some(r) = self.cfg.restarts {
                let s = self.state.step;
                if r.merge_every.is_some_and(|k| s.is_multiple_of(k)) {
                    let mut worst = 0f64;
                    for (_, p) in self.model.projections_mut() {
                        worst = worst.max(p.merge_and_reinit(&mut self.state.restart_rng)?);
                    }
                    event.push("merge");
                    // A compact frozen W is quantised again at every merge: its error shows
                    // whether that drifts.
                    if self.model.projections().any(|(_, p)| p.quantized.is_some()) {
                        quant_error = Some(worst);
                    }
                }
                if r.reset_every.is_some_and(|k| s.is_multiple_of(k)) {
                    self.opt.reset_lora(r.reset, &mut self.state.reset_rng)?;
                    event.push("optimizer_reset");
                }
            }

            let secs = started.elapsed().as_secs_f64();
            let mut m = StepMetrics {
                step: self.state.step,
                loss,
                lr,
                grad_norm,
                tokens: self.state.tokens,
                tokens_per_s: tokens as f64 / secs.max(1e-9),
                eval_loss: None,
                perplexity: None,
                event: (!event.is_empty()).then(|| event.join("+")),
                quant_error,
            };
            let is_last = self.state.step == end_step;
            if let (Some(v), 0) = (valid, rank) {
                if (self.cfg.eval_every > 0 && self.state.step.is_multiple_of(self.cfg.eval_every))
                    || is_last
                {
                    let batches = v
                        .batches(self.cfg.eval_sequences, self.cfg.micro_batch)
                        .map(Ok);
                    let (l, _) = evaluate(&self.model, batches, &self.device)?;
                    m.eval_loss = Some(l);
                    m.perplexity = Some(l.exp());
                }
            }
            if let Some(f) = &mut metrics {
                writeln!(f, "{}", serde_json::to_string(&m)?)?;
                f.flush()?;
            }
            on_step(&m);
            history.push(m);
            if self.cfg.checkpoint_every > 0
                && self.state.step.is_multiple_of(self.cfg.checkpoint_every)
                && !is_last
                && rank == 0
            {
                self.checkpoint(ckpt_dir, loader, metrics_path)?;
                last_ckpt_step = self.state.step;
            }
        }
        self.state.loader = loader.state();
        self.state.opt_step = self.opt.step;
        // The final state describes the whole metrics file, not the last periodic checkpoint
        // (which `checkpoint_every`, a cosmetic parameter, decides).
        self.state.metrics_len = std::fs::metadata(metrics_path).map_or(0, |m| m.len());
        Ok(history)
    }
}

/// A JSON summary of parameter counts, for stage reports.
pub fn param_report(model: &Llama) -> Value {
    json!({
        "trainable_params": model.trainable_count(),
        "frozen_params": model.frozen_count(),
    })
}
