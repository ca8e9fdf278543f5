//! Activation statistics and calibration ranges, as ONNX Runtime's `onnxruntime.quantization.calibrate`
//! computes them (and TensorRT's entropy calibrator before it).
//!
//! Collection (streaming: one batch of values at a time, memory = the histograms):
//! - [`MinMax`]: running minimum and maximum (`MinMaxCalibrater`, no moving average).
//! - [`Histogram::collect_abs`]: histogram of |x| whose bins keep their width and are appended when a
//!   batch exceeds the last edge (`HistogramCollector.collect_absolute_value`, used by the symmetric
//!   percentile method).
//! - [`Histogram::collect_signed`]: histogram of x over [−t, t], t = max |x| so far; a batch with a larger
//!   t widens the range by whole old bins on both sides and moves the old counts into the middle
//!   (`HistogramCollector.collect_value` / `merge_histogram`, used by the entropy method).
//!
//! Bin edges are float32 as numpy computes them (`np.linspace` in float32, `np.arange` fill), and values
//! are binned with numpy's rules (uniform bins: index guess then correction against the edges; explicit
//! edges: left-closed bins, the last one closed).
//!
//! Ranges ([`Method`]): `minmax` = (min, max); `percentile` = symmetric percentile of |x|
//! (`compute_percentile` with symmetric=True): t = the edge `searchsorted(cdf, p / 100)` of the |x|
//! histogram, (−t, t) clipped to the observed (min, max); `entropy` = the KL-divergence threshold of
//! `get_entropy_threshold` (TensorRT's algorithm as ONNX Runtime implements it, quirks included: the
//! expanded candidate distribution is truncated to integers and spread over every bin of a merged group,
//! both distributions are smoothed with eps = 1e-4 in float32, the KL value is stored as float32 and the
//! first minimum wins), clipped to (min, max). The oracle test compares these with ONNX Runtime's python
//! code on the same histograms.

/// Bins of a new histogram (TensorRT's entropy calibrator and ONNX Runtime's percentile default).
pub const DEFAULT_BINS: usize = 2048;
/// Quantized bins of the entropy method (int8: 128 levels per side).
pub const QUANTIZED_BINS: usize = 128;
/// Default percentile of the percentile method.
pub const DEFAULT_PERCENTILE: f64 = 99.99;

/// How a tensor's range is computed from its statistics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    MinMax,
    /// Symmetric percentile of |x| (0 < p ≤ 100).
    Percentile(f64),
    Entropy,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::MinMax => "minmax",
            Method::Percentile(_) => "percentile",
            Method::Entropy => "entropy",
        }
    }
}

/// Running min/max (NaN ignored).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MinMax {
    pub min: f32,
    pub max: f32,
    /// Values seen.
    pub count: u64,
}

impl Default for MinMax {
    fn default() -> Self {
        MinMax { min: f32::INFINITY, max: f32::NEG_INFINITY, count: 0 }
    }
}

impl MinMax {
    pub fn update(&mut self, data: &[f32]) {
        for &v in data {
            if v < self.min {
                self.min = v;
            }
            if v > self.max {
                self.max = v;
            }
        }
        self.count += data.len() as u64;
    }
    /// (min, max), (0, 0) before any value.
    pub fn range(&self) -> (f32, f32) {
        if self.min > self.max {
            (0.0, 0.0)
        } else {
            (self.min, self.max)
        }
    }
}

/// min and max of a batch ignoring NaN (numpy `nanmin`/`nanmax`); (0, 0) when empty or all NaN.
fn batch_min_max(data: &[f32]) -> (f32, f32) {
    let mut m = MinMax::default();
    m.update(data);
    m.range()
}

/// A histogram with float32 edges (`counts.len() + 1` of them) and the (min, max) of the signed values.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub edges: Vec<f32>,
    pub min: f32,
    pub max: f32,
    /// Signed histograms: the half-width t of the range [−t, t] (0 for |x| histograms).
    pub threshold: f32,
}

/// `np.linspace(lo, hi, n + 1, dtype=float32)` for float32 `lo`, `hi`.
pub fn linspace_f32(lo: f32, hi: f32, n: usize) -> Vec<f32> {
    let step = (hi - lo) / n as f32;
    let mut e: Vec<f32> =
        (0..=n).map(|i| if step == 0.0 { (i as f32 / n as f32) * (hi - lo) } else { i as f32 * step } + lo).collect();
    if let Some(last) = e.last_mut() {
        *last = hi;
    }
    e
}

/// numpy's uniform-bin histogram of `data` over `[lo, hi]` with `n` bins: the edges and the counts.
/// Values outside the range (and NaN) are not counted; `lo == hi` widens the range by 0.5 on both sides.
pub fn np_histogram_uniform(data: &[f32], n: usize, lo: f32, hi: f32) -> (Vec<u64>, Vec<f32>) {
    let (lo, hi) = if lo == hi { (lo - 0.5, hi + 0.5) } else { (lo, hi) };
    let edges = linspace_f32(lo, hi, n);
    let mut counts = vec![0u64; n];
    let denom = hi - lo;
    for &v in data {
        if !(v >= lo && v <= hi) {
            continue;
        }
        let f = ((v - lo) / denom) * n as f32;
        let mut i = (f as usize).min(n - 1);
        if v < edges[i] && i > 0 {
            i -= 1;
        } else if i + 1 < n && v >= edges[i + 1] {
            i += 1;
        }
        counts[i] += 1;
    }
    (counts, edges)
}

/// numpy's histogram of `data` with explicit increasing `edges` (bins `[e_i, e_{i+1})`, the last closed).
pub fn np_histogram_edges(data: &[f32], edges: &[f32]) -> Vec<u64> {
    let n = edges.len() - 1;
    let mut counts = vec![0u64; n];
    let (lo, hi) = (edges[0], edges[n]);
    for &v in data {
        if !(v >= lo && v <= hi) {
            continue;
        }
        // First edge > v, minus one: bin with e_i <= v < e_{i+1}.
        let i = edges.partition_point(|&e| e <= v);
        counts[(i.max(1) - 1).min(n - 1)] += 1;
    }
    counts
}

/// [`np_histogram_edges`] against float64 edges.
fn np_histogram_edges_f64(data: &[f32], edges: &[f64]) -> Vec<u64> {
    let n = edges.len() - 1;
    let mut counts = vec![0u64; n];
    let (lo, hi) = (edges[0], edges[n]);
    for &v in data {
        let v = f64::from(v);
        if !(v >= lo && v <= hi) {
            continue;
        }
        let i = edges.partition_point(|&e| e <= v);
        counts[(i.max(1) - 1).min(n - 1)] += 1;
    }
    counts
}

impl Histogram {
    /// Adds a batch to a histogram of |x| (`collect_absolute_value`); `bins` sizes a new histogram.
    pub fn collect_abs(h: &mut Option<Histogram>, data: &[f32], bins: usize) {
        let (mn, mx) = batch_min_max(data);
        let abs: Vec<f32> = data.iter().map(|v| v.abs()).filter(|v| !v.is_nan()).collect();
        match h {
            None => {
                let (alo, ahi) = batch_min_max(&abs);
                let (lo, hi) = if abs.is_empty() { (0.0, 1.0) } else { (alo, ahi) };
                let (counts, edges) = np_histogram_uniform(&abs, bins, lo, hi);
                *h = Some(Histogram { counts, edges, min: mn, max: mx, threshold: 0.0 });
            }
            Some(old) => {
                let amax = batch_min_max(&abs).1;
                let last = old.edges[old.edges.len() - 1];
                let counts = if amax > last {
                    // np.arange(last + width, amax + width, width) on float32 scalars: float64 values, the
                    // first two rounded through float32 (start, start + width), the rest start + i·delta in
                    // float64. The batch is binned against these float64 edges; they are stored as float32.
                    let width = old.edges[1] - old.edges[0];
                    let (start, stop) = (last + width, amax + width);
                    let len = ((f64::from(stop) - f64::from(start)) / f64::from(width)).ceil().max(0.0) as usize;
                    let mut edges: Vec<f64> = old.edges.iter().map(|&e| f64::from(e)).collect();
                    let (s0, s1) = (f64::from(start), f64::from(start + width));
                    for i in 0..len {
                        edges.push(match i {
                            0 => s0,
                            1 => s1,
                            _ => s0 + i as f64 * (s1 - s0),
                        });
                    }
                    let c = np_histogram_edges_f64(&abs, &edges);
                    old.edges = edges.iter().map(|&e| e as f32).collect();
                    c
                } else {
                    np_histogram_edges(&abs, &old.edges)
                };
                let mut merged = counts;
                for (m, o) in merged.iter_mut().zip(&old.counts) {
                    *m += o;
                }
                old.counts = merged;
                old.min = old.min.min(mn);
                old.max = old.max.max(mx);
            }
        }
    }

    /// Adds a batch to a signed histogram over [−t, t] (`collect_value` / `merge_histogram`).
    pub fn collect_signed(h: &mut Option<Histogram>, data: &[f32], bins: usize) {
        let (mn, mx) = batch_min_max(data);
        let t = mn.abs().max(mx.abs());
        match h {
            None => {
                let (counts, edges) = np_histogram_uniform(data, bins, -t, t);
                *h = Some(Histogram { counts, edges, min: mn, max: mx, threshold: t });
            }
            Some(old) => {
                let n_old = old.counts.len();
                if t <= old.threshold {
                    let (c, _) = np_histogram_uniform(data, n_old, -old.threshold, old.threshold);
                    for (o, n) in old.counts.iter_mut().zip(c) {
                        *o += n;
                    }
                } else if old.threshold == 0.0 {
                    let (mut c, e) = np_histogram_uniform(data, n_old, -t, t);
                    for (n, o) in c.iter_mut().zip(&old.counts) {
                        *n += o;
                    }
                    old.counts = c;
                    old.edges = e;
                    old.threshold = t;
                } else {
                    let stride = 2.0 * old.threshold / n_old as f32;
                    let half = (((t - old.threshold) / stride).floor() + 1.0) as usize;
                    let n_new = n_old + 2 * half;
                    let t_new = half as f32 * stride + old.threshold;
                    let (mut c, e) = np_histogram_uniform(data, n_new, -t_new, t_new);
                    for (n, o) in c[half..n_new - half].iter_mut().zip(&old.counts) {
                        *n += o;
                    }
                    old.counts = c;
                    old.edges = e;
                    old.threshold = t_new;
                }
                old.min = old.min.min(mn);
                old.max = old.max.max(mx);
            }
        }
    }

    /// The symmetric percentile range of an |x| histogram (`compute_percentile`, symmetric=True).
    pub fn percentile_range(&self, percentile: f64) -> (f32, f32) {
        let total: u64 = self.counts.iter().sum();
        let target = percentile / 100.0;
        let mut cdf = 0f64;
        let mut idx = self.counts.len();
        for (i, &c) in self.counts.iter().enumerate() {
            cdf += c as f64 / total.max(1) as f64;
            if cdf >= target {
                idx = i;
                break;
            }
        }
        let t = self.edges[idx];
        clip_to(-t, t, self.min, self.max)
    }

    /// The KL-divergence (entropy) range of a signed histogram (`get_entropy_threshold`), or `None` when
    /// the histogram has fewer bins than `quantized_bins` (ONNX Runtime fails there too).
    pub fn entropy_range(&self, quantized_bins: usize) -> Option<(f32, f32)> {
        let hist = &self.counts;
        let n = hist.len();
        let zero = n / 2;
        let half = quantized_bins / 2;
        if quantized_bins == 0 || zero < half {
            return None;
        }
        let mut best: Option<(f32, (f32, f32))> = None;
        for i in half..=zero {
            let start = zero - i;
            let end = (zero + i + 1).min(n);
            let thr = (self.edges[start], self.edges[end]);
            let sliced = &hist[start..end];
            let mut p: Vec<u64> = sliced.to_vec();
            p[0] += hist[..start].iter().sum::<u64>();
            let last = p.len() - 1;
            p[last] += hist[end..].iter().sum::<u64>();
            let merged = sliced.len() / quantized_bins;
            let mut qb = vec![0u64; quantized_bins];
            for (k, q) in qb.iter_mut().enumerate() {
                *q = sliced[k * merged..(k + 1) * merged].iter().sum();
            }
            qb[quantized_bins - 1] += sliced[quantized_bins * merged..].iter().sum::<u64>();
            let mut q = vec![0u64; p.len()];
            for (k, &qv) in qb.iter().enumerate() {
                let (s, e) = (k * merged, (k + 1) * merged);
                let norm = p[s..e].iter().filter(|&&v| v != 0).count();
                if norm != 0 {
                    let v = (qv as f64 / norm as f64).trunc() as u64;
                    q[s..e].fill(v);
                }
            }
            let kl = match (smooth(&p), smooth(&q)) {
                (Some(ps), Some(qs)) => kl_f32(&ps, &qs),
                _ => f32::INFINITY,
            };
            // numpy argmin: the first minimum (a NaN would win; KL here is never NaN).
            if best.is_none_or(|(b, _)| kl < b) {
                best = Some((kl, thr));
            }
        }
        let (_, (lo, hi)) = best?;
        Some(clip_to(lo, hi, self.min, self.max))
    }
}

fn clip_to(lo: f32, hi: f32, min: f32, max: f32) -> (f32, f32) {
    (if lo < min { min } else { lo }, if hi > max { max } else { hi })
}

/// `smooth_distribution(p, eps=0.0001)` in float32; `None` when every entry is zero.
fn smooth(p: &[u64]) -> Option<Vec<f32>> {
    let zeros = p.iter().filter(|&&v| v == 0).count();
    let nonzeros = p.len() - zeros;
    if nonzeros == 0 {
        return None;
    }
    let eps = 0.0001f32;
    let eps1 = (0.0001f64 * zeros as f64 / nonzeros as f64) as f32;
    Some(p.iter().map(|&v| if v == 0 { 0.0 + eps } else { v as f32 + (0.0 - eps1) }).collect())
}

/// numpy's float32 `np.sum` of a contiguous array: the first element plus the pairwise sum of the rest.
pub fn np_sum_f32(a: &[f32]) -> f32 {
    match a.split_first() {
        None => 0.0,
        Some((first, rest)) => first + pairwise_sum(rest),
    }
}

fn pairwise_sum(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        let mut res = 0f32;
        for &v in a {
            res += v;
        }
        res
    } else if n <= 128 {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[i..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

/// `scipy.stats.entropy(p, q)` on float32 arrays: both normalised in float32, `rel_entr` per element
/// (computed in float64, stored as float32), summed as numpy sums float32.
fn kl_f32(p: &[f32], q: &[f32]) -> f32 {
    let (sp, sq) = (np_sum_f32(p), np_sum_f32(q));
    let terms: Vec<f32> = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| {
            let (a, b) = (f64::from(a / sp), f64::from(b / sq));
            let v = if a > 0.0 && b > 0.0 {
                a * (a / b).ln()
            } else if a == 0.0 && b >= 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
            v as f32
        })
        .collect();
    np_sum_f32(&terms)
}

/// Statistics of one tensor: min/max always, plus the histogram its method needs.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorStats {
    pub minmax: MinMax,
    pub hist: Option<Histogram>,
    /// Rank of the tensor as observed (all observations must agree).
    pub rank: usize,
}

impl TensorStats {
    pub fn new(rank: usize) -> Self {
        TensorStats { minmax: MinMax::default(), hist: None, rank }
    }

    /// Adds one observed batch of values.
    pub fn collect(&mut self, data: &[f32], method: Method, bins: usize) {
        self.minmax.update(data);
        match method {
            Method::MinMax => {}
            Method::Percentile(_) => Histogram::collect_abs(&mut self.hist, data, bins),
            Method::Entropy => Histogram::collect_signed(&mut self.hist, data, bins),
        }
    }

    /// The calibrated (low, high) range; `None` if the method cannot compute one (see
    /// [`Histogram::entropy_range`]).
    pub fn range(&self, method: Method) -> Option<(f32, f32)> {
        match (method, &self.hist) {
            (Method::MinMax, _) => Some(self.minmax.range()),
            (Method::Percentile(p), Some(h)) => Some(h.percentile_range(p)),
            (Method::Entropy, Some(h)) => h.entropy_range(QUANTIZED_BINS),
            (_, None) => Some(self.minmax.range()),
        }
    }
}

/// The symmetric int8 amplitude of a range: max(|low|, |high|).
pub fn amax(range: (f32, f32)) -> f32 {
    range.0.abs().max(range.1.abs())
}

/// The symmetric int8 scale of an amplitude: amax / 127 (1 for an all-zero tensor, whose every value
/// quantizes to 0 whatever the scale).
pub fn int8_scale(amax: f32) -> f32 {
    if amax > 0.0 && amax.is_finite() {
        amax / 127.0
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(counts: &[u64], lo: f32, hi: f32, min: f32, max: f32) -> Histogram {
        Histogram { counts: counts.to_vec(), edges: linspace_f32(lo, hi, counts.len()), min, max, threshold: 0.0 }
    }

    #[test]
    fn minmax_by_hand() {
        let mut s = TensorStats::new(2);
        s.collect(&[0.5, -2.0, 1.0], Method::MinMax, 16);
        s.collect(&[3.0, f32::NAN, -1.0], Method::MinMax, 16);
        assert_eq!(s.range(Method::MinMax), Some((-2.0, 3.0)));
        assert_eq!(amax((-2.0, 3.0)), 3.0);
        assert_eq!(int8_scale(3.0), 3.0 / 127.0);
        assert_eq!(int8_scale(0.0), 1.0);
        assert_eq!(MinMax::default().range(), (0.0, 0.0));
    }

    #[test]
    fn percentile_by_hand() {
        // |x| histogram over [0, 10], 10 bins of width 1, 128 values: 96, 16, 8, 4, 4, then zeros; the cdf is
        // 0.75, 0.875, 0.9375, 0.96875, 1 (exact in binary).
        let counts = [96, 16, 8, 4, 4, 0, 0, 0, 0, 0];
        let h = hist(&counts, 0.0, 10.0, -4.5, 4.2);
        // The left edge of the first bin whose cdf reaches p / 100 (ORT's searchsorted choice).
        assert_eq!(h.percentile_range(87.5), (-1.0, 1.0));
        assert_eq!(h.percentile_range(90.0), (-2.0, 2.0));
        assert_eq!(h.percentile_range(95.0), (-3.0, 3.0));
        assert_eq!(h.percentile_range(100.0), (-4.0, 4.0));
        // Clipped to the observed signed range.
        let h = hist(&counts, 0.0, 10.0, -3.5, 3.9);
        assert_eq!(h.percentile_range(100.0), (-3.5, 3.9));
    }

    #[test]
    fn entropy_of_a_uniform_histogram_keeps_the_full_range() {
        // Uniform counts: no clipping can lower the KL divergence below the full range's (exact, 0 for
        // 256 bins merged by 2 into 128 → q equals p). The candidates start at 128 bins (±64).
        let counts = vec![10u64; 256];
        let h = Histogram { threshold: 8.0, ..hist(&counts, -8.0, 8.0, -8.0, 8.0) };
        assert_eq!(h.entropy_range(128), Some((-8.0, 8.0)));
        // Too few bins for 128 quantized bins: no range (ORT fails on this too).
        let h = hist(&[1, 2, 3, 4], -1.0, 1.0, -1.0, 1.0);
        assert_eq!(h.entropy_range(128), None);
    }

    #[test]
    fn entropy_clips_a_long_tail() {
        // A peaked histogram with one far outlier on each side: the best threshold lies well inside.
        let n = 1024;
        let mut counts = vec![0u64; n];
        for (i, c) in counts.iter_mut().enumerate() {
            let x = (i as f64 + 0.5 - n as f64 / 2.0) / 40.0;
            *c = (1e5 * (-x * x / 2.0).exp()) as u64;
        }
        counts[0] = 1;
        counts[n - 1] = 1;
        let h = Histogram { threshold: 10.0, ..hist(&counts, -10.0, 10.0, -10.0, 10.0) };
        let (lo, hi) = h.entropy_range(128).unwrap();
        // Candidate slices have an odd number of bins (zero bin ± i): high is one bin wider than −low.
        let width = 20.0 / n as f32;
        assert!((hi + lo - width).abs() < 1e-5 && hi > 0.5 && hi < 9.0, "{lo} {hi}");
    }

    #[test]
    fn signed_collection_widens_by_whole_bins() {
        let mut h = None;
        Histogram::collect_signed(&mut h, &[-1.0, 0.5, 1.0], 8);
        let a = h.clone().unwrap();
        assert_eq!(a.edges, linspace_f32(-1.0, 1.0, 8));
        assert_eq!(a.counts, vec![1, 0, 0, 0, 0, 0, 1, 1]);
        // t = 1.6 > 1: stride 0.25, half = floor(0.6 / 0.25) + 1 = 3 bins each side → 14 bins over ±1.75.
        Histogram::collect_signed(&mut h, &[1.6], 8);
        let b = h.unwrap();
        assert_eq!(b.counts.len(), 14);
        assert_eq!(b.threshold, 1.75);
        assert_eq!(b.counts.iter().sum::<u64>(), 4);
        assert_eq!(&b.counts[3..11], &a.counts[..]);
        assert_eq!(b.counts[13], 1);
        assert_eq!((b.min, b.max), (-1.0, 1.6));
    }

    #[test]
    fn abs_collection_appends_bins_of_the_same_width() {
        let mut h = None;
        Histogram::collect_abs(&mut h, &[0.0, -1.0, 0.5, 1.0, 2.0], 4);
        let a = h.clone().unwrap();
        assert_eq!(a.edges, vec![0.0, 0.5, 1.0, 1.5, 2.0]);
        assert_eq!(a.counts, vec![1, 1, 2, 1]);
        Histogram::collect_abs(&mut h, &[-2.9], 4);
        let b = h.unwrap();
        assert_eq!(b.edges, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
        assert_eq!(b.counts, vec![1, 1, 2, 1, 0, 1]);
        assert_eq!((b.min, b.max), (-2.9, 2.0));
    }
}
