//! relora-data: text corpora to training batches.
//!
//! Corpus files (C4's gzip JSON lines, JSON lines, parquet, plain text) are streamed through
//! a Hugging Face tokenizer (loaded, or trained on the corpus) into parquet shards of token
//! ids, one row per document ending in exactly one EOS id. The loader packs documents into
//! fixed-length sequences and serves deterministic, resumable batches. Nothing here knows
//! about pipelines, the cache or models.

pub mod corpus;
pub mod loader;
pub mod shards;
pub mod tokenize;

pub use corpus::{Format, OnBadRecord};
pub use loader::{pack, Batch, Loader, LoaderState, Packing, Sequences};
pub use shards::{read_split, TokenDocs};
pub use tokenize::{tokenize, DatasetManifest, TokenizeConfig, TokenizerSource};
