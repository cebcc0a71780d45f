//! Where each stage runs: the launchers of a run (the executor's, and the local one for
//! the kinds it keeps here), what each stage asks for, and the checks of an `executor:`
//! block against the kinds this binary has.

use crate::launch::{Launcher, Local};
use crate::slurm::Slurm;
use crate::{Dag, Registry};
use anyhow::{bail, Result};
use relora_spec::{ExecutorSpec, ExecutorType, ResourceRequest};

/// The launchers of a run: the executor's, and the local one for the kinds it keeps on
/// this machine (`local_kinds`: a download where compute nodes have no network).
pub(crate) struct Launchers {
    pub(crate) main: Box<dyn Launcher>,
    local: Local,
    local_kinds: Vec<String>,
}

impl Launchers {
    pub(crate) fn new(executor: &ExecutorSpec) -> Launchers {
        Launchers {
            main: match executor.executor_type() {
                ExecutorType::Local => Box::new(Local),
                ExecutorType::Slurm => Box::new(Slurm::new(executor)),
            },
            local: Local,
            local_kinds: executor.local_kinds.clone(),
        }
    }

    /// The launcher for stages of `kind`.
    pub(crate) fn for_kind(&self, kind: &str) -> &dyn Launcher {
        if self.local_kinds.iter().any(|k| k == kind) {
            &self.local
        } else {
            self.main.as_ref()
        }
    }
}

/// What stage `i` asks for: its own `resources:`, then what its kind derives from its
/// params (a `device`), then the executor's resources for its kind, then its `default`.
pub(crate) fn resources(
    dag: &Dag,
    registry: &Registry,
    executor: &ExecutorSpec,
    i: usize,
) -> ResourceRequest {
    let s = &dag.pipeline.stages[i];
    let from_kind: ResourceRequest = registry
        .get(&s.kind)
        .map(|k| k.resources(&s.params))
        .unwrap_or_default()
        .into();
    let none = ResourceRequest::default();
    let per_kind = executor.resources.get(&s.kind).unwrap_or(&none);
    let default = executor.resources.get("default").unwrap_or(&none);
    s.resources
        .clone()
        .unwrap_or_default()
        .or(&from_kind)
        .or(per_kind)
        .or(default)
}

/// Each kind an `executor:` block names (under `resources`, other than `default`, and
/// `local_kinds`) that this binary lacks: its key path and what is wrong.
fn unknown_kinds(spec: &ExecutorSpec, registry: &Registry) -> Vec<(Vec<String>, String)> {
    let under_resources = spec
        .resources
        .keys()
        .filter(|k| *k != "default")
        .map(|k| (vec!["resources".to_string(), k.clone()], k));
    let local = spec
        .local_kinds
        .iter()
        .enumerate()
        .map(|(i, k)| (vec!["local_kinds".to_string(), i.to_string()], k));
    under_resources
        .chain(local)
        .filter(|(_, k)| registry.get(k).is_none())
        .map(|(path, k)| {
            let mut full = vec!["executor".to_string()];
            full.extend(path);
            let message = format!(
                "no stage kind `{k}`{}; known kinds: {}",
                relora_spec::did_you_mean(k, registry.names()),
                registry.names().collect::<Vec<_>>().join(", ")
            );
            (full, message)
        })
        .collect()
}

/// The merged executor settings name only kinds this binary has.
pub(crate) fn check_executor_kinds(executor: &ExecutorSpec, registry: &Registry) -> Result<()> {
    match unknown_kinds(executor, registry).into_iter().next() {
        Some((path, message)) => bail!("at `{}`: {message}", path.join(".")),
        None => Ok(()),
    }
}

/// Check that the kinds an `executor:` block names exist, with errors at its lines.
pub fn check_executor_block(
    block: &relora_spec::ExecutorBlock,
    registry: &Registry,
) -> Result<(), relora_spec::SpecErrors> {
    let errors: Vec<_> = unknown_kinds(&block.spec, registry)
        .into_iter()
        .map(|(path, message)| {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            block.source.error(&path, message)
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(relora_spec::SpecErrors(errors))
    }
}

/// For `plan`: how each stage would be launched under this executor.
pub fn placements(dag: &Dag, registry: &Registry, executor: &ExecutorSpec) -> Result<Vec<String>> {
    check_executor_kinds(executor, registry)?;
    let launchers = Launchers::new(executor);
    Ok(dag
        .pipeline
        .stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            launchers
                .for_kind(&s.kind)
                .describe(&resources(dag, registry, executor, i))
        })
        .collect())
}
