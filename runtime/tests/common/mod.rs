//! Helpers shared by the runtime's tests on real (random `tiny`) exports.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use exporter::checkpoint::Stage;
use exporter::random::write_random;
use exporter::{export, ExportOptions};
use spherear_core::ModelConfig;

/// A random `tiny` checkpoint (its `ar.safetensors` passed to `edit` first) exported to `dir/export`.
pub fn tiny_export(dir: &Path, edit: impl FnOnce(&Path)) -> PathBuf {
    let ck = dir.join("ck");
    write_random(&ModelConfig::preset("tiny").unwrap(), &ck, 3, Stage::Ar).unwrap();
    edit(&ck.join("ar.safetensors"));
    let out = dir.join("export");
    export(&ExportOptions { max_batch: 16, ..ExportOptions::new(ck, &out) }).unwrap();
    out
}

/// Overwrites every value of tensor `key` of a safetensors file with `value`.
pub fn set_tensor(path: &Path, key: &str, value: f32) {
    let mut bytes = std::fs::read(path).unwrap();
    let (start, len) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data = st.tensor(key).unwrap().data();
        (data.as_ptr() as usize - bytes.as_ptr() as usize, data.len())
    };
    for c in bytes[start..start + len].chunks_exact_mut(4) {
        c.copy_from_slice(&value.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// The runtime binary.
pub fn runtime() -> Command {
    Command::new(env!("CARGO_BIN_EXE_runtime"))
}
