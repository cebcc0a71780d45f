//! The one trait through which stage kinds plug into the executor.

use anyhow::Result;
use relora_spec::{Resources, SpecError, StageSpec};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A kind of stage: what its parameters are and how it runs.
///
/// The executor calls `validate`, `cosmetic_params`, `external_files` and `resources` in
/// the orchestrator process, and `run` in a child process of its own.
pub trait StageKind: Send + Sync {
    fn name(&self) -> &'static str;
    /// The code the kind's outputs depend on: `(part, fingerprint)` pairs (a crate or module
    /// and the hash of its normalised source; `dependencies` and their versions). Each pair
    /// enters the stage's key, so an entry made by other code is never reused.
    fn code(&self) -> &'static [(&'static str, &'static str)];
    /// Input names the kind accepts, and whether each is required; `None` accepts any name.
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]>;
    /// Check parameters before anything runs (unknown keys, types, ranges).
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>>;
    /// Checks that need the stages this one reads (their kinds, matrix values, params),
    /// by input name; called after `validate`, before anything runs.
    fn validate_inputs(
        &self,
        _stage: &StageSpec,
        _upstream: &BTreeMap<String, &StageSpec>,
    ) -> Result<(), Vec<SpecError>> {
        Ok(())
    }
    /// Parameters that do not change the outputs (log frequency, progress display).
    fn cosmetic_params(&self) -> &'static [&'static str] {
        &[]
    }
    /// Files outside the cache that the stage reads; their contents go into its key.
    fn external_files(&self, _stage: &StageSpec) -> Result<Vec<(String, PathBuf)>> {
        Ok(Vec::new())
    }
    /// What the stage holds while it runs (GPUs), from its parameters.
    fn resources(&self, _params: &Value) -> Resources {
        Resources::default()
    }
    /// What the stage will read, compute and make (`plan --estimate`), from its parameters,
    /// what is known of its inputs, and its own outputs when it is already cached. A fact
    /// named `flops` is summed over the pipeline by `plan`.
    fn estimate(
        &self,
        _stage: &StageSpec,
        _inputs: &BTreeMap<String, InputEstimate>,
        _cached: Option<&Path>,
    ) -> Result<Estimate> {
        Ok(Estimate::default())
    }
    /// Compute the outputs into `ctx.out_dir` (in the stage's own process).
    fn run(&self, ctx: &mut StageContext) -> Result<()>;
}

/// A stage's size before it runs: lines for the user, and facts for the stages downstream
/// (a vocabulary size, a token count), which the executor passes on without reading them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Estimate {
    pub lines: Vec<String>,
    pub facts: Value,
}

/// What is known of one input before the stage runs: the upstream stage's estimated facts,
/// and its outputs folder when its entry is already in the cache (exact figures).
#[derive(Debug, Clone, Default)]
pub struct InputEstimate {
    pub facts: Value,
    pub outputs: Option<PathBuf>,
}

/// Parse a stage's params into the kind's own struct; errors point at the offending key.
pub fn parse_params<T: DeserializeOwned>(stage: &StageSpec) -> Result<T, Vec<SpecError>> {
    let de = stage.params.clone();
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut path: Vec<String> = e
            .path()
            .iter()
            .map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => key.clone(),
                serde_path_to_error::Segment::Seq { index } => index.to_string(),
                _ => String::new(),
            })
            .filter(|s| !s.is_empty() && s != "?")
            .collect();
        let msg = e.inner().to_string();
        // For an unknown field serde's path ends at its parent; the field is in the message.
        if let Some(field) = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
        {
            if path.last().map(String::as_str) != Some(field) {
                path.push(field.to_string());
            }
        }
        let mut sub = vec!["params"];
        sub.extend(path.iter().map(String::as_str));
        vec![stage.error(&sub, msg)]
    })
}

/// What a running stage sees: its parameters, its inputs' folders and where to write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageContext {
    pub stage: String,
    pub kind: String,
    pub params: Value,
    /// Relative paths in params are relative to this folder.
    pub base_dir: PathBuf,
    /// Input name → the outputs folder of the upstream entry.
    pub inputs: BTreeMap<String, PathBuf>,
    /// Input name → the upstream stage's name, for messages (never for outputs: names are
    /// not in keys).
    #[serde(default)]
    pub input_stages: BTreeMap<String, String>,
    /// Write every output here; it becomes the entry's `outputs/`.
    pub out_dir: PathBuf,
    /// Survives a failed attempt; for checkpoints to resume from.
    pub scratch_dir: PathBuf,
    /// GPU ids assigned by the executor (also set as CUDA_VISIBLE_DEVICES).
    pub gpus: Vec<u32>,
    /// Written at the end into the entry's manifest.
    #[serde(default)]
    pub metrics: BTreeMap<String, Value>,
}

/// One progress report; the executor shows the latest per stage.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    pub step: u64,
    pub total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Lines a child writes to stdout with this prefix are progress reports, not log text.
pub const PROGRESS_PREFIX: &str = "@@relora-progress ";

impl StageContext {
    pub fn input(&self, name: &str) -> Result<&Path> {
        self.inputs
            .get(name)
            .map(PathBuf::as_path)
            .ok_or_else(|| anyhow::anyhow!("stage `{}` needs an input named `{name}`", self.stage))
    }

    /// `input `data` (stage `tokens`)`: an input as messages name it.
    pub fn describe_input(&self, name: &str) -> String {
        match self.input_stages.get(name) {
            Some(stage) => format!("input `{name}` (stage `{stage}`)"),
            None => format!("input `{name}`"),
        }
    }

    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    pub fn progress(&self, p: &Progress) {
        if let Ok(s) = serde_json::to_string(p) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{PROGRESS_PREFIX}{s}");
            let _ = out.flush();
        }
    }

    pub fn metric(&mut self, name: &str, value: impl Serialize) {
        if let Ok(v) = serde_json::to_value(value) {
            self.metrics.insert(name.to_string(), v);
        }
    }
}
