//! Quality evaluation (`runtime eval`): generate a class-balanced set of images for every (steps, cfg)
//! setting (with the caller's generator), score them with the judge classifier (an `exporter judge`
//! folder), and report
//!
//! - **class accuracy**: the share of generated images the judge assigns to the class they were
//!   generated for;
//! - **Fréchet distance** between the Gaussians of the judge's penultimate-layer features of the generated
//!   images and of the dataset's test split (the FID formula with the judge in place of Inception;
//!   [`crate::stats`]).
//!
//! A reference row scores real test images (the same count per class as each generated set, so the
//! sample-size bias of the distance is the same) against the training split: the distance real data gets.
//! Generated images are rounded to 8-bit pixels before scoring, exactly as a PNG would store them and as
//! the real images are.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use ort::environment::Environment;
use ort::session::Session;
use ort::value::Tensor;
use serde::{Deserialize, Serialize};
use spherear_core::data::{self, Dataset, Split};
use spherear_core::grid::to_u8_pixel;
use spherear_core::judge::JudgeManifest;
use spherear_core::manifest::Manifest;
use spherear_core::request::SampleRequest;

use crate::error::{ort_err, QualityError, Result};
use crate::report::{markdown_table, write_line_chart, LineChart, Series};
use crate::stats::{frechet_distance, Gaussian};

/// The judge classifier loaded into ONNX Runtime.
pub struct Judge {
    pub manifest: JudgeManifest,
    session: Mutex<Session>,
}

/// Judge outputs for a set of images.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub predictions: Vec<i64>,
    /// [n, feature_dim] row-major.
    pub features: Vec<f32>,
}

impl Judge {
    /// Loads an `exporter judge` folder into a session of `env` (the process's one ONNX Runtime
    /// environment, e.g. `runtime::ortlib::environment_with_threads`, whose pool the session shares).
    pub fn load(dir: &Path, env: &Environment) -> Result<Self> {
        if !dir.exists() {
            return Err(QualityError::Io(format!("judge folder {} does not exist", dir.display())));
        }
        let manifest = JudgeManifest::load(dir)?;
        let file = dir.join(&manifest.file);
        if !file.is_file() {
            return Err(QualityError::Model(format!("judge graph {} is missing", file.display())));
        }
        let ctx = format!("loading {}", file.display());
        let session = Session::builder(env).and_then(|mut b| b.commit_from_file(&file)).map_err(ort_err(ctx))?;
        Ok(Judge { manifest, session: Mutex::new(session) })
    }

    /// Scores `images` ([n, C, H, W] in [−1, 1]) in chunks of `batch`.
    pub fn score(&self, images: &[f32], batch: usize) -> Result<Scores> {
        let c = &self.manifest.config;
        let per = c.in_channels * c.image_size * c.image_size;
        if per == 0 || images.len() % per != 0 {
            return Err(QualityError::Invalid(format!(
                "{} values are not whole [{}, {}, {}] images",
                images.len(),
                c.in_channels,
                c.image_size,
                c.image_size
            )));
        }
        let mut session = self.session.lock().map_err(|_| QualityError::Model("judge session lock poisoned".into()))?;
        let mut out = Scores { predictions: Vec::new(), features: Vec::new() };
        for chunk in images.chunks(batch.max(1) * per) {
            let n = chunk.len() / per;
            let input = Tensor::from_array(([n, c.in_channels, c.image_size, c.image_size], chunk.to_vec()))
                .map_err(ort_err("judge input"))?;
            let res = session.run(ort::inputs!["image" => input]).map_err(ort_err("judge"))?;
            let get = |name: &str| -> Result<Vec<f32>> {
                let v = res.get(name).ok_or_else(|| QualityError::Model(format!("judge returned no '{name}'")))?;
                let (_, d) = v.try_extract_tensor::<f32>().map_err(ort_err(format!("judge output {name}")))?;
                Ok(d.to_vec())
            };
            let logits = get("logits")?;
            let feats = get("features")?;
            if logits.len() != n * c.num_classes || feats.len() != n * c.feature_dim {
                return Err(QualityError::Model("judge outputs have unexpected sizes".into()));
            }
            for row in logits.chunks(c.num_classes) {
                let best =
                    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
                out.predictions.push(best.0 as i64);
            }
            out.features.extend(feats);
        }
        Ok(out)
    }
}

/// Rounds images to 8-bit pixels and back (what a PNG stores; how real images arrive).
pub fn quantize_like_png(images: &mut [f32]) {
    for v in images {
        *v = to_u8_pixel(*v) as f32 / 127.5 - 1.0;
    }
}

/// Accuracy of `predictions` against `labels`.
pub fn accuracy(predictions: &[i64], labels: &[i64]) -> f64 {
    let hits = predictions.iter().zip(labels).filter(|(p, l)| p == l).count();
    hits as f64 / labels.len().max(1) as f64
}

/// What to evaluate.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub per_class: usize,
    pub cfgs: Vec<f32>,
    pub steps: Vec<usize>,
    pub seed: u64,
    pub batch: usize,
    /// Dataset spec (`fashion-mnist`, `fashion-mnist:DIR`, or an ImageFolder root).
    pub data: String,
    /// Training images used for the reference statistics (None = all).
    pub train_limit: Option<usize>,
    pub out: Option<PathBuf>,
}

/// One evaluated setting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRow {
    /// `generated` or `reference (real test vs train)`.
    pub kind: String,
    pub steps: Option<usize>,
    pub cfg: Option<f32>,
    pub images: usize,
    pub accuracy: f64,
    pub frechet_distance: f64,
    pub seconds: f64,
}

/// The evaluation report (eval.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub model: String,
    pub judge_test_accuracy: Option<f64>,
    pub feature_dim: usize,
    pub test_images: usize,
    pub train_images: usize,
    pub rows: Vec<EvalRow>,
    pub notes: Vec<String>,
}

/// The first `per_class` images of every class of `d` (in class order), with their labels.
fn balanced(d: &Dataset, per_class: usize) -> (Vec<f32>, Vec<i64>) {
    let mut imgs = Vec::new();
    let mut labels = Vec::new();
    for c in 0..d.num_classes as i64 {
        for i in d.labels.iter().enumerate().filter(|(_, &l)| l == c).map(|(i, _)| i).take(per_class) {
            imgs.extend_from_slice(d.image(i));
            labels.push(c);
        }
    }
    (imgs, labels)
}

/// Scores generated images against a data set's test split with a judge: the judge, the test split and
/// the Gaussian of its features, computed once and shared by every setting (and by the quantization gate).
pub struct TestSplit<'j> {
    pub judge: &'j Judge,
    pub test: Dataset,
    pub test_gauss: Gaussian,
    /// Judge accuracy on the whole test split.
    pub judge_accuracy: f64,
}

/// Images per judge call.
const SCORE_BATCH: usize = 256;

impl<'j> TestSplit<'j> {
    /// Loads the test split of `data` at the model's image size and checks judge, model and data agree.
    pub fn load(judge: &'j Judge, m: &Manifest, data: &str) -> Result<Self> {
        let jc = &judge.manifest.config;
        if jc.image_size != m.image_size || jc.num_classes != m.num_classes || jc.in_channels != 3 {
            return Err(QualityError::Invalid(format!(
                "the judge ({} px, {} classes, {} channels) does not fit the model ({} px, {} classes, 3 channels)",
                jc.image_size, jc.num_classes, jc.in_channels, m.image_size, m.num_classes
            )));
        }
        let test = data::load(&data::parse_source(data), Split::Test, m.image_size, None)?;
        if test.num_classes != m.num_classes {
            return Err(QualityError::Invalid(format!(
                "the dataset has {} classes, the model {}",
                test.num_classes, m.num_classes
            )));
        }
        let scores = judge.score(&test.images, SCORE_BATCH)?;
        let test_gauss = Gaussian::fit(&scores.features, jc.feature_dim)?;
        let judge_accuracy = accuracy(&scores.predictions, &test.labels);
        Ok(TestSplit { judge, test, test_gauss, judge_accuracy })
    }

    /// Images of the smallest class of the test split.
    pub fn smallest_class(&self) -> usize {
        (0..self.test.num_classes as i64)
            .map(|c| self.test.labels.iter().filter(|&&l| l == c).count())
            .min()
            .unwrap_or(0)
    }

    /// (accuracy, Fréchet distance to the test split) of decoded images ([n, 3, H, W] in [−1, 1], rounded
    /// to 8-bit pixels first) generated for `classes`.
    pub fn score(&self, images: &mut [f32], classes: &[i64]) -> Result<(f64, f64)> {
        quantize_like_png(images);
        let s = self.judge.score(images, SCORE_BATCH)?;
        let g = Gaussian::fit(&s.features, self.judge.manifest.config.feature_dim)?;
        Ok((accuracy(&s.predictions, classes), frechet_distance(&g, &self.test_gauss)?))
    }
}

/// Runs the evaluation of the export described by `m`. `generate` turns each setting's request (a class
/// grid) into decoded images [n, 3, H, W] in [−1, 1], in request order; its errors come back as
/// [`QualityError::Generate`].
pub fn evaluate<E>(
    m: &Manifest,
    judge: &Judge,
    o: &EvalOptions,
    mut generate: impl FnMut(&SampleRequest) -> std::result::Result<Vec<f32>, E>,
) -> Result<EvalReport>
where
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let jc = &judge.manifest.config;
    if o.per_class < 2 || o.cfgs.is_empty() || o.steps.is_empty() {
        return Err(QualityError::Invalid("--per-class must be ≥ 2 and --cfg/--steps non-empty".into()));
    }
    let split = TestSplit::load(judge, m, &o.data)?;
    // Generated rows are compared with a reference row of as many real test images per class, and all of a
    // setting's images are scored at once: --per-class is bounded by the smallest test class.
    let k = split.smallest_class();
    if o.per_class > k {
        return Err(QualityError::Invalid(format!(
            "--per-class {} is more than the {k} test images of the smallest class (the reference row needs as many \
             real images per class)",
            o.per_class
        )));
    }
    let test = &split.test;
    let train = data::load(&data::parse_source(&o.data), Split::Train, m.image_size, o.train_limit)?;
    let sb = SCORE_BATCH;
    let train_gauss = Gaussian::fit(&judge.score(&train.images, sb)?.features, jc.feature_dim)?;

    let mut rows = Vec::new();
    // Reference: real test images, per_class of each class, against the training split.
    let t0 = Instant::now();
    let (ref_imgs, ref_labels) = balanced(&test, o.per_class);
    let rs = judge.score(&ref_imgs, sb)?;
    rows.push(EvalRow {
        kind: "reference (real test vs train)".into(),
        steps: None,
        cfg: None,
        images: ref_labels.len(),
        accuracy: accuracy(&rs.predictions, &ref_labels),
        frechet_distance: frechet_distance(&Gaussian::fit(&rs.features, jc.feature_dim)?, &train_gauss)?,
        seconds: t0.elapsed().as_secs_f64(),
    });

    let classes: Vec<i64> = (0..m.num_classes as i64).collect();
    for &steps in &o.steps {
        for &cfg in &o.cfgs {
            let req = SampleRequest::grid(&classes, o.per_class, cfg, steps, o.seed, o.batch)?;
            let t0 = Instant::now();
            let mut images = generate(&req).map_err(|e| QualityError::Generate(e.into()))?;
            let seconds = t0.elapsed().as_secs_f64();
            let (acc, fd) = split.score(&mut images, &req.classes)?;
            rows.push(EvalRow {
                kind: "generated".into(),
                steps: Some(steps),
                cfg: Some(cfg),
                images: req.classes.len(),
                accuracy: acc,
                frechet_distance: fd,
                seconds,
            });
        }
    }
    let report = EvalReport {
        model: m.config.name.clone(),
        judge_test_accuracy: Some(split.judge_accuracy),
        feature_dim: jc.feature_dim,
        test_images: test.len(),
        train_images: train.len(),
        rows,
        notes: vec![
            format!(
                "Judge: {} (accuracy on all {} test images above); features = its {}-d penultimate layer.",
                judge.manifest.dataset,
                test.len(),
                jc.feature_dim
            ),
            format!(
                "Generated rows: {} images per class, seed {}, distance against all {} test images; images rounded \
                 to 8-bit pixels before scoring.",
                o.per_class,
                o.seed,
                test.len()
            ),
            format!(
                "Reference row: the first {} test images of each class against {} training images. The distance \
                 has a sample-size bias (it shrinks with more images), so compare rows of equal size only.",
                o.per_class,
                train.len()
            ),
        ],
    };
    if let Some(dir) = &o.out {
        write_report(dir, &report)?;
    }
    Ok(report)
}

/// The markdown table of a report.
pub fn markdown(r: &EvalReport) -> String {
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            vec![
                x.kind.clone(),
                x.steps.map(|s| s.to_string()).unwrap_or("-".into()),
                x.cfg.map(|c| format!("{c}")).unwrap_or("-".into()),
                x.images.to_string(),
                format!("{:.1}%", 100.0 * x.accuracy),
                format!("{:.3}", x.frechet_distance),
                format!("{:.1}", x.seconds),
            ]
        })
        .collect();
    let mut s = format!(
        "# Quality: {} (judge test accuracy {})\n\n",
        r.model,
        r.judge_test_accuracy.map(|a| format!("{:.2}%", 100.0 * a)).unwrap_or("-".into())
    );
    s.push_str(&markdown_table(
        &["rows", "steps", "cfg", "images", "judge accuracy", "Fréchet distance (judge features)", "seconds"],
        &rows,
    ));
    s.push('\n');
    for n in &r.notes {
        s.push_str(&format!("- {n}\n"));
    }
    s
}

/// Distance vs CFG, one line per step count, the reference as a dashed level.
pub fn chart(r: &EvalReport) -> LineChart {
    let mut steps: Vec<usize> = r.rows.iter().filter_map(|x| x.steps).collect();
    steps.sort_unstable();
    steps.dedup();
    let mut series: Vec<Series> = steps
        .iter()
        .map(|&s| Series {
            label: format!("{s} head steps"),
            points: r
                .rows
                .iter()
                .filter(|x| x.steps == Some(s))
                .filter_map(|x| x.cfg.map(|c| (c as f64, x.frechet_distance)))
                .collect(),
            dashed: false,
            color: None,
        })
        .collect();
    let cfgs: Vec<f64> = r.rows.iter().filter_map(|x| x.cfg.map(|c| c as f64)).collect();
    if let (Some(reference), Some(lo), Some(hi)) = (
        r.rows.iter().find(|x| x.steps.is_none()),
        cfgs.iter().copied().reduce(f64::min),
        cfgs.iter().copied().reduce(f64::max),
    ) {
        series.push(Series {
            label: "real test images vs train".into(),
            points: vec![(lo, reference.frechet_distance), (hi, reference.frechet_distance)],
            dashed: true,
            color: None,
        });
    }
    LineChart {
        title: format!("{}: Fréchet distance in judge features vs CFG", r.model),
        x_label: "CFG scale".into(),
        y_label: "Fréchet distance".into(),
        log_x: false,
        log_y: true,
        series,
    }
}

/// Writes eval.json, eval.md and eval.png into `dir`.
pub fn write_report(dir: &Path, r: &EvalReport) -> Result<()> {
    use spherear_core::fsutil::write_atomic;
    std::fs::create_dir_all(dir).map_err(|e| QualityError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let json = serde_json::to_string_pretty(r).map_err(|e| QualityError::Io(e.to_string()))?;
    write_atomic(&dir.join("eval.json"), json.as_bytes())?;
    write_atomic(&dir.join("eval.md"), markdown(r).as_bytes())?;
    write_line_chart(&dir.join("eval.png"), &chart(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_quantisation() {
        assert_eq!(accuracy(&[1, 2, 3, 4], &[1, 2, 0, 4]), 0.75);
        let mut v = vec![-1.0, 0.0, 0.999, 1.0, -2.0];
        quantize_like_png(&mut v);
        // 127.5·x + 128 truncated: −1 → 0.5 → 0 → −1; 0 → 128 → 0.0039; 1 → 255 → 1.
        assert_eq!(v[0], -1.0);
        assert!((v[1] - (128.0 / 127.5 - 1.0)).abs() < 1e-7);
        assert_eq!(v[3], 1.0);
        assert_eq!(v[4], -1.0);
    }

    #[test]
    fn balanced_subset_takes_per_class_in_class_order() {
        let d = Dataset {
            images: (0..6).flat_map(|i| vec![i as f32; 3]).collect(),
            labels: vec![1, 0, 1, 0, 0, 1],
            num_classes: 2,
            class_names: vec!["a".into(), "b".into()],
            size: 1,
        };
        let (imgs, labels) = balanced(&d, 2);
        assert_eq!(labels, vec![0, 0, 1, 1]);
        assert_eq!(imgs.iter().step_by(3).copied().collect::<Vec<_>>(), vec![1.0, 3.0, 0.0, 2.0]);
    }
}
