//! `bench speed`: throughput of the runtime across batch sizes, head steps and precisions, the libtorch
//! reference sampler (`trainer sample`) on the same checkpoint and settings, and the roofline of every row
//! from the analytic cost model ([`crate::cost`]) and this machine's measured peaks.
//!
//! Bounded run time: each setting samples only the first `tokens` tokens of every image (a
//! [`spherear_core::request::SampleRequest::token_limit`]) and extrapolates to whole images from the
//! per-call means ([`spherear_core::timing::Timing`]); every extrapolated row is labelled so. One untimed
//! 2-token warm-up pass runs before each timed setting, in both samplers.

use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use calibration::calibrate::CalibrateOptions;
use calibration::histogram::{Method, DEFAULT_PERCENTILE};
use calibration::quantize::{QuantizeOptions, WeightBits};
use spherear_core::manifest::{Manifest, PrecisionKind};
use spherear_core::timing::{peak_rss_bytes, reset_peak_rss, Timing};
use spherear_core::ModelConfig;

use quality::report::{markdown_table, write_line_chart, LineChart, Series};
use runtime::{GenerateRequest, Generator, GeneratorOptions};

use crate::cost::{datasheet_gpus, Bound, Machine, ModelCost, Setting};
use crate::micro::{matmul_rate, read_bandwidth, Bandwidth, MatmulRate};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct SpeedOptions {
    /// Export folders (any precisions); a precision without one is exported from `checkpoint`.
    pub models: Vec<PathBuf>,
    /// Trainer checkpoint folder: the reference sampler's model, and the source of missing exports.
    pub checkpoint: Option<PathBuf>,
    pub batch_sizes: Vec<usize>,
    pub steps: Vec<usize>,
    pub precisions: Vec<Precision>,
    pub cfg: f32,
    /// Tokens per image to time (0 = all).
    pub tokens: usize,
    pub out: PathBuf,
    /// The `trainer` binary (default: next to this executable).
    pub trainer: Option<PathBuf>,
    pub no_baseline: bool,
    pub threads: Option<usize>,
    /// Seconds each machine microbenchmark runs.
    pub micro_seconds: f64,
    pub ort_lib: Option<PathBuf>,
    pub progress: bool,
}

/// A precision of the runtime graphs: the export's (`ar_step`'s) [`PrecisionKind`]: fp32 and fp16 exports,
/// weight-only int8/int4 (`calibration quantize`).
pub type Precision = PrecisionKind;

/// Bytes per element of the KV cache (and of the weights where an export does not count them).
fn kv_bytes(p: Precision) -> usize {
    if p == Precision::Fp16 {
        2
    } else {
        4
    }
}

/// Images of the calibration that makes a benchmark's int8 export (its speed does not depend on the ranges).
const INT8_CALIBRATION_IMAGES: usize = 2;

/// Precisions made from the fp32 export (weight-only w8/w4, calibrated int8) rather than from the checkpoint.
fn derived(p: Precision) -> bool {
    matches!(p, Precision::W8 | Precision::W4 | Precision::Int8)
}

/// The precision an export runs at: its `ar_step`'s.
fn precision_of(m: &Manifest) -> Option<Precision> {
    m.graph_precision("ar_step").map(|g| g.kind)
}

/// One timed sampler on one setting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measured {
    pub timing: Timing,
    pub seconds_per_image: f64,
    pub images_per_second: f64,
    pub extrapolated: bool,
}

impl Measured {
    fn new(timing: Timing) -> Self {
        Measured {
            seconds_per_image: timing.seconds_per_image(),
            images_per_second: timing.images_per_second(),
            extrapolated: timing.extrapolated(),
            timing,
        }
    }
}

/// One row of the table: a (precision, steps, batch) setting.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpeedRow {
    pub precision: Precision,
    pub steps: usize,
    pub batch: usize,
    pub runtime: Measured,
    /// The libtorch reference (fp32 whatever the row's precision), if run.
    pub reference: Option<Measured>,
    /// Why there is no reference, if so.
    pub reference_note: Option<String>,
    /// runtime images/s ÷ reference images/s.
    pub speedup: Option<f64>,
    pub flops_per_image: f64,
    pub bytes_per_image: f64,
    pub bound: Bound,
    /// Roofline bound ÷ measured time (both per image), in percent.
    pub pct_roofline: f64,
    /// Byte time alone ÷ measured time: the share of the memory-bandwidth roofline reached.
    pub pct_bandwidth: f64,
    /// FLOP time alone ÷ measured time: the share of the FLOP roofline reached.
    pub pct_flops: f64,
    /// Share of the (extrapolated) time spent in the diffusion head.
    pub head_share: f64,
}

/// A measured machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MachineReport {
    pub threads: usize,
    pub matmul_fp32: MatmulRate,
    pub matmul_fp16: Option<MatmulRate>,
    pub bandwidth: Bandwidth,
}

/// A projected GPU row (analytic roofline upper bound).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Projection {
    pub gpu: String,
    pub precision: Precision,
    pub steps: usize,
    pub batch: usize,
    pub images_per_second_bound: f64,
    pub source: String,
}

/// A target of the issue, checked against the measured rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: Option<f64>,
    pub threshold: f64,
    pub met: Option<bool>,
}

/// Everything `bench speed` measured (written as speed.json).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpeedReport {
    pub model: String,
    pub ar_parameters: usize,
    pub num_tokens: usize,
    pub cfg: f32,
    pub tokens_timed: usize,
    pub machine: MachineReport,
    pub rows: Vec<SpeedRow>,
    pub projections: Vec<Projection>,
    pub targets: Vec<TargetCheck>,
    pub notes: Vec<String>,
}

type Res<T> = anyhow::Result<T>;

/// The files a run writes into `--out` (besides the `export-*` folders it makes from `--checkpoint`).
pub const RESULT_FILES: [&str; 3] = ["speed.json", "speed.md", "speed.png"];

/// Every `--model` must be an export of the `--checkpoint`'s model (same config), checked before any
/// export or measurement. Returns that config.
fn check_inputs_match(o: &SpeedOptions) -> Res<ModelConfig> {
    let (cfg, origin) = match (&o.checkpoint, o.models.first()) {
        (Some(ckpt), _) => (ModelConfig::load(&ckpt.join("config.json"))?, format!("--checkpoint {}", ckpt.display())),
        (None, Some(m)) => (Manifest::load(m)?.config, format!("--model {}", m.display())),
        (None, None) => anyhow::bail!("give --model (an export folder) and/or --checkpoint (a trainer run folder)"),
    };
    for m in &o.models {
        let man = Manifest::load(m)?;
        if man.config != cfg {
            anyhow::bail!(
                "--model {} is an export of a '{}' model that differs from {origin} ('{}'); give exports of one \
                 model (and its checkpoint), or leave --model out to export the checkpoint",
                m.display(),
                man.config.name,
                cfg.name
            );
        }
    }
    Ok(cfg)
}

/// Finds (or makes) an export of each precision: fp32/fp16 exported from `--checkpoint`, w8/w4 quantized
/// (`calibration quantize`, default block size and accuracy level 4) from the fp32 export.
fn exports(o: &SpeedOptions) -> Res<Vec<(Precision, PathBuf, Manifest)>> {
    let mut have = Vec::new();
    for m in &o.models {
        let man = Manifest::load(m)?;
        have.push((m.clone(), man));
    }
    let max_batch = o.batch_sizes.iter().max().copied().unwrap_or(1) * 2;
    let mut out: Vec<(Precision, PathBuf, Manifest)> = Vec::new();
    // fp32 first: the quantized precisions are made from it.
    let mut wanted = o.precisions.clone();
    if wanted.iter().any(|&p| derived(p)) && !wanted.contains(&Precision::Fp32) {
        wanted.insert(0, Precision::Fp32);
    }
    wanted.sort_by_key(|&p| derived(p));
    for p in wanted {
        if let Some((dir, man)) = have.iter().find(|(_, m)| precision_of(m) == Some(p)) {
            out.push((p, dir.clone(), man.clone()));
            continue;
        }
        let dir = o.out.join(format!("export-{}", p.name()));
        // Always a fresh export: a folder left by an earlier run may come from another checkpoint or exporter.
        if derived(p) {
            let Some((_, src, _)) = out.iter().find(|(q, _, _)| *q == Precision::Fp32) else {
                anyhow::bail!("no fp32 export to quantize to {p}");
            };
            eprintln!("quantizing {} to {} ({})", src.display(), dir.display(), p.name());
            if let Some(bits) = p.weight_bits() {
                let w = if bits == 8 { WeightBits::Int8 } else { WeightBits::Int4 };
                let q = QuantizeOptions { force: true, ..QuantizeOptions::new(src, &dir, w) };
                calibration::quantize::quantize_export(&q, &mut |_, _| {})?;
            } else {
                // Speed does not depend on the ranges: a small calibration (quality: `calibration calibrate`).
                let c = CalibrateOptions {
                    force: true,
                    calls_per_graph: 8,
                    batch: 1,
                    cfg: Some(o.cfg),
                    ..CalibrateOptions::new(src, &dir, INT8_CALIBRATION_IMAGES, Method::Percentile(DEFAULT_PERCENTILE))
                };
                calibration::calibrate::calibrate_export(&c, &mut |_| {})?;
            }
        } else {
            let ckpt = o.checkpoint.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "no {} export among --model and no --checkpoint to export one from; pass --model DIR of an \
                     `exporter onnx{}` folder or --checkpoint RUN",
                    p.name(),
                    if p == Precision::Fp16 { " --fp16" } else { "" }
                )
            })?;
            eprintln!("exporting {} ({}) to {}", ckpt.display(), p.name(), dir.display());
            let opts = exporter::ExportOptions {
                fp16: p == Precision::Fp16,
                max_batch: max_batch.max(64),
                force: true,
                ..exporter::ExportOptions::new(ckpt, &dir)
            };
            exporter::export(&opts)?;
        }
        let man = Manifest::load(&dir)?;
        out.push((p, dir, man));
    }
    out.retain(|(p, _, _)| o.precisions.contains(p));
    let cfgs: Vec<&ModelConfig> = out.iter().map(|(_, _, m)| &m.config).collect();
    if cfgs.windows(2).any(|w| w[0] != w[1]) {
        anyhow::bail!("the exports given for different precisions have different model configs");
    }
    Ok(out)
}

fn trainer_binary(o: &SpeedOptions) -> Option<PathBuf> {
    if let Some(p) = &o.trainer {
        return Some(p.clone());
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join("trainer");
    p.is_file().then_some(p)
}

/// Runs the reference sampler on one setting (a `trainer sample --token-limit … --timing-json …` process).
fn reference(
    trainer: &Path,
    ckpt: &Path,
    o: &SpeedOptions,
    classes: &[i64],
    steps: usize,
    tokens: usize,
) -> Res<Timing> {
    let tmp = tempfile_path(&o.out, "reference-timing.json");
    let list: Vec<String> = classes.iter().map(|c| c.to_string()).collect();
    let mut cmd = Command::new(trainer);
    if let Some(t) = o.threads {
        cmd.arg("--threads").arg(t.to_string());
    }
    cmd.arg("sample")
        .arg("--checkpoint")
        .arg(ckpt)
        .arg("--classes")
        .arg(list.join(","))
        .args(["--per-class", "1", "--seed", "0", "--quiet"])
        .arg("--cfg")
        .arg(o.cfg.to_string())
        .arg("--steps")
        .arg(steps.to_string())
        .arg("--batch")
        .arg(classes.len().to_string())
        .arg("--token-limit")
        .arg(tokens.to_string())
        .arg("--timing-json")
        .arg(&tmp);
    let out = cmd.output().map_err(|e| anyhow::anyhow!("cannot run {}: {e}", trainer.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("{} sample failed: {}", trainer.display(), err.trim().lines().last().unwrap_or(""));
    }
    let text = std::fs::read_to_string(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    Ok(serde_json::from_str(&text)?)
}

fn tempfile_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!(".{name}.{}", std::process::id()))
}

fn runtime_row(g: &Generator, classes: &[i64], cfg: f32, steps: usize, tokens: usize) -> Res<Timing> {
    let batch = classes.len();
    let warm =
        GenerateRequest { classes: classes.to_vec(), cfg, steps, seed: 1, first_image: 0, batch, token_limit: Some(2.min(tokens)) };
    g.generate_tokens(&warm, |_| {})?;
    let req = GenerateRequest { seed: 0, token_limit: Some(tokens), ..warm };
    reset_peak_rss();
    let (tok, stats) = g.generate_tokens(&req, |_| {})?;
    let mut timing = stats.timing;
    g.decode_timed(&tok, batch, &mut timing)?;
    timing.peak_rss_bytes = peak_rss_bytes();
    Ok(timing)
}

fn pct(a: f64, b: f64) -> f64 {
    100.0 * a / b.max(1e-30)
}

/// Runs the whole benchmark and writes speed.json, speed.md and speed.png into `o.out`.
pub fn run(o: &SpeedOptions) -> Res<SpeedReport> {
    if o.batch_sizes.is_empty() || o.batch_sizes.contains(&0) {
        anyhow::bail!("--batch-sizes must list positive sizes");
    }
    if o.steps.is_empty() || o.steps.contains(&0) {
        anyhow::bail!("--steps must list positive step counts");
    }
    if o.precisions.is_empty() {
        anyhow::bail!("--precision must list fp32 and/or fp16");
    }
    if !(o.cfg.is_finite() && o.cfg >= 1.0) {
        anyhow::bail!("--cfg must be ≥ 1");
    }
    // The microbenchmarks loop until this many seconds have passed: an infinite value never ends.
    if !(o.micro_seconds.is_finite() && o.micro_seconds >= 0.0) {
        anyhow::bail!("--micro-seconds must be a finite number ≥ 0, got {}", o.micro_seconds);
    }
    if o.models.is_empty() && o.checkpoint.is_none() {
        anyhow::bail!("give --model (an export folder) and/or --checkpoint (a trainer run folder)");
    }
    if let Some(c) = &o.checkpoint {
        if !c.join("ar.safetensors").is_file() {
            anyhow::bail!("--checkpoint {} has no ar.safetensors (a trainer AR run folder is needed)", c.display());
        }
    }
    let l = check_inputs_match(o)?.num_tokens();
    let tokens = if o.tokens == 0 { l } else { o.tokens.min(l) };
    if tokens < 2 && l > 1 {
        anyhow::bail!("--tokens must be ≥ 2 (one AR step must be timed to extrapolate)");
    }
    spherear_core::fsutil::check_dir_output(&o.out)?;
    std::fs::create_dir_all(&o.out).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", o.out.display()))?;
    // A new run's results replace the old ones only when it finishes: remove the old ones now, so a run
    // that fails leaves no stale table that looks like its own.
    for f in RESULT_FILES {
        let p = o.out.join(f);
        if p.is_file() {
            std::fs::remove_file(&p).map_err(|e| anyhow::anyhow!("cannot remove the old {}: {e}", p.display()))?;
        }
    }
    let exports = exports(o)?;
    let cfg = exports[0].2.config.clone();
    let options = GeneratorOptions { threads: o.threads, ort_lib: o.ort_lib.clone(), ..Default::default() };
    let (env, _) = runtime::ortlib::environment_with_threads(o.ort_lib.as_deref(), o.threads)?;

    // Machine peaks.
    eprintln!("measuring this machine (matrix multiply through ONNX Runtime, memory read bandwidth)…");
    let threads = o.threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    // The peak is the best of two shapes (a square product and a transformer-like one), each best-of-runs:
    // a single short probe on a shared VM under-measures, and rows then exceed 100 %.
    let best = |fp16: bool| -> Res<MatmulRate> {
        let a = matmul_rate(&env, o.threads, (1024, 1024, 1024), fp16, o.micro_seconds)?;
        let b = matmul_rate(&env, o.threads, (512, 768, 3072), fp16, o.micro_seconds)?;
        Ok(if a.flops_per_s >= b.flops_per_s { a } else { b })
    };
    let matmul_fp32 = best(false)?;
    let matmul_fp16 = if o.precisions.contains(&Precision::Fp16) { Some(best(true)?) } else { None };
    let bandwidth = read_bandwidth(1 << 30, threads, o.micro_seconds);
    let machine = MachineReport { threads, matmul_fp32, matmul_fp16, bandwidth };
    let here = |p: Precision| Machine {
        name: "this machine (measured)".into(),
        flops_per_s: match (p, &machine.matmul_fp16) {
            (Precision::Fp16, Some(r)) => r.flops_per_s,
            _ => machine.matmul_fp32.flops_per_s,
        },
        bytes_per_s: machine.bandwidth.bytes_per_s,
        source: "measured by this run".into(),
    };
    let cost = ModelCost::new(&cfg);
    let doubled = o.cfg > 1.0;

    let trainer = if o.no_baseline { None } else { trainer_binary(o) };
    let mut reference_note = None;
    if o.no_baseline {
        reference_note = Some("--no-baseline".to_string());
    } else if o.checkpoint.is_none() {
        reference_note = Some("no --checkpoint: the reference sampler needs the trainer checkpoint".to_string());
    } else if trainer.is_none() {
        reference_note = Some("no trainer binary next to bench (build it, or pass --trainer)".to_string());
    }
    if let Some(n) = &reference_note {
        eprintln!("reference (libtorch) rows skipped: {n}");
    }

    let total = exports.len() * o.steps.len() * o.batch_sizes.len();
    let bar = if o.progress {
        let b = ProgressBar::new(total as u64);
        b.set_style(
            ProgressStyle::with_template("bench [{bar:30}] {pos}/{len} settings  {msg}  eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::hidden())
    };
    let mut refs: Vec<((usize, usize), Result<Timing, String>)> = Vec::new();
    let mut rows = Vec::new();
    for (p, dir, man) in &exports {
        let g = Generator::with_manifest(dir, man.clone(), &options)?;
        for &steps in &o.steps {
            for &batch in &o.batch_sizes {
                bar.set_message(format!("{} steps {steps} batch {batch}", p.name()));
                let classes: Vec<i64> = (0..batch).map(|i| (i % cfg.num_classes) as i64).collect();
                let rt = Measured::new(runtime_row(&g, &classes, o.cfg, steps, tokens)?);
                // The reference is fp32 and shared by both precisions' rows.
                let reference = match (&trainer, &o.checkpoint) {
                    (Some(t), Some(c)) => {
                        if !refs.iter().any(|(k, _)| *k == (steps, batch)) {
                            let r = reference(t, c, o, &classes, steps, tokens).map_err(|e| format!("{e:#}"));
                            refs.push(((steps, batch), r));
                        }
                        refs.iter().find(|(k, _)| *k == (steps, batch)).map(|(_, r)| r.clone())
                    }
                    _ => None,
                };
                let (reference, note) = match reference {
                    Some(Ok(t)) => (Some(Measured::new(t)), None),
                    Some(Err(e)) => (None, Some(e)),
                    None => (None, reference_note.clone()),
                };
                let setting = Setting { batch, steps, cfg: doubled, bytes_per_elem: kv_bytes(*p) };
                let cost = cost.with_export_bytes(man);
                let img = cost.per_image(&setting);
                let bound = cost.bound(&setting, &here(*p));
                let full = rt.timing.full_batch();
                let total_s = full.prefill + full.ar_step + full.head + full.host + full.decoder;
                let row = SpeedRow {
                    precision: *p,
                    steps,
                    batch,
                    speedup: reference.as_ref().map(|r| rt.images_per_second / r.images_per_second),
                    reference,
                    reference_note: note,
                    flops_per_image: img.flops,
                    bytes_per_image: img.bytes,
                    pct_roofline: pct(bound.seconds, rt.seconds_per_image),
                    pct_bandwidth: pct(bound.byte_seconds, rt.seconds_per_image),
                    pct_flops: pct(bound.flop_seconds, rt.seconds_per_image),
                    head_share: full.head / total_s.max(1e-30),
                    bound,
                    runtime: rt,
                };
                if o.progress {
                    bar.println(summary_line(&cfg.name, &row));
                } else {
                    eprintln!("{}", summary_line(&cfg.name, &row));
                }
                rows.push(row);
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();

    let mut projections = Vec::new();
    // GPU projections for the unquantized precisions (the quantized kernels have their own rates).
    for &p in o.precisions.iter().filter(|&&p| !derived(p)) {
        for gpu in datasheet_gpus(p == Precision::Fp16) {
            for &steps in &o.steps {
                for &batch in &o.batch_sizes {
                    let s = Setting { batch, steps, cfg: doubled, bytes_per_elem: kv_bytes(p) };
                    projections.push(Projection {
                        gpu: gpu.name.clone(),
                        precision: p,
                        steps,
                        batch,
                        images_per_second_bound: cost.bound(&s, &gpu).images_per_second(),
                        source: gpu.source.clone(),
                    });
                }
            }
        }
    }
    let targets = targets(&rows);
    let notes = vec![
        "Peak RSS is the process's peak while the row ran (reset per row); ONNX Runtime's CPU arena keeps buffers \
         of earlier, larger rows, so a runtime row can show memory inherited from the rows before it."
            .to_string(),
        format!(
            "Each setting times the first {tokens} of {l} tokens per image (plus prefill and one decoder run) and \
             extrapolates: prefill + (L-1) x mean AR step + L x mean head/host time per token + decoder; rows \
             marked * are extrapolated."
        ),
        "The reference is `trainer sample` (libtorch, fp32) on the same checkpoint, classes, cfg, steps and \
         batch, run as a separate process with the same token limit and warm-up."
            .into(),
        "Roofline: analytic FLOPs (2 x MACs of matmuls/convolutions + attention) and weight bytes per image \
         (every weight read once per call; KV cache reads included) from core::cost, against this machine's \
         measured ONNX Runtime MatMul rate (best of 1024^3 and 512x768x3072) and 2-thread... read bandwidth. % bandwidth = byte time / \
         measured time; % FLOPs = FLOP time / measured time; % roofline = max-bound / measured."
            .replace("2-thread... ", &format!("{threads}-thread ")),
        "GPU projections are analytic roofline upper bounds from datasheet peaks, not measurements.".into(),
    ];
    let report = SpeedReport {
        model: cfg.name.clone(),
        ar_parameters: crate::cost::ar_params(&cfg),
        num_tokens: l,
        cfg: o.cfg,
        tokens_timed: tokens,
        machine,
        rows,
        projections,
        targets,
        notes,
    };
    write_outputs(&o.out, &report)?;
    Ok(report)
}

fn targets(rows: &[SpeedRow]) -> Vec<TargetCheck> {
    let find = |b: usize| rows.iter().find(|r| r.precision == Precision::Fp32 && r.steps == 10 && r.batch == b);
    let mut t = Vec::new();
    let mut add = |name: &str, v: Option<f64>, th: f64| {
        t.push(TargetCheck { target: name.into(), measured: v, threshold: th, met: v.map(|v| v >= th) });
    };
    add("runtime fp32 / reference, batch 1, 10 steps (x)", find(1).and_then(|r| r.speedup), 3.0);
    add("runtime fp32 / reference, batch 16, 10 steps (x)", find(16).and_then(|r| r.speedup), 1.5);
    add("% of bandwidth roofline, fp32 batch 1, 10 steps", find(1).map(|r| r.pct_bandwidth), 70.0);
    let big = rows
        .iter()
        .filter(|r| r.precision == Precision::Fp32 && r.steps == 10 && r.batch >= 16)
        .map(|r| r.pct_flops)
        .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))));
    add("% of FLOP roofline, fp32 batch >= 16, 10 steps (best)", big, 70.0);
    let ratio = |p: Precision| {
        let at1 = |q: Precision| rows.iter().find(|r| r.precision == q && r.steps == 10 && r.batch == 1);
        Some(at1(p)?.runtime.images_per_second / at1(Precision::Fp32)?.runtime.images_per_second)
    };
    add("w8 / fp32 images/s, batch 1, 10 steps (x)", ratio(Precision::W8), 1.5);
    add("w4 / fp32 images/s, batch 1, 10 steps (x)", ratio(Precision::W4), 2.0);
    t
}

/// One line per setting, printed as the benchmark goes (and by `make demo`).
pub fn summary_line(model: &str, r: &SpeedRow) -> String {
    let star = if r.runtime.extrapolated { "*" } else { "" };
    let reference = match (&r.reference, r.speedup) {
        (Some(x), Some(s)) => format!("reference {:.3} img/s, {s:.2}x", x.images_per_second),
        _ => format!("reference: {}", r.reference_note.as_deref().unwrap_or("not run")),
    };
    format!(
        "{model} {} steps {} batch {}: runtime {:.3} img/s{star} ({:.3} s/img), {reference}; {:.0}% of roofline \
         ({:.0}% bandwidth, {:.0}% FLOPs); head {:.0}% of time",
        r.precision.name(),
        r.steps,
        r.batch,
        r.runtime.images_per_second,
        r.runtime.seconds_per_image,
        r.pct_roofline,
        r.pct_bandwidth,
        r.pct_flops,
        100.0 * r.head_share
    )
}

fn f3(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn gib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.2}", b as f64 / (1u64 << 30) as f64)).unwrap_or_else(|| "-".into())
}

/// The markdown report.
pub fn markdown(r: &SpeedReport) -> String {
    let m = &r.machine;
    let mut s = format!(
        "# Speed: {} ({} AR+head parameters, {} tokens, cfg {})\n\n",
        r.model, r.ar_parameters, r.num_tokens, r.cfg
    );
    s.push_str(&format!(
        "Machine ({} threads): ONNX Runtime MatMul {}x{}x{} fp32 **{:.1} GFLOP/s** (best shape){}; read bandwidth **{:.1} GB/s** \
         ({} MiB buffer).\n\n",
        m.threads,
        m.matmul_fp32.m,
        m.matmul_fp32.k,
        m.matmul_fp32.n,
        m.matmul_fp32.flops_per_s / 1e9,
        m.matmul_fp16.as_ref().map(|h| format!(", fp16 {:.1} GFLOP/s", h.flops_per_s / 1e9)).unwrap_or_default(),
        m.bandwidth.bytes_per_s / 1e9,
        m.bandwidth.buffer_bytes >> 20
    ));
    let headers = [
        "precision",
        "steps",
        "batch",
        "runtime img/s",
        "s/img",
        "prefill / AR / head / host / decoder (s per batch)",
        "reference img/s",
        "runtime ÷ ref",
        "GFLOP/img",
        "GB/img",
        "% roofline",
        "% BW",
        "% FLOP",
        "peak RSS GiB (rt / ref)",
    ];
    let rows: Vec<Vec<String>> = r
        .rows
        .iter()
        .map(|x| {
            let f = x.runtime.timing.full_batch();
            let star = if x.runtime.extrapolated { "*" } else { "" };
            vec![
                x.precision.name().into(),
                x.steps.to_string(),
                x.batch.to_string(),
                format!("{}{star}", f3(x.runtime.images_per_second)),
                f3(x.runtime.seconds_per_image),
                format!("{} / {} / {} / {} / {}", f3(f.prefill), f3(f.ar_step), f3(f.head), f3(f.host), f3(f.decoder)),
                x.reference.as_ref().map(|m| format!("{}{star}", f3(m.images_per_second))).unwrap_or("-".into()),
                x.speedup.map(|v| format!("{v:.2}x")).unwrap_or("-".into()),
                f3(x.flops_per_image / 1e9),
                f3(x.bytes_per_image / 1e9),
                format!("{:.0}", x.pct_roofline),
                format!("{:.0}", x.pct_bandwidth),
                format!("{:.0}", x.pct_flops),
                format!(
                    "{} / {}",
                    gib(x.runtime.timing.peak_rss_bytes),
                    gib(x.reference.as_ref().and_then(|m| m.timing.peak_rss_bytes))
                ),
            ]
        })
        .collect();
    s.push_str(&markdown_table(&headers, &rows));
    s.push('\n');
    if let Some(n) = r.rows.iter().find_map(|x| x.reference_note.clone()) {
        s.push_str(&format!("Reference rows missing: {n}\n\n"));
    }
    s.push_str("## Targets (fp32, 10 steps)\n\n");
    let t: Vec<Vec<String>> = r
        .targets
        .iter()
        .map(|t| {
            vec![
                t.target.clone(),
                t.measured.map(|v| format!("{v:.2}")).unwrap_or("not measured".into()),
                format!("{}", t.threshold),
                match t.met {
                    Some(true) => "met".into(),
                    Some(false) => "**missed**".into(),
                    None => "-".into(),
                },
            ]
        })
        .collect();
    s.push_str(&markdown_table(&["target", "measured", "threshold", ""], &t));
    s.push_str("\n## Projection: A100 / H100 (analytic roofline upper bound, NOT measured)\n\n");
    let p: Vec<Vec<String>> = r
        .projections
        .iter()
        .map(|p| {
            vec![
                p.gpu.clone(),
                p.precision.name().into(),
                p.steps.to_string(),
                p.batch.to_string(),
                f3(p.images_per_second_bound),
            ]
        })
        .collect();
    s.push_str(&markdown_table(&["GPU", "precision", "steps", "batch", "≤ img/s"], &p));
    let mut srcs: Vec<String> = r.projections.iter().map(|p| format!("{}: {}", p.gpu, p.source)).collect();
    srcs.sort();
    srcs.dedup();
    s.push('\n');
    for x in srcs {
        s.push_str(&format!("- {x}\n"));
    }
    s.push_str("\n## Notes\n\n");
    for n in &r.notes {
        s.push_str(&format!("- {n}\n"));
    }
    s
}

/// The chart: images/s vs batch size, one line per precision × steps (runtime solid, reference dashed).
pub fn chart(r: &SpeedReport) -> LineChart {
    let mut series = Vec::new();
    let mut keys: Vec<(Precision, usize)> = r.rows.iter().map(|x| (x.precision, x.steps)).collect();
    keys.dedup();
    for (p, steps) in &keys {
        let pts = |f: &dyn Fn(&SpeedRow) -> Option<f64>| -> Vec<(f64, f64)> {
            r.rows
                .iter()
                .filter(|x| x.precision == *p && x.steps == *steps)
                .filter_map(|x| f(x).map(|v| (x.batch as f64, v)))
                .collect()
        };
        series.push(Series {
            label: format!("runtime {} {} steps", p.name(), steps),
            points: pts(&|x| Some(x.runtime.images_per_second)),
            dashed: false,
            color: None,
        });
        if *p == Precision::Fp32 {
            let rp = pts(&|x| x.reference.as_ref().map(|m| m.images_per_second));
            if !rp.is_empty() {
                series.push(Series { label: format!("libtorch reference {steps} steps"), points: rp, dashed: true, color: None });
            }
        }
    }
    LineChart {
        title: format!("{}: throughput vs batch size (cfg {}, this machine)", r.model, r.cfg),
        x_label: "batch size".into(),
        y_label: "images / s".into(),
        log_x: true,
        log_y: true,
        series,
    }
}

fn write_outputs(dir: &Path, r: &SpeedReport) -> Res<()> {
    use spherear_core::fsutil::write_atomic;
    write_atomic(&dir.join("speed.json"), serde_json::to_string_pretty(r)?.as_bytes())?;
    write_atomic(&dir.join("speed.md"), markdown(r).as_bytes())?;
    write_line_chart(&dir.join("speed.png"), &chart(r))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn infinite_micro_seconds_is_an_error() {
        let o = SpeedOptions {
            models: vec![PathBuf::from("/nonexistent/export")],
            checkpoint: None,
            batch_sizes: vec![1],
            steps: vec![1],
            precisions: vec![Precision::Fp32],
            cfg: 1.0,
            tokens: 8,
            out: PathBuf::from("/nonexistent/out"),
            trainer: None,
            no_baseline: true,
            threads: None,
            micro_seconds: f64::INFINITY,
            ort_lib: None,
            progress: false,
        };
        let e = run(&o).unwrap_err().to_string();
        assert!(e.contains("--micro-seconds must be a finite number"), "{e}");
    }
}
