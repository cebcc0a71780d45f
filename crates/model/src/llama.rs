//! The LLaMA decoder of the paper: pre-norm blocks, RMSNorm, SwiGLU, RoPE, causal attention,
//! no biases, untied LM head. Built from differentiable ops only (candle's fused rms_norm,
//! softmax and rope kernels have no backward pass).

use crate::config::LlamaConfig;
use crate::linear::Linear;
use crate::precision::matmul;
use crate::rng::Rng;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use std::collections::HashMap;

pub const RMS_EPS: f64 = 1e-6;
pub const ROPE_BASE: f64 = 10_000.0;
/// The seven projections of a block, in the order they are wrapped and reported.
pub const PROJECTIONS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

pub struct Block {
    pub attn_norm: Var,
    pub mlp_norm: Var,
    /// q, k, v, o, gate, up, down (see [`PROJECTIONS`]).
    pub proj: [Linear; 7],
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Var,
    pub blocks: Vec<Block>,
    pub norm: Var,
    pub lm_head: Var,
    /// The dtype matmuls run in: the parameters' own dtype unless set (bf16 on a GPU).
    pub compute: DType,
}

fn rms_norm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + RMS_EPS)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// cos and sin tables, [t, head_dim/2].
fn rope_tables(t: usize, head_dim: usize, dev: &Device) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for pos in 0..t {
        for i in 0..half {
            let freq = 1.0 / ROPE_BASE.powf(2.0 * i as f64 / head_dim as f64);
            let a = pos as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (t, half), dev)?,
        Tensor::from_vec(sin, (t, half), dev)?,
    ))
}

/// Rotate-half RoPE on x [b, h, t, d].
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let a = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let b = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[a, b], D::Minus1)
}

fn causal_mask(t: usize, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..t * t)
        .map(|k| {
            if k % t > k / t {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(m, (t, t), dev)
}

impl Llama {
    /// A fresh model: every Linear and the embedding ~ N(0, 0.02), norms = 1.
    pub fn random(cfg: LlamaConfig, rng: &mut Rng, dev: &Device) -> Result<Llama> {
        let mut normal = |r: usize, c: usize| -> Result<Tensor> {
            Tensor::from_vec(rng.normal_vec(r * c, 0.02), (r, c), dev)
        };
        let (h, i) = (cfg.hidden, cfg.intermediate);
        let mut tensors = HashMap::new();
        tensors.insert(
            "embed_tokens.weight".to_string(),
            normal(cfg.vocab_size, h)?,
        );
        for l in 0..cfg.layers {
            for (p, (r, c)) in
                PROJECTIONS
                    .iter()
                    .zip([(h, h), (h, h), (h, h), (h, h), (i, h), (i, h), (h, i)])
            {
                tensors.insert(format!("layers.{l}.{p}.weight"), normal(r, c)?);
            }
            tensors.insert(
                format!("layers.{l}.input_layernorm.weight"),
                Tensor::ones(h, DType::F32, dev)?,
            );
            tensors.insert(
                format!("layers.{l}.post_attention_layernorm.weight"),
                Tensor::ones(h, DType::F32, dev)?,
            );
        }
        tensors.insert("norm.weight".to_string(), Tensor::ones(h, DType::F32, dev)?);
        tensors.insert("lm_head.weight".to_string(), normal(cfg.vocab_size, h)?);
        Llama::from_tensors(cfg, &tensors)
    }

    /// A full-rank model from plain LLaMA tensors (as [`Llama::merged_tensors`] writes them).
    pub fn from_tensors(cfg: LlamaConfig, t: &HashMap<String, Tensor>) -> Result<Llama> {
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let x = t.get(name).ok_or_else(|| {
                candle_core::Error::Msg(format!("checkpoint has no tensor `{name}`"))
            })?;
            if x.dims() != shape {
                candle_core::bail!(
                    "tensor `{name}` has shape {:?}, the model needs {shape:?}",
                    x.dims()
                );
            }
            Ok(x.clone())
        };
        let (h, i, v) = (cfg.hidden, cfg.intermediate, cfg.vocab_size);
        let shapes = [[h, h], [h, h], [h, h], [h, h], [i, h], [i, h], [h, i]];
        let mut blocks = Vec::new();
        for l in 0..cfg.layers {
            let mut proj = Vec::new();
            for (p, s) in PROJECTIONS.iter().zip(shapes) {
                proj.push(Linear::full(get(&format!("layers.{l}.{p}.weight"), &s)?)?);
            }
            blocks.push(Block {
                attn_norm: Var::from_tensor(&get(
                    &format!("layers.{l}.input_layernorm.weight"),
                    &[h],
                )?)?,
                mlp_norm: Var::from_tensor(&get(
                    &format!("layers.{l}.post_attention_layernorm.weight"),
                    &[h],
                )?)?,
                proj: proj
                    .try_into()
                    .map_err(|_| candle_core::Error::Msg("seven projections".into()))?,
            });
        }
        let embed = get("embed_tokens.weight", &[v, h])?;
        Ok(Llama {
            cfg,
            compute: embed.dtype(),
            embed: Var::from_tensor(&embed)?,
            blocks,
            norm: Var::from_tensor(&get("norm.weight", &[h])?)?,
            lm_head: Var::from_tensor(&get("lm_head.weight", &[v, h])?)?,
        })
    }

    /// Every projection with its name (`layers.3.q_proj`).
    pub fn projections(&self) -> impl Iterator<Item = (String, &Linear)> {
        self.blocks.iter().enumerate().flat_map(|(l, b)| {
            b.proj
                .iter()
                .zip(PROJECTIONS)
                .map(move |(p, n)| (format!("layers.{l}.{n}"), p))
        })
    }

    pub fn projections_mut(&mut self) -> impl Iterator<Item = (String, &mut Linear)> {
        self.blocks.iter_mut().enumerate().flat_map(|(l, b)| {
            b.proj
                .iter_mut()
                .zip(PROJECTIONS)
                .map(move |(p, n)| (format!("layers.{l}.{n}"), p))
        })
    }

    /// (name, var, is_lora) for every trainable parameter, in a fixed order.
    pub fn trainable(&self) -> Vec<(String, Var, bool)> {
        let mut out = vec![("embed_tokens.weight".to_string(), self.embed.clone(), false)];
        for (l, b) in self.blocks.iter().enumerate() {
            out.push((
                format!("layers.{l}.input_layernorm.weight"),
                b.attn_norm.clone(),
                false,
            ));
            out.push((
                format!("layers.{l}.post_attention_layernorm.weight"),
                b.mlp_norm.clone(),
                false,
            ));
            for (p, n) in b.proj.iter().zip(PROJECTIONS) {
                if let (Some(w), true) = (&p.weight, p.weight_trainable) {
                    out.push((format!("layers.{l}.{n}.weight"), w.clone(), false));
                }
                if let Some(lora) = &p.lora {
                    out.push((format!("layers.{l}.{n}.lora_a"), lora.a.clone(), true));
                    out.push((format!("layers.{l}.{n}.lora_b"), lora.b.clone(), true));
                }
            }
        }
        out.push(("norm.weight".to_string(), self.norm.clone(), false));
        out.push(("lm_head.weight".to_string(), self.lm_head.clone(), false));
        out
    }

    /// Frozen weights (LoRA bases): no gradient, no optimizer state.
    pub fn frozen(&self) -> Vec<(String, Var)> {
        self.projections()
            .filter_map(|(n, p)| match (&p.weight, p.weight_trainable) {
                (Some(w), false) => Some((format!("{n}.weight"), w.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn trainable_count(&self) -> usize {
        self.trainable()
            .iter()
            .map(|(_, v, _)| v.elem_count())
            .sum()
    }

    pub fn frozen_count(&self) -> usize {
        self.frozen().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Every tensor needed to restore this exact model (frozen W and LoRA factors included).
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut m: HashMap<String, Tensor> = self
            .trainable()
            .into_iter()
            .map(|(n, v, _)| (n, v.as_tensor().clone()))
            .collect();
        for (n, v) in self.frozen() {
            m.insert(n, v.as_tensor().clone());
        }
        m
    }

    /// Load tensors written by [`Llama::state_tensors`] into this (already wrapped) model.
    pub fn load_state(&self, t: &HashMap<String, Tensor>) -> Result<()> {
        let all = self
            .trainable()
            .into_iter()
            .map(|(n, v, _)| (n, v))
            .chain(self.frozen());
        for (name, var) in all {
            let x = t.get(&name).ok_or_else(|| {
                candle_core::Error::Msg(format!("checkpoint has no tensor `{name}`"))
            })?;
            var.set(&x.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// Plain LLaMA tensors with every projection's effective weight (W + s·B·A).
    pub fn merged_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        m.insert("embed_tokens.weight".into(), self.embed.as_tensor().clone());
        m.insert("norm.weight".into(), self.norm.as_tensor().clone());
        m.insert("lm_head.weight".into(), self.lm_head.as_tensor().clone());
        for (l, b) in self.blocks.iter().enumerate() {
            m.insert(
                format!("layers.{l}.input_layernorm.weight"),
                b.attn_norm.as_tensor().clone(),
            );
            m.insert(
                format!("layers.{l}.post_attention_layernorm.weight"),
                b.mlp_norm.as_tensor().clone(),
            );
        }
        for (n, p) in self.projections() {
            m.insert(format!("{n}.weight"), p.effective_weight()?);
        }
        Ok(m)
    }

    /// Logits [b, t, vocab] for ids [b, t], in the parameters' dtype. `dropout` is Some in
    /// training mode. Matmuls run in `self.compute` (see [`crate::precision`]); with f32
    /// compute every cast below is a no-op.
    pub fn forward(&self, ids: &Tensor, mut dropout: Option<&mut Rng>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let (nh, hd) = (self.cfg.heads, self.cfg.head_dim());
        let dev = ids.device();
        let master = self.embed.dtype();
        let compute = self.compute;
        let (cos, sin) = rope_tables(t, hd, dev)?;
        let (cos, sin) = (cos.to_dtype(compute)?, sin.to_dtype(compute)?);
        let mask = causal_mask(t, dev)?.to_dtype(master)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let has_dropout = self
            .blocks
            .iter()
            .flat_map(|b| &b.proj)
            .any(|p| p.lora.as_ref().is_some_and(|l| l.dropout > 0.0));
        if let (Some(rng), false, true) = (dropout.as_deref_mut(), dev.is_cpu(), has_dropout) {
            // LoRA dropout masks are drawn on the device (see linear.rs); seed its generator
            // from the run's RNG so they are reproducible and survive a resume.
            dev.set_seed(u64::from(rng.next_u32()) << 32 | u64::from(rng.next_u32()))?;
        }
        // The residual stream stays in the master dtype; each sub-layer reads a normalised
        // copy in the compute dtype and its output is widened back before the addition.
        let mut x = self
            .embed
            .as_tensor()
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, self.cfg.hidden))?;
        for blk in &self.blocks {
            let [q, k, v, o, gate, up, down] = &blk.proj;
            let n = rms_norm(&x, blk.attn_norm.as_tensor())?.to_dtype(compute)?;
            let heads = |y: Tensor| y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous();
            let qh = rope(&heads(q.forward(&n, dropout.as_deref_mut())?)?, &cos, &sin)?;
            let kh = rope(&heads(k.forward(&n, dropout.as_deref_mut())?)?, &cos, &sin)?;
            let vh = heads(v.forward(&n, dropout.as_deref_mut())?)?;
            let att = (matmul(&qh, &kh.t()?)? * scale)?
                .to_dtype(master)?
                .broadcast_add(&mask)?;
            let att = candle_nn::ops::softmax(&att, D::Minus1)?.to_dtype(compute)?;
            let y = matmul(&att, &vh)?
                .transpose(1, 2)?
                .reshape((b, t, self.cfg.hidden))?;
            x = (x + o.forward(&y, dropout.as_deref_mut())?.to_dtype(master)?)?;
            let n = rms_norm(&x, blk.mlp_norm.as_tensor())?.to_dtype(compute)?;
            let g = candle_nn::ops::silu(&gate.forward(&n, dropout.as_deref_mut())?)?;
            let u = up.forward(&n, dropout.as_deref_mut())?;
            let mlp = down.forward(&(g * u)?, dropout.as_deref_mut())?;
            x = (x + mlp.to_dtype(master)?)?;
        }
        let x = rms_norm(&x, self.norm.as_tensor())?.to_dtype(compute)?;
        let head = self.lm_head.as_tensor().to_dtype(compute)?;
        matmul(&x.reshape((b * t, self.cfg.hidden))?, &head.t()?)?
            .to_dtype(master)?
            .reshape((b, t, self.cfg.vocab_size))
    }
}

/// Weighted mean token cross-entropy: logits [n, vocab], targets [n] (u32), weights [n].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let weights = weights.to_dtype(logits.dtype())?;
    let total = weights.sum_all()?;
    (picked * &weights)?.sum_all()?.neg()?.div(&total)
}
