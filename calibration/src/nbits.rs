//! Blockwise symmetric weight quantization in the layout of ONNX Runtime's `com.microsoft.MatMulNBits`,
//! byte for byte what ONNX Runtime's reference quantizer writes (`MatMulNBitsQuantizer` with
//! `DefaultWeightOnlyQuantConfig(is_symmetric=True)`, whose packing is MLAS `MlasQuantizeBlockwise`,
//! column-wise; checked against onnxruntime 1.31.1 by `tests/tests/calibration_quantize.rs`).
//!
//! A weight B `[K, N]` (the exporter's `[in, out]` layout, row-major) is cut, per output column n, into
//! blocks of `block_size` consecutive rows along K (the last block may be short). For each block:
//! - `m` = the value of largest magnitude (the minimum when |max| = |min|, so ties pick the negative one),
//!   scanning in row order with strict comparisons (the first of equal values wins; this fixes the sign of
//!   the scale of an all-zero block);
//! - `scale = −m / 2^(bits−1)` (fp32), so m maps to the most negative level −2^(bits−1); the largest positive
//!   level is 2^(bits−1) − 1, hence a block's positive extreme is clipped by one level when it is the
//!   larger one — the reference's choice, kept for byte identity;
//! - `q = clamp(round_half_away(v · (1/scale) + 2^(bits−1)), 0, 2^bits − 1)` with fp32 multiply then add
//!   (no fused multiply-add), and q = 2^(bits−1) when scale = 0; MatMulNBits without zero points
//!   dequantizes `(q − 2^(bits−1)) · scale`.
//!
//! Storage: `B_Q` uint8 `[N, ceil(K / block_size), block_size · bits / 8]` — int4 packs row 2i in the low
//! and row 2i + 1 in the high nibble — with the padding rows of a short last block zero; `scales` fp32
//! `[N, ceil(K / block_size)]`. Symmetric quantization has no zero-point input.
//!
//! One reference quirk is reproduced: for int4 with odd K the padding nibble after the last row repeats
//! the high nibble of the previous byte of the same 2·block_size-row stretch (MLAS reuses a stale
//! register there). MatMulNBits never reads it (K bounds the rows), so it changes no result.

/// Supported weight widths.
pub const BITS: [u32; 2] = [4, 8];
/// Block sizes the reference quantizer (MLAS `MlasQuantizeBlockwise`) implements: 16, 32, 64, 128, 256.
pub const BLOCK_SIZES: [usize; 5] = [16, 32, 64, 128, 256];

/// A quantized weight: MatMulNBits inputs B and scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed {
    pub k: usize,
    pub n: usize,
    pub bits: u32,
    pub block_size: usize,
    /// `[n, k_blocks, blob]` bytes.
    pub data: Vec<u8>,
    /// `[n, k_blocks]` scales.
    pub scales: Vec<f32>,
}

impl Packed {
    /// Blocks along K.
    pub fn k_blocks(&self) -> usize {
        self.k.div_ceil(self.block_size)
    }
    /// Bytes of one block of one column.
    pub fn blob_size(&self) -> usize {
        self.block_size * self.bits as usize / 8
    }
    /// ONNX dims of B: `[N, k_blocks, blob]`.
    pub fn data_dims(&self) -> Vec<i64> {
        vec![self.n as i64, self.k_blocks() as i64, self.blob_size() as i64]
    }
    /// ONNX dims of the scales: `[N, k_blocks]`.
    pub fn scale_dims(&self) -> Vec<i64> {
        vec![self.n as i64, self.k_blocks() as i64]
    }
    /// Little-endian bytes of the scales.
    pub fn scale_bytes(&self) -> Vec<u8> {
        self.scales.iter().flat_map(|s| s.to_le_bytes()).collect()
    }

    /// The quantized level of row `r`, column `c` (0 ≤ level < 2^bits).
    pub fn level(&self, r: usize, c: usize) -> u8 {
        let row_bytes = self.k_blocks() * self.blob_size();
        match self.bits {
            8 => self.data[c * row_bytes + r],
            _ => (self.data[c * row_bytes + r / 2] >> (4 * (r % 2))) & 0xF,
        }
    }

    /// The weight MatMulNBits computes with: row-major `[K, N]`, `(q − 2^(bits−1)) · scale`.
    pub fn dequantize(&self) -> Vec<f32> {
        let (kb, mid) = (self.k_blocks(), 1i32 << (self.bits - 1));
        let mut out = vec![0f32; self.k * self.n];
        for c in 0..self.n {
            for r in 0..self.k {
                let s = self.scales[c * kb + r / self.block_size];
                out[r * self.n + c] = (i32::from(self.level(r, c)) - mid) as f32 * s;
            }
        }
        out
    }
}

/// Quantizes the row-major `[k, n]` weight `w` (see the module doc). `bits` ∈ [`BITS`], `block_size` ∈
/// [`BLOCK_SIZES`] (checked by the caller; anything else panics).
pub fn quantize(w: &[f32], k: usize, n: usize, bits: u32, block_size: usize) -> Packed {
    assert!(BITS.contains(&bits) && BLOCK_SIZES.contains(&block_size), "unsupported bits/block size");
    assert_eq!(w.len(), k * n, "weight length");
    let kb = k.div_ceil(block_size);
    let blob = block_size * bits as usize / 8;
    let half = (1u32 << (bits - 1)) as f32;
    let max_level = ((1u32 << bits) - 1) as f32;
    let mut data = vec![0u8; n * kb * blob];
    let mut scales = vec![0f32; n * kb];
    let mut levels = vec![0u8; kb * block_size];
    for c in 0..n {
        levels.fill(0);
        for b in 0..kb {
            let rows = b * block_size..((b + 1) * block_size).min(k);
            let (mut min, mut max) = (f32::MAX, -f32::MAX);
            for r in rows.clone() {
                let v = w[r * n + c];
                if v < min {
                    min = v;
                }
                if v > max {
                    max = v;
                }
            }
            let m = if max.abs() > min.abs() { max } else { min };
            let scale = -m / half;
            scales[c * kb + b] = scale;
            let recip = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            for r in rows {
                let q = (w[r * n + c] * recip + half).round();
                levels[r] = q.clamp(0.0, max_level) as u8;
            }
        }
        let out = &mut data[c * kb * blob..(c + 1) * kb * blob];
        if bits == 8 {
            out.copy_from_slice(&levels);
        } else {
            if k % 2 == 1 && !(k - 1).is_multiple_of(2 * block_size) {
                levels[k] = levels[k - 2]; // the reference's stale padding nibble (module doc)
            }
            for (o, pair) in out.iter_mut().zip(levels.chunks_exact(2)) {
                *o = (pair[0] & 0xF) | (pair[1] << 4);
            }
        }
    }
    Packed { k, n, bits, block_size, data, scales }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int4_hand_example() {
        // One column, K = 4, block 16: m = -2.0 (|-2| > |1.5|), scale = 2/8 = 0.25, levels v/0.25 + 8.
        let p = quantize(&[1.5, -2.0, 0.1, 0.125], 4, 1, 4, 16);
        assert_eq!(p.scales, vec![0.25]);
        assert_eq!(p.data_dims(), vec![1, 1, 8]);
        // 1.5 → 14, -2 → 0, 0.1 → round(8.4) = 8, 0.125 → round(8.5) = 9 (half away from zero).
        assert_eq!(&p.data[..2], &[14, 8 | (9 << 4)]); // row 1 (level 0) in the high nibble of byte 0
        assert!(p.data[2..].iter().all(|&b| b == 0), "padding rows are zero");
        assert_eq!(p.dequantize(), vec![1.5, -2.0, 0.0, 0.25]);
    }

    #[test]
    fn positive_extreme_takes_the_negative_scale_and_clips() {
        // m = +4 → scale = -0.5: 4 → -8 + 8 = 0 (dequantized (0 - 8)·-0.5 = 4); -3.5 → 7 + 8 = 15.
        let p = quantize(&[4.0, -3.5], 2, 1, 4, 16);
        assert_eq!(p.scales, vec![-0.5]);
        assert_eq!(p.data[0], 15 << 4);
        assert_eq!(p.dequantize(), vec![4.0, -3.5]);
        // |max| = |min|: the minimum wins, scale positive, +1 clips to level 15 = 7 · 0.125.
        let p = quantize(&[1.0, -1.0], 2, 1, 4, 16);
        assert_eq!(p.scales, vec![0.125]);
        assert_eq!(p.dequantize(), vec![0.875, -1.0]);
    }

    #[test]
    fn int8_layout_and_zero_blocks() {
        // K = 20, block 16: two blocks per column, columns stored one after the other.
        let (k, n) = (20, 2);
        let mut w: Vec<f32> = (0..k * n).map(|i| (i as f32 - 17.0) * 0.01).collect();
        for r in 0..16 {
            w[r * n + 1] = if r == 0 { -0.0 } else { 0.0 };
        }
        let p = quantize(&w, k, n, 8, 16);
        assert_eq!(p.data_dims(), vec![2, 2, 16]);
        assert_eq!(p.data.len(), 64);
        // All-zero block: scale is -(first zero)/128 = +0.0 here, every level the midpoint 128.
        assert_eq!(p.scales[2].to_bits(), 0.0f32.to_bits());
        assert!((0..16).all(|r| p.level(r, 1) == 128));
        // Padding of the short second block (rows 20..32) is zero.
        assert!(p.data[16 + 4..32].iter().all(|&b| b == 0));
    }

    #[test]
    fn error_is_within_half_a_level_except_the_clipped_side() {
        let (k, n) = (96, 5);
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
        for bits in BITS {
            for bs in BLOCK_SIZES {
                let p = quantize(&w, k, n, bits, bs);
                let d = p.dequantize();
                for c in 0..n {
                    for r in 0..k {
                        let s = p.scales[c * p.k_blocks() + r / bs].abs();
                        let (v, e) = (w[r * n + c], (w[r * n + c] - d[r * n + c]).abs());
                        // Half a level, except values beyond the top level on the side opposite the
                        // block's extreme (v / scale > 2^(bits-1) - 1/2), clipped by up to one level.
                        let top = (1u32 << (bits - 1)) as f32 - 0.5;
                        let bound = if v / p.scales[c * p.k_blocks() + r / bs] > top { s } else { 0.5 * s };
                        assert!(e <= bound * 1.0001, "bits {bits} block {bs} r {r} c {c}: {e} vs scale {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn odd_k_int4_padding_nibble_repeats_the_previous_high_nibble() {
        let w = [0.5f32, -1.0, 0.25];
        let p = quantize(&w, 3, 1, 4, 16);
        // Rows 0, 1 → byte 0; row 2 → low nibble of byte 1, high nibble = high nibble of byte 0.
        assert_eq!(p.data[1] >> 4, p.data[0] >> 4);
        // A last row that starts a 2·block stretch gets a zero padding nibble.
        let w: Vec<f32> = (0..33).map(|i| i as f32 - 16.0).collect();
        let p = quantize(&w, 33, 1, 4, 16);
        assert_eq!(p.data[16] >> 4, 0); // block 2 starts at byte 2 · 8
    }
}
