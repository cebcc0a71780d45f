//! Reading documents from corpus files, streamed, with errors that name file and line.
//!
//! Formats: C4's gzip JSON lines (`{"text","timestamp","url"}`), plain JSON lines (gzip or
//! not), parquet with a text column, and plain text (one document per line). The format
//! follows from the file name unless given.

use anyhow::{bail, Context, Result};
use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// JSON lines, gzip or not, with a text field.
    Jsonl,
    /// Parquet with a text column.
    Parquet,
    /// One document per line.
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadRecord {
    /// Stop with an error naming file and line.
    #[default]
    Error,
    /// Skip the record and count it.
    Skip,
}

pub fn detect_format(path: &Path) -> Format {
    let name = path.to_string_lossy().to_lowercase();
    let name = name.strip_suffix(".gz").unwrap_or(&name);
    if name.ends_with(".parquet") {
        Format::Parquet
    } else if name.ends_with(".txt") {
        Format::Text
    } else {
        Format::Jsonl
    }
}

/// Expand globs (relative to `base`) into a sorted, de-duplicated file list.
pub fn expand_globs(patterns: &[String], base: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for pat in patterns {
        let full = if Path::new(pat).is_absolute() {
            pat.clone()
        } else {
            base.join(pat).to_string_lossy().to_string()
        };
        let mut n = 0;
        for entry in glob::glob(&full).with_context(|| format!("bad glob `{pat}`"))? {
            let p = entry?;
            if p.is_file() {
                files.push(p);
                n += 1;
            }
        }
        if n == 0 {
            bail!("`{pat}` matches no file (looked in {})", base.display());
        }
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// One document, with where it came from.
pub struct Doc {
    pub text: String,
    pub line: usize,
}

/// Counts of what was read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReadStats {
    pub documents: u64,
    pub skipped: u64,
}

fn open_maybe_gz(path: &Path) -> Result<Box<dyn BufRead>> {
    let f =
        File::open(path).with_context(|| format!("cannot open corpus file {}", path.display()))?;
    let mut r = BufReader::new(f);
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(BufReader::new(MultiGzDecoder::new(r))))
    } else {
        Ok(Box::new(r))
    }
}

/// Call `f` with each document of `path` in order until it returns false; returns the
/// counts of what was read.
pub fn for_each_doc(
    path: &Path,
    format: Format,
    text_field: &str,
    on_bad: OnBadRecord,
    mut f: impl FnMut(Doc) -> Result<bool>,
) -> Result<ReadStats> {
    let mut stats = ReadStats::default();
    if format == Format::Parquet {
        return read_parquet(path, text_field, &mut stats, &mut f).map(|_| stats);
    }
    let mut reader = open_maybe_gz(path)?;
    let mut buf = Vec::new();
    let mut line = 0usize;
    loop {
        buf.clear();
        line += 1;
        let n = reader.read_until(b'\n', &mut buf).map_err(|e| {
            anyhow::anyhow!(
                "{}:{line}: cannot read ({e}); is the file truncated or not gzip?",
                path.display()
            )
        })?;
        if n == 0 {
            break;
        }
        let parsed = parse_record(&buf, format, text_field);
        match parsed {
            Ok(None) => {}
            Ok(Some(text)) => {
                stats.documents += 1;
                if !f(Doc { text, line })? {
                    return Ok(stats);
                }
            }
            Err(why) => match on_bad {
                OnBadRecord::Error => bail!(
                    "{}:{line}: {why} (set `on_bad_record: skip` to skip such records)",
                    path.display()
                ),
                OnBadRecord::Skip => stats.skipped += 1,
            },
        }
    }
    if stats.documents == 0 && stats.skipped == 0 {
        bail!("{}: the file holds no documents", path.display());
    }
    Ok(stats)
}

fn parse_record(bytes: &[u8], format: Format, text_field: &str) -> Result<Option<String>, String> {
    let s = std::str::from_utf8(bytes).map_err(|e| format!("not valid UTF-8 ({e})"))?;
    let s = s.trim_end_matches(['\n', '\r']);
    if s.trim().is_empty() {
        return Ok(None);
    }
    match format {
        Format::Text => Ok(Some(s.to_string())),
        Format::Jsonl => {
            let v: serde_json::Value =
                serde_json::from_str(s).map_err(|e| format!("invalid JSON ({e})"))?;
            match v.get(text_field) {
                Some(serde_json::Value::String(t)) => Ok(Some(t.clone())),
                Some(_) => Err(format!("field `{text_field}` is not a string")),
                None => Err(format!("record has no `{text_field}` field")),
            }
        }
        Format::Parquet => unreachable!("parquet is read by columns"),
    }
}

fn read_parquet(
    path: &Path,
    text_field: &str,
    stats: &mut ReadStats,
    f: &mut dyn FnMut(Doc) -> Result<bool>,
) -> Result<()> {
    use crate::shards::parquet_call;
    use arrow::array::{Array, LargeStringArray, StringArray};
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut reader = parquet_call(path, || {
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            crate::shards::StrictFile(file),
        )
        .with_context(|| format!("{}: not a parquet file", path.display()))?
        .build()
        .with_context(|| format!("{}: not a readable parquet file", path.display()))
    })?;
    let mut row = 0usize;
    while let Some(batch) = parquet_call(path, || Ok(reader.next()))? {
        let batch = batch.with_context(|| format!("{}: reading row group", path.display()))?;
        let col = batch
            .column_by_name(text_field)
            .with_context(|| format!("{}: no column `{text_field}`", path.display()))?;
        let texts: Vec<Option<String>> = if let Some(a) = col.as_any().downcast_ref::<StringArray>()
        {
            (0..a.len())
                .map(|i| (!a.is_null(i)).then(|| a.value(i).to_string()))
                .collect()
        } else if let Some(a) = col.as_any().downcast_ref::<LargeStringArray>() {
            (0..a.len())
                .map(|i| (!a.is_null(i)).then(|| a.value(i).to_string()))
                .collect()
        } else {
            bail!(
                "{}: column `{text_field}` is not a string column",
                path.display()
            );
        };
        for t in texts {
            row += 1;
            if let Some(text) = t {
                stats.documents += 1;
                if !f(Doc { text, line: row })? {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// Read everything from a reader into a string, for small files (tokenizer JSON).
pub fn read_to_string(path: &Path) -> Result<String> {
    let mut s = String::new();
    File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .read_to_string(&mut s)
        .with_context(|| format!("{} is not UTF-8 text", path.display()))?;
    Ok(s)
}
