//! The 2-D rotary position embedding (RoPE) of the official SphereAR code.
//!
//! Tokens form a `grid × grid` raster in row-major order (token index r·grid + c) and are
//! preceded by `prefix` condition tokens (class embeddings, or the S-VAE's register tokens).
//! Image token (r, c) sits at the 2-D coordinate (x, y) = (c + 1.5, r + 1.5), i.e. the centre
//! of its cell shifted by one so that no image token shares the prefix tokens' origin (0, 0).
//!
//! With head dimension h, the h/4 frequencies are f_j = 10000^(−2j/(h/2)), j = 0 … h/4 − 1.
//! A token's h/2 rotation angles are [x·f_0 … x·f_{h/4−1}, y·f_0 … y·f_{h/4−1}]: the first half
//! of each head's channel pairs encodes the column, the second half the row. Pair i of a head,
//! (a, b) = (`q[2i]`, `q[2i+1]`), is rotated by angle θ_i: (a, b) ↦ (a·cos θ_i − b·sin θ_i,
//! b·cos θ_i + a·sin θ_i).
//!
//! Angles are computed in f64 and the table stores (cos θ, sin θ) as f32.

use crate::CoreError;

/// A RoPE table: `data` is row-major [positions, pairs, 2] holding (cos θ, sin θ).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeTable {
    /// Number of positions: prefix + grid² for a fresh table.
    pub positions: usize,
    /// Channel pairs per head: head_dim / 2.
    pub pairs: usize,
    pub data: Vec<f32>,
}

/// Builds the 2-D RoPE table for `prefix` condition tokens followed by a `grid × grid` image.
///
/// Errors unless `grid > 0`, `head_dim > 0` and `head_dim` is divisible by 4
/// (h/4 frequencies for each of the two axes).
pub fn rope_2d(grid: usize, head_dim: usize, prefix: usize) -> Result<RopeTable, CoreError> {
    if grid == 0 || head_dim == 0 || !head_dim.is_multiple_of(4) {
        return Err(CoreError::Invalid(format!(
            "2-D RoPE needs grid > 0 and head_dim a positive multiple of 4, got grid {grid}, head_dim {head_dim}"
        )));
    }
    let positions = grid
        .checked_mul(grid)
        .and_then(|g2| g2.checked_add(prefix))
        .ok_or_else(|| CoreError::Invalid(format!("RoPE table for grid {grid} and prefix {prefix} is too large")))?;
    let pairs = head_dim / 2;
    let freqs: Vec<f64> = (0..head_dim / 4).map(|j| 1.0 / 10000f64.powf((2 * j) as f64 / pairs as f64)).collect();
    let mut data = Vec::with_capacity(positions * pairs * 2);
    let coords = std::iter::repeat_n((0.0, 0.0), prefix)
        .chain((0..grid * grid).map(|t| ((t % grid) as f64 + 1.5, (t / grid) as f64 + 1.5)));
    for (x, y) in coords {
        for angle in freqs.iter().map(|f| x * f).chain(freqs.iter().map(|f| y * f)) {
            data.push(angle.cos() as f32);
            data.push(angle.sin() as f32);
        }
    }
    Ok(RopeTable { positions, pairs, data })
}

impl RopeTable {
    /// The (cos, sin) values of positions `start..end`, as [end − start, pairs, 2].
    ///
    /// Never fails: both bounds are clamped to `0..=positions` (and `end` to at least `start`),
    /// so an out-of-range request yields a shorter, possibly empty, slice.
    pub fn rows(&self, start: usize, end: usize) -> &[f32] {
        let start = start.min(self.positions);
        let end = end.clamp(start, self.positions);
        let width = self.pairs * 2;
        &self.data[start * width..end * width]
    }

    /// Keeps only the first `positions` positions (clamped to the current count).
    ///
    /// The AR transformer uses prefix + grid² − 1 positions: the last image token is
    /// predicted but never fed back as an input.
    pub fn truncated(mut self, positions: usize) -> RopeTable {
        self.positions = positions.min(self.positions);
        self.data.truncate(self.positions * self.pairs * 2);
        self
    }
}

/// Reference RoPE application on `x`, a row-major [n_pos, n_head, head_dim] buffer; `table_rows`
/// holds the [n_pos, head_dim/2, 2] (cos, sin) rows of those positions (see [`RopeTable::rows`]).
/// Every head of position p rotates its pair i by the angle of table row p, pair i.
///
/// Errors when `head_dim` is odd or zero, or when a buffer length does not match the shape.
pub fn apply_rope(
    x: &mut [f32],
    table_rows: &[f32],
    n_pos: usize,
    n_head: usize,
    head_dim: usize,
) -> Result<(), CoreError> {
    let shape_ok = head_dim > 0
        && head_dim.is_multiple_of(2)
        && n_pos.checked_mul(head_dim).is_some_and(|n| table_rows.len() == n)
        && n_pos.checked_mul(n_head).and_then(|n| n.checked_mul(head_dim)).is_some_and(|n| x.len() == n);
    if !shape_ok {
        return Err(CoreError::Invalid(format!(
            "apply_rope: x has {} values and the table {} for [n_pos {n_pos}, n_head {n_head}, head_dim {head_dim}]",
            x.len(),
            table_rows.len()
        )));
    }
    if n_head == 0 {
        return Ok(());
    }
    for (pos, table) in x.chunks_exact_mut(n_head * head_dim).zip(table_rows.chunks_exact(head_dim)) {
        for head in pos.chunks_exact_mut(head_dim) {
            for (pair, cs) in head.chunks_exact_mut(2).zip(table.chunks_exact(2)) {
                let (a, b, c, s) = (pair[0], pair[1], cs[0], cs[1]);
                pair[0] = a * c - b * s;
                pair[1] = b * c + a * s;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "entry {i}: {x} vs {y}\n{a:?}\n{b:?}");
        }
    }

    #[test]
    fn small_table_by_hand() {
        // grid 2, head_dim 8, one prefix token: 5 positions, 4 pairs, f = [1, 10000^(-1/2)] = [1, 0.01].
        let t = rope_2d(2, 8, 1).unwrap();
        assert_eq!((t.positions, t.pairs, t.data.len()), (5, 4, 40));
        // Prefix token at (0, 0): every angle is 0.
        close(t.rows(0, 1), &[1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0], 0.0);
        // Image token 1 = (r 0, c 1) is position 2, at (x, y) = (2.5, 1.5):
        // angles [2.5, 0.025, 1.5, 0.015]; (cos, sin) of each from python3 math:
        let expect: [[f32; 2]; 4] = [
            [-0.801_143_6, 0.598_472_1],
            [0.999_687_5, 0.024_997_396],
            [0.070_737_2, 0.997_495],
            [0.999_887_5, 0.014_999_44],
        ];
        close(t.rows(2, 3), expect.as_flattened(), 1e-6);
        // Image token 2 = (r 1, c 0) is position 3, at (1.5, 2.5): the two halves swap.
        close(t.rows(3, 4), [&expect[2..], &expect[..2]].concat().as_flattened(), 1e-6);
    }

    #[test]
    fn rows_clamp_and_truncation() {
        let t = rope_2d(2, 4, 0).unwrap();
        assert_eq!((t.positions, t.pairs), (4, 2));
        assert_eq!(t.rows(3, 10).len(), 4);
        assert!(t.rows(7, 9).is_empty());
        assert!(t.rows(3, 1).is_empty());
        let last = t.rows(2, 3).to_vec();
        let u = t.truncated(3);
        assert_eq!((u.positions, u.data.len()), (3, 12));
        assert_eq!(u.rows(2, 3), &last[..]);
        assert_eq!(u.truncated(99).positions, 3);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(rope_2d(0, 8, 1).is_err());
        assert!(rope_2d(2, 6, 1).is_err());
        assert!(rope_2d(2, 0, 1).is_err());
        assert!(apply_rope(&mut [0.0; 4], &[1.0, 0.0], 1, 1, 4).is_err());
        assert!(apply_rope(&mut [0.0; 3], &[1.0, 0.0, 1.0, 0.0], 1, 1, 3).is_err());
    }

    #[test]
    fn rotation_by_hand() {
        // One position, two heads of dim 2, (cos, sin) = (0.6, 0.8):
        // (1, 2) -> (1·0.6 − 2·0.8, 2·0.6 + 1·0.8) = (−1, 2); (3, 0) -> (1.8, 2.4).
        let mut x = [1.0f32, 2.0, 3.0, 0.0];
        apply_rope(&mut x, &[0.6, 0.8], 1, 2, 2).unwrap();
        close(&x, &[-1.0, 2.0, 1.8, 2.4], 1e-6);
    }

    #[test]
    fn rotation_preserves_pair_norms() {
        let (n_head, hd) = (3, 8);
        let t = rope_2d(3, hd, 2).unwrap();
        let n = t.positions;
        let orig: Vec<f32> = (0..n * n_head * hd).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
        let mut x = orig.clone();
        apply_rope(&mut x, t.rows(0, n), n, n_head, hd).unwrap();
        for (p, q) in orig.chunks(2).zip(x.chunks(2)) {
            let (a, b) = (p[0].hypot(p[1]), q[0].hypot(q[1]));
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // The prefix positions have angle 0 and stay unchanged.
        assert_eq!(&x[..2 * n_head * hd], &orig[..2 * n_head * hd]);
        assert_ne!(x, orig);
    }
}
