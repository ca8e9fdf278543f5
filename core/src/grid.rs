//! The PNG grid every sampler writes: `n` images of `size × size` laid out `min(cols, n)` columns wide and
//! `ceil(n / cols)` rows high, edge to edge with no borders, in row-major order; unused cells of the last
//! row are black. Pixels follow [`to_u8_pixel`].
//!
//! [`GridCanvas`] holds only the 8-bit canvas (3 bytes per pixel), so a grid can be filled image by image
//! as batches finish; [`GridCanvas::bytes_needed`] tells a command before any work whether it fits.

use std::io::Cursor;
use std::path::Path;

use image::{ImageFormat, RgbImage};

use crate::CoreError;

/// The official pixel rule: `clamp(127.5·x + 128, 0, 255)` truncated to `u8`
/// (as `torch.clamp(127.5 * x + 128.0, 0, 255).to(torch.uint8)`). NaN maps to 0.
#[inline]
pub fn to_u8_pixel(x: f32) -> u8 {
    // `as u8` truncates toward zero and maps NaN to 0; the clamp keeps it in range.
    (127.5 * x + 128.0).clamp(0.0, 255.0) as u8
}

/// Largest PNG side (the format's limit, 2³¹ − 1 pixels).
pub const MAX_PNG_SIDE: usize = (1 << 31) - 1;

/// An RGB canvas for a grid of `n` images.
pub struct GridCanvas {
    canvas: RgbImage,
    n: usize,
    size: usize,
    cols: usize,
}

/// (columns, rows, width px, height px) of a grid, or `None` when a side overflows.
fn layout(n: usize, size: usize, cols: usize) -> Option<(usize, usize, usize, usize)> {
    let cols = cols.min(n);
    let rows = n.div_ceil(cols);
    Some((cols, rows, cols.checked_mul(size)?, rows.checked_mul(size)?))
}

impl GridCanvas {
    /// Bytes of the canvas of a grid of `n` images of side `size` with `cols` columns (`None` when the
    /// grid cannot be written as a PNG at all: zero sizes, or a side above [`MAX_PNG_SIDE`]).
    pub fn bytes_needed(n: usize, size: usize, cols: usize) -> Option<u64> {
        if n == 0 || size == 0 || cols == 0 {
            return None;
        }
        let (_, _, w, h) = layout(n, size, cols)?;
        if w > MAX_PNG_SIDE || h > MAX_PNG_SIDE || w > u32::MAX as usize || h > u32::MAX as usize {
            return None;
        }
        (w as u64).checked_mul(h as u64)?.checked_mul(3)
    }

    /// A black canvas for `n` images.
    pub fn new(n: usize, size: usize, cols: usize) -> Result<Self, CoreError> {
        if Self::bytes_needed(n, size, cols).is_none() {
            return Err(CoreError::Invalid(format!(
                "a grid of {n} images of {size}×{size} px with {cols} columns cannot be written as a PNG"
            )));
        }
        let (cols, _, w, h) = layout(n, size, cols).ok_or_else(|| CoreError::Invalid("grid too large".into()))?;
        Ok(GridCanvas { canvas: RgbImage::new(w as u32, h as u32), n, size, cols })
    }

    /// Paints image `index` (`[3, size, size]`, values in [−1, 1]) into its cell.
    pub fn put(&mut self, index: usize, image: &[f32]) -> Result<(), CoreError> {
        let (s, plane) = (self.size, self.size * self.size);
        if index >= self.n || image.len() != 3 * plane {
            return Err(CoreError::Invalid(format!(
                "grid image {index}: {} values for a cell of 3×{s}×{s} (grid of {})",
                image.len(),
                self.n
            )));
        }
        let (x0, y0) = ((index % self.cols) * s, (index / self.cols) * s);
        for y in 0..s {
            for x in 0..s {
                let k = y * s + x;
                let px = [to_u8_pixel(image[k]), to_u8_pixel(image[plane + k]), to_u8_pixel(image[2 * plane + k])];
                self.canvas.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(px));
            }
        }
        Ok(())
    }

    /// Encodes the canvas as PNG and writes it atomically ([`crate::fsutil::write_atomic`]).
    pub fn save(&self, path: &Path) -> Result<(), CoreError> {
        let mut buf = Cursor::new(Vec::new());
        self.canvas
            .write_to(&mut buf, ImageFormat::Png)
            .map_err(|e| CoreError::Io(format!("cannot encode PNG {}: {e}", path.display())))?;
        crate::fsutil::write_atomic(path, buf.get_ref())
    }
}

/// Writes `n` images `[n, 3, size, size]` (values in `[−1, 1]`, converted with [`to_u8_pixel`])
/// as one PNG grid: `min(cols, n)` columns, `ceil(n / cols)` rows, images edge to edge with no
/// borders in row-major order; unused cells of the last row are black. Written atomically.
pub fn save_grid_png(path: &Path, images: &[f32], n: usize, size: usize, cols: usize) -> Result<(), CoreError> {
    if n == 0 || size == 0 || cols == 0 {
        return Err(CoreError::Invalid(format!(
            "cannot write grid {}: need n, size and cols ≥ 1 (got {n}, {size}, {cols})",
            path.display()
        )));
    }
    let per = 3 * size * size;
    if images.len() != n * per {
        return Err(CoreError::Invalid(format!(
            "cannot write grid {}: {} values do not form {n} images of 3×{size}×{size}",
            path.display(),
            images.len()
        )));
    }
    let mut grid = GridCanvas::new(n, size, cols)?;
    for (i, img) in images.chunks_exact(per).enumerate() {
        grid.put(i, img)?;
    }
    grid.save(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_cells() {
        assert_eq!(GridCanvas::bytes_needed(5, 2, 2), Some(2 * 2 * 3 * 2 * 3));
        assert_eq!(GridCanvas::bytes_needed(0, 2, 2), None);
        assert_eq!(GridCanvas::bytes_needed(100_000_000, 32, 100_000_000), None, "too wide for a PNG");
        assert_eq!(GridCanvas::bytes_needed(usize::MAX, 32, 1), None);
        let mut g = GridCanvas::new(3, 1, 2).unwrap();
        g.put(2, &[1.0, -1.0, 0.0]).unwrap();
        assert!(g.put(3, &[0.0; 3]).is_err());
        assert!(g.put(0, &[0.0; 2]).is_err());
        assert_eq!(g.canvas.get_pixel(0, 1).0, [255, 0, 128]);
        assert_eq!(g.canvas.get_pixel(1, 1).0, [0, 0, 0], "unused cell stays black");
    }

    #[test]
    fn pixel_rule() {
        assert_eq!(to_u8_pixel(-1.0), 0);
        assert_eq!(to_u8_pixel(1.0), 255);
        assert_eq!(to_u8_pixel(0.0), 128);
        assert_eq!(to_u8_pixel(-5.0), 0);
        assert_eq!(to_u8_pixel(5.0), 255);
        assert_eq!(to_u8_pixel(f32::NAN), 0);
        // Round trip of every byte through [−1, 1] is off by at most one (rule adds 0.5).
        for p in 0..=255u8 {
            let q = to_u8_pixel(p as f32 / 127.5 - 1.0) as i32;
            assert!((q - p as i32).abs() <= 1, "{p} -> {q}");
        }
    }

    #[test]
    fn grid_png_round_trip() {
        let d = tempfile::tempdir().unwrap();
        let (n, size, cols) = (5, 3, 2);
        let plane = size * size;
        let images: Vec<f32> = (0..n * 3 * plane).map(|i| ((i * 37) % 256) as f32 / 127.5 - 1.0).collect();
        let path = d.path().join("grid.png");
        save_grid_png(&path, &images, n, size, cols).unwrap();
        let g = image::open(&path).unwrap().to_rgb8();
        assert_eq!(g.dimensions(), (6, 9));
        for i in 0..n {
            let (x0, y0) = ((i % cols) * size, (i / cols) * size);
            for c in 0..3 {
                for y in 0..size {
                    for x in 0..size {
                        let v = images[i * 3 * plane + c * plane + y * size + x];
                        let px = g.get_pixel((x0 + x) as u32, (y0 + y) as u32).0[c];
                        assert_eq!(px, to_u8_pixel(v));
                    }
                }
            }
        }
        assert_eq!(g.get_pixel(5, 8).0, [0, 0, 0], "empty cell is black");
        let e = save_grid_png(&path, &images[1..], n, size, cols).unwrap_err();
        assert!(matches!(e, CoreError::Invalid(_)));
    }
}
