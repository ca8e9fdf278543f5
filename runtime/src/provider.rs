//! Execution providers: `cpu` (default), `cuda` and `tensorrt`, registered explicitly on every session.
//!
//! A GPU provider that the loaded ONNX Runtime does not offer, or whose registration fails (missing CUDA /
//! TensorRT libraries, no device), falls back to CPU with one `warn` line, or is an error with `strict`.
//! The decision is made once per [`crate::Generator`] and reported by [`ProviderReport`].

use std::path::{Path, PathBuf};

use ort::ep::{self, ExecutionProvider};
use ort::session::builder::SessionBuilder;
use spherear_core::manifest::{Dim, GraphEntry};

use crate::error::{one_line, Result, RuntimeError};

/// Which execution provider to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provider {
    #[default]
    Cpu,
    Cuda,
    TensorRt,
}

impl Provider {
    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }
}

impl std::str::FromStr for Provider {
    type Err = RuntimeError;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Provider::Cpu),
            "cuda" => Ok(Provider::Cuda),
            "tensorrt" | "trt" => Ok(Provider::TensorRt),
            other => Err(RuntimeError::Invalid(format!("unknown provider '{other}' (cpu, cuda, tensorrt)"))),
        }
    }
}

/// TensorRT settings (ignored by the other providers).
#[derive(Debug, Clone, Default)]
pub struct TensorRtOptions {
    /// Folder for built engines and the timing cache (created if missing); engines are rebuilt without it.
    pub engine_cache: Option<PathBuf>,
    /// Allow fp16 kernels.
    pub fp16: bool,
    /// Allow int8 kernels (needs a calibration table for graphs without Q/DQ nodes).
    pub int8: bool,
    /// INT8 calibration table (TensorRT calibration cache) to use with `int8`.
    pub int8_calibration_table: Option<PathBuf>,
}

/// Provider choice and its settings.
#[derive(Debug, Clone, Default)]
pub struct ProviderOptions {
    pub provider: Provider,
    /// Fail instead of falling back to CPU.
    pub strict: bool,
    /// GPU ordinal for cuda / tensorrt.
    pub device_id: i32,
    pub tensorrt: TensorRtOptions,
}

impl ProviderOptions {
    /// Checks option combinations that do not depend on the machine.
    pub fn validate(&self) -> Result<()> {
        let t = &self.tensorrt;
        let trt_only = t.engine_cache.is_some() || t.fp16 || t.int8 || t.int8_calibration_table.is_some();
        if trt_only && self.provider != Provider::TensorRt {
            return Err(RuntimeError::Invalid("--trt-* options need --provider tensorrt".into()));
        }
        if t.int8_calibration_table.is_some() && !t.int8 {
            return Err(RuntimeError::Invalid("--trt-int8-calibration-table needs --trt-int8".into()));
        }
        if let Some(p) = &t.int8_calibration_table {
            calibration_table(p)?;
        }
        if self.device_id < 0 {
            return Err(RuntimeError::Invalid(format!("--device-id must be >= 0, got {}", self.device_id)));
        }
        Ok(())
    }
}

/// The INT8 calibration table as the TensorRT provider must get it: an absolute path (the provider
/// resolves a relative one against the engine cache folder) and whether it is TensorRT's native cache
/// (text starting with `TRT-`) rather than ONNX Runtime's flatbuffers table.
pub fn calibration_table(p: &Path) -> Result<(PathBuf, bool)> {
    let abs = std::fs::canonicalize(p)
        .map_err(|e| RuntimeError::Invalid(format!("INT8 calibration table {}: {e}", p.display())))?;
    let mut head = [0u8; 4];
    let native = std::fs::File::open(&abs)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .map(|()| &head == b"TRT-")
        .unwrap_or(false);
    if !abs.is_file() {
        return Err(RuntimeError::Invalid(format!("INT8 calibration table {} is not a file", p.display())));
    }
    Ok((abs, native))
}

/// What a generator actually runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderReport {
    pub requested: Provider,
    pub active: Provider,
    /// Why the requested provider is not active (the one-line fallback message).
    pub fallback: Option<String>,
}

fn available(name: &str, check: ort::Result<bool>) -> std::result::Result<(), String> {
    match check {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!("this ONNX Runtime build does not include {name}")),
        Err(e) => Err(format!("cannot query ONNX Runtime for {name}: {}", one_line(&e.to_string()))),
    }
}

/// Decides the active provider: the requested one when the loaded ONNX Runtime offers it, else CPU
/// (logged) or an error (`strict`).
pub fn resolve(opts: &ProviderOptions) -> Result<ProviderReport> {
    let check = match opts.provider {
        Provider::Cpu => Ok(()),
        Provider::Cuda => available("the CUDA execution provider", ep::CUDA::is_available()),
        Provider::TensorRt => available("the TensorRT execution provider", ep::TensorRT::is_available())
            .and_then(|()| available("the CUDA execution provider", ep::CUDA::is_available())),
    };
    fallback_or_fail(opts, check)
}

pub(crate) fn fallback_or_fail(
    opts: &ProviderOptions,
    check: std::result::Result<(), String>,
) -> Result<ProviderReport> {
    match check {
        Ok(()) => Ok(ProviderReport { requested: opts.provider, active: opts.provider, fallback: None }),
        Err(why) if opts.strict => {
            Err(RuntimeError::Provider(format!("{} requested with --strict-provider, but {why}", opts.provider.name())))
        }
        Err(why) => {
            let line = format!("provider {} unavailable ({why}); falling back to CPU", opts.provider.name());
            tracing::warn!("{line}");
            Ok(ProviderReport { requested: opts.provider, active: Provider::Cpu, fallback: Some(line) })
        }
    }
}

/// TensorRT optimisation profile shapes for one graph: every input with a symbolic axis, batch from 1
/// (min) to `max_batch` (opt and max). Format `name:1x8,other:1`.
pub fn trt_profiles(graph: &GraphEntry, max_batch: usize) -> Option<(String, String)> {
    let shape = |batch: usize, dims: &[Dim]| {
        dims.iter()
            .map(|d| match d {
                Dim::N(n) => n.to_string(),
                Dim::Sym(_) => batch.to_string(),
            })
            .collect::<Vec<_>>()
            .join("x")
    };
    let dynamic: Vec<_> = graph.inputs.iter().filter(|s| s.shape.iter().any(|d| matches!(d, Dim::Sym(_)))).collect();
    if dynamic.is_empty() {
        return None;
    }
    let join =
        |b: usize| dynamic.iter().map(|s| format!("{}:{}", s.name, shape(b, &s.shape))).collect::<Vec<_>>().join(",");
    Some((join(1), join(max_batch)))
}

/// Registers the active provider on a session builder (nothing for CPU: ONNX Runtime's CPU provider is
/// always last). `graph`/`max_batch` give the TensorRT profiles.
pub(crate) fn register(
    builder: &mut SessionBuilder,
    report: &ProviderReport,
    opts: &ProviderOptions,
    graph: &GraphEntry,
    graph_name: &str,
    max_batch: usize,
) -> std::result::Result<(), String> {
    let err =
        |what: &str, e: ort::Error| format!("registering {what} for {graph_name} failed: {}", one_line(&e.to_string()));
    match report.active {
        Provider::Cpu => Ok(()),
        Provider::Cuda => {
            ep::CUDA::default().with_device_id(opts.device_id).register(builder).map_err(|e| err("CUDA", e))
        }
        Provider::TensorRt => {
            let t = &opts.tensorrt;
            let mut trt = ep::TensorRT::default()
                .with_device_id(opts.device_id)
                .with_fp16(t.fp16)
                .with_int8(t.int8)
                .with_engine_cache_prefix(graph_name);
            if let Some(dir) = &t.engine_cache {
                let dir = dir.display().to_string();
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(&dir)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&dir);
            }
            if let Some(table) = &t.int8_calibration_table {
                let (path, native) = calibration_table(table).map_err(|e| e.to_string())?;
                trt = trt
                    .with_int8_calibration_table_name(path.display())
                    .with_int8_use_native_calibration_table(native);
            }
            if let Some((min, max)) = trt_profiles(graph, max_batch) {
                trt = trt.with_profile_min_shapes(min).with_profile_opt_shapes(&max).with_profile_max_shapes(&max);
            }
            trt.register(builder).map_err(|e| err("TensorRT", e))?;
            // Nodes TensorRT does not take run on CUDA, then CPU.
            ep::CUDA::default().with_device_id(opts.device_id).register(builder).map_err(|e| err("CUDA", e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spherear_core::manifest::{IoSpec, TensorDType};

    #[test]
    fn parse_and_validate() {
        assert_eq!("TensorRT".parse::<Provider>().unwrap(), Provider::TensorRt);
        assert!("rocm".parse::<Provider>().is_err());
        let mut o = ProviderOptions::default();
        o.tensorrt.fp16 = true;
        assert!(o.validate().is_err());
        o.provider = Provider::TensorRt;
        assert!(o.validate().is_ok());
        o.tensorrt.int8_calibration_table = Some("/nonexistent/calib.cache".into());
        assert!(o.validate().is_err());
    }

    #[test]
    fn calibration_tables_are_absolute_and_typed() {
        let dir = tempfile::tempdir().unwrap();
        let native = dir.path().join("calibration.trt.cache");
        std::fs::write(&native, "TRT-100000-EntropyCalibration2\nx: 3c010a14\n").unwrap();
        let flat = dir.path().join("calibration.flatbuffers");
        std::fs::write(&flat, [12u8, 0, 0, 0, 8, 0]).unwrap();
        let cwd = std::env::current_dir().unwrap();
        let rel = pathdiff(&native, &cwd);
        let (p, is_native) = calibration_table(&rel).unwrap();
        assert!(p.is_absolute() && is_native, "{p:?}");
        assert!(!calibration_table(&flat).unwrap().1);
        assert!(calibration_table(dir.path()).is_err(), "a folder is not a table");
    }

    /// `target` relative to `base` (both absolute), with `..` steps.
    fn pathdiff(target: &Path, base: &Path) -> PathBuf {
        let (t, b): (Vec<_>, Vec<_>) = (target.components().collect(), base.components().collect());
        let common = t.iter().zip(&b).take_while(|(x, y)| x == y).count();
        let mut out = PathBuf::new();
        for _ in common..b.len() {
            out.push("..");
        }
        for c in &t[common..] {
            out.push(c);
        }
        out
    }

    #[test]
    fn fallback_is_logged_or_strict() {
        let mut o = ProviderOptions { provider: Provider::Cuda, ..Default::default() };
        let r = fallback_or_fail(&o, Err("no CUDA".into())).unwrap();
        assert_eq!(r.active, Provider::Cpu);
        assert!(r.fallback.unwrap().contains("falling back to CPU"));
        o.strict = true;
        let e = fallback_or_fail(&o, Err("no CUDA".into())).unwrap_err().to_string();
        assert!(e.contains("--strict-provider") && e.contains("no CUDA"), "{e}");
    }

    #[test]
    fn profiles_cover_dynamic_inputs() {
        let io = |n: &str, shape: Vec<Dim>| IoSpec {
            name: n.into(),
            dtype: TensorDType::Float32,
            shape,
            meaning: String::new(),
        };
        let g = GraphEntry {
            file: "ar_step.onnx".into(),
            doc: String::new(),
            inputs: vec![
                io("token", vec![Dim::Sym("batch".into()), Dim::N(8)]),
                io("position", vec![Dim::N(1)]),
                io("past_key_values.0.key", vec![Dim::Sym("batch".into()), Dim::N(2), Dim::N(17), Dim::N(16)]),
            ],
            outputs: vec![],
            precision: None,
        };
        let (min, max) = trt_profiles(&g, 32).unwrap();
        assert_eq!(min, "token:1x8,past_key_values.0.key:1x2x17x16");
        assert_eq!(max, "token:32x8,past_key_values.0.key:32x2x17x16");
    }
}
