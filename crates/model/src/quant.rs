//! Frozen weights kept in fewer bits: bf16, int8 with one scale per output row, or NF4 (the
//! 4-bit NormalFloat of QLoRA, Dettmers et al. 2023) with one scale per block of weights.
//!
//! A ReLoRA or LoRA layer's W does not change between merges, so it needs no f32 copy: the
//! matmuls dequantise it a block of rows at a time ([`crate::fused::lora`]) and a merge
//! dequantises, adds s·B·A in f32 and quantises again. Trainable parameters, gradients and
//! Adam's moments stay f32.
//!
//! Formats, for a W of `rows × cols` (out × in), row-major:
//! - `bf16`: each weight rounded to bfloat16 (to nearest, ties to even): 2 bytes a weight.
//! - `int8`: per row, scale = max|w| / 127, code = round(w / scale) in −127…127: 1 byte a
//!   weight and 4 bytes a row.
//! - `nf4`: per block of `block` consecutive weights of the flattened (row-major) W, scale =
//!   max|w|; each weight is the index of the NF4 level nearest to w / scale, two to a byte:
//!   half a byte a weight and 4 bytes a block. Blocks run over the flattened W, as
//!   bitsandbytes' do, so a block may straddle two rows and any size fits any shape (LLaMA
//!   1B's MLP width, 5461, is odd). No double quantisation of the scales.

use serde::{Deserialize, Serialize};

/// How a frozen W is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FrozenFormat {
    #[default]
    F32,
    Bf16,
    Int8,
    Nf4,
}

impl FrozenFormat {
    pub fn name(self) -> &'static str {
        match self {
            FrozenFormat::F32 => "f32",
            FrozenFormat::Bf16 => "bf16",
            FrozenFormat::Int8 => "int8",
            FrozenFormat::Nf4 => "nf4",
        }
    }

    /// Bytes a `rows × cols` W takes in this format (`block`: NF4's block size).
    pub fn bytes(self, rows: usize, cols: usize, block: usize) -> usize {
        let n = rows * cols;
        match self {
            FrozenFormat::F32 => 4 * n,
            FrozenFormat::Bf16 => 2 * n,
            FrozenFormat::Int8 => n + 4 * rows,
            FrozenFormat::Nf4 => n.div_ceil(2) + 4 * n.div_ceil(block.max(1)),
        }
    }
}

/// The 16 NF4 levels: quantiles of a standard normal scaled to [−1, 1], with an exact 0
/// (QLoRA, Appendix E; the values bitsandbytes uses).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// A frozen W in a compact format.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantWeight {
    pub format: FrozenFormat,
    pub rows: usize,
    pub cols: usize,
    /// NF4's block size (weights per scale); unused otherwise.
    pub block: usize,
    /// bf16: 2 bytes a weight (little-endian); int8: 1 byte a weight (two's complement);
    /// NF4: two 4-bit level indices a byte, the earlier weight in the low nibble.
    pub codes: Vec<u8>,
    /// int8: one per row; NF4: one per block; bf16: none.
    pub scales: Vec<f32>,
}

/// bf16 bits of `x`, rounded to nearest with ties to even (NaN kept a NaN).
fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((b >> 16) & 1);
    ((b + round) >> 16) as u16
}

/// The index of the NF4 level nearest to `x` (in [−1, 1]); the lower one on a tie.
fn nf4_index(x: f32) -> u8 {
    // The levels are sorted: the midpoints between neighbours decide.
    let mut i = 0;
    while i < 15 && x > (NF4_LEVELS[i] + NF4_LEVELS[i + 1]) / 2.0 {
        i += 1;
    }
    i as u8
}

impl QuantWeight {
    /// `w` (`rows × cols`, row-major) in `format`; `block` (NF4) at least 1.
    pub fn quantize(
        w: &[f32],
        (rows, cols): (usize, usize),
        format: FrozenFormat,
        block: usize,
    ) -> QuantWeight {
        assert_eq!(
            w.len(),
            rows * cols,
            "quantize: data does not match the shape"
        );
        let (codes, scales) = match format {
            FrozenFormat::F32 => (w.iter().flat_map(|x| x.to_le_bytes()).collect(), vec![]),
            FrozenFormat::Bf16 => (
                w.iter().flat_map(|x| to_bf16(*x).to_le_bytes()).collect(),
                vec![],
            ),
            FrozenFormat::Int8 => {
                let mut codes = Vec::with_capacity(w.len());
                let mut scales = Vec::with_capacity(rows);
                for row in w.chunks(cols.max(1)) {
                    let absmax = row.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let scale = if absmax > 0.0 { absmax / 127.0 } else { 1.0 };
                    scales.push(scale);
                    codes.extend(
                        row.iter()
                            .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8 as u8),
                    );
                }
                (codes, scales)
            }
            FrozenFormat::Nf4 => {
                assert!(block > 0, "nf4: a block holds at least one weight");
                let mut scales = Vec::with_capacity(w.len() / block);
                let mut idx = Vec::with_capacity(w.len());
                for b in w.chunks(block) {
                    let absmax = b.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let scale = if absmax > 0.0 { absmax } else { 1.0 };
                    scales.push(scale);
                    idx.extend(b.iter().map(|x| nf4_index(x / scale)));
                }
                let codes = idx
                    .chunks(2)
                    .map(|p| p[0] | (p.get(1).copied().unwrap_or(0) << 4))
                    .collect();
                (codes, scales)
            }
        };
        QuantWeight {
            format,
            rows,
            cols,
            block,
            codes,
            scales,
        }
    }

    /// Rows `first..first + out.len() / cols` of W, in f32, into `out`.
    #[inline(always)]
    pub fn dequantize_rows(&self, first: usize, out: &mut [f32]) {
        let c = self.cols;
        let start = first * c;
        match self.format {
            FrozenFormat::F32 => {
                for (i, o) in out.iter_mut().enumerate() {
                    let b = &self.codes[4 * (start + i)..4 * (start + i) + 4];
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            FrozenFormat::Bf16 => {
                for (i, o) in out.iter_mut().enumerate() {
                    let j = 2 * (start + i);
                    let bits = u16::from_le_bytes([self.codes[j], self.codes[j + 1]]);
                    *o = f32::from_bits((bits as u32) << 16);
                }
            }
            FrozenFormat::Int8 => {
                for (r, row) in out.chunks_mut(c).enumerate() {
                    let scale = self.scales[first + r];
                    let codes = &self.codes[(first + r) * c..(first + r + 1) * c];
                    for (o, q) in row.iter_mut().zip(codes) {
                        *o = (*q as i8) as f32 * scale;
                    }
                }
            }
            FrozenFormat::Nf4 => {
                // Block by block: one scale each, no division per weight.
                let end = start + out.len();
                let mut k = start;
                while k < end {
                    let b = k / self.block;
                    let stop = ((b + 1) * self.block).min(end);
                    let scale = self.scales[b];
                    for j in k..stop {
                        let nibble = (self.codes[j >> 1] >> ((j & 1) * 4)) & 15;
                        out[j - start] = NF4_LEVELS[nibble as usize] * scale;
                    }
                    k = stop;
                }
            }
        }
    }

    /// All of W in f32, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, &mut out);
        out
    }

    /// Bytes held (codes and scales).
    pub fn bytes(&self) -> usize {
        self.codes.len() + 4 * self.scales.len()
    }

    /// ‖W − Q(W)‖ / ‖W‖ for the `w` this was quantised from.
    pub fn relative_error(&self, w: &[f32]) -> f64 {
        let d = self.dequantize();
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in w.iter().zip(&d) {
            num += ((a - b) as f64).powi(2);
            den += (*a as f64).powi(2);
        }
        if den == 0.0 {
            0.0
        } else {
            (num / den).sqrt()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// The formats written out again, independently and plainly, from their definitions.
    fn reference(
        w: &[f32],
        rows: usize,
        cols: usize,
        format: FrozenFormat,
        block: usize,
    ) -> Vec<f32> {
        match format {
            FrozenFormat::F32 => w.to_vec(),
            FrozenFormat::Bf16 => w
                .iter()
                .map(|x| {
                    // The nearest bf16 by search over its two neighbours (ties: even).
                    let lo = f32::from_bits(x.to_bits() & 0xffff_0000);
                    let hi = f32::from_bits((x.to_bits() & 0xffff_0000) + 0x1_0000);
                    let (dl, dh) = ((x - lo).abs(), (hi - x).abs());
                    if dl < dh || (dl == dh && (lo.to_bits() >> 16).is_multiple_of(2)) {
                        lo
                    } else {
                        hi
                    }
                })
                .collect(),
            FrozenFormat::Int8 => (0..rows)
                .flat_map(|r| {
                    let row = &w[r * cols..(r + 1) * cols];
                    let m = row.iter().map(|x| x.abs()).fold(0.0, f32::max);
                    let s = m / 127.0;
                    row.iter()
                        .map(move |x| (x / s).round() * s)
                        .collect::<Vec<_>>()
                })
                .collect(),
            FrozenFormat::Nf4 => w
                .chunks(block)
                .flat_map(|b| {
                    let m = b.iter().map(|x| x.abs()).fold(0.0, f32::max);
                    b.iter()
                        .map(|x| {
                            let t = x / m;
                            // The nearest level by exhaustive search (first on a tie).
                            let best = NF4_LEVELS
                                .iter()
                                .min_by(|a, b| (t - **a).abs().total_cmp(&(t - **b).abs()))
                                .unwrap();
                            best * m
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
        }
    }

    #[test]
    fn every_format_round_trips_as_its_definition_says() {
        let mut rng = Rng::new(11);
        let (rows, cols) = (24, 128);
        let w = rng.normal_vec(rows * cols, 0.02);
        for (format, block, worst) in [
            (FrozenFormat::F32, 64, 0.0),
            (FrozenFormat::Bf16, 64, 0.004),
            (FrozenFormat::Int8, 64, 0.02),
            (FrozenFormat::Nf4, 64, 0.12),
            (FrozenFormat::Nf4, 32, 0.12),
            // Blocks that straddle rows, and a short last block.
            (FrozenFormat::Nf4, 48, 0.12),
            (FrozenFormat::Nf4, 100, 0.12),
        ] {
            let q = QuantWeight::quantize(&w, (rows, cols), format, block);
            let want = reference(&w, rows, cols, format, block);
            assert_eq!(q.dequantize(), want, "{format:?} block {block}");
            assert_eq!(q.bytes(), format.bytes(rows, cols, block), "{format:?}");
            let e = q.relative_error(&w);
            assert!(e <= worst, "{format:?}: relative error {e}");
            // Rows dequantise alone as they do together.
            let mut two = vec![0f32; 2 * cols];
            q.dequantize_rows(5, &mut two);
            assert_eq!(two, want[5 * cols..7 * cols]);
        }
        // A zero row or block quantises to zeros, not NaN.
        let z = vec![0f32; 2 * 64];
        for f in [FrozenFormat::Int8, FrozenFormat::Nf4] {
            assert!(QuantWeight::quantize(&z, (2, 64), f, 64)
                .dequantize()
                .iter()
                .all(|x| *x == 0.0));
        }
    }
}
