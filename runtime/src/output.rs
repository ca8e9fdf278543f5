//! Writing results: the PNG grid (laid out like `trainer sample`'s: one row per class, `per_class`
//! columns), one PNG per image, and the tokens as safetensors (key `tokens`, [N, L, d] f32).
//! Every file is written to a temporary sibling and renamed, so no partial file is ever left.

use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use spherear_core::data::save_grid_png;
use spherear_core::fsutil::with_tmp_path;

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

impl OutputOptions {
    /// Checks, before any work, that every output can be created (parent folders exist).
    pub fn check(&self) -> Result<()> {
        for p in [&self.grid, &self.tokens].into_iter().flatten() {
            let parent = p.parent().filter(|q| !q.as_os_str().is_empty()).unwrap_or(Path::new("."));
            if !parent.is_dir() {
                return Err(RuntimeError::Io(format!(
                    "cannot write {}: folder {} does not exist",
                    p.display(),
                    parent.display()
                )));
            }
            if p.is_dir() {
                return Err(RuntimeError::Io(format!("cannot write {}: it is a folder", p.display())));
            }
        }
        if let Some(d) = &self.dir {
            if d.exists() && !d.is_dir() {
                return Err(RuntimeError::Io(format!("--out-dir {} exists and is not a folder", d.display())));
            }
        }
        if self.grid.is_some() && self.cols == 0 {
            return Err(RuntimeError::Invalid("grid needs at least one column".into()));
        }
        Ok(())
    }
}

/// File name of image `index` (class `class`) inside `--out-dir`.
pub fn image_file_name(index: usize, class: i64) -> String {
    format!("{index:04}-class{class}.png")
}

/// Writes the requested outputs for `images` ([N, 3, size, size] in [−1, 1]) of `classes`.
pub fn write_outputs(
    opts: &OutputOptions,
    classes: &[i64],
    tokens: &Tokens,
    images: &[f32],
    size: usize,
) -> Result<()> {
    let n = classes.len();
    if let Some(p) = &opts.tokens {
        write_tokens(p, tokens)?;
    }
    if let Some(p) = &opts.grid {
        save_grid_png(p, images, n, size, opts.cols)?;
    }
    if let Some(dir) = &opts.dir {
        std::fs::create_dir_all(dir).map_err(|e| RuntimeError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let per = 3 * size * size;
        for (j, (&c, img)) in classes.iter().zip(images.chunks_exact(per)).enumerate() {
            save_grid_png(&dir.join(image_file_name(j, c)), img, 1, size, 1)?;
        }
    }
    Ok(())
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
}
