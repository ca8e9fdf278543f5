//! Finding and loading the ONNX Runtime shared library (`ort` with `load-dynamic`), once per process.
//!
//! Search order: an explicit path (`--ort-lib`), then `ORT_DYLIB_PATH`, then the `onnxruntime` python wheel
//! of a `.venv` found next to the executable, the working directory or the workspace this crate was built
//! from (`.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ort::environment::Environment;

use crate::error::{one_line, Result, RuntimeError};

/// Environment variable `ort` reads the library path from.
pub const ORT_DYLIB_ENV: &str = "ORT_DYLIB_PATH";

const NOT_FOUND: &str = "cannot find the ONNX Runtime library (libonnxruntime.so): pass --ort-lib PATH or set \
ORT_DYLIB_PATH to it, e.g. .venv/lib/python3.11/site-packages/onnxruntime/capi/libonnxruntime.so.1.31.1 \
(`make setup` installs the onnxruntime wheel into .venv)";

fn lib_in_capi(capi: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(capi)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == "libonnxruntime.so" || n.starts_with("libonnxruntime.so."))
                && p.is_file()
        })
        .collect();
    // Prefer the fully versioned name (the wheel ships only that one); sort for determinism.
    found.sort();
    found.pop()
}

fn lib_in_venv(venv: &Path) -> Option<PathBuf> {
    let lib = venv.join("lib");
    let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python")))
        .collect();
    pythons.sort();
    pythons.iter().rev().find_map(|py| lib_in_capi(&py.join("site-packages/onnxruntime/capi")))
}

/// Folders whose `.venv` is searched: ancestors of the executable, of the working directory, and the
/// workspace this crate was compiled in.
fn search_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(5).map(Path::to_path_buf));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().take(5).map(Path::to_path_buf));
    }
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    roots
}

/// Resolves the library path (see the module documentation); one-line error naming what to do.
pub fn find_ort_library(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(RuntimeError::Library(format!("--ort-lib {} is not a file; {NOT_FOUND}", p.display())))
        };
    }
    if let Some(p) = std::env::var_os(ORT_DYLIB_ENV).filter(|v| !v.is_empty()).map(PathBuf::from) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(RuntimeError::Library(format!("{ORT_DYLIB_ENV}={} is not a file; {NOT_FOUND}", p.display())))
        };
    }
    search_roots()
        .iter()
        .find_map(|r| lib_in_venv(&r.join(".venv")))
        .ok_or_else(|| RuntimeError::Library(NOT_FOUND.into()))
}

static ENV: Mutex<Option<(Environment, PathBuf)>> = Mutex::new(None);

/// Loads the library (first call only; later calls reuse it whatever `explicit` says) and returns the
/// process-wide ONNX Runtime environment and the path it was loaded from.
///
/// Every session of the process shares one intra-op thread pool (`threads`, default: one per logical CPU),
/// fixed by the first call. Per-session pools would each spin-wait after their own calls, and the
/// sampler alternates ar_step and head_step thousands of times per image, so the idle pool's spinning
/// threads would compete with the working one for the same cores (measured, SphereAR-B batch 1 on
/// 2 cores: an AR step took 68 ms with per-session pools vs 37 ms alone).
pub fn environment(explicit: Option<&Path>) -> Result<(Environment, PathBuf)> {
    environment_with_threads(explicit, None)
}

/// [`environment`] with the size of the shared intra-op thread pool (used only by the first call).
pub fn environment_with_threads(explicit: Option<&Path>, threads: Option<usize>) -> Result<(Environment, PathBuf)> {
    let mut guard = ENV.lock().map_err(|_| RuntimeError::Library("ONNX Runtime environment lock poisoned".into()))?;
    if let Some((env, path)) = guard.as_ref() {
        return Ok((env.clone(), path.clone()));
    }
    let path = find_ort_library(explicit)?;
    let path = path.canonicalize().unwrap_or(path);
    let builder = ort::init_from(&path).map_err(|e| {
        RuntimeError::Library(format!(
            "cannot load ONNX Runtime from {}: {}; {NOT_FOUND}",
            path.display(),
            one_line(&e.to_string())
        ))
    })?;
    let pool = ort::environment::GlobalThreadPoolOptions::default()
        .with_intra_threads(threads.unwrap_or(0))
        .and_then(|p| p.with_inter_threads(1))
        .map_err(|e| {
            RuntimeError::Library(format!("cannot configure the thread pool: {}", one_line(&e.to_string())))
        })?;
    let env = builder.with_name("spherear-runtime").with_global_thread_pool(pool).build().map_err(|e| {
        RuntimeError::Library(format!("cannot create the ONNX Runtime environment: {}", one_line(&e.to_string())))
    })?;
    *guard = Some((env.clone(), path.clone()));
    Ok((env, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_missing_path_names_the_fix() {
        let msg = find_ort_library(Some(Path::new("/nonexistent/libonnxruntime.so"))).unwrap_err().to_string();
        assert!(msg.contains("--ort-lib") && msg.contains("ORT_DYLIB_PATH"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn finds_a_wheel_layout() {
        let dir = tempfile::tempdir().unwrap();
        let capi = dir.path().join(".venv/lib/python3.11/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        assert!(lib_in_venv(&dir.path().join(".venv")).is_none());
        std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"").unwrap();
        std::fs::write(capi.join("libonnxruntime_providers_shared.so"), b"").unwrap();
        assert_eq!(lib_in_venv(&dir.path().join(".venv")), Some(capi.join("libonnxruntime.so.1.31.1")));
    }
}
