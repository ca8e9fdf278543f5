//! `exporter judge` from the command line: a random judge run folder exports to a complete folder; a
//! missing checkpoint folder is one error line, a non-zero exit and no output folder.

use std::path::Path;
use std::process::Command;

use exporter::random::write_random_judge;
use spherear_core::judge::{JudgeConfig, JudgeManifest, JUDGE_GRAPH_FILE, JUDGE_WEIGHTS_DATA_FILE};

fn exporter(args: &[&Path]) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_exporter"));
    c.arg("judge").arg("--checkpoint").arg(args[0]).arg("--out").arg(args[1]);
    c.output().unwrap()
}

#[test]
fn judge_cli_exports_a_random_judge() {
    let d = tempfile::tempdir().unwrap();
    let (ck, out) = (d.path().join("run"), d.path().join("export/judge"));
    write_random_judge(&JudgeConfig::default_for(32, 10), &ck, 3).unwrap();
    let o = exporter(&[&ck, &out]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("judge.onnx") && stdout.contains("test accuracy unknown"), "{stdout}");
    let m = JudgeManifest::load(&out).unwrap();
    assert_eq!(m.config, JudgeConfig::default_for(32, 10));
    assert_eq!((m.test_accuracy, m.dataset.as_str()), (None, "fashion-mnist"));
    assert!(out.join(JUDGE_GRAPH_FILE).is_file());
    // 32·3·9+32 + 64·32·9+64 + 128·64·9+128 + 128·2048+128 + 10·128+10 parameters, fp32.
    let params = 896 + 18496 + 73856 + 262272 + 1290;
    assert_eq!(std::fs::metadata(out.join(JUDGE_WEIGHTS_DATA_FILE)).unwrap().len(), 4 * params);
    // A second export into the non-empty folder is refused without --force.
    let o = exporter(&[&ck, &out]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--force"));
}

#[test]
fn judge_cli_missing_checkpoint_is_one_line_and_writes_nothing() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let o = exporter(&[&d.path().join("nope"), &out]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("error: ") && err.contains("no such checkpoint folder"), "{err}");
    assert!(o.stdout.is_empty());
    assert!(!out.exists());
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0, "nothing written next to it either");
}
