//! Writing results: the PNG grid (laid out like `trainer sample`'s: one row per class, `per_class`
//! columns), one PNG per image, and the tokens as safetensors (key `tokens`, [N, L, d] f32).
//!
//! [`OutputOptions::check`] runs before any work: at least one output, distinct paths, targets that may be
//! replaced (a regular file or nothing, see [`spherear_core::fsutil`]) in writable folders, and an
//! in-memory part (grid canvas, tokens) that fits in memory. [`OutputWriter`] then receives images batch
//! by batch: per-image PNGs are written at once, the grid and the tokens when everything is done. Every
//! file is written to a staging sibling and renamed, so no partial file is ever left.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use spherear_core::fsutil::{self, with_tmp_path};
use spherear_core::grid::GridCanvas;

use crate::error::{Result, RuntimeError};
use crate::generator::Tokens;

/// Where to write what.
#[derive(Debug, Clone, Default)]
pub struct OutputOptions {
    /// One PNG grid.
    pub grid: Option<PathBuf>,
    /// Grid columns (images per class); rows follow.
    pub cols: usize,
    /// A folder receiving `NNNN-classC.png` per image.
    pub dir: Option<PathBuf>,
    /// Tokens [N, L, d] as safetensors under key `tokens`.
    pub tokens: Option<PathBuf>,
}

/// Two paths naming the same file (same folder after resolving links, same name).
fn same_file(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(fsutil::parent_dir(p)).ok().map(|d| d.join(p.file_name().unwrap_or_default()));
    a == b || matches!((canon(a), canon(b)), (Some(x), Some(y)) if x == y)
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}

impl OutputOptions {
    /// Checks, before any work, that the outputs make sense and can be written: at least one output;
    /// `--out` and `--tokens-out` distinct; each file target a regular file or nothing, in a writable
    /// folder; `--out-dir` a folder (or creatable) and writable.
    pub fn check(&self) -> Result<()> {
        if self.grid.is_none() && self.dir.is_none() && self.tokens.is_none() {
            return Err(RuntimeError::Invalid(
                "nothing to write: give --out (grid PNG), --out-dir (one PNG per image) and/or --tokens-out".into(),
            ));
        }
        if let (Some(g), Some(t)) = (&self.grid, &self.tokens) {
            if same_file(g, t) {
                return Err(RuntimeError::Invalid(format!(
                    "--out and --tokens-out both name {}; give two different files",
                    g.display()
                )));
            }
        }
        for p in [&self.grid, &self.tokens].into_iter().flatten() {
            fsutil::check_file_output(p)?;
        }
        if let Some(d) = &self.dir {
            fsutil::check_dir_output(d)?;
        }
        if self.grid.is_some() && self.cols == 0 {
            return Err(RuntimeError::Invalid("grid needs at least one column".into()));
        }
        Ok(())
    }

    /// Bytes the grid canvas and the tokens of `n` images keep in memory until the end of the run
    /// (per-image PNGs are written as they come and cost nothing here). An error when the grid cannot be
    /// a PNG at all or when the total is more than half the memory available now.
    pub fn check_memory(&self, n: usize, image_size: usize, num_tokens: usize, dim: usize) -> Result<u64> {
        let mut need = 0u64;
        let too_many = || RuntimeError::Invalid(format!("{n} images are too many to hold in memory"));
        if self.grid.is_some() {
            need = GridCanvas::bytes_needed(n, image_size, self.cols).ok_or_else(|| {
                RuntimeError::Invalid(format!(
                    "a grid of {n} images ({} per row) cannot be written as one PNG; write one PNG per image \
                     with --out-dir instead",
                    self.cols
                ))
            })?;
        }
        if self.tokens.is_some() {
            let t = (n as u64).checked_mul((num_tokens * dim * 4) as u64).ok_or_else(too_many)?;
            need = need.checked_add(t).ok_or_else(too_many)?;
        }
        if let Some(avail) = spherear_core::timing::available_memory_bytes() {
            if need > avail / 2 {
                return Err(RuntimeError::Invalid(format!(
                    "the grid and tokens of {n} images need {:.1} GiB in memory, more than half of the {:.1} GiB \
                     available; write one PNG per image with --out-dir (memory then grows with --batch only), or \
                     ask for fewer images",
                    gib(need),
                    gib(avail)
                )));
            }
        }
        Ok(need)
    }
}

/// File name of image `index` (class `class`) inside `--out-dir`.
pub fn image_file_name(index: usize, class: i64) -> String {
    format!("{index:04}-class{class}.png")
}

/// Receives the images of a run batch by batch and writes the requested outputs.
pub struct OutputWriter {
    opts: OutputOptions,
    total: usize,
    image_size: usize,
    canvas: Option<GridCanvas>,
    tokens: Option<Tokens>,
    /// Images written to `--out-dir` so far.
    written: usize,
}

impl OutputWriter {
    /// A writer for `total` images; allocates the grid canvas and the token buffer (check their size
    /// first with [`OutputOptions::check_memory`]) and creates `--out-dir`.
    pub fn new(opts: &OutputOptions, total: usize, image_size: usize, num_tokens: usize, dim: usize) -> Result<Self> {
        let canvas = match &opts.grid {
            Some(_) => Some(GridCanvas::new(total, image_size, opts.cols)?),
            None => None,
        };
        let tokens =
            opts.tokens.as_ref().map(|_| Tokens { data: vec![0f32; total * num_tokens * dim], n: total, num_tokens, dim });
        if let Some(dir) = &opts.dir {
            std::fs::create_dir_all(dir)
                .map_err(|e| RuntimeError::Io(format!("cannot create {}: {e}", dir.display())))?;
            fsutil::clean_stale_staging(dir, |n| n.ends_with(".png"));
        }
        Ok(OutputWriter { opts: opts.clone(), total, image_size, canvas, tokens, written: 0 })
    }

    /// Takes images `first .. first + classes.len()` of the run: their tokens and decoded images
    /// ([n, 3, size, size] in [−1, 1]). Per-image PNGs are written now.
    pub fn push(&mut self, first: usize, classes: &[i64], tokens: &Tokens, images: &[f32]) -> Result<()> {
        let (n, per) = (classes.len(), 3 * self.image_size * self.image_size);
        if first + n > self.total || images.len() != n * per || tokens.n != n {
            return Err(RuntimeError::Invalid(format!(
                "output: images {first}..{} do not fit a run of {} (got {} pixels values, {} token rows)",
                first + n,
                self.total,
                images.len(),
                tokens.n
            )));
        }
        if let Some(all) = &mut self.tokens {
            let per_tok = all.num_tokens * all.dim;
            if tokens.data.len() != n * per_tok {
                return Err(RuntimeError::Invalid("output: token shape differs from the run's".into()));
            }
            all.data[first * per_tok..(first + n) * per_tok].copy_from_slice(&tokens.data);
        }
        for (j, img) in images.chunks_exact(per).enumerate() {
            if let Some(c) = &mut self.canvas {
                c.put(first + j, img)?;
            }
            if let Some(dir) = &self.opts.dir {
                let mut one = GridCanvas::new(1, self.image_size, 1)?;
                one.put(0, img)?;
                one.save(&dir.join(image_file_name(first + j, classes[j])))?;
                self.written += 1;
            }
        }
        Ok(())
    }

    /// Images written to `--out-dir` so far.
    pub fn images_written(&self) -> usize {
        self.written
    }

    /// Writes the grid and the tokens file.
    pub fn finish(self) -> Result<()> {
        if let (Some(p), Some(t)) = (&self.opts.tokens, &self.tokens) {
            write_tokens(p, t)?;
        }
        if let (Some(p), Some(c)) = (&self.opts.grid, &self.canvas) {
            c.save(p)?;
        }
        Ok(())
    }
}

/// Writes the requested outputs for `images` ([N, 3, size, size] in [−1, 1]) of `classes` in one go.
pub fn write_outputs(
    opts: &OutputOptions,
    classes: &[i64],
    tokens: &Tokens,
    images: &[f32],
    size: usize,
) -> Result<()> {
    let mut w = OutputWriter::new(opts, classes.len(), size, tokens.num_tokens, tokens.dim)?;
    w.push(0, classes, tokens, images)?;
    w.finish()
}

/// Tokens as safetensors, key `tokens`, f32 [N, L, d] (what `trainer sample --tokens-out` writes).
pub fn write_tokens(path: &Path, tokens: &Tokens) -> Result<()> {
    let bytes: Vec<u8> = tokens.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![tokens.n, tokens.num_tokens, tokens.dim], &bytes)
        .map_err(|e| RuntimeError::Io(format!("tokens: {e}")))?;
    with_tmp_path(path, |tmp| {
        safetensors::serialize_to_file([("tokens", view)], &None, tmp)
            .map_err(|e| RuntimeError::Io(format!("cannot write {}: {e}", path.display())))
    })
}

/// Reads a `tokens` safetensors file back ([N, L, d] f32).
pub fn read_tokens(path: &Path) -> Result<Tokens> {
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::Io(format!("cannot read {}: {e}", path.display())))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| RuntimeError::Io(format!("{}: not a safetensors file: {e}", path.display())))?;
    let t = st.tensor("tokens").map_err(|e| RuntimeError::Io(format!("{}: {e}", path.display())))?;
    let shape = t.shape();
    if t.dtype() != Dtype::F32 || shape.len() != 3 {
        return Err(RuntimeError::Io(format!(
            "{}: tokens must be f32 [N, L, d], got {:?} {shape:?}",
            path.display(),
            t.dtype()
        )));
    }
    let data = t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    Ok(Tokens { data, n: shape[0], num_tokens: shape[1], dim: shape[2] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = Tokens { data: (0..2 * 3 * 4).map(|v| v as f32 * 0.5).collect(), n: 2, num_tokens: 3, dim: 4 };
        let p = dir.path().join("t.safetensors");
        write_tokens(&p, &tokens).unwrap();
        assert_eq!(read_tokens(&p).unwrap(), tokens);
        let images = vec![0.25f32; 2 * 3 * 2 * 2];
        let opts = OutputOptions {
            grid: Some(dir.path().join("g.png")),
            cols: 1,
            dir: Some(dir.path().join("each")),
            tokens: None,
        };
        opts.check().unwrap();
        write_outputs(&opts, &[3, 1], &tokens, &images, 2).unwrap();
        assert!(dir.path().join("g.png").is_file());
        assert!(dir.path().join("each").join(image_file_name(1, 1)).is_file());
        let bad = OutputOptions { grid: Some(dir.path().join("missing/g.png")), cols: 1, ..Default::default() };
        assert!(bad.check().is_err());
    }

    #[test]
    fn pieces_give_the_same_files_as_one_push() {
        let dir = tempfile::tempdir().unwrap();
        let n = 5;
        let tokens = Tokens { data: (0..n * 2 * 3).map(|v| v as f32).collect(), n, num_tokens: 2, dim: 3 };
        let images: Vec<f32> = (0..n * 3 * 4).map(|v| (v as f32 / 30.0) - 1.0).collect();
        let classes = [0, 0, 1, 1, 2];
        let opts = |tag: &str| OutputOptions {
            grid: Some(dir.path().join(format!("{tag}.png"))),
            cols: 2,
            dir: None,
            tokens: Some(dir.path().join(format!("{tag}.safetensors"))),
        };
        write_outputs(&opts("whole"), &classes, &tokens, &images, 2).unwrap();
        let mut w = OutputWriter::new(&opts("pieces"), n, 2, 2, 3).unwrap();
        for (first, len) in [(0, 2), (2, 2), (4, 1)] {
            let t = Tokens { data: tokens.data[first * 6..(first + len) * 6].to_vec(), n: len, num_tokens: 2, dim: 3 };
            w.push(first, &classes[first..first + len], &t, &images[first * 12..(first + len) * 12]).unwrap();
        }
        w.finish().unwrap();
        for ext in ["png", "safetensors"] {
            let a = std::fs::read(dir.path().join(format!("whole.{ext}"))).unwrap();
            assert_eq!(a, std::fs::read(dir.path().join(format!("pieces.{ext}"))).unwrap(), "{ext}");
        }
    }

    #[test]
    fn outputs_are_checked_before_any_work() {
        let dir = tempfile::tempdir().unwrap();
        let none = OutputOptions { cols: 1, ..Default::default() };
        assert!(none.check().unwrap_err().to_string().contains("nothing to write"));
        let same = OutputOptions {
            grid: Some(dir.path().join("x")),
            cols: 1,
            tokens: Some(dir.path().join(".").join("x")),
            ..Default::default()
        };
        assert!(same.check().unwrap_err().to_string().contains("two different files"));
        // A folder where nothing can be created (even as root): /proc.
        let ro = OutputOptions { grid: Some(PathBuf::from("/proc/spherear-grid.png")), cols: 1, ..Default::default() };
        assert!(ro.check().unwrap_err().to_string().contains("not writable"));
        let huge = OutputOptions { grid: Some(dir.path().join("g.png")), cols: 100_000_000, ..Default::default() };
        assert!(huge.check_memory(1_000_000_000, 32, 64, 16).unwrap_err().to_string().contains("--out-dir"));
        let toks = OutputOptions { tokens: Some(dir.path().join("t")), ..Default::default() };
        assert!(toks.check_memory(usize::MAX, 32, 64, 16).is_err());
        assert_eq!(toks.check_memory(10, 32, 64, 16).unwrap(), 10 * 64 * 16 * 4);
    }
}
