//! Packing documents into fixed-length sequences while reading shards, one row group at a
//! time, from any position.

use crate::loader::{Packing, Sequences};
use crate::shards::{DocRun, ShardLayout};
use anyhow::{bail, Result};
use rayon::prelude::*;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;

/// A place in a sequence of shards: shard `shard` of the reading order, its row `row`, and
/// `offset` tokens into that row's document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    pub shard: u64,
    pub row: u64,
    pub offset: u64,
}

/// How sequences are cut from documents.
#[derive(Debug, Clone)]
pub struct PackSpec {
    pub seq_len: usize,
    pub packing: Packing,
    pub pad_id: u32,
    /// Ids at or above this are reported as corruption, with shard and row.
    pub vocab_size: Option<u32>,
}

/// Reads shards in a given order from a position and cuts sequences, decoding up to
/// `pool`'s thread count of row groups at once.
pub struct Packer {
    shards: Arc<Vec<PathBuf>>,
    order: Vec<usize>,
    spec: PackSpec,
    pool: Arc<rayon::ThreadPool>,
    /// The next unread token.
    pos: Position,
    layout: Option<ShardLayout>,
    /// Decoded row groups of the current shard, the first holding `pos.row`.
    runs: VecDeque<DocRun>,
}

impl Packer {
    pub fn new(
        shards: Arc<Vec<PathBuf>>,
        order: Vec<usize>,
        spec: PackSpec,
        pool: Arc<rayon::ThreadPool>,
        start: Position,
    ) -> Packer {
        Packer {
            shards,
            order,
            spec,
            pool,
            pos: start,
            layout: None,
            runs: VecDeque::new(),
        }
    }

    /// The position of the next unread token.
    pub fn position(&self) -> Position {
        self.pos
    }

    /// Make `runs[0]` the decoded row group holding `pos.row`, moving on to the next shard
    /// at the end of one. False when every shard is read.
    fn load(&mut self) -> Result<bool> {
        loop {
            if let Some(r) = self.runs.front() {
                if self.pos.row < r.first_row + r.len() as u64 {
                    return Ok(true);
                }
                self.runs.pop_front();
                continue;
            }
            let Some(&shard) = self.order.get(self.pos.shard as usize) else {
                return Ok(false);
            };
            if self.layout.is_none() {
                self.layout = Some(ShardLayout::open(&self.shards[shard])?);
            }
            let layout = self.layout.as_ref().expect("opened above");
            let Some(group) = layout.group_of(self.pos.row) else {
                if self.pos.row > layout.rows() {
                    bail!(
                        "{}: a saved position points at row {} but the shard has {} rows; \
                         was the data replaced?",
                        layout.path.display(),
                        self.pos.row,
                        layout.rows()
                    );
                }
                self.pos = Position {
                    shard: self.pos.shard + 1,
                    row: 0,
                    offset: 0,
                };
                self.layout = None;
                continue;
            };
            // Decode this group and the next ones in parallel, one per thread.
            let last = (group + self.pool.current_num_threads()).min(layout.groups());
            let from = self.pos.row;
            let runs: Vec<Result<DocRun>> = self.pool.install(|| {
                (group..last)
                    .into_par_iter()
                    .map(|g| layout.read_group(g, from.max(layout.group_start(g))))
                    .collect()
            });
            for run in runs {
                let run = run?;
                self.check_ids(&run)?;
                self.runs.push_back(run);
            }
        }
    }

    fn check_ids(&self, run: &DocRun) -> Result<()> {
        let Some(vocab) = self.spec.vocab_size else {
            return Ok(());
        };
        if run.tokens.iter().all(|&t| t < vocab) {
            return Ok(());
        }
        let i = (0..run.len())
            .find(|&i| run.doc(i).iter().any(|&t| t >= vocab))
            .unwrap_or(0);
        let bad = run.doc(i).iter().find(|&&t| t >= vocab).copied();
        bail!(
            "{}: row {}: token id {} is outside the vocabulary of {vocab}; the shard is \
             corrupt or was made with another tokenizer",
            self.layout
                .as_ref()
                .map_or_else(String::new, |l| l.path.display().to_string()),
            run.first_row + i as u64,
            bad.unwrap_or(0)
        )
    }

    /// Append sequences to `seqs` until it holds `n` or the shards end; returns where the
    /// first appended one began (None: nothing appended).
    pub fn fill(&mut self, seqs: &mut Sequences, n: usize) -> Result<Option<Position>> {
        let mut first = None;
        while seqs.len() < n {
            match self.next_sequence(&mut seqs.tokens, &mut seqs.mask)? {
                Some(p) => {
                    first.get_or_insert(p);
                }
                None => break,
            }
        }
        Ok(first)
    }

    /// Append the next sequence to `tokens` and `mask` and return where it began; None
    /// (appending nothing) when the shards hold no further whole sequence.
    pub fn next_sequence(
        &mut self,
        tokens: &mut Vec<u32>,
        mask: &mut Vec<u8>,
    ) -> Result<Option<Position>> {
        if !self.load()? {
            return Ok(None);
        }
        let n = self.spec.seq_len;
        let (start_len, start) = (tokens.len(), self.pos);
        match self.spec.packing {
            Packing::Concat => {
                let mut need = n;
                while need > 0 {
                    if !self.load()? {
                        tokens.truncate(start_len);
                        return Ok(None);
                    }
                    let run = &self.runs[0];
                    let doc = run.doc((self.pos.row - run.first_row) as usize);
                    let rest = &doc[self.pos.offset as usize..];
                    let k = rest.len().min(need);
                    tokens.extend_from_slice(&rest[..k]);
                    need -= k;
                    if k == rest.len() {
                        self.pos.row += 1;
                        self.pos.offset = 0;
                    } else {
                        self.pos.offset += k as u64;
                    }
                }
                mask.extend(std::iter::repeat_n(1u8, n));
            }
            Packing::Pad => {
                let run = &self.runs[0];
                let doc = run.doc((self.pos.row - run.first_row) as usize);
                let k = doc.len().min(n);
                tokens.extend_from_slice(&doc[..k]);
                tokens.extend(std::iter::repeat_n(self.spec.pad_id, n - k));
                mask.extend(std::iter::repeat_n(1u8, k));
                mask.extend(std::iter::repeat_n(0u8, n - k));
                self.pos.row += 1;
                self.pos.offset = 0;
            }
        }
        Ok(Some(start))
    }
}
