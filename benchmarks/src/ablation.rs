//! `bench ablation`: the posterior ablation's summary (paper §4.3, Fig. 4 on Fashion-MNIST). `make ablation`
//! trains one VAE + AR model per (posterior, seed) into `RUNS/<posterior>-seed<N>/` with the same steps,
//! evaluates each with `runtime eval` into its `eval/eval.json`; this module gathers those reports with
//! the runs' VAE metrics (`vae-metrics.json`: held-out PSNR) and AR metrics (`ar-metrics.json`: the
//! Gaussian latent scale), and writes `ablation.json` (every run and the per-posterior summary),
//! `ablation.md` (tables) and `ablation.png` (Fréchet distance vs CFG: per posterior the mean over seeds,
//! solid, and the min–max envelope over seeds, dashed).
//!
//! The posterior of a run is its `config.json`'s `vae.posterior` (absent: spherical); its seed is the
//! folder name's `-seed<N>` suffix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use quality::eval::EvalReport;
use quality::report::{markdown_table, write_line_chart, LineChart, Series};
use serde::{Deserialize, Serialize};
use spherear_core::fsutil::write_atomic;

/// Errors of the summary: a missing or malformed input names the file.
#[derive(Debug, thiserror::Error)]
pub enum AblationError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Output(String),
}

pub type Result<T> = std::result::Result<T, AblationError>;

/// One generated row of a run's evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRow {
    pub steps: usize,
    pub cfg: f32,
    pub images: usize,
    pub accuracy: f64,
    pub frechet_distance: f64,
}

/// One (posterior, seed) run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// The run folder's name.
    pub run: String,
    pub posterior: String,
    pub seed: u64,
    /// Held-out VAE PSNR (dB) from the posterior mode and from one sample.
    pub psnr_mode_db: Option<f64>,
    pub psnr_sample_db: Option<f64>,
    /// The Gaussian latent scale of the AR stage (absent for latents on the sphere).
    pub latent_scale: Option<f64>,
    /// The evaluation's reference row: real test images vs the training split.
    pub reference_frechet_distance: Option<f64>,
    pub rows: Vec<RunRow>,
}

/// Mean, minimum and maximum over seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub mean: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(v: &[f64]) -> Option<Spread> {
        if v.is_empty() {
            return None;
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Spread { mean, min, max })
    }

    fn cell(&self, digits: usize) -> String {
        format!("{:.digits$} [{:.digits$}, {:.digits$}]", self.mean, self.min, self.max)
    }
}

/// One (posterior, head steps, cfg) point over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SummaryRow {
    pub posterior: String,
    pub steps: usize,
    pub cfg: f32,
    pub seeds: Vec<u64>,
    pub frechet_distance: Spread,
    pub accuracy: Spread,
}

/// The VAE of one posterior over seeds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeRow {
    pub posterior: String,
    pub seeds: Vec<u64>,
    pub psnr_mode_db: Option<Spread>,
    pub psnr_sample_db: Option<Spread>,
}

/// `ablation.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ablation {
    pub runs: Vec<RunResult>,
    pub summary: Vec<SummaryRow>,
    pub vae: Vec<VaeRow>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| AblationError::Input(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| AblationError::Input(format!("{}: invalid JSON: {e}", path.display())))
}

/// The seed of a run folder named `<anything>-seed<N>`.
fn seed_of(name: &str) -> Option<u64> {
    name.rsplit_once("-seed").and_then(|(_, s)| s.parse().ok())
}

/// Reads one run folder (config.json, vae-metrics.json, eval/eval.json; ar-metrics.json if present).
pub fn read_run(dir: &Path) -> Result<RunResult> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let seed = seed_of(&name)
        .ok_or_else(|| AblationError::Input(format!("{}: run folders are named <posterior>-seed<N>", dir.display())))?;
    let config: serde_json::Value = read_json(&dir.join("config.json"))?;
    let posterior = config["vae"]["posterior"].as_str().unwrap_or("spherical").to_string();
    let vae: serde_json::Value = read_json(&dir.join("vae-metrics.json"))?;
    let ar_path = dir.join("ar-metrics.json");
    let latent_scale =
        if ar_path.exists() { read_json::<serde_json::Value>(&ar_path)?["latent_scale"].as_f64() } else { None };
    let eval: EvalReport = read_json(&dir.join("eval").join("eval.json"))?;
    let rows: Vec<RunRow> = eval
        .rows
        .iter()
        .filter_map(|r| {
            Some(RunRow {
                steps: r.steps?,
                cfg: r.cfg?,
                images: r.images,
                accuracy: r.accuracy,
                frechet_distance: r.frechet_distance,
            })
        })
        .collect();
    if rows.is_empty() {
        return Err(AblationError::Input(format!("{}: no generated rows", dir.join("eval/eval.json").display())));
    }
    Ok(RunResult {
        run: name,
        posterior,
        seed,
        psnr_mode_db: vae["psnr_mode_db"].as_f64(),
        psnr_sample_db: vae["psnr_sample_db"].as_f64(),
        latent_scale,
        reference_frechet_distance: eval.rows.iter().find(|r| r.steps.is_none()).map(|r| r.frechet_distance),
        rows,
    })
}

/// Every run folder under `root` (each subfolder with an `eval/eval.json`), sorted by name.
pub fn find_runs(root: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(root)
        .map_err(|e| AblationError::Input(format!("cannot read the runs folder {}: {e}", root.display())))?;
    let mut dirs: Vec<PathBuf> =
        entries.flatten().map(|e| e.path()).filter(|p| p.join("eval").join("eval.json").is_file()).collect();
    dirs.sort();
    if dirs.is_empty() {
        return Err(AblationError::Input(format!(
            "{}: no run folder with eval/eval.json (run `make ablation` first)",
            root.display()
        )));
    }
    Ok(dirs)
}

/// Groups the runs by posterior (spherical first, then by name) and (steps, cfg).
pub fn summarize(runs: Vec<RunResult>) -> Ablation {
    let order = |p: &str| (p != "spherical", p.to_string());
    let mut posteriors: Vec<String> = runs.iter().map(|r| r.posterior.clone()).collect();
    posteriors.sort_by_key(|p| order(p));
    posteriors.dedup();
    let mut summary = Vec::new();
    let mut vae = Vec::new();
    for p in &posteriors {
        let mine: Vec<&RunResult> = runs.iter().filter(|r| &r.posterior == p).collect();
        let mut points: BTreeMap<(usize, u32), Vec<(u64, &RunRow)>> = BTreeMap::new();
        for r in &mine {
            for row in &r.rows {
                points.entry((row.steps, row.cfg.to_bits())).or_default().push((r.seed, row));
            }
        }
        let mut rows: Vec<SummaryRow> = points
            .into_values()
            .filter_map(|v| {
                let fd: Vec<f64> = v.iter().map(|(_, r)| r.frechet_distance).collect();
                let acc: Vec<f64> = v.iter().map(|(_, r)| r.accuracy).collect();
                Some(SummaryRow {
                    posterior: p.clone(),
                    steps: v[0].1.steps,
                    cfg: v[0].1.cfg,
                    seeds: v.iter().map(|(s, _)| *s).collect(),
                    frechet_distance: Spread::of(&fd)?,
                    accuracy: Spread::of(&acc)?,
                })
            })
            .collect();
        rows.sort_by(|a, b| (a.steps, a.cfg).partial_cmp(&(b.steps, b.cfg)).unwrap_or(std::cmp::Ordering::Equal));
        summary.extend(rows);
        let psnr = |f: fn(&RunResult) -> Option<f64>| Spread::of(&mine.iter().filter_map(|r| f(r)).collect::<Vec<_>>());
        vae.push(VaeRow {
            posterior: p.clone(),
            seeds: mine.iter().map(|r| r.seed).collect(),
            psnr_mode_db: psnr(|r| r.psnr_mode_db),
            psnr_sample_db: psnr(|r| r.psnr_sample_db),
        });
    }
    Ablation { runs, summary, vae }
}

impl Ablation {
    /// `ablation.md`: the generation table (mean [min, max] over seeds) and the VAE table.
    pub fn markdown(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .summary
            .iter()
            .map(|r| {
                vec![
                    r.posterior.clone(),
                    r.steps.to_string(),
                    format!("{}", r.cfg),
                    r.seeds.len().to_string(),
                    r.frechet_distance.cell(2),
                    Spread { mean: 100.0 * r.accuracy.mean, min: 100.0 * r.accuracy.min, max: 100.0 * r.accuracy.max }
                        .cell(1),
                ]
            })
            .collect();
        let vae: Vec<Vec<String>> = self
            .vae
            .iter()
            .map(|v| {
                let cell = |s: &Option<Spread>| s.map_or("–".into(), |s| s.cell(2));
                vec![v.posterior.clone(), v.seeds.len().to_string(), cell(&v.psnr_mode_db), cell(&v.psnr_sample_db)]
            })
            .collect();
        let reference = self.runs.iter().filter_map(|r| r.reference_frechet_distance).collect::<Vec<_>>();
        let mut s = String::from("# Posterior ablation (Fashion-MNIST)\n\nMean [min, max] over seeds.\n\n");
        s += &markdown_table(
            &["posterior", "head steps", "cfg", "seeds", "Fréchet distance", "judge accuracy %"],
            &rows,
        );
        if let Some(r) = Spread::of(&reference) {
            s += &format!("\nReal test images vs train (reference row): Fréchet distance {}.\n", r.cell(2));
        }
        s += "\n## VAE (held-out PSNR, dB)\n\n";
        s += &markdown_table(&["posterior", "seeds", "PSNR (mode)", "PSNR (sample)"], &vae);
        s
    }

    /// Fréchet distance vs CFG at the largest step count evaluated: per posterior the mean over seeds and
    /// the min–max envelope (dashed: the minimum left to right, then the maximum back).
    pub fn chart(&self) -> LineChart {
        let steps = self.summary.iter().map(|r| r.steps).max().unwrap_or(0);
        let mut series = Vec::new();
        for (i, v) in self.vae.iter().enumerate() {
            let pts: Vec<&SummaryRow> =
                self.summary.iter().filter(|r| r.posterior == v.posterior && r.steps == steps).collect();
            let at =
                |f: fn(&Spread) -> f64| pts.iter().map(|r| (r.cfg as f64, f(&r.frechet_distance))).collect::<Vec<_>>();
            series.push(Series {
                label: format!("{} (mean of {} seeds)", v.posterior, v.seeds.len()),
                points: at(|s| s.mean),
                dashed: false,
                color: Some(i),
            });
            let mut envelope = at(|s| s.min);
            envelope.extend(at(|s| s.max).into_iter().rev());
            if let Some(&first) = envelope.first() {
                envelope.push(first);
            }
            series.push(Series {
                label: format!("{} min–max over seeds", v.posterior),
                points: envelope,
                dashed: true,
                color: Some(i),
            });
        }
        LineChart {
            title: format!("Posterior ablation: Fréchet distance in judge features vs CFG ({steps} head steps)"),
            x_label: "CFG scale".into(),
            y_label: "Fréchet distance".into(),
            log_x: false,
            log_y: false,
            series,
        }
    }

    /// Writes ablation.json, ablation.md and ablation.png into `out` (created if needed).
    pub fn write(&self, out: &Path) -> Result<()> {
        let io = |e: String| AblationError::Output(e);
        std::fs::create_dir_all(out).map_err(|e| io(format!("cannot create {}: {e}", out.display())))?;
        let json = serde_json::to_string_pretty(self).map_err(|e| io(e.to_string()))?;
        write_atomic(&out.join("ablation.json"), json.as_bytes()).map_err(|e| io(e.to_string()))?;
        write_atomic(&out.join("ablation.md"), self.markdown().as_bytes()).map_err(|e| io(e.to_string()))?;
        write_line_chart(&out.join("ablation.png"), &self.chart()).map_err(|e| io(e.to_string()))
    }
}

/// `bench ablation`: reads every run under `runs`, writes the summary into `out`, returns it.
pub fn run(runs: &Path, out: &Path) -> Result<Ablation> {
    let results = find_runs(runs)?.iter().map(|d| read_run(d)).collect::<Result<Vec<_>>>()?;
    let a = summarize(results);
    a.write(out)?;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use quality::eval::EvalRow;

    /// A fake run folder: FD = base + cfg-dependent shape, accuracy fixed.
    fn fake_run(root: &Path, posterior: Option<&str>, seed: u64, base: f64, psnr: f64) {
        let name = format!("{}-seed{seed}", posterior.unwrap_or("spherical"));
        let dir = root.join(&name);
        std::fs::create_dir_all(dir.join("eval")).unwrap();
        let vae = match posterior {
            Some(p) => serde_json::json!({ "posterior": p }),
            None => serde_json::json!({}),
        };
        std::fs::write(dir.join("config.json"), serde_json::json!({ "vae": vae }).to_string()).unwrap();
        std::fs::write(
            dir.join("vae-metrics.json"),
            serde_json::json!({ "psnr_mode_db": psnr, "psnr_sample_db": psnr - 1.0 }).to_string(),
        )
        .unwrap();
        if posterior == Some("gaussian") {
            std::fs::write(dir.join("ar-metrics.json"), r#"{"latent_scale": 0.5}"#).unwrap();
        }
        let mut rows = vec![EvalRow {
            kind: "reference (real test vs train)".into(),
            steps: None,
            cfg: None,
            images: 40,
            accuracy: 0.9,
            frechet_distance: 0.7,
            seconds: 0.0,
        }];
        for cfg in [1.0f32, 3.0] {
            rows.push(EvalRow {
                kind: "generated".into(),
                steps: Some(10),
                cfg: Some(cfg),
                images: 40,
                accuracy: 0.5 + 0.1 * cfg as f64,
                frechet_distance: base + 10.0 / cfg as f64,
                seconds: 1.0,
            });
        }
        let report = EvalReport {
            model: name,
            judge_test_accuracy: Some(0.9),
            feature_dim: 128,
            test_images: 40,
            train_images: 40,
            rows,
            notes: vec![],
        };
        std::fs::write(dir.join("eval/eval.json"), serde_json::to_string(&report).unwrap()).unwrap();
    }

    #[test]
    fn gathers_runs_into_mean_min_max_per_posterior() {
        let dir = tempfile::tempdir().unwrap();
        let runs = dir.path().join("runs");
        // Spherical: one run without the posterior field (an old config), one with it.
        fake_run(&runs, None, 0, 5.0, 20.0);
        fake_run(&runs, Some("spherical"), 1, 7.0, 22.0);
        fake_run(&runs, Some("gaussian"), 0, 20.0, 18.0);
        fake_run(&runs, Some("gaussian"), 1, 30.0, 19.0);
        std::fs::create_dir_all(runs.join("not-a-run")).unwrap();
        let out = dir.path().join("bench");
        let a = run(&runs, &out).unwrap();
        assert_eq!(a.runs.len(), 4);
        assert_eq!(a.summary.len(), 4, "2 posteriors × 2 cfgs");
        let s1 = &a.summary[0];
        assert_eq!((s1.posterior.as_str(), s1.cfg, s1.seeds.clone()), ("spherical", 1.0, vec![0, 1]));
        // FD at cfg 1: 15 and 17 → mean 16; gaussian at cfg 3: 20 + 3.33, 30 + 3.33.
        assert_eq!(s1.frechet_distance, Spread { mean: 16.0, min: 15.0, max: 17.0 });
        let g3 = a.summary.iter().find(|r| r.posterior == "gaussian" && r.cfg == 3.0).unwrap();
        assert!((g3.frechet_distance.mean - (25.0 + 10.0 / 3.0)).abs() < 1e-12);
        assert!((g3.accuracy.mean - 0.8).abs() < 1e-12);
        assert_eq!(a.vae[1].psnr_mode_db, Some(Spread { mean: 18.5, min: 18.0, max: 19.0 }));
        assert_eq!(a.runs.iter().filter_map(|r| r.latent_scale).collect::<Vec<_>>(), vec![0.5, 0.5]);
        let md = std::fs::read_to_string(out.join("ablation.md")).unwrap();
        assert!(md.contains("| spherical | 10 | 1 | 2 | 16.00 [15.00, 17.00] | 60.0 [60.0, 60.0] |"), "{md}");
        assert!(md.contains("| gaussian | 2 | 18.50 [18.00, 19.00] | 17.50 [17.00, 18.00] |"), "{md}");
        let back: Ablation =
            serde_json::from_str(&std::fs::read_to_string(out.join("ablation.json")).unwrap()).unwrap();
        assert_eq!(back, a);
        let png = std::fs::read(out.join("ablation.png")).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 1000, "{} bytes", png.len());
        // The chart: per posterior a mean line and a closed min–max envelope.
        let c = a.chart();
        assert_eq!(c.series.len(), 4);
        assert_eq!(c.series[0].points, vec![(1.0, 16.0), (3.0, 6.0 + 10.0 / 3.0)]);
        assert_eq!(c.series[1].points.len(), 5);
        assert_eq!(c.series[1].points.first(), c.series[1].points.last());
        // A posterior's mean and envelope share a colour; the posteriors differ.
        assert_eq!((c.series[0].color, c.series[1].color, c.series[2].color), (Some(0), Some(0), Some(1)));
    }

    #[test]
    fn missing_inputs_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = run(&dir.path().join("none"), dir.path()).unwrap_err().to_string();
        assert!(e.contains("cannot read the runs folder"), "{e}");
        let e = run(dir.path(), &dir.path().join("o")).unwrap_err().to_string();
        assert!(e.contains("no run folder with eval/eval.json"), "{e}");
        fake_run(dir.path(), Some("gaussian"), 0, 1.0, 1.0);
        std::fs::remove_file(dir.path().join("gaussian-seed0/vae-metrics.json")).unwrap();
        let e = run(dir.path(), &dir.path().join("o")).unwrap_err().to_string();
        assert!(e.contains("vae-metrics.json"), "{e}");
        let bad = dir.path().join("odd");
        std::fs::create_dir_all(bad.join("eval")).unwrap();
        assert!(read_run(&bad).unwrap_err().to_string().contains("<posterior>-seed<N>"));
    }
}
