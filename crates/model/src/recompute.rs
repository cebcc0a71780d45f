//! Activation checkpointing: a block keeps only its input in the forward pass and is run
//! again, with its autograd graph, when the backward pass reaches it.
//!
//! Memory for activations falls from every block's to one block's plus each block's input
//! (`plan --estimate` says how much), for one more forward pass of every block per step.
//! The block runs as an op of its own ([`Recompute`]): its forward pass computes the block
//! with nothing tracked and hands over the output; its backward pass builds the block again
//! on a copy of the saved input, with the same dropout masks (the run's RNG as it stood
//! before the block), and runs candle's backward pass over it from the output's gradient.
//! That is the same arithmetic in the same order as without checkpointing, so the
//! gradients are the same bits (tested). candle sees the op's input only, so the gradients
//! of the block's parameters are handed back through [`ParamGrads`] and
//! [`crate::Llama::backward`] adds them to candle's.
//!
//! On a GPU, LoRA dropout masks come from the device's generator; a checkpointed block seeds
//! it from the run's RNG before its forward pass and again before its recomputation, so its
//! masks differ from an unchecked run's (deterministic all the same).

use crate::llama::{Block, BlockPass};
use crate::rng::Rng;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor, Var};
use std::sync::{Arc, Mutex};

/// Gradients of recomputed blocks' parameters: (parameter, gradient), in the order the
/// backward pass produced them.
#[derive(Clone, Default)]
pub struct ParamGrads(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl ParamGrads {
    fn push(&self, param: Tensor, grad: Tensor) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((param, grad));
    }

    pub fn is_empty(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
    }

    /// Everything gathered so far, leaving none.
    pub fn take(&self) -> Vec<(Tensor, Tensor)> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// `blk` applied to `x` in training mode, checkpointed: returns the block's output as one
/// autograd node over `x`.
pub(crate) fn block(
    blk: &Block,
    x: &Tensor,
    mut dropout: Option<&mut Rng>,
    pass: &BlockPass,
    grads: &ParamGrads,
) -> Result<Tensor> {
    let has_dropout = blk
        .proj
        .iter()
        .any(|p| p.lora.as_ref().is_some_and(|l| l.dropout > 0.0));
    let device_seed = match dropout.as_deref_mut() {
        Some(rng) if has_dropout && !x.device().is_cpu() => {
            let seed = rng.next_u64();
            x.device().set_seed(seed)?;
            Some(seed)
        }
        _ => None,
    };
    let rng = dropout.as_deref().copied();
    let mut quiet = pass.clone();
    quiet.pass.track = false;
    let y = blk.forward(&x.detach(), dropout, &quiet)?;
    // The op hands over y's storage whole: it must hold y and nothing else.
    let y = match y.layout().contiguous_offsets() {
        Some((0, end)) if end == y.elem_count() => y,
        _ => y.copy()?,
    };
    x.apply_op1(Recompute {
        block: blk.clone(),
        rng,
        device_seed,
        pass: pass.clone(),
        output: Mutex::new(Some(y)),
        grads: grads.clone(),
    })
}

struct Recompute {
    /// The block's layers (their parameters shared, not copied).
    block: Block,
    /// The dropout RNG as it stood before the block's forward pass.
    rng: Option<Rng>,
    /// The device generator's seed for the block's masks (on a GPU, with dropout).
    device_seed: Option<u64>,
    pass: BlockPass,
    /// The output of the untracked forward pass, until the op hands it over.
    output: Mutex<Option<Tensor>>,
    grads: ParamGrads,
}

impl Recompute {
    fn output(&self) -> Result<Tensor> {
        match self.output.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(y) => Ok(y),
            None => bail!("recompute: a block's output was asked for twice"),
        }
    }
}

impl CustomOp1 for Recompute {
    fn name(&self) -> &'static str {
        "recompute-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => bail!("recompute: the block ran on another device than its input"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let y = self.output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, y.shape().clone())),
            _ => bail!("recompute: the block ran on another device than its input"),
        }
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, dout: &Tensor) -> Result<Option<Tensor>> {
        let input = Var::from_tensor(&x.detach())?;
        if let Some(seed) = self.device_seed {
            x.device().set_seed(seed)?;
        }
        let mut rng = self.rng;
        let y = self
            .block
            .forward(input.as_tensor(), rng.as_mut(), &self.pass)?;
        // d(Σ y ∘ dout)/dy is dout, exactly (1 · dout); detached, so the pass stays in
        // the block.
        let mut store = (y * dout.detach())?.sum_all()?.backward()?;
        for v in self.block.trainable_vars() {
            if let Some(g) = store.remove(v.as_tensor()) {
                self.grads.push(v.as_tensor().clone(), g);
            }
        }
        Ok(store.remove(input.as_tensor()))
    }
}
