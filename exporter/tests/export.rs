//! Export behaviour without libtorch: errors leave no partial output, the VAE-only case, the CLI's error
//! line, and the weight bytes of a full-size random `spherear-b` export.

use std::path::Path;
use std::process::Command;

use exporter::checkpoint::Stage;
use exporter::random::write_random;
use exporter::{export, ExportOptions};
use spherear_core::keys::{ar_keys, param_count, vae_keys};
use spherear_core::ModelConfig;

fn opts(ckpt: &Path, out: &Path) -> ExportOptions {
    ExportOptions { max_batch: 4, ..ExportOptions::new(ckpt, out) }
}

fn tiny(dir: &Path, stage: Stage) -> std::path::PathBuf {
    let ck = dir.join("ck");
    write_random(&ModelConfig::preset("tiny").unwrap(), &ck, 7, stage).unwrap();
    ck
}

/// Names in `dir` other than `keep`: a failed export must leave nothing (no temporary folder either).
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn missing_checkpoint_is_a_clear_error_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let e = export(&opts(&d.path().join("nope"), &d.path().join("out"))).unwrap_err().to_string();
    assert!(e.contains("no such checkpoint folder"), "{e}");
    std::fs::create_dir(d.path().join("empty")).unwrap();
    let e = export(&opts(&d.path().join("empty"), &d.path().join("out"))).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
    assert!(leftovers(d.path(), &["empty"]).is_empty());
}

#[test]
fn checkpoint_config_mismatch_is_a_clear_error_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path(), Stage::Ar);
    let mut other = ModelConfig::preset("tiny").unwrap();
    other.ar.n_layer = 3;
    other.save(&ck.join("config.json")).unwrap();
    let e = export(&opts(&ck, &d.path().join("out"))).unwrap_err().to_string();
    assert!(e.contains("checkpoint/config mismatch") && e.contains("ar.n_layer"), "{e}");
    assert!(leftovers(d.path(), &["ck"]).is_empty());
}

#[test]
fn existing_output_needs_force_and_force_replaces_only_an_export() {
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path(), Stage::Ar);
    let out = d.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("precious.txt"), "keep").unwrap();
    let e = export(&opts(&ck, &out)).unwrap_err().to_string();
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    // --force does not delete a folder of user files either.
    let e = export(&ExportOptions { force: true, ..opts(&ck, &out) }).unwrap_err().to_string();
    assert!(e.contains("holding an export") && !e.contains('\n'), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("precious.txt")).unwrap(), "keep");
    assert!(leftovers(d.path(), &["ck", "out"]).is_empty());
    // An earlier export is replaced whole.
    let out2 = d.path().join("out2");
    export(&opts(&ck, &out2)).unwrap();
    std::fs::write(out2.join("stale.txt"), "from the earlier export").unwrap();
    let m = export(&ExportOptions { force: true, ..opts(&ck, &out2) }).unwrap();
    assert!(!out2.join("stale.txt").exists());
    assert_eq!(m.graphs.len(), 4);
    for g in m.graphs.values() {
        assert!(out2.join(&g.file).is_file());
    }
    assert!(out2.join("manifest.json").is_file());
    assert!(leftovers(d.path(), &["ck", "out", "out2"]).is_empty());
}

#[test]
fn force_never_deletes_the_checkpoint_or_a_folder_containing_it() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("runs");
    std::fs::create_dir(&run).unwrap();
    let ck = tiny(&run, Stage::Ar);
    let before = std::fs::read(ck.join("ar.safetensors")).unwrap();
    for out in [ck.clone(), run.clone(), d.path().to_path_buf()] {
        let e = export(&ExportOptions { force: true, ..opts(&ck, &out) }).unwrap_err().to_string();
        assert!(e.contains("this command's input"), "{}: {e}", out.display());
        assert_eq!(std::fs::read(ck.join("ar.safetensors")).unwrap(), before);
    }
    // Even when the checkpoint folder also holds a manifest (looks like an export).
    std::fs::write(ck.join("manifest.json"), r#"{"format": "spherear-onnx"}"#).unwrap();
    assert!(export(&ExportOptions { force: true, ..opts(&ck, &ck) }).is_err());
    assert_eq!(std::fs::read(ck.join("ar.safetensors")).unwrap(), before);
    assert!(leftovers(&run, &["ck"]).is_empty());
}

#[test]
fn staging_folders_of_killed_exports_are_removed() {
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path(), Stage::Ar);
    // What a SIGKILLed export of `out` by a process that no longer exists leaves behind.
    let stale = d.path().join(".out.tmp-999999999");
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("weights.bin"), vec![0u8; 1000]).unwrap();
    export(&opts(&ck, &d.path().join("out"))).unwrap();
    assert!(!stale.exists());
    assert!(leftovers(d.path(), &["ck", "out"]).is_empty());
}

#[test]
fn non_finite_weights_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path(), Stage::Ar);
    let path = ck.join("ar.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let key = "head.net.final_layer.linear.weight";
    let (start, len) = {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let data = st.tensor(key).unwrap().data();
        (data.as_ptr() as usize - bytes.as_ptr() as usize, data.len())
    };
    assert!(len >= 8);
    bytes[start..start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    bytes[start + 4..start + 8].copy_from_slice(&f32::INFINITY.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let e = export(&opts(&ck, &d.path().join("out"))).unwrap_err().to_string();
    assert!(e.contains("non-finite") && e.contains(&format!("{key} (2)")), "{e}");
    assert!(leftovers(d.path(), &["ck"]).is_empty());
}

#[test]
fn vae_only_checkpoint_exports_the_decoder_only() {
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path(), Stage::Vae);
    let out = d.path().join("out");
    let m = export(&opts(&ck, &out)).unwrap();
    assert_eq!(m.graphs.keys().collect::<Vec<_>>(), ["decoder"]);
    assert!(m.kv_cache.is_none());
    let text = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(text.contains("\"stage\": \"vae\"") && text.contains("only the decoder"), "{text}");
}

#[test]
fn cli_prints_one_error_line_and_exits_1() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_exporter"))
        .args(["onnx", "--checkpoint"])
        .arg(d.path().join("missing"))
        .arg("--out")
        .arg(d.path().join("out"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("error: export failed: checkpoint") && err.contains("no such checkpoint folder"), "{err}");
    assert!(!d.path().join("out").exists());
}

/// Exported parameters: the AR model and head, and the decoder half of the S-VAE (its RoPE buffer is
/// rebuilt as inline cos/sin tables, the encoder and quant_proj are not deployed).
fn exported_params(cfg: &ModelConfig) -> usize {
    let vae: Vec<_> = vae_keys(cfg)
        .into_iter()
        .filter(|k| {
            (k.name.starts_with("vae.decoder.") && !k.name.ends_with("freqs_cis"))
                || k.name == "vae.post_quant_proj.weight"
        })
        .collect();
    param_count(&ar_keys(cfg)) + param_count(&vae)
}

#[test]
fn spherear_b_random_export_has_the_expected_weight_bytes() {
    let cfg = ModelConfig::preset("spherear-b").unwrap();
    let d = tempfile::tempdir().unwrap();
    let ck = d.path().join("ck");
    write_random(&cfg, &ck, 1, Stage::Ar).unwrap();
    let n = exported_params(&cfg);
    for (fp16, size) in [(false, 4u64), (true, 2)] {
        let out = d.path().join(if fp16 { "fp16" } else { "fp32" });
        let m = export(&ExportOptions { fp16, ..opts(&ck, &out) }).unwrap();
        let on_disk = std::fs::metadata(out.join(&m.weights.file)).unwrap().len();
        println!("spherear-b fp16={fp16}: {} parameters, {on_disk} bytes of weights", m.weights.parameters);
        assert_eq!(m.weights.parameters, n);
        assert_eq!(on_disk, n as u64 * size);
        assert_eq!(m.weights.bytes, on_disk);
        for g in m.graphs.values() {
            let len = std::fs::metadata(out.join(&g.file)).unwrap().len();
            assert!(len < 8 << 20, "{} is {len} bytes: weights must be external", g.file);
        }
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// The node that reads initializer `init` in `graph` of the export at `out`.
fn reader_of(out: &Path, graph: &str, init: &str) -> String {
    let m = exporter::onnx::read_model(&out.join(format!("{graph}.onnx"))).unwrap();
    let names: std::collections::HashSet<&str> = m.graph.node.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names.len(), m.graph.node.len(), "{graph}: node names are unique");
    let n = m.graph.node.iter().find(|n| n.input.iter().any(|i| i == init));
    n.unwrap_or_else(|| panic!("{graph}: nothing reads {init}")).name.clone()
}

#[test]
fn nodes_are_named_after_the_official_module_they_belong_to() {
    let d = tempfile::tempdir().unwrap();
    let ck = tiny(d.path(), Stage::Ar);
    let out = d.path().join("out");
    export(&ExportOptions { fp16: true, ..opts(&ck, &out) }).unwrap();
    for (graph, init, node) in [
        ("ar_step", "layers.1.attention.wqkv.weight.T", "layers.1.attention.wqkv/MatMul_"),
        ("ar_step", "past_key_values.1.key", "layers.1.attention/GroupQueryAttention_"),
        ("ar_prefill", "layers.0.feed_forward.w2.weight.T", "layers.0.feed_forward.w2/MatMul_"),
        ("head_step", "head.net.res_blocks.1.norm.weight", "head.net.res_blocks.1.norm/Mul_"),
        (
            "decoder",
            "vae.decoder.unpatchify.1.net.0.block.2.weight",
            "vae.decoder.unpatchify.1.net.0.block.2/ConvTranspose_",
        ),
    ] {
        let name = reader_of(&out, graph, init);
        assert!(name.starts_with(node), "{graph}: {init} is read by {name}, expected {node}N");
    }
}
