//! `svd`: singular values of each projection's weight update ΔW (§7 of the reference).
//!
//! With inputs `final` and `base`: ΔW = final merged weights − base weights (ReLoRA against
//! its warm start; full-rank against the same-step checkpoint). With `final` alone: its live
//! low-rank update s·B·A (the LoRA baseline).

use anyhow::{bail, Context, Result};
use relora_analysis::{analyse, plots};
use relora_exec::{parse_params, StageContext, StageKind};
use relora_model::checkpoint::load_tensors;
use relora_spec::{SpecError, StageSpec};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SvdParams {
    #[serde(default = "d_threshold")]
    pub threshold: f64,
    #[serde(default = "d_bins")]
    pub bins: usize,
    #[serde(default = "d_range")]
    pub range: (f64, f64),
    /// A name for the figures' legends.
    #[serde(default)]
    pub label: Option<String>,
}

fn d_threshold() -> f64 {
    0.1
}
fn d_bins() -> usize {
    50
}
fn d_range() -> (f64, f64) {
    (0.0, 2.0)
}

pub struct Svd;

impl StageKind for Svd {
    fn name(&self) -> &'static str {
        "svd"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::SVD
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        Some(&[("final", true), ("base", false)])
    }
    fn cosmetic_params(&self) -> &'static [&'static str] {
        &["label"]
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let p: SvdParams = parse_params(stage)?;
        let mut c = crate::check::Checks::new(stage);
        c.positive(&["threshold"], p.threshold);
        c.at_least(&["bins"], p.bins as u64, 1, "histogram bins");
        c.require(
            p.range.0.is_finite() && p.range.1.is_finite() && p.range.1 > p.range.0,
            &["range"],
            format!(
                "range must be [lo, hi] with finite lo < hi; got [{}, {}]",
                p.range.0, p.range.1
            ),
        );
        c.finish()
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: SvdParams = serde_json::from_value(ctx.params.clone())?;
        let dev = candle_core::Device::Cpu;
        let final_dir = ctx.input("final")?.to_path_buf();
        let deltas = match ctx.inputs.get("base") {
            Some(base) => {
                let a = load_tensors(&final_dir.join("model.safetensors"), &dev)?;
                let b = load_tensors(&base.join("model.safetensors"), &dev)?;
                let mut out = Vec::new();
                for (name, t) in &a {
                    if !name.ends_with("_proj.weight") {
                        continue;
                    }
                    let base_t = b
                        .get(name)
                        .with_context(|| format!("the base model has no `{name}`"))?;
                    if base_t.dims() != t.dims() {
                        bail!(
                            "`{name}` has shape {:?} in the final model but {:?} in the base",
                            t.dims(),
                            base_t.dims()
                        );
                    }
                    out.push((name.clone(), (t - base_t)?));
                }
                out
            }
            None => {
                let path = final_dir.join("lora_update.safetensors");
                if !path.exists() {
                    bail!("`final` has no low-rank update ({}); give a `base` input to compare against", path.display());
                }
                load_tensors(&path, &dev)?.into_iter().collect()
            }
        };
        let matrices = deltas
            .into_iter()
            .map(|(name, t)| {
                let (r, c) = t.dims2()?;
                let data = t
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                Ok((name.trim_end_matches(".weight").to_string(), r, c, data))
            })
            .collect::<Result<Vec<_>>>()?;
        let n = matrices.len();
        let report = analyse(matrices, p.threshold, p.bins, p.range)?;
        let out = ctx.out_dir.clone();
        std::fs::write(
            out.join("spectrum.json"),
            serde_json::to_vec_pretty(&report)?,
        )?;
        std::fs::write(out.join("spectrum.csv"), report.to_csv())?;
        let label = p.label.clone().unwrap_or_else(|| ctx.stage.clone());
        let methods = vec![(label, report.clone())];
        plots::svd_histograms(&out.join("histograms"), &methods)?;
        plots::svd_counts(&out.join("counts"), &methods)?;
        println!("{n} matrices analysed");
        for (proj, s) in &report.projections {
            println!(
                "{proj}: {} of {} singular values below {}",
                s.below_threshold, s.values, p.threshold
            );
            ctx.metric(&format!("below_threshold.{proj}"), s.below_threshold);
            ctx.metric(&format!("values.{proj}"), s.values);
        }
        Ok(())
    }
}
