//! The LLaMA decoder of the paper: pre-norm blocks, RMSNorm, SwiGLU, RoPE, causal attention,
//! no biases, untied LM head. RMSNorm, RoPE, attention, SwiGLU and the loss run as this
//! crate's fused ops ([`crate::fused`]) where they exist, or as a reference composition of
//! candle's differentiable primitives (candle's own fused rms_norm, softmax and rope kernels
//! have no backward pass).

use crate::config::LlamaConfig;
use crate::fused::{self, Ops, RopeTables};
use crate::linear::{Linear, Pass};
use crate::precision::matmul;
use crate::recompute;
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

#[derive(Clone)]
pub struct Block {
    pub attn_norm: Var,
    pub mlp_norm: Var,
    /// q, k, v, o, gate, up, down (see [`PROJECTIONS`]).
    pub proj: [Linear; 7],
}

/// What every block of one forward pass shares.
#[derive(Clone)]
pub(crate) struct BlockPass {
    pub(crate) tables: RopeTables,
    /// 1/√head_dim.
    pub(crate) scale: f64,
    /// Whether the fused RMSNorm, RoPE, attention and SwiGLU run.
    pub(crate) fused: bool,
    pub(crate) pass: Pass,
    pub(crate) heads: usize,
    pub(crate) master: DType,
    pub(crate) compute: DType,
}

impl Block {
    /// The block applied to the residual stream `x [b, t, hidden]` (master dtype).
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        mut dropout: Option<&mut Rng>,
        bp: &BlockPass,
    ) -> Result<Tensor> {
        let (b, t, hidden) = x.dims3()?;
        let (pass, compute, master) = (bp.pass, bp.compute, bp.master);
        let normed = |x: &Tensor, w: &Var| norm(x, &param(w, pass.track), bp.fused);
        let [q, k, v, o, gate, up, down] = &self.proj;
        let n = normed(x, &self.attn_norm)?.to_dtype(compute)?;
        let q = q.apply(&n, dropout.as_deref_mut(), pass)?;
        let k = k.apply(&n, dropout.as_deref_mut(), pass)?;
        let v = v.apply(&n, dropout.as_deref_mut(), pass)?;
        let y = if bp.fused {
            let (q, k) = (fused::rope(&q, &bp.tables)?, fused::rope(&k, &bp.tables)?);
            fused::causal_attention(&q, &k, &v, bp.heads, bp.scale)?
        } else {
            let hd = hidden / bp.heads;
            let heads = |y: Tensor| y.reshape((b, t, bp.heads, hd));
            let qkv = [heads(q)?, heads(k)?, heads(v)?];
            reference_attention(qkv, &bp.tables, bp.scale, master)?.reshape((b, t, hidden))?
        };
        let x = (x + o
            .apply(&y, dropout.as_deref_mut(), pass)?
            .to_dtype(master)?)?;
        let n = normed(&x, &self.mlp_norm)?.to_dtype(compute)?;
        let g = gate.apply(&n, dropout.as_deref_mut(), pass)?;
        let u = up.apply(&n, dropout.as_deref_mut(), pass)?;
        let act = if bp.fused {
            fused::swiglu(&g, &u)?
        } else {
            (candle_nn::ops::silu(&g)? * u)?
        };
        let mlp = down.apply(&act, dropout, pass)?;
        x + mlp.to_dtype(master)?
    }

    /// The block's trained tensors (norms, trainable W, LoRA factors).
    pub(crate) fn trainable_vars(&self) -> Vec<&Var> {
        let mut out = vec![&self.attn_norm, &self.mlp_norm];
        out.extend(
            self.proj
                .iter()
                .flat_map(|p| p.trained())
                .map(|(_, v, _)| v),
        );
        out
    }
}

pub struct Llama {
    pub cfg: LlamaConfig,
    pub embed: Var,
    pub blocks: Vec<Block>,
    pub norm: Var,
    pub lm_head: Var,
    /// The dtype matmuls run in: the parameters' own dtype unless set (bf16 on a GPU).
    pub compute: DType,
    /// Fused ops or the reference composition (for tests and benchmarks).
    pub ops: Ops,
    /// Keep only each block's input in a training forward pass and recompute the block in
    /// the backward pass (see [`crate::recompute`]); gradients come from [`Llama::backward`].
    pub checkpoint_activations: bool,
    /// Gradients of the parameters of recomputed blocks, until [`Llama::backward`] collects
    /// them.
    recomputed: recompute::ParamGrads,
}

/// A parameter as the forward pass reads it: detached unless `track`.
fn param(v: &Var, track: bool) -> Tensor {
    if track {
        v.as_tensor().clone()
    } else {
        v.as_tensor().detach()
    }
}

/// RMSNorm, fused or as the reference composition.
fn norm(x: &Tensor, w: &Tensor, fused: bool) -> Result<Tensor> {
    if fused {
        fused::rms_norm(x, w, RMS_EPS)
    } else {
        rms_norm(x, w)
    }
}

pub(crate) fn rms_norm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let inv = (var + RMS_EPS)?.sqrt()?.recip()?;
    x.broadcast_mul(&inv)?.broadcast_mul(w)
}

/// Rotate-half RoPE on x [b, h, t, d].
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
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
        Llama::from_owned_tensors(cfg, tensors)
    }

    /// A full-rank model from plain LLaMA tensors (as [`Llama::merged_tensors`] writes them).
    pub fn from_tensors(cfg: LlamaConfig, t: &HashMap<String, Tensor>) -> Result<Llama> {
        Llama::build(cfg, |name| t.get(name).cloned())
    }

    /// [`Llama::from_tensors`], taking the tensors: each is dropped once the model holds its
    /// copy, so building needs one model's memory and one tensor more, not two models'.
    pub fn from_owned_tensors(cfg: LlamaConfig, mut t: HashMap<String, Tensor>) -> Result<Llama> {
        Llama::build(cfg, |name| t.remove(name))
    }

    /// This model on `dev`, every parameter moved (a compact W as its codes: see
    /// [`crate::frozen::CompactWeight`]). A model for a GPU is built and adapted on the host,
    /// then moved, so the GPU never holds a dense copy of a W it keeps compact.
    pub fn to_device(self, dev: &Device) -> Result<Llama> {
        let mv = |v: &Var| Var::from_tensor(&v.as_tensor().to_device(dev)?);
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let mut proj = b.proj.clone();
            for p in &mut proj {
                p.move_to(dev)?;
            }
            blocks.push(Block {
                attn_norm: mv(&b.attn_norm)?,
                mlp_norm: mv(&b.mlp_norm)?,
                proj,
            });
        }
        Ok(Llama {
            embed: mv(&self.embed)?,
            blocks,
            norm: mv(&self.norm)?,
            lm_head: mv(&self.lm_head)?,
            recomputed: Default::default(),
            ..self
        })
    }

    fn build(cfg: LlamaConfig, mut take: impl FnMut(&str) -> Option<Tensor>) -> Result<Llama> {
        let mut get = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let x = take(name).ok_or_else(|| {
                candle_core::Error::Msg(format!("checkpoint has no tensor `{name}`"))
            })?;
            if x.dims() != shape {
                candle_core::bail!(
                    "tensor `{name}` has shape {:?}, the model needs {shape:?}",
                    x.dims()
                );
            }
            Ok(x)
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
            ops: Ops::default(),
            checkpoint_activations: false,
            recomputed: Default::default(),
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
                for (suffix, v, lora) in p.trained() {
                    out.push((format!("layers.{l}.{n}.{suffix}"), v.clone(), lora));
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

    /// Frozen weights, dense or compact.
    pub fn frozen_count(&self) -> usize {
        let compact: usize = self
            .projections()
            .filter_map(|(_, p)| p.quantized.as_ref().map(|q| q.rows * q.cols))
            .sum();
        self.frozen()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum::<usize>()
            + compact
    }

    /// Every tensor needed to restore this exact model (frozen W and LoRA factors included;
    /// a compact W as its codes and scales, so a resumed run continues from exactly it).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut m: HashMap<String, Tensor> = self
            .trainable()
            .into_iter()
            .map(|(n, v, _)| (n, v.as_tensor().clone()))
            .collect();
        for (n, v) in self.frozen() {
            m.insert(n, v.as_tensor().clone());
        }
        for (n, p) in self.projections() {
            if let Some(q) = &p.quantized {
                let dev = p
                    .lora
                    .as_ref()
                    .map_or(Device::Cpu, |l| l.a.device().clone());
                let codes = Tensor::from_slice(&q.codes, q.codes.len(), &dev)?;
                let scales = Tensor::from_slice(&q.scales, q.scales.len(), &dev)?;
                m.insert(format!("{n}.weight.codes"), codes);
                m.insert(format!("{n}.weight.scales"), scales);
            }
        }
        Ok(m)
    }

    /// Load tensors written by [`Llama::state_tensors`] into this (already wrapped) model.
    pub fn load_state(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
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
        for (name, p) in self.projections_mut() {
            let Some(q) = &p.quantized else { continue };
            let get = |what: &str| {
                t.get(&format!("{name}.weight.{what}")).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "checkpoint has no `{name}.weight.{what}` for this stage's {} frozen \
                         weights",
                        q.format.name()
                    ))
                })
            };
            let codes = get("codes")?.to_vec1::<u8>()?;
            let scales = get("scales")?.to_vec1::<f32>()?;
            if codes.len() != q.codes.len() || scales.len() != q.scales.len() {
                candle_core::bail!(
                    "checkpoint's `{name}.weight` is not {} of this layer's shape",
                    q.format.name()
                );
            }
            let restored = crate::quant::QuantWeight {
                codes,
                scales,
                ..(*q.host).clone()
            };
            let dev = p
                .lora
                .as_ref()
                .map_or(Device::Cpu, |l| l.a.device().clone());
            p.quantized = Some(crate::frozen::CompactWeight::new(restored, &dev)?);
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

    /// Logits [b, t, vocab] for ids [b, t], in the parameters' dtype, with the autograd
    /// graph for a backward pass. `dropout` is Some in training mode. Matmuls run in
    /// `self.compute` (see [`crate::precision`]); with f32 compute every cast below is a no-op.
    pub fn forward(&self, ids: &Tensor, dropout: Option<&mut Rng>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        self.logits(ids, dropout)?
            .reshape((b, t, self.cfg.vocab_size))
    }

    /// The logits of [`Llama::forward`] as [b·t, vocab], in the parameters' dtype.
    pub fn logits(&self, ids: &Tensor, dropout: Option<&mut Rng>) -> Result<Tensor> {
        let (x, pass) = self.trunk(ids, dropout, true)?;
        self.head(&x, pass)
    }

    /// The weighted mean token cross-entropy of ids [b, t] against `targets` and `weights`
    /// [b·t] (see [`cross_entropy`]), with the autograd graph for a backward pass. With the
    /// fused ops the LM head and the loss are one op and no logits tensor is formed.
    pub fn loss(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        dropout: Option<&mut Rng>,
    ) -> Result<Tensor> {
        self.scored(ids, targets, weights, dropout, true)
    }

    /// The gradients of `loss` (from [`Llama::loss`]) for every tracked tensor: candle's
    /// backward pass, plus the gradients of the parameters of blocks that were recomputed
    /// in it (with `checkpoint_activations`; candle sees only their inputs).
    pub fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        // A backward pass that failed midway may have left some behind.
        self.recomputed.take();
        let mut store = loss.backward()?;
        for (t, g) in self.recomputed.take() {
            let g = match store.remove(&t) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            store.insert(&t, g);
        }
        Ok(store)
    }

    /// Whether no recomputed gradient waits for [`Llama::backward`] (for tests).
    pub fn recomputed_is_empty(&self) -> bool {
        self.recomputed.is_empty()
    }

    /// [`Llama::loss`] in evaluation mode: no dropout, and no autograd graph recorded (the
    /// parameters enter detached).
    pub fn loss_eval(&self, ids: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
        self.scored(ids, targets, weights, None, false)
    }

    fn scored(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        weights: &Tensor,
        dropout: Option<&mut Rng>,
        track: bool,
    ) -> Result<Tensor> {
        let (x, pass) = self.trunk(ids, dropout, track)?;
        if pass.fused {
            let head = param(&self.lm_head, track).to_dtype(self.compute)?;
            return fused::head_cross_entropy(&x, &head, targets, weights);
        }
        let logits = self.head(&x, pass)?;
        if self.ops.fused_on(ids.device(), logits.dtype()) {
            // On a GPU: the head is a cuBLAS matmul, the loss a fused kernel.
            return fused::cross_entropy(&logits, targets, weights);
        }
        cross_entropy(&logits, targets, weights)
    }

    /// Logits [b·t, vocab] in the master dtype from the final hidden states.
    fn head(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let head = param(&self.lm_head, pass.track).to_dtype(self.compute)?;
        let logits = if pass.fused {
            fused::linear(x, &head)?
        } else {
            matmul(x, &head.t()?)?
        };
        logits.to_dtype(self.embed.dtype())
    }

    /// The final hidden states [b·t, hidden] in the compute dtype (after the last norm), and
    /// how the pass ran.
    fn trunk(
        &self,
        ids: &Tensor,
        mut dropout: Option<&mut Rng>,
        track: bool,
    ) -> Result<(Tensor, Pass)> {
        let (b, t) = ids.dims2()?;
        let (nh, hd) = (self.cfg.heads, self.cfg.head_dim());
        let dev = ids.device();
        let master = self.embed.dtype();
        let compute = self.compute;
        let fused = self.ops.fused_on(dev, master);
        let pass = Pass {
            track,
            fused: self.ops.fused_matmuls_on(dev, compute),
        };
        // Without `track` the parameters enter detached, so no op records a graph.
        let tables = RopeTables::new(t, hd, ROPE_BASE);
        let scale = 1.0 / (hd as f64).sqrt();
        let has_dropout = self
            .blocks
            .iter()
            .flat_map(|b| &b.proj)
            .any(|p| p.lora.as_ref().is_some_and(|l| l.dropout > 0.0));
        if let (Some(rng), false, true) = (dropout.as_deref_mut(), dev.is_cpu(), has_dropout) {
            // LoRA dropout masks are drawn on the device (see linear.rs); seed its generator
            // from the run's RNG so they are reproducible and survive a resume.
            dev.set_seed(rng.next_u64())?;
        }
        // The residual stream stays in the master dtype; each sub-layer reads a normalised
        // copy in the compute dtype and its output is widened back before the addition.
        let mut x = param(&self.embed, track)
            .embedding(&ids.flatten_all()?)?
            .reshape((b, t, self.cfg.hidden))?;
        let shared = BlockPass {
            tables,
            scale,
            fused,
            pass,
            heads: nh,
            master,
            compute,
        };
        for blk in &self.blocks {
            x = if self.checkpoint_activations && track {
                recompute::block(blk, &x, dropout.as_deref_mut(), &shared, &self.recomputed)?
            } else {
                blk.forward(&x, dropout.as_deref_mut(), &shared)?
            };
        }
        let x = norm(&x, &param(&self.norm, track), fused)?.to_dtype(compute)?;
        Ok((x.reshape((b * t, self.cfg.hidden))?, pass))
    }
}

/// The reference attention: q, k, v [b, t, heads, head_dim] in the compute dtype, each
/// transposed to [b, heads, t, head_dim]; scores, mask and softmax (in the master dtype)
/// composed from candle's differentiable ops. Returns [b, t, heads, head_dim].
pub(crate) fn reference_attention(
    [q, k, v]: [Tensor; 3],
    tables: &RopeTables,
    scale: f64,
    master: DType,
) -> Result<Tensor> {
    let t = q.dim(1)?;
    let compute = q.dtype();
    let dev = q.device();
    let (cos, sin) = tables.tensors(dev)?;
    let (cos, sin) = (cos.to_dtype(compute)?, sin.to_dtype(compute)?);
    let mask = causal_mask(t, dev)?.to_dtype(master)?;
    let heads = |y: Tensor| y.transpose(1, 2)?.contiguous();
    let qh = rope(&heads(q)?, &cos, &sin)?;
    let kh = rope(&heads(k)?, &cos, &sin)?;
    let vh = heads(v)?;
    let att = (matmul(&qh, &kh.t()?)? * scale)?
        .to_dtype(master)?
        .broadcast_add(&mask)?;
    let att = candle_nn::ops::softmax(&att, D::Minus1)?.to_dtype(compute)?;
    matmul(&att, &vh)?.transpose(1, 2)
}

/// Weighted mean token cross-entropy: logits [n, vocab], targets [n] (u32), weights [n].
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    let picked = logp.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    let weights = weights.to_dtype(logits.dtype())?;
    let total = weights.sum_all()?;
    (picked * &weights)?.sum_all()?.neg()?.div(&total)
}
