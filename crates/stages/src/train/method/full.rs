//! `method: full`: every weight trained at full rank with AdamW (the paper's baseline, and
//! the warm start every ReLoRA run begins from). The trait's defaults are this method.

use super::TrainMethod;

pub struct Full;

impl TrainMethod for Full {
    fn name(&self) -> &'static str {
        "full"
    }
    fn summary(&self) -> &'static str {
        "full-rank training"
    }
}
