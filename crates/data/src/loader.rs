//! The training loader: shards streamed in a seeded order, packed into sequences, shuffled
//! within a bounded window, prefetched on a background thread, and resumable at an exact
//! position.
//!
//! # Order
//! Epoch `e` reads the shards in a permutation drawn from `(seed, e)`, packs them into
//! sequences as one stream, and cuts that stream into windows of `window` sequences. Each
//! window is shuffled with a permutation drawn from `(seed, e, window index)`, and rank `r`
//! of `world` takes the window's positions `r, r + world, …`. So the order depends only on
//! the seed, the shard list and the packing; never on threads or timing.
//!
//! Why this is enough for pre-training: a corpus such as C4 is already shuffled across and
//! within its files, so what a loader must break up is the local correlation packing
//! creates (one long document filling consecutive sequences) and any order of the shard
//! list. The shard permutation removes the second, and a window of thousands of sequences
//! scatters the first across many batches. When an epoch fits in one window the order is a
//! full shuffle of it.
//!
//! # Memory
//! At most `PREFETCH_WINDOWS + 2` windows of `window × seq_len` tokens (the one being
//! consumed, those queued, the one being built) plus `threads` decoded row groups of about
//! [`ROW_GROUP_TOKENS`](crate::shards::ROW_GROUP_TOKENS) ids each, whatever the dataset's
//! size: with the defaults and seq_len 256, about 45 MB.
//!
//! # Resume
//! [`LoaderState`] names the current window by its first sequence's position (shard in the
//! epoch's order, row, token offset) and how many of its sequences were taken. Restoring
//! re-reads that window from its position and skips what was taken, so a resumed run sees
//! exactly the tokens an uninterrupted one would have.

use crate::shards::ShardInfo;
use crate::stream::{PackSpec, Packer, Position};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;

/// How documents become sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Packing {
    /// Concatenate all documents (each ends in EOS) and cut fixed-length blocks.
    #[default]
    Concat,
    /// One document per sequence, truncated or padded, with a loss mask on the padding.
    Pad,
}

/// Fixed-length sequences, row-major, with a mask that is 1 on real tokens.
#[derive(Debug, Clone)]
pub struct Sequences {
    pub seq_len: usize,
    pub tokens: Vec<u32>,
    pub mask: Vec<u8>,
}

impl Sequences {
    /// No sequences yet, with room for `n` of `seq_len` tokens.
    pub fn with_capacity(seq_len: usize, n: usize) -> Sequences {
        Sequences {
            seq_len,
            tokens: Vec::with_capacity(n * seq_len),
            mask: Vec::with_capacity(n * seq_len),
        }
    }
    pub fn len(&self) -> usize {
        self.tokens.len() / self.seq_len
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn row(&self, i: usize) -> (&[u32], &[u8]) {
        let r = i * self.seq_len..(i + 1) * self.seq_len;
        (&self.tokens[r.clone()], &self.mask[r])
    }
    /// The first `max` sequences as batches of up to `micro_batch`.
    pub fn batches(&self, max: usize, micro_batch: usize) -> impl Iterator<Item = Batch> + '_ {
        let n = self.len().min(max);
        (0..n)
            .step_by(micro_batch.max(1))
            .map(move |i| Batch::from_rows((i..(i + micro_batch).min(n)).map(|k| self.row(k))))
    }
}

/// A batch of next-token examples: `inputs[b][t]` predicts `targets[b][t]`, weighted by
/// `weights[b][t]` (0 on padding). Each row is `seq_len - 1` long.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Batch {
    pub batch_size: usize,
    pub len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Batch {
    pub fn from_rows<'a>(rows: impl Iterator<Item = (&'a [u32], &'a [u8])>) -> Batch {
        let mut b = Batch::default();
        for (toks, mask) in rows {
            b.push_row(toks, mask);
        }
        b
    }

    /// Append one sequence (its tokens and mask) as a row of inputs, targets and weights.
    pub fn push_row(&mut self, toks: &[u32], mask: &[u8]) {
        self.len = toks.len() - 1;
        self.batch_size += 1;
        self.inputs.extend_from_slice(&toks[..toks.len() - 1]);
        self.targets.extend_from_slice(&toks[1..]);
        self.weights.extend(mask[1..].iter().map(|&m| m as f32));
    }

    /// Tokens that carry loss.
    pub fn target_tokens(&self) -> f64 {
        self.weights.iter().map(|&w| w as f64).sum()
    }
}

/// A split on disk: its folder's parent (paths in `shards` are relative to it) and its shards
/// in manifest order.
#[derive(Debug, Clone)]
pub struct Split {
    pub root: PathBuf,
    pub shards: Vec<ShardInfo>,
}

impl Split {
    pub fn new(root: &Path, shards: Vec<ShardInfo>) -> Split {
        Split {
            root: root.to_path_buf(),
            shards,
        }
    }
    fn paths(&self) -> Arc<Vec<PathBuf>> {
        Arc::new(
            self.shards
                .iter()
                .map(|s| self.root.join(&s.file))
                .collect(),
        )
    }
    /// Tokens in the split.
    pub fn tokens(&self) -> u64 {
        self.shards.iter().map(|s| s.tokens).sum()
    }
    pub fn documents(&self) -> u64 {
        self.shards.iter().map(|s| s.documents).sum()
    }
    /// Whole sequences one pass over the split yields.
    pub fn sequences(&self, seq_len: usize, packing: Packing) -> u64 {
        match packing {
            Packing::Concat => self.tokens() / seq_len as u64,
            Packing::Pad => self.documents(),
        }
    }
}

/// Everything that decides the loader's order, apart from the data.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub seq_len: usize,
    pub packing: Packing,
    pub pad_id: u32,
    /// Ids at or above this are reported as corruption.
    pub vocab_size: Option<u32>,
    pub seed: u64,
    /// Sequences per shuffle window.
    pub window: usize,
    pub rank: usize,
    pub world: usize,
    /// Threads decoding parquet (does not change the order).
    pub threads: usize,
}

/// Default sequences per shuffle window.
pub const DEFAULT_WINDOW: usize = 8192;

/// Windows queued ahead of the trainer.
const PREFETCH_WINDOWS: usize = 2;

/// The most bytes a loader holds, whatever the split's size: the windows in flight (ids and
/// mask, 5 bytes a token) and the row groups being decoded (4 bytes a token).
pub fn memory_bound(window: usize, seq_len: usize, threads: usize) -> u64 {
    let windows = (PREFETCH_WINDOWS + 2) * window * seq_len * 5;
    let groups = threads.max(1) * crate::shards::ROW_GROUP_TOKENS * 4;
    (windows + groups) as u64
}

/// Where a loader is: the current window (epoch, its index in the epoch, the position of its
/// first sequence) and how many of its sequences this rank has taken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoaderState {
    pub epoch: u64,
    pub window: u64,
    /// Position in the epoch's shard order of the window's first sequence.
    pub shard: u64,
    /// Its row in that shard.
    pub row: u64,
    /// Its first token's offset in that row's document.
    pub offset: u64,
    /// Sequences of the window this rank has taken.
    pub taken: u64,
    /// What the position is a position in (shards, sequence length, packing, window);
    /// empty before the first batch.
    pub layout: String,
}

/// One shuffled window: its sequences, and the order in which this rank takes them.
struct Window {
    epoch: u64,
    index: u64,
    start: Position,
    seqs: Sequences,
    picks: Vec<u32>,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A Fisher–Yates permutation of `0..n` drawn from `seed`.
fn permutation(n: usize, mut seed: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (splitmix(&mut seed) % (i as u64 + 1)) as usize;
        perm.swap(i, j);
    }
    perm
}

const EPOCH_MIX: u64 = 0xA24B_AED4_963E_E407;
const WINDOW_MIX: u64 = 0x9FB2_1C65_1E98_DF25;
const SHARD_MIX: u64 = 0xD6E8_FEB8_6659_FD93;

fn shard_order(seed: u64, epoch: u64, n: usize) -> Vec<usize> {
    permutation(n, seed ^ SHARD_MIX ^ epoch.wrapping_mul(EPOCH_MIX))
}

fn window_seed(seed: u64, epoch: u64, window: u64) -> u64 {
    seed ^ epoch.wrapping_mul(EPOCH_MIX) ^ window.wrapping_mul(WINDOW_MIX)
}

/// Deterministic shuffled batches from a split, read as they are needed.
pub struct Loader {
    split: Split,
    cfg: LoaderConfig,
    layout: String,
    state: LoaderState,
    /// Windows from the background reader; started at the first batch after a restore.
    incoming: Option<Receiver<Result<Window>>>,
    current: Option<Window>,
    /// Time the consumer spent blocked on the background reader.
    waited: std::time::Duration,
}

impl Loader {
    pub fn new(split: Split, cfg: LoaderConfig) -> Result<Loader> {
        if cfg.world == 0 || cfg.rank >= cfg.world {
            bail!("rank {} is not below world size {}", cfg.rank, cfg.world);
        }
        if split.shards.is_empty() {
            bail!("{}: the split has no shards", split.root.display());
        }
        let mut h = blake3::Hasher::new();
        for s in &split.shards {
            h.update(format!("{}:{}:{}\n", s.file, s.documents, s.tokens).as_bytes());
        }
        h.update(
            format!(
                "{} {:?} {} {}",
                cfg.seq_len, cfg.packing, cfg.window, cfg.world
            )
            .as_bytes(),
        );
        let layout = h.finalize().to_hex()[..16].to_string();
        Ok(Loader {
            split,
            cfg,
            layout,
            state: LoaderState::default(),
            incoming: None,
            current: None,
            waited: std::time::Duration::ZERO,
        })
    }

    /// How long `next_batch` has waited for the background reader in total: near zero when
    /// the reader keeps ahead of the trainer.
    pub fn waited(&self) -> std::time::Duration {
        self.waited
    }

    pub fn state(&self) -> LoaderState {
        let mut s = self.state.clone();
        s.layout = self.layout.clone();
        s
    }

    /// Whether `state` is a position in this loader's data, order and packing.
    pub fn can_restore(&self, state: &LoaderState) -> bool {
        state.layout.is_empty() || state.layout == self.layout
    }

    /// Continue from `state`; the next batch starts where that state's run stopped.
    pub fn restore(&mut self, state: &LoaderState) -> Result<()> {
        if !self.can_restore(state) {
            bail!(
                "the saved loader position belongs to other data or another sequence length, \
                 packing, window or world size"
            );
        }
        self.state = state.clone();
        self.incoming = None;
        self.current = None;
        Ok(())
    }

    fn start_reader(&self) -> Result<Receiver<Result<Window>>> {
        let (tx, rx) = sync_channel(PREFETCH_WINDOWS);
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(self.cfg.threads.max(1))
                .thread_name(|i| format!("relora-decode-{i}"))
                .build()
                .context("starting the loader's decode threads")?,
        );
        let (paths, cfg, s) = (self.split.paths(), self.cfg.clone(), self.state.clone());
        std::thread::Builder::new()
            .name("relora-loader".into())
            .spawn(move || {
                let mut start = Position {
                    shard: s.shard,
                    row: s.row,
                    offset: s.offset,
                };
                let (mut epoch, mut index) = (s.epoch, s.window);
                loop {
                    let produced = produce_epoch(&paths, &cfg, &pool, epoch, index, start, |w| {
                        tx.send(Ok(w)).is_ok()
                    });
                    match produced {
                        Ok(Some(0)) if start == Position::default() && index == 0 => {
                            let _ = tx.send(Err(anyhow::anyhow!(
                                "one pass over the training split yields fewer than {} whole \
                                 sequences of {} tokens; give it more data or lower seq_len",
                                cfg.world,
                                cfg.seq_len
                            )));
                            return;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => return,
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    }
                    epoch += 1;
                    index = 0;
                    start = Position::default();
                }
            })
            .context("starting the loader thread")?;
        Ok(rx)
    }

    /// The next `batch_size` sequences.
    pub fn next_batch(&mut self, batch_size: usize) -> Result<Batch> {
        let mut batch = Batch::default();
        while batch.batch_size < batch_size {
            let exhausted = self
                .current
                .as_ref()
                .is_none_or(|w| self.state.taken as usize >= w.picks.len());
            if exhausted {
                self.next_window()?;
                continue;
            }
            let w = self.current.as_ref().expect("checked above");
            let (tokens, mask) = w.seqs.row(w.picks[self.state.taken as usize] as usize);
            batch.push_row(tokens, mask);
            self.state.taken += 1;
        }
        Ok(batch)
    }

    fn next_window(&mut self) -> Result<()> {
        // After a restore the first window is the saved one, with `taken` already counted.
        let resuming = self.current.is_none() && self.incoming.is_none();
        if self.incoming.is_none() {
            self.incoming = Some(self.start_reader()?);
        }
        let started = std::time::Instant::now();
        let w = self
            .incoming
            .as_ref()
            .expect("started above")
            .recv()
            .context("the loader thread stopped")??;
        self.waited += started.elapsed();
        if !resuming {
            self.state.taken = 0;
        }
        self.state.epoch = w.epoch;
        self.state.window = w.index;
        self.state.shard = w.start.shard;
        self.state.row = w.start.row;
        self.state.offset = w.start.offset;
        self.current = Some(w);
        Ok(())
    }
}

/// Produce the windows of `epoch` from window `index` at `start`, handing each to `send`
/// (false: the consumer is gone). Returns the windows produced, or None when told to stop.
fn produce_epoch(
    paths: &Arc<Vec<PathBuf>>,
    cfg: &LoaderConfig,
    pool: &Arc<rayon::ThreadPool>,
    epoch: u64,
    mut index: u64,
    start: Position,
    mut send: impl FnMut(Window) -> bool,
) -> Result<Option<u64>> {
    let spec = PackSpec {
        seq_len: cfg.seq_len,
        packing: cfg.packing,
        pad_id: cfg.pad_id,
        vocab_size: cfg.vocab_size,
    };
    let order = shard_order(cfg.seed, epoch, paths.len());
    let mut packer = Packer::new(paths.clone(), order, spec, pool.clone(), start);
    let mut produced = 0;
    loop {
        let mut seqs = Sequences::with_capacity(cfg.seq_len, cfg.window);
        let first = packer.fill(&mut seqs, cfg.window)?;
        let n = seqs.len();
        let per_rank = n / cfg.world;
        if per_rank == 0 {
            return Ok(Some(produced));
        }
        let perm = permutation(n, window_seed(cfg.seed, epoch, index));
        let picks = perm
            .into_iter()
            .skip(cfg.rank)
            .step_by(cfg.world)
            .take(per_rank)
            .map(|i| i as u32)
            .collect();
        let w = Window {
            epoch,
            index,
            start: first.expect("a window with sequences has a first one"),
            seqs,
            picks,
        };
        if !send(w) {
            return Ok(None);
        }
        produced += 1;
        index += 1;
        if n < cfg.window {
            return Ok(Some(produced));
        }
    }
}

/// The first `max` sequences of a split, in order (no shuffle): the evaluation set.
pub fn read_sequences(split: &Split, spec: &PackSpec, max: usize) -> Result<Sequences> {
    let mut r = SequenceReader::new(split, spec.clone(), 1)?;
    let mut seqs = Sequences::with_capacity(spec.seq_len, 0);
    r.packer.fill(&mut seqs, max)?;
    Ok(seqs)
}

/// A split's sequences in order, for streaming evaluation.
pub struct SequenceReader {
    packer: Packer,
    seq_len: usize,
}

impl SequenceReader {
    pub fn new(split: &Split, spec: PackSpec, threads: usize) -> Result<SequenceReader> {
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads.max(1))
                .build()
                .context("starting decode threads")?,
        );
        let order = (0..split.shards.len()).collect();
        let seq_len = spec.seq_len;
        Ok(SequenceReader {
            packer: Packer::new(split.paths(), order, spec, pool, Position::default()),
            seq_len,
        })
    }

    /// Up to `n` next sequences as one batch; None at the end.
    pub fn next_batch(&mut self, n: usize) -> Result<Option<Batch>> {
        let mut seqs = Sequences::with_capacity(self.seq_len, n);
        self.packer.fill(&mut seqs, n)?;
        Ok((!seqs.is_empty()).then(|| Batch::from_rows((0..seqs.len()).map(|i| seqs.row(i)))))
    }

    /// Batches of up to `micro_batch` covering the first `max` sequences, read on a
    /// background thread a few batches ahead of the consumer.
    pub fn prefetch(
        mut self,
        max: usize,
        micro_batch: usize,
    ) -> impl Iterator<Item = Result<Batch>> {
        let (tx, rx) = sync_channel(4);
        std::thread::spawn(move || {
            let mut left = max;
            while left > 0 {
                let r = self.next_batch(micro_batch.min(left));
                let stop = !matches!(r, Ok(Some(_)));
                let item = match r {
                    Ok(Some(b)) => {
                        left -= b.batch_size;
                        Ok(b)
                    }
                    Ok(None) => return,
                    Err(e) => Err(e),
                };
                if tx.send(item).is_err() || stop {
                    return;
                }
            }
        });
        rx.into_iter()
    }
}

#[cfg(test)]
mod tests;
