//! `command`: a user's own step, as a shell command with declared inputs and outputs.
//!
//! The command runs with `sh -c` in the pipeline file's folder. It sees `$OUT` (write
//! outputs there), `$SCRATCH` (kept across failed attempts) and `$IN_<NAME>` for each input
//! (the upstream stage's outputs folder). Files it reads from the repository are listed in
//! `files` so that their contents enter the key; `outputs` are checked to exist afterwards.

use anyhow::{bail, Context, Result};
use relora_exec::{parse_params, StageContext, StageKind};
use relora_spec::{SpecError, StageSpec};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandParams {
    /// The shell command.
    pub run: String,
    /// Repository files the command reads (hashed into the key).
    #[serde(default)]
    pub files: Vec<String>,
    /// Paths under $OUT that must exist when the command succeeds.
    #[serde(default)]
    pub outputs: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

pub struct Command;

fn safe_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && !path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, std::path::Component::Normal(_)))
}

impl StageKind for Command {
    fn name(&self) -> &'static str {
        "command"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::COMMAND
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        None
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let p: CommandParams = parse_params(stage)?;
        let mut errors = Vec::new();
        for (i, o) in p.outputs.iter().enumerate() {
            if !safe_relative(o) {
                errors.push(stage.error(
                    &["params", "outputs", &i.to_string()],
                    format!("output `{o}` must be a relative path inside $OUT (no `..`)"),
                ));
            }
        }
        for (i, f) in p.files.iter().enumerate() {
            if !stage.base_dir.join(f).is_file() {
                errors.push(stage.error(
                    &["params", "files", &i.to_string()],
                    format!(
                        "file `{f}` does not exist (relative to {})",
                        stage.base_dir.display()
                    ),
                ));
            }
        }
        relora_spec::no_errors(errors)
    }
    fn external_files(&self, stage: &StageSpec) -> Result<Vec<(String, PathBuf)>> {
        let p: CommandParams = serde_json::from_value(stage.params.clone())?;
        Ok(p.files
            .iter()
            .map(|f| (f.clone(), stage.base_dir.join(f)))
            .collect())
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: CommandParams = serde_json::from_value(ctx.params.clone())?;
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c")
            .arg(&p.run)
            .current_dir(&ctx.base_dir)
            .env("OUT", &ctx.out_dir)
            .env("SCRATCH", &ctx.scratch_dir);
        for (name, dir) in &ctx.inputs {
            cmd.env(format!("IN_{}", name.to_uppercase()), dir);
        }
        cmd.envs(&p.env);
        let status = cmd.status().context("starting sh")?;
        if !status.success() {
            bail!("command `{}` failed ({status})", p.run);
        }
        for o in &p.outputs {
            if !ctx.out_dir.join(o).exists() {
                bail!("command succeeded but did not write its declared output `$OUT/{o}`");
            }
        }
        Ok(())
    }
}
