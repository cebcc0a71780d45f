//! Parquet shards of token ids: one row per document, column `input_ids: list<uint32>`.
//!
//! Shards are written in row groups of about [`ROW_GROUP_TOKENS`] tokens, and read one row
//! group at a time, so neither side ever holds more than a row group of a shard in memory
//! however large the shard is.

use anyhow::{bail, Context, Result};
use arrow::array::{Array, ListArray, ListBuilder, UInt32Array, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The column that holds each document's ids.
pub const IDS_COLUMN: &str = "input_ids";

/// Tokens per parquet row group: the unit a reader decodes at once (4 MiB of ids).
pub const ROW_GROUP_TOKENS: usize = 1 << 20;

/// Rows per record batch while writing; bounds the writer's unencoded buffer.
const WRITE_BATCH_ROWS: usize = 1024;

/// The shard schema: one non-null list of non-null u32 per row.
pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new(
        IDS_COLUMN,
        DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))),
        false,
    )]))
}

/// One shard as a dataset manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Path relative to the dataset folder (`train/00000-00000.parquet`).
    pub file: String,
    pub documents: u64,
    pub tokens: u64,
}

/// Writes documents into numbered shards `{prefix}-{n:05}.parquet`, starting a new one past
/// `shard_tokens`.
pub struct ShardWriter {
    dir: PathBuf,
    prefix: String,
    shard_tokens: usize,
    writer: Option<ArrowWriter<File>>,
    builder: ListBuilder<UInt32Builder>,
    pending_rows: usize,
    tokens_in_group: usize,
    current: Option<ShardInfo>,
    /// Every shard closed so far; `file` is the bare file name.
    pub shards: Vec<ShardInfo>,
    pub documents: u64,
    pub tokens: u64,
}

impl ShardWriter {
    /// Shards named `shard-{n:05}.parquet` in `dir`.
    pub fn new(dir: &Path, shard_tokens: usize) -> Result<Self> {
        Self::with_prefix(dir, "shard", shard_tokens)
    }

    /// Shards named `{prefix}-{n:05}.parquet` in `dir`.
    pub fn with_prefix(dir: &Path, prefix: &str, shard_tokens: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            prefix: prefix.to_string(),
            shard_tokens: shard_tokens.max(1),
            writer: None,
            builder: new_builder(),
            pending_rows: 0,
            tokens_in_group: 0,
            current: None,
            shards: Vec::new(),
            documents: 0,
            tokens: 0,
        })
    }

    /// Append one document.
    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        if self.writer.is_none() {
            let name = format!("{}-{:05}.parquet", self.prefix, self.shards.len());
            let path = self.dir.join(&name);
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build();
            let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            self.writer = Some(ArrowWriter::try_new(f, schema(), Some(props))?);
            self.current = Some(ShardInfo {
                file: name,
                documents: 0,
                tokens: 0,
            });
        }
        self.builder.values().append_slice(ids);
        self.builder.append(true);
        self.pending_rows += 1;
        self.tokens_in_group += ids.len();
        let cur = self.current.as_mut().expect("a shard is open");
        cur.documents += 1;
        cur.tokens += ids.len() as u64;
        self.documents += 1;
        self.tokens += ids.len() as u64;
        if self.pending_rows >= WRITE_BATCH_ROWS {
            self.write_batch()?;
        }
        if cur_tokens(&self.current) >= self.shard_tokens as u64 {
            self.close_shard()?;
        } else if self.tokens_in_group >= ROW_GROUP_TOKENS {
            self.write_batch()?;
            let path = self.shard_path();
            self.writer_mut()?
                .flush()
                .with_context(|| format!("writing {}", path.display()))?;
            self.tokens_in_group = 0;
        }
        Ok(())
    }

    /// The open shard's file (for errors: a full disk names the file it could not write).
    fn shard_path(&self) -> std::path::PathBuf {
        self.dir
            .join(self.current.as_ref().map_or("", |c| c.file.as_str()))
    }

    fn writer_mut(&mut self) -> Result<&mut ArrowWriter<File>> {
        self.writer
            .as_mut()
            .context("a shard is open while rows are pending")
    }

    fn write_batch(&mut self) -> Result<()> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        let list = std::mem::replace(&mut self.builder, new_builder()).finish();
        let batch = RecordBatch::try_new(schema(), vec![Arc::new(list)])?;
        let path = self.shard_path();
        self.writer_mut()?
            .write(&batch)
            .with_context(|| format!("writing {}", path.display()))?;
        self.pending_rows = 0;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        self.write_batch()?;
        if let Some(w) = self.writer.take() {
            let path = self.shard_path();
            w.close()
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(info) = self.current.take() {
            self.shards.push(info);
        }
        self.tokens_in_group = 0;
        Ok(())
    }

    /// Close the open shard; the writer's counts and shard list are final.
    pub fn finish(mut self) -> Result<ShardWriter> {
        self.close_shard()?;
        Ok(self)
    }
}

fn cur_tokens(cur: &Option<ShardInfo>) -> u64 {
    cur.as_ref().map_or(0, |c| c.tokens)
}

fn new_builder() -> ListBuilder<UInt32Builder> {
    ListBuilder::new(UInt32Builder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::UInt32,
        false,
    )))
}

/// Consecutive documents as one flat token array: document i is
/// `tokens[offsets[i]..offsets[i + 1]]`, and came from row `first_row + i` of its shard.
#[derive(Debug, Clone, Default)]
pub struct DocRun {
    pub first_row: u64,
    pub tokens: Vec<u32>,
    pub offsets: Vec<usize>,
}

impl DocRun {
    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn doc(&self, i: usize) -> &[u32] {
        &self.tokens[self.offsets[i]..self.offsets[i + 1]]
    }
}

/// A call into the parquet reader, with a panic turned into an error naming `path`.
///
/// The parquet crate panics on some malformed pages (fuzzing found a run-length header
/// longer than its 10-byte limit: "Num of bytes exceed MAX_VLQ_BYTE_LEN"). A corrupt shard
/// or corpus file must be an error that names the file, not a crash of the stage.
pub(crate) fn parquet_call<T>(path: &Path, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            bail!(
                "{}: corrupt parquet data (the reader stopped: {msg})",
                path.display()
            )
        }
    }
}

/// A parquet file whose reads fail at its end instead of returning nothing.
///
/// A page reader that meets the end of the file has met a corrupt (truncated or
/// overwritten) file. The parquet crate's reader, given a page header that declares a huge
/// list of fields, skips them one by one, each skip reading zero bytes at the end of the
/// file: billions of reads, a hang (fuzzing found it). Failing those reads makes it an
/// error.
pub(crate) struct StrictFile(pub File);

pub(crate) struct StrictRead<R>(R);

impl<R: std::io::Read> std::io::Read for StrictRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read(buf)?;
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file ends inside a page (truncated or corrupt)",
            ));
        }
        Ok(n)
    }
}

impl parquet::file::reader::Length for StrictFile {
    fn len(&self) -> u64 {
        self.0.len()
    }
}

impl parquet::file::reader::ChunkReader for StrictFile {
    type T = StrictRead<<File as parquet::file::reader::ChunkReader>::T>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(StrictRead(self.0.get_read(start)?))
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        self.0.get_bytes(start, length)
    }
}

/// A shard's footer, read once: its row groups, for reading it a piece at a time from any row.
#[derive(Debug, Clone)]
pub struct ShardLayout {
    pub path: PathBuf,
    metadata: ArrowReaderMetadata,
    /// First row of each row group, and the row count last: group g is
    /// `starts[g]..starts[g + 1]`.
    starts: Vec<u64>,
}

impl ShardLayout {
    /// Read a shard's footer (no data pages).
    pub fn open(path: &Path) -> Result<ShardLayout> {
        let f =
            File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
        let metadata = parquet_call(path, || {
            ArrowReaderMetadata::load(&StrictFile(f), Default::default()).with_context(|| {
                format!(
                    "{}: not a readable parquet shard (truncated or overwritten?)",
                    path.display()
                )
            })
        })?;
        let mut starts = vec![0];
        for g in metadata.metadata().row_groups() {
            starts.push(starts.last().copied().unwrap_or(0) + g.num_rows() as u64);
        }
        Ok(ShardLayout {
            path: path.to_path_buf(),
            metadata,
            starts,
        })
    }

    /// Rows in the shard.
    pub fn rows(&self) -> u64 {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Row groups in the shard.
    pub fn groups(&self) -> usize {
        self.starts.len() - 1
    }

    /// The first row of row group `group`.
    pub fn group_start(&self, group: usize) -> u64 {
        self.starts[group]
    }

    /// The row group holding `row`.
    pub fn group_of(&self, row: u64) -> Option<usize> {
        (row < self.rows()).then(|| self.starts.partition_point(|&s| s <= row) - 1)
    }

    /// Decode the documents of row group `group` from row `from` (a row of that group) to
    /// the group's end. Errors name the shard and the rows that failed.
    pub fn read_group(&self, group: usize, from: u64) -> Result<DocRun> {
        let (group_start, group_end) = (self.starts[group], self.starts[group + 1]);
        let what = || {
            format!(
                "{}: rows {from}..{group_end} (row group {group})",
                self.path.display()
            )
        };
        let f = File::open(&self.path)
            .with_context(|| format!("cannot open shard {}", self.path.display()))?;
        let mut reader = parquet_call(&self.path, || {
            ParquetRecordBatchReaderBuilder::new_with_metadata(StrictFile(f), self.metadata.clone())
                .with_row_groups(vec![group])
                .with_offset((from - group_start) as usize)
                .with_batch_size(WRITE_BATCH_ROWS)
                .build()
                .with_context(what)
        })?;
        let mut run = DocRun {
            first_row: from,
            tokens: Vec::new(),
            offsets: vec![0],
        };
        while let Some(batch) = parquet_call(&self.path, || Ok(reader.next()))? {
            let batch = batch.with_context(|| format!("{}: cannot decode", what()))?;
            let row = from + run.len() as u64;
            let (values, offs) =
                ids_of(&batch).with_context(|| format!("{}: row {row}", self.path.display()))?;
            run.tokens.reserve(values.len());
            for w in offs.windows(2) {
                run.tokens
                    .extend_from_slice(&values[w[0] as usize..w[1] as usize]);
                run.offsets.push(run.tokens.len());
            }
        }
        if run.first_row + run.len() as u64 != group_end {
            bail!(
                "{}: row group {group} ended after {} of its {} rows from row {from}",
                self.path.display(),
                run.len(),
                group_end - from
            );
        }
        Ok(run)
    }
}

/// The id values and list offsets of a record batch of shard rows.
fn ids_of(batch: &RecordBatch) -> Result<(&[u32], &[i32])> {
    let col = batch
        .column_by_name(IDS_COLUMN)
        .with_context(|| format!("no `{IDS_COLUMN}` column; is this a token shard?"))?;
    let list = col
        .as_any()
        .downcast_ref::<ListArray>()
        .with_context(|| format!("`{IDS_COLUMN}` is not a list column"))?;
    let values = list
        .values()
        .as_any()
        .downcast_ref::<UInt32Array>()
        .context("token ids are not uint32")?;
    // The offsets index into the child array, whose buffer `values()` already slices.
    Ok((values.values(), list.value_offsets()))
}

/// Every document of `dir`'s `*.parquet` shards, in file-name order, in memory (numbered
/// from 0 across the shards). For small splits and tests; training and evaluation stream.
pub fn read_split(dir: &Path) -> Result<DocRun> {
    let files = list_shards(dir)?;
    let mut docs = DocRun {
        first_row: 0,
        tokens: Vec::new(),
        offsets: vec![0],
    };
    for path in files {
        let layout = ShardLayout::open(&path)?;
        for g in 0..layout.groups() {
            let run = layout.read_group(g, layout.group_start(g))?;
            for i in 0..run.len() {
                docs.tokens.extend_from_slice(run.doc(i));
                docs.offsets.push(docs.tokens.len());
            }
        }
    }
    Ok(docs)
}

/// The `*.parquet` files of `dir`, sorted by name.
pub fn list_shards(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading token shards in {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no parquet shards", dir.display());
    }
    Ok(files)
}

/// Write `docs` into shards of about `shard_tokens` under `dir`; for tests and benchmarks.
pub fn write_docs<'a>(
    dir: &Path,
    docs: impl IntoIterator<Item = &'a [u32]>,
    shard_tokens: usize,
) -> Result<Vec<ShardInfo>> {
    let mut w = ShardWriter::new(dir, shard_tokens)?;
    for d in docs {
        w.push(d)?;
    }
    Ok(w.finish()?.shards)
}
