//! Range checks for stage parameters, each reported at its key path under `params` (or where
//! `defaults:` set it), so `plan` rejects a bad value with file:line:col before anything runs.

use relora_spec::{SpecError, StageSpec};

/// Collects a stage's parameter problems.
pub struct Checks<'a> {
    stage: &'a StageSpec,
    errors: Vec<SpecError>,
}

impl<'a> Checks<'a> {
    pub fn new(stage: &'a StageSpec) -> Checks<'a> {
        Checks {
            stage,
            errors: Vec::new(),
        }
    }

    /// Report `message` at `params.<path>` unless `ok`.
    pub fn require(&mut self, ok: bool, path: &[&str], message: impl Into<String>) {
        if !ok {
            let mut full = vec!["params"];
            full.extend_from_slice(path);
            self.errors.push(self.stage.error(&full, message));
        }
    }

    /// A whole number that must be at least `min`.
    pub fn at_least(&mut self, path: &[&str], value: u64, min: u64, why: &str) {
        let name = path.join(".");
        self.require(
            value >= min,
            path,
            format!("{name} must be at least {min} ({why}); got {value}"),
        );
    }

    /// A real number that must be finite and above zero (a NaN or an infinity is named as
    /// such, never shown as `null`).
    pub fn positive(&mut self, path: &[&str], value: f64) {
        self.within(path, value, 0.0, f64::INFINITY, false, false);
    }

    /// A finite real number in the interval from `lo` to `hi`, each end open or closed.
    pub fn within(
        &mut self,
        path: &[&str],
        value: f64,
        lo: f64,
        hi: f64,
        lo_closed: bool,
        hi_closed: bool,
    ) {
        let name = path.join(".");
        if !value.is_finite() {
            let what = if value.is_nan() { "NaN" } else { "infinite" };
            self.require(
                false,
                path,
                format!("{name} must be a finite number, not {what}"),
            );
            return;
        }
        let above = if lo_closed { value >= lo } else { value > lo };
        let below = if hi_closed { value <= hi } else { value < hi };
        let interval = format!(
            "{}{lo}, {}{}",
            if lo_closed { "[" } else { "(" },
            if hi.is_infinite() {
                "∞".to_string()
            } else {
                hi.to_string()
            },
            if hi_closed { "]" } else { ")" }
        );
        self.require(
            above && below,
            path,
            format!("{name} must be in {interval}; got {value}"),
        );
    }

    /// Every problem found, or Ok.
    pub fn finish(self) -> Result<(), Vec<SpecError>> {
        relora_spec::no_errors(self.errors)
    }

    /// Add problems found elsewhere (a nested check).
    pub fn extend(&mut self, more: Vec<SpecError>) {
        self.errors.extend(more);
    }
}
