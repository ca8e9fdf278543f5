//! The official training augmentation (`random_crop_arr` + flip of SphereAR's `dataset.py`), for the AR
//! stage's `--augment N` views: the image's side is resized to s' drawn uniformly from the integers
//! ⌈S/1.0⌉ ..= ⌈S/0.8⌉ (a crop of 80–100 % of the side), an S×S window is cut at a uniform offset, and the
//! result is mirrored horizontally with probability ½.
//!
//! Differences: the official code resizes the original (larger) image with PIL's bicubic; our datasets
//! are already S×S, so the S×S image is upscaled with libtorch's bicubic (a = −0.75, PIL uses −0.5); the
//! official decay of the augmentation ratio over the last epochs (350 → 375 of 400) is not reproduced.
//!
//! Each view is a function of (seed, view, image index) alone ([`view_rng`]), so the cached views do not
//! depend on batching or `--limit` order, and a resumed run is bit-identical.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use spherear_core::noise::step_seed;
use tch::Tensor;

/// Smallest and largest crop, as fractions of the side (`min_crop_frac`, `max_crop_frac`).
pub const MIN_CROP_FRAC: f64 = 0.8;
pub const MAX_CROP_FRAC: f64 = 1.0;

/// One augmented view of an S×S image: resize to `side`², cut S×S at (`top`, `left`), then `flip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct View {
    pub side: usize,
    pub top: usize,
    pub left: usize,
    pub flip: bool,
}

impl View {
    /// The un-augmented image.
    pub fn identity(size: usize) -> Self {
        View { side: size, top: 0, left: 0, flip: false }
    }

    /// Draws a view of an image of side `size` (the official order: side, top, left, flip).
    pub fn draw(size: usize, rng: &mut ChaCha8Rng) -> Self {
        let lo = (size as f64 / MAX_CROP_FRAC).ceil() as usize;
        let hi = (size as f64 / MIN_CROP_FRAC).ceil() as usize;
        let side = rng.gen_range(lo..=hi);
        let top = rng.gen_range(0..=side - size);
        let left = rng.gen_range(0..=side - size);
        View { side, top, left, flip: rng.gen_bool(0.5) }
    }

    /// Applies the view to images [N, C, S, S] (the same view to each).
    pub fn apply(&self, images: &Tensor) -> Tensor {
        let size = images.size()[3];
        let side = self.side as i64;
        let x = if side == size {
            images.shallow_clone()
        } else {
            Tensor::upsample_bicubic2d(images, [side, side], false, None, None)
        };
        let x = x.narrow(2, self.top as i64, size).narrow(3, self.left as i64, size);
        if self.flip {
            x.flip([3])
        } else {
            x.contiguous()
        }
    }
}

/// The RNG of view `view` of image `index` under `seed` (stream 2; the step RNG uses stream 1).
pub fn view_rng(seed: u64, view: usize, index: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(step_seed(step_seed(seed, view as u64), index as u64));
    rng.set_stream(2);
    rng
}

/// View `view` of each image of `images` [N, C, S, S], whose dataset indices are `indices`.
pub fn augment_batch(images: &Tensor, indices: &[usize], seed: u64, view: usize) -> Tensor {
    let size = images.size()[3] as usize;
    let views: Vec<Tensor> = indices
        .iter()
        .enumerate()
        .map(|(i, &index)| View::draw(size, &mut view_rng(seed, view, index)).apply(&images.narrow(0, i as i64, 1)))
        .collect();
    Tensor::cat(&views, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn images() -> Tensor {
        tch::manual_seed(5);
        Tensor::rand([6, 3, 16, 16], (Kind::Float, Device::Cpu)) * 2.0 - 1.0
    }

    #[test]
    fn views_are_deterministic_and_differ() {
        let x = images();
        let idx = [0, 1, 2, 3, 4, 5];
        let a = augment_batch(&x, &idx, 7, 0);
        assert_eq!(a.size(), x.size());
        // Same seed, view and indices: the same tensors, bit for bit.
        assert!(a.equal(&augment_batch(&x, &idx, 7, 0)));
        // Another view, or another seed: other crops.
        assert!(!a.equal(&augment_batch(&x, &idx, 7, 1)));
        assert!(!a.equal(&augment_batch(&x, &idx, 8, 0)));
        // A view depends on the image index, not on its place in the batch.
        let b = augment_batch(&x.narrow(0, 3, 1), &[3], 7, 0);
        assert!(b.equal(&a.narrow(0, 3, 1)));
        // The drawn sides stay in ⌈16/1.0⌉ ..= ⌈16/0.8⌉ = 16..=20 and both sides and flips occur.
        let drawn: Vec<View> = (0..200).map(|i| View::draw(16, &mut view_rng(1, 0, i))).collect();
        assert!(drawn.iter().all(|v| (16..=20).contains(&v.side) && v.top <= v.side - 16 && v.left <= v.side - 16));
        assert!(drawn.iter().any(|v| v.side == 16) && drawn.iter().any(|v| v.side == 20));
        let flips = drawn.iter().filter(|v| v.flip).count();
        assert!((70..=130).contains(&flips), "{flips} flips of 200");
    }

    #[test]
    fn flip_is_an_exact_mirror_and_identity_is_exact() {
        let x = images();
        assert!(View::identity(16).apply(&x).equal(&x));
        let f = View { flip: true, ..View::identity(16) }.apply(&x);
        for col in 0..16 {
            assert!(f.select(3, col).equal(&x.select(3, 15 - col)), "column {col}");
        }
        // A crop of an upscaled image keeps the mirror relation: flip(view) = view with mirrored offset, flipped.
        let v = View { side: 20, top: 1, left: 3, flip: false };
        let mirrored = View { left: 20 - 16 - 3, flip: true, ..v }.apply(&x.flip([3]));
        assert!((v.apply(&x) - mirrored).abs().max().double_value(&[]) < 1e-5);
    }
}
