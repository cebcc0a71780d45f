//! Parquet shards of token ids: one row per document, column `input_ids: list<uint32>`.

use anyhow::{bail, Context, Result};
use arrow::array::{Array, ListArray, ListBuilder, UInt32Array, UInt32Builder};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const IDS_COLUMN: &str = "input_ids";

pub fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![Field::new(
        IDS_COLUMN,
        DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))),
        false,
    )]))
}

/// Writes documents into numbered shards, starting a new one past `shard_tokens`.
pub struct ShardWriter {
    dir: PathBuf,
    shard_tokens: usize,
    writer: Option<ArrowWriter<File>>,
    builder: ListBuilder<UInt32Builder>,
    pending_rows: usize,
    tokens_in_shard: usize,
    pub shards: Vec<PathBuf>,
    pub documents: u64,
    pub tokens: u64,
}

impl ShardWriter {
    pub fn new(dir: &Path, shard_tokens: usize) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(ShardWriter {
            dir: dir.to_path_buf(),
            shard_tokens: shard_tokens.max(1),
            writer: None,
            builder: new_builder(),
            pending_rows: 0,
            tokens_in_shard: 0,
            shards: Vec::new(),
            documents: 0,
            tokens: 0,
        })
    }

    pub fn push(&mut self, ids: &[u32]) -> Result<()> {
        if self.writer.is_none() {
            let path = self
                .dir
                .join(format!("shard-{:05}.parquet", self.shards.len()));
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .build();
            let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
            self.writer = Some(ArrowWriter::try_new(f, schema(), Some(props))?);
            self.shards.push(path);
        }
        self.builder.values().append_slice(ids);
        self.builder.append(true);
        self.pending_rows += 1;
        self.tokens_in_shard += ids.len();
        self.documents += 1;
        self.tokens += ids.len() as u64;
        if self.pending_rows >= 1024 {
            self.flush_batch()?;
        }
        if self.tokens_in_shard >= self.shard_tokens {
            self.close_shard()?;
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<()> {
        if self.pending_rows == 0 {
            return Ok(());
        }
        let list = std::mem::replace(&mut self.builder, new_builder()).finish();
        let batch = RecordBatch::try_new(schema(), vec![Arc::new(list)])?;
        self.writer
            .as_mut()
            .context("a shard is open while rows are pending")?
            .write(&batch)?;
        self.pending_rows = 0;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        self.flush_batch()?;
        if let Some(w) = self.writer.take() {
            w.close()?;
        }
        self.tokens_in_shard = 0;
        Ok(())
    }

    pub fn finish(mut self) -> Result<ShardWriter> {
        self.close_shard()?;
        Ok(self)
    }
}

fn new_builder() -> ListBuilder<UInt32Builder> {
    ListBuilder::new(UInt32Builder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::UInt32,
        false,
    )))
}

/// Documents as one flat token array with offsets: doc i is `tokens[offsets[i]..offsets[i+1]]`.
#[derive(Debug, Clone, Default)]
pub struct TokenDocs {
    pub tokens: Vec<u32>,
    pub offsets: Vec<usize>,
}

impl TokenDocs {
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

/// Read every `shard-*.parquet` in `dir`, in order.
pub fn read_split(dir: &Path) -> Result<TokenDocs> {
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
    let mut docs = TokenDocs {
        tokens: Vec::new(),
        offsets: vec![0],
    };
    for path in files {
        let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .with_context(|| format!("{}: not a parquet file", path.display()))?
            .build()?;
        for batch in reader {
            let batch = batch?;
            let col = batch
                .column_by_name(IDS_COLUMN)
                .with_context(|| format!("{}: no `{IDS_COLUMN}` column", path.display()))?;
            let list = col
                .as_any()
                .downcast_ref::<ListArray>()
                .with_context(|| format!("{}: `{IDS_COLUMN}` is not a list", path.display()))?;
            let values = list
                .values()
                .as_any()
                .downcast_ref::<UInt32Array>()
                .with_context(|| format!("{}: ids are not uint32", path.display()))?;
            let offs = list.value_offsets();
            for i in 0..list.len() {
                let (a, b) = (offs[i] as usize, offs[i + 1] as usize);
                docs.tokens.extend_from_slice(&values.values()[a..b]);
                docs.offsets.push(docs.tokens.len());
            }
        }
    }
    Ok(docs)
}
