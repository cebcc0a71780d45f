//! relora-stages: the stage kinds relora-pipe ships, each adapting a library crate to the
//! executor's [`StageKind`](relora_exec::StageKind) trait.
//!
//! This is the only crate that knows both the pipeline world (params as YAML-born JSON,
//! cache folders) and the ML world (data, model, analysis); the libraries on either side
//! stay ignorant of each other.

mod command;

pub use command::Command;

use relora_exec::Registry;

/// Every stage kind this binary can run.
pub fn registry() -> Registry {
    let mut r = Registry::default();
    r.register(Box::new(Command));
    r
}
