//! relora-stages: the stage kinds relora-pipe ships, each adapting a library crate to the
//! executor's [`StageKind`](relora_exec::StageKind) trait.
//!
//! This is the one crate that knows both sides: the pipeline world (parameters born in
//! YAML, input folders from the cache) and the ML world (relora-data, relora-model,
//! relora-analysis), which stay ignorant of each other's concerns.
//!
//! Beside the kinds: `compare` (`relora-pipe compare`: the parameters that differ between
//! stages and their final metrics), `check` (range checks that report at the YAML key), `device` (what
//! `device:` holds and opens), `record` (`train.json`, read by eval and continued train
//! stages), `estimate` (what `plan --estimate` says of a stage's size; in no kind's
//! fingerprint, as it never reaches outputs) and `code` (each kind's code fingerprint, from
//! `build.rs`, which also names the files each kind's outputs depend on).
//!
//! | kind | inputs | does |
//! |---|---|---|
//! | `command` | any | a shell command with declared files and outputs |
//! | `download` | – | http(s) files pinned by sha256, resumable |
//! | `tokenize` | `corpus`?, `tokenizer`? | corpus → tokenizer → parquet shards |
//! | `train` | `data`, `init`? | training by a method of `train/method/` (full, relora, lora, control, galore) |
//! | `eval` | `model`, `data` | perplexity on the validation or the test split |
//! | `select` | a swept template of evals | the winner of each group by a declared rule |
//! | `svd` | `final`, `base`? | singular values of the weight updates |
//! | `report` | `ROW@COL`, `curve@X`, `svd@X` | tables and figures |
//! | `export` | `model`, `tokenizer` | a Hugging Face transformers checkpoint directory |
//! | `import` | – | a transformers LLaMA checkpoint as a model entry |

mod check;
pub mod code;
mod command;
pub mod compare;
pub mod device;
mod download;
mod estimate;
mod eval;
pub mod export;
mod import;
mod record;
mod report;
mod select;
mod svd;
mod tensorboard;
mod tokenize;
pub mod train;

pub use command::Command;

use relora_exec::Registry;

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
    r.register(Box::new(select::Select));
    r.register(Box::new(export::Export));
    r.register(Box::new(import::Import));
    r
}

#[cfg(test)]
mod validation_tests;
