//! `method: galore`: full-rank weights trained through low-rank gradients (Zhao et al.,
//! ICML 2024). The seven projections of every block get GaLore's projected Adam
//! (`relora_model::galore`); the embeddings, norms and LM head plain AdamW, as in the
//! authors' code. The `galore:` section's defaults are the GaLore paper's: T = 200 and
//! α = 0.25 at every size, rank 128 (its 60M setting; 256 at 130M and 350M, 512 at 1B).

use super::TrainMethod;
use crate::check::Checks;
use crate::train::params::{model_config, TrainParams};
use relora_model::galore::Projector;
use relora_model::{GaloreConfig, LlamaConfig, ProjType, TrainConfig};
use serde::{Deserialize, Serialize};

/// `galore:`: the subspace's rank, how often it is recomputed, the update's scale and
/// which side is projected.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GaloreParams {
    #[serde(default = "d_rank")]
    pub rank: usize,
    #[serde(default = "d_gap")]
    pub update_proj_gap: u64,
    #[serde(default = "d_scale")]
    pub scale: f64,
    #[serde(default = "d_proj_type")]
    pub proj_type: ProjType,
}

impl Default for GaloreParams {
    fn default() -> Self {
        GaloreParams {
            rank: d_rank(),
            update_proj_gap: d_gap(),
            scale: d_scale(),
            proj_type: d_proj_type(),
        }
    }
}

fn d_rank() -> usize {
    128
}
fn d_gap() -> u64 {
    200
}
fn d_scale() -> f64 {
    0.25
}
fn d_proj_type() -> ProjType {
    ProjType::Std
}

impl GaloreParams {
    fn config(&self) -> GaloreConfig {
        GaloreConfig {
            rank: self.rank,
            update_proj_gap: self.update_proj_gap,
            scale: self.scale,
            proj_type: self.proj_type,
        }
    }
}

/// The shapes (out, in) of one block's seven projections.
fn projection_shapes(cfg: &LlamaConfig) -> [(usize, usize); 7] {
    let (h, i) = (cfg.hidden, cfg.intermediate);
    [(h, h), (h, h), (h, h), (h, h), (i, h), (i, h), (h, i)]
}

pub struct Galore;

impl Galore {
    fn params(p: &TrainParams) -> GaloreParams {
        p.galore.clone().unwrap_or_default()
    }
}

impl TrainMethod for Galore {
    fn name(&self) -> &'static str {
        "galore"
    }
    fn summary(&self) -> &'static str {
        "GaLore (full-rank weights, gradients projected onto a low-rank subspace)"
    }
    fn sections(&self) -> &'static [&'static str] {
        &["galore"]
    }
    fn check(&self, p: &TrainParams, c: &mut Checks) {
        let g = Self::params(p);
        c.at_least(
            &["galore", "rank"],
            g.rank as u64,
            1,
            "the projected gradients' rank",
        );
        if let Ok(cfg) = model_config(&p.model, 32) {
            let smallest = cfg.hidden.min(cfg.intermediate);
            c.require(
                g.rank <= smallest,
                &["galore", "rank"],
                format!(
                    "galore.rank ({}) cannot exceed the smaller side of every projection \
                     (min(hidden, intermediate) = {smallest})",
                    g.rank
                ),
            );
        }
        c.at_least(
            &["galore", "update_proj_gap"],
            g.update_proj_gap,
            1,
            "optimizer steps between two SVDs of the gradient",
        );
        c.positive(&["galore", "scale"], g.scale);
    }
    fn configure(&self, p: &TrainParams, _total: u64, cfg: &mut TrainConfig) {
        cfg.galore = Some(Self::params(p).config());
    }
    fn optimizer_floats(&self, p: &TrainParams, cfg: &LlamaConfig, _has_init: bool) -> f64 {
        let g = Self::params(p).config();
        let projected: usize = projection_shapes(cfg)
            .iter()
            .map(|&shape| {
                let (a, b) = Projector::new(g, shape).low_shape();
                a * b
            })
            .sum();
        let plain = cfg.param_count()
            - cfg.layers
                * projection_shapes(cfg)
                    .iter()
                    .map(|(a, b)| a * b)
                    .sum::<usize>();
        2.0 * (plain + cfg.layers * projected) as f64
    }
}
