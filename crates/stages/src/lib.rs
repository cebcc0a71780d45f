//! relora-stages: the stage kinds relora-pipe ships, each adapting a library crate to the
//! executor's [`StageKind`](relora_exec::StageKind) trait.
//!
//! This is the one crate that knows both sides: the pipeline world (parameters born in
//! YAML, input folders from the cache) and the ML world (relora-data, relora-model,
//! relora-analysis), which stay ignorant of each other's concerns.
//!
//! | kind | inputs | does |
//! |---|---|---|
//! | `command` | any | a shell command with declared files and outputs |
//! | `download` | – | http(s) files pinned by sha256, resumable |
//! | `tokenize` | `corpus`? | corpus → tokenizer → parquet shards |
//! | `train` | `data`, `init`? | full / relora / lora / control training |
//! | `eval` | `model`, `data` | validation perplexity |
//! | `svd` | `final`, `base`? | singular values of the weight updates |
//! | `report` | `ROW@COL`, `curve@X`, `svd@X` | tables and figures |

mod command;
mod download;
mod eval;
mod report;
mod svd;
mod tokenize;
pub mod train;

pub use command::Command;

use relora_exec::Registry;

/// A stage whose `device` is `cuda` or `cuda:N` holds one GPU while it runs.
fn device_resources(params: &serde_json::Value) -> relora_spec::Resources {
    let dev = params
        .get("device")
        .and_then(serde_json::Value::as_str)
        .unwrap_or("cpu");
    relora_spec::Resources {
        gpus: u32::from(dev.starts_with("cuda")),
    }
}

/// Every stage kind this binary can run.
pub fn registry() -> Registry {
    let mut r = Registry::default();
    r.register(Box::new(Command));
    r.register(Box::new(download::Download));
    r.register(Box::new(tokenize::Tokenize));
    r.register(Box::new(train::Train));
    r.register(Box::new(eval::Eval));
    r.register(Box::new(svd::Svd));
    r.register(Box::new(report::Report));
    r
}
