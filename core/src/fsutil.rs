//! Safe output writes: a file or folder appears whole or not at all, and a write never replaces
//! anything that is not ours to replace.
//!
//! The rules every command follows (the README's "What is safe" section):
//! - **Files** ([`write_atomic`], [`with_tmp_path`]) are written to a staging sibling and renamed over the
//!   target. Only a regular file (or nothing) is replaced; a symlink, FIFO, device, socket or folder at the
//!   target is refused before anything is written ([`check_file_target`]).
//! - **Folders** ([`write_folder_atomically`]) are filled in a staging sibling and swapped in. What may be
//!   replaced is decided by [`check_folder_output`]: nothing, an empty folder, or — only with `force` — a
//!   folder that holds an earlier output of the same kind, and never a folder equal to or containing one of
//!   the command's inputs.
//! - **Staging names** are `.NAME.tmp-PID` (and `.NAME.old-PID` while a folder is swapped). A process
//!   killed mid-write leaves one behind; [`clean_stale_staging`] removes those of processes that are gone
//!   and is called before each write into the same folder.
//! - [`check_file_output`] and [`probe_writable`] let a command find an unwritable target before any work.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::CoreError;

/// The staging sibling `.NAME.TAG-PID` of `path` for this process.
pub fn staging_path(path: &Path, tag: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{tag}-{}", std::process::id()))
}

/// The temporary sibling a file write goes to before the rename.
pub fn tmp_sibling(path: &Path) -> PathBuf {
    staging_path(path, "tmp")
}

/// Splits a staging name `.NAME.TAG-PID` (TAG `tmp` or `old`) into (NAME, PID).
pub fn parse_staging_name(file_name: &str) -> Option<(&str, u32)> {
    let rest = file_name.strip_prefix('.')?;
    let (head, pid) = rest.rsplit_once('-')?;
    let pid: u32 = pid.parse().ok()?;
    let name = head.strip_suffix(".tmp").or_else(|| head.strip_suffix(".old"))?;
    (!name.is_empty()).then_some((name, pid))
}

/// Whether process `pid` is running. Without `/proc` every process counts as running, so nothing of
/// another process is ever removed on such systems.
pub fn pid_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.is_dir() {
        return true;
    }
    pid == std::process::id() || proc.join(pid.to_string()).exists()
}

/// Removes the staging entries in `dir` (files or folders named `.NAME.tmp-PID` / `.NAME.old-PID`) whose
/// NAME passes `names` and whose process is gone: what a killed write left behind. Returns how many were
/// removed. Entries of running processes (and everything else) are left alone.
pub fn clean_stale_staging(dir: &Path, names: impl Fn(&str) -> bool) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in rd.flatten() {
        let file_name = entry.file_name();
        let Some(s) = file_name.to_str() else { continue };
        let Some((name, pid)) = parse_staging_name(s) else { continue };
        if !names(name) || pid_alive(pid) {
            continue;
        }
        let path = entry.path();
        let ok = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path).is_ok(),
            Ok(_) => std::fs::remove_file(&path).is_ok(),
            Err(_) => false,
        };
        if ok {
            removed += 1;
        }
    }
    removed
}

/// The folder a path lives in (`.` for a bare name).
pub fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// Describes what kind of non-regular file `meta` is, for messages.
fn kind_name(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        return "a regular file";
    }
    if t.is_symlink() {
        return "a symbolic link";
    }
    if t.is_dir() {
        return "a folder";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

/// Checks that a file output may be written at `path`: nothing is there or a regular file is (a symlink,
/// FIFO, device, socket or folder is refused), and its folder exists.
pub fn check_file_target(path: &Path) -> Result<(), CoreError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_file() => {}
        Ok(meta) => {
            return Err(CoreError::Io(format!(
                "refusing to write {}: it is {}, and only a regular file is ever replaced",
                path.display(),
                kind_name(&meta)
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CoreError::Io(format!("cannot write {}: {e}", path.display()))),
    }
    let parent = parent_dir(path);
    if !parent.is_dir() {
        return Err(CoreError::Io(format!(
            "cannot write {}: folder {} does not exist",
            path.display(),
            parent.display()
        )));
    }
    Ok(())
}

/// Creates and removes a file in `dir`: fails, naming `dir`, where it cannot be written.
pub fn probe_writable(dir: &Path) -> Result<(), CoreError> {
    let probe = staging_path(&dir.join("write-probe"), "tmp");
    let res = std::fs::OpenOptions::new().write(true).create_new(true).open(&probe);
    match res {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            Ok(())
        }
        Err(e) => Err(CoreError::Io(format!("folder {} is not writable: {e}", dir.display()))),
    }
}

/// The nearest existing ancestor of `path` (the path itself if it exists).
pub fn existing_ancestor(path: &Path) -> PathBuf {
    let mut p = if path.is_absolute() { path.to_path_buf() } else { Path::new(".").join(path) };
    while std::fs::symlink_metadata(&p).is_err() {
        match p.parent() {
            Some(q) => p = q.to_path_buf(),
            None => break,
        }
    }
    p
}

/// Everything a command checks about a file output before any work: [`check_file_target`] plus a write
/// probe in its folder.
pub fn check_file_output(path: &Path) -> Result<(), CoreError> {
    check_file_target(path)?;
    probe_writable(parent_dir(path))
}

/// Everything a command checks about a folder it will create files in (`--out-dir`): it is a folder or
/// will be created under a writable existing folder.
pub fn check_dir_output(dir: &Path) -> Result<(), CoreError> {
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() => probe_writable(dir),
        Ok(meta) => Err(CoreError::Io(format!("{} exists and is {}, not a folder", dir.display(), kind_name(&meta)))),
        Err(_) => {
            let anc = existing_ancestor(dir);
            if !anc.is_dir() {
                return Err(CoreError::Io(format!("cannot create {}: {} is not a folder", dir.display(), anc.display())));
            }
            probe_writable(&anc)
        }
    }
}

/// Writes `bytes` to a staging sibling, syncs it, then renames it over `path` (see [`check_file_target`]
/// for what may be replaced).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CoreError> {
    with_tmp_path(path, |tmp| {
        let res = (|| {
            let mut f = std::fs::File::create(tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        res.map_err(|e| CoreError::Io(format!("cannot write {}: {e}", path.display())))
    })
}

/// Runs `write` on a staging sibling path, then renames it to `path`; removes the staging file on error.
/// The target is checked first ([`check_file_target`]): nothing is written where it would be refused.
pub fn with_tmp_path<E>(path: &Path, write: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E>
where
    E: From<CoreError>,
{
    check_file_target(path)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    clean_stale_staging(parent_dir(path), |n| n == name);
    let tmp = tmp_sibling(path);
    match write(&tmp) {
        Ok(()) => {
            // Checked again: the target may have changed while we wrote.
            if let Err(e) = check_file_target(path) {
                let _ = std::fs::remove_file(&tmp);
                return Err(E::from(e));
            }
            std::fs::rename(&tmp, path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                E::from(CoreError::Io(format!("cannot rename into {}: {e}", path.display())))
            })
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// What a command wants to write as a whole folder, and what must survive it.
pub struct FolderOutput<'a> {
    /// The folder to create or replace.
    pub out: &'a Path,
    /// The user allowed replacing an earlier output (`--force`).
    pub force: bool,
    /// What the folder holds, for messages ("an export", "a run folder").
    pub kind: &'a str,
    /// Whether an existing folder holds an earlier output of this kind (the only thing `force` replaces).
    pub is_ours: &'a dyn Fn(&Path) -> bool,
    /// The command's inputs: the output may never equal or contain one of them.
    pub inputs: &'a [&'a Path],
}

fn canonical(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

/// Decides whether `o.out` may be written: nothing there or an empty folder — yes; a non-empty folder —
/// only with `force`, only when `is_ours` accepts it, and never when it equals or contains an input;
/// anything that is not a folder (a file, a symlink) — no.
pub fn check_folder_output(o: &FolderOutput) -> Result<(), CoreError> {
    let out = o.out;
    let err = |msg: String| Err(CoreError::Io(format!("output folder {}: {msg}", out.display())));
    let meta = match std::fs::symlink_metadata(out) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let anc = existing_ancestor(out);
            if !anc.is_dir() {
                return err(format!("cannot be created: {} is not a folder", anc.display()));
            }
            return probe_writable(&anc);
        }
        Err(e) => return err(format!("{e}")),
        Ok(m) => m,
    };
    if !meta.is_dir() {
        return err(format!("exists and is {}; only a folder holding {} is ever replaced", kind_name(&meta), o.kind));
    }
    if let Some(c_out) = canonical(out) {
        for input in o.inputs {
            if let Some(c_in) = canonical(input) {
                if c_in.starts_with(&c_out) {
                    let how = if c_in == c_out { "is" } else { "contains" };
                    return err(format!("{how} this command's input {}; choose another --out", input.display()));
                }
            }
        }
    }
    let empty = std::fs::read_dir(out).map_err(|e| CoreError::Io(format!("cannot list {}: {e}", out.display())))?.next().is_none();
    if !empty {
        if !o.force {
            return err(format!("exists and is not empty (pass --force to replace {})", o.kind));
        }
        if !(o.is_ours)(out) {
            return err(format!(
                "--force replaces only a folder holding {}, and this one does not; remove or rename it yourself",
                o.kind
            ));
        }
    }
    probe_writable(parent_dir(out))
}

/// Fills a staging sibling of `out` with `write`, then swaps it into place (replacing an existing `out`,
/// which the caller has cleared with [`check_folder_output`]), so `out` appears whole or not at all. On
/// any error nothing is left behind. Staging folders of killed earlier runs are removed first.
pub fn write_folder_atomically<T, E>(out: &Path, write: impl FnOnce(&Path) -> Result<T, E>) -> Result<T, E>
where
    E: From<CoreError>,
{
    let io = |what: String| move |e: std::io::Error| E::from(CoreError::Io(format!("{what}: {e}")));
    let parent = parent_dir(out);
    std::fs::create_dir_all(parent).map_err(io(format!("cannot create {}", parent.display())))?;
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    clean_stale_staging(parent, |n| n == name);
    let tmp = staging_path(out, "tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(io(format!("cannot create {}", tmp.display())))?;
    let value = match write(&tmp) {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let old = staging_path(out, "old");
    let had_old = out.exists();
    let swap = (|| {
        if had_old {
            std::fs::rename(out, &old)?;
        }
        std::fs::rename(&tmp, out)
    })();
    if let Err(e) = swap {
        let _ = std::fs::remove_dir_all(&tmp);
        if had_old && !out.exists() {
            let _ = std::fs::rename(&old, out);
        }
        return Err(E::from(CoreError::Io(format!("cannot move {} into place: {e}", out.display()))));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let bad = dir.path().join("missing/x.json");
        assert!(write_atomic(&bad, b"x").is_err());
    }

    #[cfg(unix)]
    #[test]
    fn only_regular_files_are_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.txt");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("link.png");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let msg = write_atomic(&link, b"x").unwrap_err().to_string();
        assert!(msg.contains("symbolic link"), "{msg}");
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep");
        let fifo = dir.path().join("fifo");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        assert!(write_atomic(&fifo, b"x").unwrap_err().to_string().contains("FIFO"));
        assert!(check_file_target(Path::new("/dev/null")).unwrap_err().to_string().contains("device"));
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        assert!(write_atomic(&sub, b"x").unwrap_err().to_string().contains("folder"));
        // Nothing else appeared in the folder.
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["fifo", "link.png", "sub", "target.txt"]);
    }

    #[test]
    fn staging_names_parse_and_stale_ones_are_cleaned() {
        assert_eq!(parse_staging_name(".export.tmp-123"), Some(("export", 123)));
        assert_eq!(parse_staging_name(".a.b.png.old-7"), Some(("a.b.png", 7)));
        assert_eq!(parse_staging_name(".export.tmp-x"), None);
        assert_eq!(parse_staging_name("export.tmp-1"), None);
        let dir = tempfile::tempdir().unwrap();
        // A PID far above pid_max is never alive; our own PID always is.
        let dead = dir.path().join(".out.tmp-999999999");
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("weights.bin"), b"partial").unwrap();
        std::fs::write(dir.path().join(".grid.png.tmp-999999999"), b"partial").unwrap();
        let mine = staging_path(&dir.path().join("out"), "tmp");
        std::fs::create_dir(&mine).unwrap();
        std::fs::write(dir.path().join(".other.tmp-999999999"), b"not matched by the filter").unwrap();
        assert_eq!(clean_stale_staging(dir.path(), |n| n == "out" || n == "grid.png"), 2);
        assert!(!dead.exists() && mine.exists());
        assert!(dir.path().join(".other.tmp-999999999").exists());
    }

    #[test]
    fn folder_output_rules() {
        let dir = tempfile::tempdir().unwrap();
        let ours = |p: &Path| p.join("manifest.json").is_file();
        let check = |out: &Path, force: bool, inputs: &[&Path]| {
            check_folder_output(&FolderOutput { out, force, kind: "an export", is_ours: &ours, inputs })
        };
        let new = dir.path().join("new");
        check(&new, false, &[]).unwrap();
        let user = dir.path().join("user");
        std::fs::create_dir(&user).unwrap();
        check(&user, false, &[]).unwrap(); // empty
        std::fs::write(user.join("notes.txt"), b"mine").unwrap();
        assert!(check(&user, false, &[]).unwrap_err().to_string().contains("--force"));
        assert!(check(&user, true, &[]).unwrap_err().to_string().contains("remove or rename it yourself"));
        std::fs::write(user.join("manifest.json"), b"{}").unwrap();
        check(&user, true, &[]).unwrap();
        let ckpt = user.join("ckpt");
        std::fs::create_dir(&ckpt).unwrap();
        assert!(check(&user, true, &[&ckpt]).unwrap_err().to_string().contains("contains this command's input"));
        assert!(check(&ckpt, true, &[&ckpt]).unwrap_err().to_string().contains("is this command's input"));
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(check(&file, true, &[]).unwrap_err().to_string().contains("is a regular file"));
    }

    #[test]
    fn folder_write_is_atomic_and_cleans_dead_staging() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let stale = dir.path().join(".out.tmp-999999999");
        std::fs::create_dir(&stale).unwrap();
        let r: Result<(), CoreError> = write_folder_atomically(&out, |tmp| {
            std::fs::write(tmp.join("a"), b"1").map_err(|e| CoreError::Io(e.to_string()))
        });
        r.unwrap();
        assert!(out.join("a").is_file() && !stale.exists());
        let r: Result<(), CoreError> = write_folder_atomically(&out, |_| Err(CoreError::Io("boom".into())));
        assert!(r.is_err());
        assert!(out.join("a").is_file(), "a failed write leaves the old folder");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
