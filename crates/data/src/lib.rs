//! relora-data: text corpora to training batches.
//!
//! Corpus files (C4's gzip JSON lines, JSON lines, parquet, plain text) are streamed through
//! a Hugging Face tokenizer (loaded, or trained on a sample of the corpus) into parquet
//! shards of token ids, one row per document ending in exactly one EOS id, several files at
//! once. The loader streams those shards in a seeded order, packs them into fixed-length
//! sequences, shuffles within a bounded window and prefetches on a background thread; its
//! position is a small value a checkpoint stores. Memory is bounded by a few windows and row
//! groups whatever the dataset's size. Nothing here knows about pipelines, the cache or
//! models.

pub mod corpus;
#[cfg(test)]
mod fuzz_regressions;
pub mod loader;
pub mod shards;
pub mod stream;
pub mod tokenize;

pub use corpus::{Format, OnBadRecord};
pub use loader::{
    read_sequences, Batch, Loader, LoaderConfig, LoaderState, Packing, SequenceReader, Sequences,
    Split, DEFAULT_WINDOW,
};
pub use shards::{read_split, DocRun, ShardInfo};
pub use stream::PackSpec;
pub use tokenize::{tokenize, DatasetManifest, TokenizeConfig, TokenizerSource};
