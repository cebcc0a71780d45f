//! Packing documents into fixed-length sequences, and the training data loader.
//!
//! The loader's position is a small serialisable value, so a resumed run, or a ReLoRA phase
//! continuing after the data its warm start consumed, picks up exactly where it left off.

use crate::shards::TokenDocs;
use serde::{Deserialize, Serialize};

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
}

pub fn pack(docs: &TokenDocs, seq_len: usize, packing: Packing, pad_id: u32) -> Sequences {
    match packing {
        Packing::Concat => {
            let n = docs.tokens.len() / seq_len;
            Sequences {
                seq_len,
                tokens: docs.tokens[..n * seq_len].to_vec(),
                mask: vec![1; n * seq_len],
            }
        }
        Packing::Pad => {
            let mut tokens = Vec::with_capacity(docs.len() * seq_len);
            let mut mask = Vec::with_capacity(docs.len() * seq_len);
            for i in 0..docs.len() {
                let d = docs.doc(i);
                let k = d.len().min(seq_len);
                tokens.extend_from_slice(&d[..k]);
                mask.extend(std::iter::repeat_n(1u8, k));
                tokens.extend(std::iter::repeat_n(pad_id, seq_len - k));
                mask.extend(std::iter::repeat_n(0u8, seq_len - k));
            }
            Sequences {
                seq_len,
                tokens,
                mask,
            }
        }
    }
}

/// A batch of next-token examples: `inputs[b][t]` predicts `targets[b][t]`, weighted by
/// `weights[b][t]` (0 on padding). Each row is `seq_len - 1` long.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub len: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Batch {
    pub fn from_rows<'a>(rows: impl Iterator<Item = (&'a [u32], &'a [u8])>) -> Batch {
        let mut b = Batch {
            batch_size: 0,
            len: 0,
            inputs: Vec::new(),
            targets: Vec::new(),
            weights: Vec::new(),
        };
        for (toks, mask) in rows {
            b.len = toks.len() - 1;
            b.batch_size += 1;
            b.inputs.extend_from_slice(&toks[..toks.len() - 1]);
            b.targets.extend_from_slice(&toks[1..]);
            b.weights.extend(mask[1..].iter().map(|&m| m as f32));
        }
        b
    }

    /// Tokens that carry loss.
    pub fn target_tokens(&self) -> f64 {
        self.weights.iter().map(|&w| w as f64).sum()
    }
}

/// Where a loader is: which pass over the data, and how far into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LoaderState {
    pub epoch: u64,
    pub index: u64,
}

/// Deterministic shuffled batches; rank `r` of `world` sees a disjoint share of each epoch.
pub struct Loader {
    seqs: Sequences,
    seed: u64,
    rank: usize,
    world: usize,
    order: Vec<usize>,
    state: LoaderState,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Loader {
    pub fn new(seqs: Sequences, seed: u64, rank: usize, world: usize) -> Loader {
        assert!(world >= 1 && rank < world, "rank must be below world size");
        let mut l = Loader {
            seqs,
            seed,
            rank,
            world,
            order: Vec::new(),
            state: LoaderState::default(),
        };
        l.shuffle();
        l
    }

    /// Sequences per epoch for this rank.
    pub fn epoch_len(&self) -> usize {
        self.seqs.len() / self.world
    }

    fn shuffle(&mut self) {
        let n = self.seqs.len();
        let mut perm: Vec<usize> = (0..n).collect();
        let mut s = self.seed ^ self.state.epoch.wrapping_mul(0xA24B_AED4_963E_E407);
        for i in (1..n).rev() {
            let j = (splitmix(&mut s) % (i as u64 + 1)) as usize;
            perm.swap(i, j);
        }
        let per_rank = n / self.world;
        self.order = perm
            .into_iter()
            .skip(self.rank)
            .step_by(self.world)
            .take(per_rank)
            .collect();
    }

    pub fn state(&self) -> LoaderState {
        self.state
    }

    pub fn restore(&mut self, state: LoaderState) {
        let reshuffle = state.epoch != self.state.epoch;
        self.state = state;
        if reshuffle {
            self.shuffle();
        }
    }

    pub fn next_batch(&mut self, batch_size: usize) -> Batch {
        let mut idx = Vec::with_capacity(batch_size);
        while idx.len() < batch_size {
            if self.state.index as usize >= self.order.len() {
                self.state.epoch += 1;
                self.state.index = 0;
                self.shuffle();
            }
            idx.push(self.order[self.state.index as usize]);
            self.state.index += 1;
        }
        Batch::from_rows(idx.into_iter().map(|i| self.seqs.row(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn docs(lens: &[usize]) -> TokenDocs {
        let mut d = TokenDocs {
            tokens: vec![],
            offsets: vec![0],
        };
        let mut next = 10;
        for &l in lens {
            for _ in 0..l - 1 {
                d.tokens.push(next);
                next += 1;
            }
            d.tokens.push(1);
            d.offsets.push(d.tokens.len());
        }
        d
    }

    #[test]
    fn concat_packs_all_tokens_and_pad_masks_padding() {
        let d = docs(&[3, 5, 4]);
        let c = pack(&d, 4, Packing::Concat, 0);
        assert_eq!(c.len(), 3);
        assert_eq!(&c.tokens[..4], &[10, 11, 1, 12]);
        let p = pack(&d, 4, Packing::Pad, 0);
        assert_eq!(p.len(), 3);
        assert_eq!(p.row(0), (&[10, 11, 1, 0][..], &[1, 1, 1, 0][..]));
        let b = Batch::from_rows([p.row(0)].into_iter());
        assert_eq!(b.inputs, [10, 11, 1]);
        assert_eq!(b.targets, [11, 1, 0]);
        assert_eq!(b.weights, [1.0, 1.0, 0.0]);
    }

    #[test]
    fn loader_is_deterministic_resumable_and_rank_disjoint() {
        let d = docs(&[8; 40]);
        let seqs = pack(&d, 8, Packing::Concat, 0);
        let mut a = Loader::new(seqs.clone(), 7, 0, 1);
        let first: Vec<Batch> = (0..7).map(|_| a.next_batch(4)).collect();
        let mut b = Loader::new(seqs.clone(), 7, 0, 1);
        for _ in 0..3 {
            b.next_batch(4);
        }
        let st = b.state();
        let mut c = Loader::new(seqs.clone(), 7, 0, 1);
        c.restore(st);
        for batch in &first[3..] {
            assert_eq!(&c.next_batch(4), batch);
        }
        // Crossing an epoch boundary (40 sequences, 28 taken) and restoring there too.
        let st = c.state();
        let next = c.next_batch(4);
        let mut d2 = Loader::new(seqs.clone(), 7, 0, 1);
        d2.restore(st);
        assert_eq!(d2.next_batch(4), next);
        let r0 = Loader::new(seqs.clone(), 7, 0, 2);
        let r1 = Loader::new(seqs, 7, 1, 2);
        assert!(r0.order.iter().all(|i| !r1.order.contains(i)));
        assert_eq!(r0.epoch_len(), 20);
    }
}
