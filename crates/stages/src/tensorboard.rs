//! TensorBoard event files: a train stage's scalars (loss, learning rate, gradient norm,
//! tokens seen, evaluation loss and perplexity) as it trains, for `tensorboard --logdir`.
//!
//! They are written beside the stage's log, never among its outputs: every event carries a
//! wall-clock time, and outputs must be the same bytes for the same key. One file per attempt
//! (a resumed stage starts another; TensorBoard reads a folder's files as one run).
//!
//! The format, written here without a protobuf library: a file of records, each
//! `length: u64 LE, masked CRC-32C of the length, data, masked CRC-32C of the data`, where
//! the data is an `Event` message (tensorflow/core/util/event.proto): `wall_time` (field 1,
//! double), `step` (2, int64), `file_version` (3, string: the first record says
//! `brain.Event:2`) or `summary` (5), a `Summary` of `Value`s with `tag` (1, string) and
//! `simple_value` (2, float). Checked with TensorBoard's own reader
//! (scripts/tensorboard/check.py).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli), bit by bit through a table.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0x82F6_3B78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// The CRC as TFRecord stores it (rotated and offset, so that a CRC of CRCs is not trivial).
fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field: its key, length and bytes.
fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    varint(out, field << 3 | 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` with a wall time and either a file version or a step and scalars.
fn event(
    wall_time: f64,
    step: Option<u64>,
    version: Option<&str>,
    scalars: &[(&str, f64)],
) -> Vec<u8> {
    let mut e = Vec::new();
    varint(&mut e, 1 << 3 | 1);
    e.extend_from_slice(&wall_time.to_le_bytes());
    if let Some(step) = step {
        varint(&mut e, 2 << 3);
        varint(&mut e, step);
    }
    if let Some(v) = version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes());
            varint(&mut v, 2 << 3 | 5);
            v.extend_from_slice(&(*value as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &v);
        }
        bytes_field(&mut e, 5, &summary);
    }
    e
}

/// One stage attempt's event file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

impl EventWriter {
    /// A new file in `dir` (created if needed), named as TensorBoard expects
    /// (`events.out.tfevents.TIME.HOST`), opened with its version record.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let now = relora_cache::now_unix();
        let host = relora_cache::hostname().unwrap_or_else(|| "localhost".into());
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now as u64,
            std::process::id()
        ));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        let mut w = EventWriter { file, path };
        w.record(&event(now, None, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Scalars of one step, flushed at once so that a running TensorBoard sees them.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        self.record(&event(relora_cache::now_unix(), Some(step), None, values))
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut r = Vec::with_capacity(data.len() + 16);
        r.extend_from_slice(&len);
        r.extend_from_slice(&masked_crc(&len).to_le_bytes());
        r.extend_from_slice(data);
        r.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&r)?;
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_its_published_check_value() {
        // The CRC-32C of the ASCII digits 1 to 9 (RFC 3720's check value).
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn a_scalar_event_encodes_as_protobuf() {
        let e = event(1.5, Some(300), None, &[("loss", 2.0)]);
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        // step 300 as a varint: 0xAC 0x02.
        want.extend_from_slice(&[0x10, 0xAC, 0x02]);
        // summary { value { tag "loss" simple_value 2.0 } }
        want.extend_from_slice(&[0x2A, 13, 0x0A, 11, 0x0A, 4, b'l', b'o', b's', b's', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(e, want);
    }
}
