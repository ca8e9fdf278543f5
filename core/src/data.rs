//! Image datasets for training the S-VAE / AR model and for evaluation.
//!
//! Two sources are supported (see [`DataSource`] and [`parse_source`]):
//!
//! - **Fashion-MNIST** in the IDX format (plain or gzip-compressed files, as shipped by the
//!   Debian package `dataset-fashion-mnist` under [`DEFAULT_FASHION_MNIST_DIR`]). The 28×28
//!   grayscale images are zero-padded (background black) to `size` when `size ≥ 28`, or resized
//!   down with a triangle filter otherwise, and replicated to three channels.
//! - **ImageFolder**: one subfolder per class, PNG/JPEG files inside; each image is centre-cropped
//!   to a square and resized to `size × size` (triangle filter).
//!
//! A loaded [`Dataset`] holds images row-major `[N, 3, size, size]` as RGB in `[−1, 1]`
//! (pixel `p ∈ 0..=255` maps to `p / 127.5 − 1`); [`crate::grid::to_u8_pixel`] is the inverse rule used
//! when writing images.
//!
//! [`Shuffler`] yields a seeded, resumable epoch-wise permutation of sample indices.

use std::io::Read;
use std::path::{Path, PathBuf};

use image::imageops::{self, FilterType};
use image::{GrayImage, RgbImage};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::noise::splitmix64;
use crate::CoreError;

/// Where the Debian package `dataset-fashion-mnist` installs the IDX files.
pub const DEFAULT_FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The ten Fashion-MNIST class names, indexed by label.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

const IDX_IMAGES_MAGIC: u32 = 0x0000_0803;
const IDX_LABELS_MAGIC: u32 = 0x0000_0801;
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

fn data_err(msg: String) -> CoreError {
    CoreError::Data(msg)
}

/// Maps a byte pixel to `[−1, 1]`: `p / 127.5 − 1`.
#[inline]
fn pixel_to_f32(p: u8) -> f32 {
    p as f32 / 127.5 - 1.0
}

// ---------------------------------------------------------------------------------------------
// Dataset
// ---------------------------------------------------------------------------------------------

/// A labelled image dataset held in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Row-major `[N, 3, size, size]`, RGB in `[−1, 1]`.
    pub images: Vec<f32>,
    /// `N` class ids in `0..num_classes`.
    pub labels: Vec<i64>,
    pub num_classes: usize,
    /// `num_classes` names, indexed by class id.
    pub class_names: Vec<String>,
    /// Side of the square images.
    pub size: usize,
}

/// How much of a dataset [`Dataset::split_holdout`] holds out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Holdout {
    /// A fraction of the samples, rounded to the nearest count and clamped to `[0, N]`
    /// (non-finite or negative fractions hold out nothing).
    Fraction(f64),
    /// A number of samples, clamped to `N`.
    Count(usize),
}

impl Holdout {
    /// The number of samples held out of `n`.
    pub fn count(self, n: usize) -> usize {
        match self {
            Holdout::Count(k) => k.min(n),
            Holdout::Fraction(f) => {
                if !f.is_finite() || f <= 0.0 {
                    0
                } else if f >= 1.0 {
                    n
                } else {
                    ((n as f64 * f).round() as usize).min(n)
                }
            }
        }
    }
}

impl Dataset {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of floats in one image: `3 · size · size`.
    pub fn image_len(&self) -> usize {
        3 * self.size * self.size
    }

    /// Image `i` as `[3, size, size]`. Panics if `i >= len()` (like slice indexing).
    pub fn image(&self, i: usize) -> &[f32] {
        let l = self.image_len();
        &self.images[i * l..(i + 1) * l]
    }

    /// A new dataset with the samples `idx` in that order (repeats allowed), same classes.
    /// Panics if an index is out of range (like slice indexing).
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let mut images = Vec::with_capacity(idx.len() * self.image_len());
        let mut labels = Vec::with_capacity(idx.len());
        for &i in idx {
            images.extend_from_slice(self.image(i));
            labels.push(self.labels[i]);
        }
        Dataset {
            images,
            labels,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
            size: self.size,
        }
    }

    /// Splits off a held-out part: returns `(kept, held_out)`.
    ///
    /// The indices `0..N` are shuffled with `ChaCha8Rng::seed_from_u64(seed)` (rand 0.8's
    /// `SliceRandom::shuffle`); the **last** `k = holdout.count(N)` indices of that permutation
    /// form the held-out part and the first `N − k` the kept part. Within each part the samples
    /// keep their original relative order. The result depends only on `(N, holdout, seed)`.
    pub fn split_holdout(self, holdout: Holdout, seed: u64) -> (Dataset, Dataset) {
        let n = self.len();
        let k = holdout.count(n);
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut kept = perm[..n - k].to_vec();
        let mut held = perm[n - k..].to_vec();
        kept.sort_unstable();
        held.sort_unstable();
        (self.subset(&kept), self.subset(&held))
    }

    /// Writes the images `idx` as `[B, 3, size, size]` into `out` (cleared first).
    ///
    /// With `flip = Some(rng)`, each image in turn draws `rng.gen_bool(0.5)` (one draw per
    /// image, in `idx` order) and is mirrored horizontally when it comes out `true`.
    /// Pass `None::<&mut ChaCha8Rng>` (any `Rng` type) for no augmentation.
    /// Panics if an index is out of range (like slice indexing).
    pub fn gather_batch(&self, idx: &[usize], out: &mut Vec<f32>, mut flip: Option<&mut impl Rng>) {
        let s = self.size;
        out.clear();
        out.reserve(idx.len() * self.image_len());
        for &i in idx {
            let img = self.image(i);
            let mirror = match flip.as_mut() {
                Some(rng) => rng.gen_bool(0.5),
                None => false,
            };
            if mirror {
                for row in img.chunks_exact(s.max(1)) {
                    out.extend(row.iter().rev());
                }
            } else {
                out.extend_from_slice(img);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shuffler
// ---------------------------------------------------------------------------------------------

/// The permutation of `0..n` used for epoch `epoch` by a [`Shuffler`] seeded with `seed`:
/// `0..n` shuffled (rand 0.8 `SliceRandom::shuffle`) with
/// `ChaCha8Rng::seed_from_u64(splitmix64(seed ^ splitmix64(epoch)))`.
pub fn epoch_permutation(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..n).collect();
    let mixed = splitmix64(seed ^ splitmix64(epoch));
    perm.shuffle(&mut ChaCha8Rng::seed_from_u64(mixed));
    perm
}

/// A seeded, resumable stream of sample indices, reshuffled at every epoch boundary.
///
/// The whole state is `(n, seed, position)`, where `position` counts the samples consumed so
/// far: sample number `p` of the stream is `epoch_permutation(n, seed, p / n)[p % n]`. Batches
/// run across epoch boundaries (the tail of one epoch is followed by the head of the next), so
/// every batch is full. A run resumed with [`Shuffler::with_position`] at a saved
/// [`Shuffler::position`] continues with exactly the batches the original run would have drawn.
#[derive(Debug, Clone)]
pub struct Shuffler {
    n: usize,
    seed: u64,
    pos: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl Shuffler {
    /// A stream over `0..n` starting at position 0.
    pub fn new(n: usize, seed: u64) -> Self {
        Self::with_position(n, seed, 0)
    }

    /// A stream over `0..n` that has already consumed `position` samples.
    pub fn with_position(n: usize, seed: u64, position: u64) -> Self {
        Shuffler { n, seed, pos: position, cached: None }
    }

    /// The next `batch` indices (empty if `n == 0`).
    pub fn next_batch(&mut self, batch: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(batch);
        if self.n == 0 {
            return out;
        }
        let n = self.n as u64;
        while out.len() < batch {
            let epoch = self.pos / n;
            let off = (self.pos % n) as usize;
            let fresh = !matches!(&self.cached, Some((e, _)) if *e == epoch);
            if fresh {
                self.cached = Some((epoch, epoch_permutation(self.n, self.seed, epoch)));
            }
            let take = (batch - out.len()).min(self.n - off);
            if let Some((_, perm)) = &self.cached {
                out.extend_from_slice(&perm[off..off + take]);
            }
            self.pos += take as u64;
        }
        out
    }

    /// Samples consumed so far (save this with the seed to resume).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The epoch the next sample belongs to (0 if `n == 0`).
    pub fn epoch(&self) -> u64 {
        if self.n == 0 {
            0
        } else {
            self.pos / self.n as u64
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of samples per epoch.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

// ---------------------------------------------------------------------------------------------
// Sources
// ---------------------------------------------------------------------------------------------

/// Where a dataset comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// Fashion-MNIST IDX files (plain or `.gz`) in `dir`.
    FashionMnist { dir: PathBuf },
    /// One subfolder per class under `root` (or under both `root/train` and `root/test`).
    ImageFolder { root: PathBuf },
}

/// Which part of a dataset to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

/// Parses a dataset spec: `"fashion-mnist"` → Fashion-MNIST in [`DEFAULT_FASHION_MNIST_DIR`];
/// `"fashion-mnist:DIR"` → Fashion-MNIST in `DIR` (an empty `DIR` means the default);
/// anything else → an ImageFolder rooted at that path.
pub fn parse_source(s: &str) -> DataSource {
    if s == "fashion-mnist" {
        return DataSource::FashionMnist { dir: PathBuf::from(DEFAULT_FASHION_MNIST_DIR) };
    }
    if let Some(dir) = s.strip_prefix("fashion-mnist:") {
        let dir = if dir.is_empty() { DEFAULT_FASHION_MNIST_DIR } else { dir };
        return DataSource::FashionMnist { dir: PathBuf::from(dir) };
    }
    DataSource::ImageFolder { root: PathBuf::from(s) }
}

/// Loads `split` of `source` as `size × size` RGB images in `[−1, 1]`.
///
/// `limit = Some(n)` keeps at most `n` images: the first `n` for Fashion-MNIST, and for an
/// ImageFolder a round-robin pick across classes (see [`load_image_folder`]).
pub fn load(source: &DataSource, split: Split, size: usize, limit: Option<usize>) -> Result<Dataset, CoreError> {
    if size == 0 {
        return Err(CoreError::Invalid("image size must be at least 1".into()));
    }
    match source {
        DataSource::FashionMnist { dir } => load_fashion_mnist(dir, split, size, limit),
        DataSource::ImageFolder { root } => load_image_folder(root, split, size, limit),
    }
}

// ---------------------------------------------------------------------------------------------
// Fashion-MNIST (IDX)
// ---------------------------------------------------------------------------------------------

const INSTALL_HINT: &str = "install the Debian package dataset-fashion-mnist (make setup)";

/// `dir/base` if it exists, else `dir/base.gz`, else an error naming both.
fn find_idx_file(dir: &Path, base: &str) -> Result<PathBuf, CoreError> {
    let plain = dir.join(base);
    if plain.is_file() {
        return Ok(plain);
    }
    let gz = dir.join(format!("{base}.gz"));
    if gz.is_file() {
        return Ok(gz);
    }
    Err(data_err(format!("{}[.gz] not found; {INSTALL_HINT}", plain.display())))
}

/// Reads a whole IDX file, gunzipping it when it starts with the gzip magic bytes.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, CoreError> {
    let raw = std::fs::read(path).map_err(|e| data_err(format!("{}: cannot read: {e}", path.display())))?;
    if raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
        let mut out = Vec::with_capacity(raw.len().saturating_mul(4));
        flate2::read::MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| data_err(format!("{}: corrupt gzip data: {e}", path.display())))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX ubyte file with the given magic; returns its dimensions and payload.
fn read_idx(path: &Path, magic: u32) -> Result<(Vec<usize>, Vec<u8>), CoreError> {
    let mut bytes = read_maybe_gz(path)?;
    let ndim = (magic & 0xff) as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < 4 {
        return Err(data_err(format!("{}: truncated IDX file ({} bytes, no header)", path.display(), bytes.len())));
    }
    let found = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if found != magic {
        return Err(data_err(format!("{}: bad IDX magic 0x{found:08x} (expected 0x{magic:08x})", path.display())));
    }
    if bytes.len() < header {
        return Err(data_err(format!(
            "{}: truncated IDX header ({} bytes, need {header})",
            path.display(),
            bytes.len()
        )));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| data_err(format!("{}: IDX dimensions {dims:?} too large", path.display())))?;
    let have = bytes.len() - header;
    if have < expected {
        return Err(data_err(format!(
            "{}: truncated IDX data: dimensions {dims:?} need {expected} bytes, found {have}",
            path.display()
        )));
    }
    if have > expected {
        return Err(data_err(format!(
            "{}: IDX file has {} trailing bytes after dimensions {dims:?}",
            path.display(),
            have - expected
        )));
    }
    bytes.drain(..header);
    Ok((dims, bytes))
}

/// The (images, labels) IDX files of `split` in the Fashion-MNIST folder `dir`.
fn fashion_mnist_files(dir: &Path, split: Split) -> Result<(PathBuf, PathBuf), CoreError> {
    if !dir.is_dir() {
        return Err(data_err(format!("{}: Fashion-MNIST directory not found; {INSTALL_HINT}", dir.display())));
    }
    let prefix = match split {
        Split::Train => "train",
        Split::Test => "t10k",
    };
    Ok((
        find_idx_file(dir, &format!("{prefix}-images-idx3-ubyte"))?,
        find_idx_file(dir, &format!("{prefix}-labels-idx1-ubyte"))?,
    ))
}

/// Loads Fashion-MNIST (any IDX ubyte image/label pair with labels below 10) from `dir`.
///
/// Files: `train-images-idx3-ubyte`/`train-labels-idx1-ubyte` for [`Split::Train`],
/// `t10k-images-idx3-ubyte`/`t10k-labels-idx1-ubyte` for [`Split::Test`], each plain or with
/// `.gz` appended (plain preferred). If `size ≥` the image side, images are zero-padded
/// (value 0, i.e. −1) centred, with offset `(size − side) / 2`; otherwise resized with a
/// triangle filter. `limit` keeps the first `n` images.
pub fn load_fashion_mnist(dir: &Path, split: Split, size: usize, limit: Option<usize>) -> Result<Dataset, CoreError> {
    if size == 0 {
        return Err(CoreError::Invalid("image size must be at least 1".into()));
    }
    let (img_path, lbl_path) = fashion_mnist_files(dir, split)?;
    let (idims, pixels) = read_idx(&img_path, IDX_IMAGES_MAGIC)?;
    let (ldims, raw_labels) = read_idx(&lbl_path, IDX_LABELS_MAGIC)?;
    let (n, h, w) = (idims[0], idims[1], idims[2]);
    if n != ldims[0] {
        return Err(data_err(format!(
            "{}: {n} images but {} has {} labels",
            img_path.display(),
            lbl_path.display(),
            ldims[0]
        )));
    }
    if h == 0 || w == 0 {
        return Err(data_err(format!("{}: empty images ({h}×{w})", img_path.display())));
    }
    let take = limit.map_or(n, |l| l.min(n));
    let num_classes = FASHION_MNIST_CLASSES.len();
    let mut labels = Vec::with_capacity(take);
    for (i, &l) in raw_labels[..take].iter().enumerate() {
        if l as usize >= num_classes {
            return Err(data_err(format!(
                "{}: label {l} of sample {i} is outside 0..{num_classes}",
                lbl_path.display()
            )));
        }
        labels.push(l as i64);
    }

    let plane = size * size;
    let mut images = vec![-1.0f32; take * 3 * plane];
    let pad = size >= h && size >= w;
    let (oy, ox) = ((size.saturating_sub(h)) / 2, (size.saturating_sub(w)) / 2);
    for i in 0..take {
        let src = &pixels[i * h * w..(i + 1) * h * w];
        let dst = &mut images[i * 3 * plane..(i + 1) * 3 * plane];
        let (first, rest) = dst.split_at_mut(plane);
        if pad {
            for y in 0..h {
                let row = &src[y * w..(y + 1) * w];
                let out = &mut first[(oy + y) * size + ox..(oy + y) * size + ox + w];
                for (o, &p) in out.iter_mut().zip(row) {
                    *o = pixel_to_f32(p);
                }
            }
        } else {
            let gray = GrayImage::from_raw(w as u32, h as u32, src.to_vec())
                .ok_or_else(|| data_err(format!("{}: image {i} has inconsistent dimensions", img_path.display())))?;
            let small = imageops::resize(&gray, size as u32, size as u32, FilterType::Triangle);
            for (o, &p) in first.iter_mut().zip(small.as_raw()) {
                *o = pixel_to_f32(p);
            }
        }
        rest[..plane].copy_from_slice(first);
        rest[plane..].copy_from_slice(first);
    }
    Ok(Dataset {
        images,
        labels,
        num_classes,
        class_names: FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect(),
        size,
    })
}

// ---------------------------------------------------------------------------------------------
// ImageFolder
// ---------------------------------------------------------------------------------------------

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, CoreError> {
    let rd = std::fs::read_dir(dir).map_err(|e| data_err(format!("{}: cannot read directory: {e}", dir.display())))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| data_err(format!("{}: cannot read directory: {e}", dir.display())))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}

fn has_image_extension(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
        .unwrap_or(false)
}

/// Decodes one image file into `[3, size, size]` floats in `[−1, 1]` appended to `out`:
/// converted to RGB8, centre-cropped to a square (offset `(w − s)/2, (h − s)/2`, `s = min(w, h)`),
/// then resized to `size × size` with a triangle filter.
fn decode_into(path: &Path, size: usize, out: &mut Vec<f32>) -> Result<(), CoreError> {
    let bad = |e: &dyn std::fmt::Display| data_err(format!("{}: cannot decode image: {e}", path.display()));
    let img = image::ImageReader::open(path)
        .map_err(|e| data_err(format!("{}: cannot open image: {e}", path.display())))?
        .with_guessed_format()
        .map_err(|e| bad(&e))?
        .decode()
        .map_err(|e| bad(&e))?;
    let rgb: RgbImage = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    let s = w.min(h);
    if s == 0 {
        return Err(data_err(format!("{}: image is empty ({w}×{h})", path.display())));
    }
    let square = if w == h { rgb } else { imageops::crop_imm(&rgb, (w - s) / 2, (h - s) / 2, s, s).to_image() };
    let t = size as u32;
    let resized = if s == t { square } else { imageops::resize(&square, t, t, FilterType::Triangle) };
    let plane = size * size;
    let start = out.len();
    out.resize(start + 3 * plane, 0.0);
    let dst = &mut out[start..];
    for (k, px) in resized.pixels().enumerate() {
        for c in 0..3 {
            dst[c * plane + k] = pixel_to_f32(px.0[c]);
        }
    }
    Ok(())
}

/// The folder that holds the class folders of `split` of an ImageFolder `root`.
///
/// If `root/train` and `root/test` are both folders, [`Split::Train`] reads `root/train` and
/// [`Split::Test`] reads `root/test`. If neither exists, both splits read `root` itself. A root with
/// only one of the two is an error naming the missing split (such a root is ambiguous: its `train/`
/// would otherwise be taken for a class), whichever split is asked for.
pub fn image_folder_split_dir(root: &Path, split: Split) -> Result<PathBuf, CoreError> {
    if !root.is_dir() {
        return Err(data_err(format!("{}: image folder not found", root.display())));
    }
    let (train, test) = (root.join("train"), root.join("test"));
    match (train.is_dir(), test.is_dir()) {
        (true, true) => Ok(match split {
            Split::Train => train,
            Split::Test => test,
        }),
        (false, false) => Ok(root.to_path_buf()),
        (has_train, _) => {
            let (have, missing) = if has_train { ("train", "test") } else { ("test", "train") };
            Err(data_err(format!(
                "{}: has a {have}/ split folder but no {missing}/ one; an image folder holds either one folder \
                 per class, or train/ and test/ each with one folder per class",
                root.display()
            )))
        }
    }
}

/// One class of an ImageFolder split: its name (the folder name) and its image files, sorted by path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassFiles {
    pub name: String,
    pub files: Vec<PathBuf>,
}

/// Lists the classes of `split` of an ImageFolder `root` and their image files, without reading any
/// image: the non-hidden subfolders of [`image_folder_split_dir`], sorted by name (class ids `0..` in
/// this order), each with its png/jpg/jpeg files (any case), sorted by path. Errors when there is no
/// class folder or a class folder has no image.
pub fn image_folder_classes(root: &Path, split: Split) -> Result<Vec<ClassFiles>, CoreError> {
    let dir = image_folder_split_dir(root, split)?;
    let class_dirs: Vec<PathBuf> = sorted_entries(&dir)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        return Err(data_err(format!(
            "{}: no class subfolders (expected one subfolder of images per class)",
            dir.display()
        )));
    }
    let mut classes = Vec::with_capacity(class_dirs.len());
    for cd in &class_dirs {
        let files: Vec<PathBuf> =
            sorted_entries(cd)?.into_iter().filter(|p| has_image_extension(p) && p.is_file()).collect();
        if files.is_empty() {
            return Err(data_err(format!("{}: class folder has no png/jpg/jpeg images", cd.display())));
        }
        let name = cd.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        classes.push(ClassFiles { name, files });
    }
    Ok(classes)
}

/// The number of classes of `split` of `source`, without decoding any image: 10 for Fashion-MNIST (after
/// checking that the split's IDX files are there), the number of class folders for an ImageFolder (see
/// [`image_folder_classes`]). [`load`] of the same split gives a dataset with this `num_classes`.
pub fn num_classes(source: &DataSource, split: Split) -> Result<usize, CoreError> {
    match source {
        DataSource::FashionMnist { dir } => {
            fashion_mnist_files(dir, split)?;
            Ok(FASHION_MNIST_CLASSES.len())
        }
        DataSource::ImageFolder { root } => Ok(image_folder_classes(root, split)?.len()),
    }
}

/// The files `split` of `source` is read from, without reading them: for Fashion-MNIST the images and
/// the labels IDX file (as found: plain preferred, else `.gz`); for an ImageFolder every image file, class
/// by class in class-id order (see [`image_folder_classes`]).
pub fn split_files(source: &DataSource, split: Split) -> Result<Vec<PathBuf>, CoreError> {
    match source {
        DataSource::FashionMnist { dir } => {
            let (images, labels) = fashion_mnist_files(dir, split)?;
            Ok(vec![images, labels])
        }
        DataSource::ImageFolder { root } => {
            Ok(image_folder_classes(root, split)?.into_iter().flat_map(|c| c.files).collect())
        }
    }
}

/// Loads an ImageFolder: one subfolder per class.
///
/// - Split: see [`image_folder_split_dir`] (`root/train` + `root/test`, or `root` for both splits; a
///   root with only one of `train/` and `test/` is an error).
/// - Classes: the non-hidden subfolders, sorted by name, get ids `0..`; each must hold at least
///   one image. Images: files with extension png/jpg/jpeg (any case), sorted by path; other
///   files and hidden entries are ignored. Each is decoded (content sniffed), converted to RGB,
///   centre-cropped to a square and resized to `size × size` with a triangle filter.
/// - Order and `limit`: without a limit, samples come class by class in sorted order. With
///   `Some(n)`, images are taken **round-robin across classes** (class 0's first image, class
///   1's first, …, class 0's second, …, skipping exhausted classes) until `n` are taken, and
///   the dataset is in that interleaved order, so a small limit still covers every class.
///   Only the picked files are decoded.
pub fn load_image_folder(root: &Path, split: Split, size: usize, limit: Option<usize>) -> Result<Dataset, CoreError> {
    if size == 0 {
        return Err(CoreError::Invalid("image size must be at least 1".into()));
    }
    let classes = image_folder_classes(root, split)?;
    let class_names: Vec<String> = classes.iter().map(|c| c.name.clone()).collect();
    let files: Vec<Vec<PathBuf>> = classes.into_iter().map(|c| c.files).collect();

    let total: usize = files.iter().map(Vec::len).sum();
    let mut picked: Vec<(usize, &Path)> = Vec::new();
    match limit {
        None => {
            for (c, fs) in files.iter().enumerate() {
                picked.extend(fs.iter().map(|p| (c, p.as_path())));
            }
        }
        Some(n) => {
            let n = n.min(total);
            let mut round = 0;
            while picked.len() < n {
                for (c, fs) in files.iter().enumerate() {
                    if picked.len() == n {
                        break;
                    }
                    if let Some(p) = fs.get(round) {
                        picked.push((c, p.as_path()));
                    }
                }
                round += 1;
            }
        }
    }

    let mut images = Vec::with_capacity(picked.len() * 3 * size * size);
    let mut labels = Vec::with_capacity(picked.len());
    for (c, path) in picked {
        decode_into(path, size, &mut images)?;
        labels.push(c as i64);
    }
    Ok(Dataset { images, labels, num_classes: class_names.len(), class_names, size })
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const S28: usize = 28 * 28;

    fn idx_images(pixels: &[Vec<u8>], h: u32, w: u32) -> Vec<u8> {
        let mut b = IDX_IMAGES_MAGIC.to_be_bytes().to_vec();
        b.extend((pixels.len() as u32).to_be_bytes());
        b.extend(h.to_be_bytes());
        b.extend(w.to_be_bytes());
        for p in pixels {
            b.extend_from_slice(p);
        }
        b
    }

    fn idx_labels(labels: &[u8]) -> Vec<u8> {
        let mut b = IDX_LABELS_MAGIC.to_be_bytes().to_vec();
        b.extend((labels.len() as u32).to_be_bytes());
        b.extend_from_slice(labels);
        b
    }

    fn gz(bytes: &[u8]) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    }

    /// Image k: pixel (0,0) = 255, pixel (y=5, x=7) = 100 + k, rest 0.
    fn fixture_pixels() -> Vec<Vec<u8>> {
        (0..3u8)
            .map(|k| {
                let mut p = vec![0u8; S28];
                p[0] = 255;
                p[5 * 28 + 7] = 100 + k;
                p
            })
            .collect()
    }

    /// Train split gzipped, test split plain.
    fn fashion_fixture() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let imgs = idx_images(&fixture_pixels(), 28, 28);
        let lbls = idx_labels(&[3, 0, 9]);
        std::fs::write(d.path().join("train-images-idx3-ubyte.gz"), gz(&imgs)).unwrap();
        std::fs::write(d.path().join("train-labels-idx1-ubyte.gz"), gz(&lbls)).unwrap();
        std::fs::write(d.path().join("t10k-images-idx3-ubyte"), &imgs).unwrap();
        std::fs::write(d.path().join("t10k-labels-idx1-ubyte"), &lbls).unwrap();
        d
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn fashion_gz_and_plain_pad_to_32() {
        let d = fashion_fixture();
        let src = DataSource::FashionMnist { dir: d.path().to_path_buf() };
        let train = load(&src, Split::Train, 32, None).unwrap();
        let test = load(&src, Split::Test, 32, None).unwrap();
        assert_eq!(train, test);
        assert_eq!(train.len(), 3);
        assert_eq!(train.images.len(), 3 * 3 * 32 * 32);
        assert_eq!(train.labels, vec![3, 0, 9]);
        assert_eq!(train.num_classes, 10);
        assert_eq!(train.class_names[9], "Ankle boot");
        for k in 0..3 {
            let img = train.image(k);
            for c in 0..3 {
                let ch = &img[c * 1024..(c + 1) * 1024];
                assert!(close(ch[0], -1.0), "corner is background");
                assert!(close(ch[31 * 32 + 31], -1.0));
                assert!(close(ch[2 * 32 + 2], 1.0), "pixel (0,0) lands at (2,2)");
                let want = (100 + k) as f32 / 127.5 - 1.0;
                assert!(close(ch[(5 + 2) * 32 + 7 + 2], want));
                assert!(close(ch[(2 + 1) * 32 + 2], -1.0));
            }
        }
    }

    #[test]
    fn fashion_limit_and_resize() {
        let d = fashion_fixture();
        let src = parse_source(&format!("fashion-mnist:{}", d.path().display()));
        let ds = load(&src, Split::Train, 28, Some(2)).unwrap();
        assert_eq!(ds.labels, vec![3, 0]);
        assert!(close(ds.image(1)[5 * 28 + 7], 101.0 / 127.5 - 1.0));
        let small = load(&src, Split::Test, 14, Some(10)).unwrap();
        assert_eq!(small.len(), 3);
        assert_eq!(small.images.len(), 3 * 3 * 14 * 14);
        assert!(small.images.iter().all(|v| (-1.0..=1.0).contains(v)));
    }

    #[test]
    fn fashion_bad_magic_names_file() {
        let d = fashion_fixture();
        let p = d.path().join("t10k-labels-idx1-ubyte");
        std::fs::write(&p, idx_images(&fixture_pixels(), 28, 28)).unwrap();
        let src = DataSource::FashionMnist { dir: d.path().to_path_buf() };
        let e = load(&src, Split::Test, 32, None).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CoreError::Data(_)));
        assert!(msg.contains("t10k-labels-idx1-ubyte") && msg.contains("magic"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn fashion_truncated_and_count_mismatch() {
        let d = fashion_fixture();
        let src = DataSource::FashionMnist { dir: d.path().to_path_buf() };
        let imgs = idx_images(&fixture_pixels(), 28, 28);
        std::fs::write(d.path().join("t10k-images-idx3-ubyte"), &imgs[..imgs.len() - 5]).unwrap();
        let msg = load(&src, Split::Test, 32, None).unwrap_err().to_string();
        assert!(msg.contains("t10k-images-idx3-ubyte") && msg.contains("truncated"), "{msg}");

        std::fs::write(d.path().join("t10k-images-idx3-ubyte"), &imgs).unwrap();
        std::fs::write(d.path().join("t10k-labels-idx1-ubyte"), idx_labels(&[1, 2])).unwrap();
        let msg = load(&src, Split::Test, 32, None).unwrap_err().to_string();
        assert!(msg.contains("3 images") && msg.contains("2 labels"), "{msg}");

        std::fs::write(d.path().join("t10k-labels-idx1-ubyte"), idx_labels(&[1, 2, 10])).unwrap();
        let msg = load(&src, Split::Test, 32, None).unwrap_err().to_string();
        assert!(msg.contains("label 10"), "{msg}");
    }

    #[test]
    fn fashion_missing_dir_and_file() {
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nope");
        let e = load(&DataSource::FashionMnist { dir: missing.clone() }, Split::Train, 32, None).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, CoreError::Data(_)));
        assert!(msg.contains(&missing.display().to_string()) && msg.contains("dataset-fashion-mnist"));
        let msg =
            load(&DataSource::FashionMnist { dir: d.path().into() }, Split::Train, 32, None).unwrap_err().to_string();
        assert!(msg.contains("train-images-idx3-ubyte") && msg.contains("not found"), "{msg}");
        assert!(msg.contains("make setup"));
    }

    #[test]
    fn parse_source_forms() {
        assert_eq!(parse_source("fashion-mnist"), DataSource::FashionMnist { dir: DEFAULT_FASHION_MNIST_DIR.into() });
        assert_eq!(parse_source("fashion-mnist:/x/y"), DataSource::FashionMnist { dir: "/x/y".into() });
        assert_eq!(parse_source("data/imgs"), DataSource::ImageFolder { root: "data/imgs".into() });
    }

    fn save_png(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) {
        RgbImage::from_fn(w, h, |x, y| image::Rgb(f(x, y))).save(path).unwrap();
    }

    /// classes "b_cat" (2 images) and "a_dog" (1 image, 20×10 with red/green/blue thirds).
    fn folder_fixture(root: &Path) {
        let (a, b) = (root.join("a_dog"), root.join("b_cat"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        save_png(&a.join("wide.PNG"), 20, 10, |x, _| {
            if x < 5 {
                [255, 0, 0]
            } else if x < 15 {
                [0, 255, 0]
            } else {
                [0, 0, 255]
            }
        });
        save_png(&b.join("1.png"), 8, 8, |_, _| [0, 0, 0]);
        save_png(&b.join("0.png"), 16, 16, |x, y| [(x * 16) as u8, (y * 16) as u8, 255]);
        std::fs::write(b.join("notes.txt"), "ignored").unwrap();
    }

    #[test]
    fn image_folder_loads_sorted_classes() {
        let d = tempfile::tempdir().unwrap();
        folder_fixture(d.path());
        let src = parse_source(&d.path().display().to_string());
        let ds = load(&src, Split::Train, 8, None).unwrap();
        assert_eq!(ds.class_names, vec!["a_dog", "b_cat"]);
        assert_eq!(ds.num_classes, 2);
        assert_eq!(ds.labels, vec![0, 1, 1]);
        assert_eq!(ds.images.len(), 3 * 3 * 64);
        assert!(ds.images.iter().all(|v| (-1.0..=1.0).contains(v)));
        // The wide image is centre-cropped to its all-green middle.
        let img = ds.image(0);
        assert!(img[..64].iter().all(|&v| v < -0.99), "red channel");
        assert!(img[64..128].iter().all(|&v| v > 0.99), "green channel");
        assert!(img[128..].iter().all(|&v| v < -0.99), "blue channel");
        // b_cat/0.png (sorted before 1.png) has blue 255; 1.png is black.
        assert!(ds.image(1)[128..].iter().all(|&v| close(v, 1.0)));
        assert!(ds.image(2).iter().all(|&v| close(v, -1.0)));
        // No train/test subfolders: Test is the same folder.
        assert_eq!(load(&src, Split::Test, 8, None).unwrap(), ds);
        // Round-robin limit covers both classes.
        let lim = load(&src, Split::Train, 8, Some(2)).unwrap();
        assert_eq!(lim.labels, vec![0, 1]);
        assert_eq!(lim.image(1), ds.image(1));
        let lim = load(&src, Split::Train, 8, Some(3)).unwrap();
        assert_eq!(lim.labels, vec![0, 1, 1]);
    }

    #[test]
    fn image_folder_train_test_subfolders() {
        let d = tempfile::tempdir().unwrap();
        folder_fixture(&d.path().join("train"));
        let t = d.path().join("test").join("x");
        std::fs::create_dir_all(&t).unwrap();
        save_png(&t.join("only.jpg.png"), 4, 4, |_, _| [255, 255, 255]);
        let src = DataSource::ImageFolder { root: d.path().into() };
        assert_eq!(load(&src, Split::Train, 4, None).unwrap().len(), 3);
        let test = load(&src, Split::Test, 4, None).unwrap();
        assert_eq!(test.class_names, vec!["x"]);
        assert!(test.images.iter().all(|&v| close(v, 1.0)));
    }

    #[test]
    fn image_folder_with_one_split_folder_names_the_missing_one() {
        let d = tempfile::tempdir().unwrap();
        folder_fixture(&d.path().join("train"));
        let src = DataSource::ImageFolder { root: d.path().into() };
        for split in [Split::Train, Split::Test] {
            let e = load(&src, split, 4, None).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, CoreError::Data(_)));
            assert!(msg.contains("has a train/ split folder but no test/ one"), "{msg}");
            assert!(!msg.contains('\n') && !msg.contains("no png"), "{msg}");
        }
        assert!(num_classes(&src, Split::Train).unwrap_err().to_string().contains("no test/"));
        std::fs::rename(d.path().join("train"), d.path().join("test")).unwrap();
        let msg = load(&src, Split::Test, 4, None).unwrap_err().to_string();
        assert!(msg.contains("has a test/ split folder but no train/ one"), "{msg}");
    }

    #[test]
    fn class_count_and_files_without_decoding() {
        let d = tempfile::tempdir().unwrap();
        folder_fixture(d.path());
        // Not an image: loading fails, but counting and listing never decode.
        std::fs::create_dir(d.path().join("c_bad")).unwrap();
        std::fs::write(d.path().join("c_bad").join("x.png"), b"not a png").unwrap();
        let src = DataSource::ImageFolder { root: d.path().into() };
        assert!(load(&src, Split::Train, 4, None).is_err());
        assert_eq!(num_classes(&src, Split::Train).unwrap(), 3);
        let rel: Vec<String> = split_files(&src, Split::Train)
            .unwrap()
            .iter()
            .map(|p| p.strip_prefix(d.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(rel, ["a_dog/wide.PNG", "b_cat/0.png", "b_cat/1.png", "c_bad/x.png"]);
        let names: Vec<String> =
            image_folder_classes(d.path(), Split::Test).unwrap().into_iter().map(|c| c.name).collect();
        assert_eq!(names, ["a_dog", "b_cat", "c_bad"]);
        // train/ + test/ splits count separately.
        let s = tempfile::tempdir().unwrap();
        folder_fixture(&s.path().join("train"));
        std::fs::create_dir_all(s.path().join("test").join("only")).unwrap();
        save_png(&s.path().join("test").join("only").join("a.png"), 4, 4, |_, _| [1, 2, 3]);
        let split = DataSource::ImageFolder { root: s.path().into() };
        assert_eq!((num_classes(&split, Split::Train).unwrap(), num_classes(&split, Split::Test).unwrap()), (2, 1));
        // Fashion-MNIST: ten classes once its files are found.
        let f = fashion_fixture();
        let fm = DataSource::FashionMnist { dir: f.path().into() };
        assert_eq!(num_classes(&fm, Split::Test).unwrap(), 10);
        let files = split_files(&fm, Split::Train).unwrap();
        assert_eq!(files, [f.path().join("train-images-idx3-ubyte.gz"), f.path().join("train-labels-idx1-ubyte.gz")]);
        let missing = DataSource::FashionMnist { dir: d.path().join("nope") };
        assert!(num_classes(&missing, Split::Train).unwrap_err().to_string().contains("dataset-fashion-mnist"));
    }

    #[test]
    fn image_folder_errors() {
        let d = tempfile::tempdir().unwrap();
        let src = DataSource::ImageFolder { root: d.path().into() };
        let msg = load(&src, Split::Train, 8, None).unwrap_err().to_string();
        assert!(msg.contains("no class subfolders"), "{msg}");

        let c = d.path().join("cls");
        std::fs::create_dir(&c).unwrap();
        std::fs::write(c.join("readme.txt"), "x").unwrap();
        let msg = load(&src, Split::Train, 8, None).unwrap_err().to_string();
        assert!(msg.contains("cls") && msg.contains("no png/jpg/jpeg"), "{msg}");

        std::fs::write(c.join("broken.png"), b"definitely not a png").unwrap();
        let e = load(&src, Split::Train, 8, None).unwrap_err();
        assert!(matches!(e, CoreError::Data(_)));
        let msg = e.to_string();
        assert!(msg.contains("broken.png"), "{msg}");
        assert!(!msg.contains('\n'));

        let missing = d.path().join("absent");
        let msg = load(&DataSource::ImageFolder { root: missing }, Split::Test, 8, None).unwrap_err().to_string();
        assert!(msg.contains("absent") && msg.contains("not found"), "{msg}");
    }

    fn toy(n: usize, size: usize) -> Dataset {
        let l = 3 * size * size;
        Dataset {
            images: (0..n * l).map(|v| v as f32).collect(),
            labels: (0..n as i64).collect(),
            num_classes: n,
            class_names: (0..n).map(|i| i.to_string()).collect(),
            size,
        }
    }

    #[test]
    fn shuffler_deterministic_and_resumable() {
        let mut a = Shuffler::new(10, 7);
        let mut b = Shuffler::new(10, 7);
        let xs: Vec<Vec<usize>> = (0..7).map(|_| a.next_batch(4)).collect();
        let ys: Vec<Vec<usize>> = (0..7).map(|_| b.next_batch(4)).collect();
        assert_eq!(xs, ys);
        let flat: Vec<usize> = xs.concat();
        // Each epoch is a permutation, and epochs differ.
        for e in 0..2 {
            let mut ep = flat[e * 10..(e + 1) * 10].to_vec();
            ep.sort();
            assert_eq!(ep, (0..10).collect::<Vec<_>>());
        }
        assert_ne!(flat[..10], flat[10..20]);
        assert_ne!(Shuffler::new(10, 8).next_batch(10), flat[..10]);
        // Resume mid-epoch.
        let mut r = Shuffler::with_position(10, 7, 12);
        assert_eq!(r.position(), 12);
        assert_eq!(r.epoch(), 1);
        assert_eq!(r.next_batch(4), flat[12..16]);
        assert_eq!(r.next_batch(8), flat[16..24]);
        assert_eq!(a.position(), 28);
        let mut resumed = Shuffler::with_position(10, 7, a.position());
        assert_eq!(resumed.next_batch(5), a.next_batch(5));
        assert!(Shuffler::new(0, 1).next_batch(3).is_empty());
    }

    #[test]
    fn split_holdout_sizes_disjoint() {
        let ds = toy(20, 2);
        let (kept, held) = ds.clone().split_holdout(Holdout::Fraction(0.25), 3);
        assert_eq!((kept.len(), held.len()), (15, 5));
        let mut all: Vec<i64> = kept.labels.iter().chain(&held.labels).copied().collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(held.image(0), ds.image(held.labels[0] as usize));
        let (k2, h2) = ds.clone().split_holdout(Holdout::Fraction(0.25), 3);
        assert_eq!((k2, h2), (kept, held));
        let (k, h) = ds.clone().split_holdout(Holdout::Count(7), 1);
        assert_eq!((k.len(), h.len()), (13, 7));
        let (k, h) = ds.split_holdout(Holdout::Count(99), 1);
        assert_eq!((k.len(), h.len()), (0, 20));
    }

    /// An RNG returning a constant: 0 makes `gen_bool(0.5)` true, `u64::MAX` false.
    struct Const(u64);
    impl rand::RngCore for Const {
        fn next_u32(&mut self) -> u32 {
            self.0 as u32
        }
        fn next_u64(&mut self) -> u64 {
            self.0
        }
        fn fill_bytes(&mut self, d: &mut [u8]) {
            d.fill(self.0 as u8)
        }
        fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), rand::Error> {
            self.fill_bytes(d);
            Ok(())
        }
    }

    #[test]
    fn gather_batch_and_flip() {
        let ds = toy(3, 3);
        let mut out = vec![99.0];
        ds.gather_batch(&[2, 0], &mut out, None::<&mut ChaCha8Rng>);
        assert_eq!(out, [ds.image(2), ds.image(0)].concat());
        ds.gather_batch(&[1], &mut out, Some(&mut Const(u64::MAX)));
        assert_eq!(out, ds.image(1));
        ds.gather_batch(&[1], &mut out, Some(&mut Const(0)));
        let img = ds.image(1);
        for c in 0..3 {
            for y in 0..3 {
                for x in 0..3 {
                    assert_eq!(out[c * 9 + y * 3 + x], img[c * 9 + y * 3 + (2 - x)]);
                }
            }
        }
        // With a real RNG both outcomes occur.
        let idx = vec![0usize; 64];
        ds.gather_batch(&idx, &mut out, Some(&mut ChaCha8Rng::seed_from_u64(0)));
        let flipped = out.chunks(27).filter(|c| *c != ds.image(0)).count();
        assert!(flipped > 0 && flipped < 64);
    }

    #[test]
    fn real_fashion_mnist_test_split() {
        let dir = Path::new(DEFAULT_FASHION_MNIST_DIR);
        if !dir.is_dir() {
            println!("skipping: {} absent (dataset-fashion-mnist not installed)", dir.display());
            return;
        }
        let ds = load(&parse_source("fashion-mnist"), Split::Test, 32, Some(16)).unwrap();
        assert_eq!(ds.len(), 16);
        assert_eq!(ds.images.len(), 16 * 3 * 32 * 32);
        assert!(ds.labels.iter().all(|&l| (0..10).contains(&l)));
        assert!(ds.images.iter().all(|v| (-1.0..=1.0).contains(v)));
        // Padding border is background.
        assert!(ds.image(0)[..32].iter().all(|&v| v == -1.0));
    }
}
