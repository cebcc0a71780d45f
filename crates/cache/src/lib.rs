//! relora-cache: a content-addressed store of stage results.
//!
//! An entry is a pure function of its key: a blake3 hash over the length-prefixed key
//! components (schema version, stage kind and version, parameters, input content hashes).
//! An entry is built in a staging folder and renamed into `entries/<key>` only once complete,
//! so a killed process never leaves anything that looks finished. Output files are hashed
//! once, at commit; the hash of all outputs is what downstream keys use (early cutoff).
//! A per-key file lock (flock) makes concurrent runs compute each entry once; the kernel
//! drops a dead process's lock, so a stale lock clears itself.
//!
//! This crate knows nothing of ML or of pipelines: only keys, folders and bytes. Its errors
//! ([`CacheError`]) name the file or key they concern.

mod lock;
mod maintenance;

pub use lock::{hostname, EntryLock, LockHolder};
pub use maintenance::GcReport;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// What went wrong in the cache, naming the file or key concerned.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A filesystem operation failed: `action` (creating, reading, …) on `path`.
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A string given as a key is not 64 hex digits.
    #[error("`{0}` is not a cache key (64 hex digits)")]
    NotAKey(String),
    /// A committed entry's manifest cannot be parsed.
    #[error("{} is corrupt; run `relora-pipe verify`, or delete that entry", path.display())]
    CorruptManifest {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A stage left something that is not a plain file or folder among its outputs.
    #[error("{}: outputs must be plain files and folders", .0.display())]
    NotAPlainFile(PathBuf),
    /// The cache folder cannot be written (a read-only mount, permissions).
    #[error(
        "the cache folder {} cannot be written ({source}); give a writable one with \
         --cache-dir or RELORA_CACHE",
        path.display()
    )]
    ReadOnly {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An entry a running stage holds cannot be moved.
    #[error("entry {0} is in use by a running stage; try again when it has finished")]
    Busy(String),
    /// Key components could not be serialised.
    #[error("serialising {what}")]
    Serialise {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
}

/// Results of this crate.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Attaches the action and path to an I/O error.
trait IoContext<T> {
    fn io(self, action: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn io(self, action: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| CacheError::Io {
            action,
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Bumped when the meaning of keys changes; every old entry then misses.
pub const KEY_SCHEMA: &str = "relora-pipe/key/v1";

/// The ordered, named parts of a key. Kept separately so `plan` can say which one changed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyComponents(pub BTreeMap<String, String>);

impl KeyComponents {
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.0.insert(name.into(), value.into());
    }

    /// blake3 over a length-prefixed encoding, so no two component lists can collide by
    /// shifting bytes between neighbours.
    pub fn key(&self) -> String {
        let mut h = blake3::Hasher::new();
        put(&mut h, KEY_SCHEMA.as_bytes());
        h.update(&(self.0.len() as u64).to_le_bytes());
        for (k, v) in &self.0 {
            put(&mut h, k.as_bytes());
            put(&mut h, v.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }
}

fn put(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// One output file of an entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    pub path: String,
    pub size: u64,
    pub blake3: String,
}

/// What an entry's `manifest.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub key: String,
    pub stage: String,
    pub kind: String,
    pub components: KeyComponents,
    pub outputs: Vec<OutputFile>,
    /// Hash over all outputs' paths and hashes: what downstream keys are built from.
    pub output_hash: String,
    pub started_unix: f64,
    pub seconds: f64,
    pub metrics: Value,
    pub tool_version: String,
    /// What the run that made this entry ran on (host, threads, build profile, ...). Kept out
    /// of the key and out of the outputs: it explains an entry, it does not define it.
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
    /// Set when the user reused another entry's outputs for this key (the code that computes
    /// the stage changed in a way they declared harmless).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_from: Option<Adoption>,
}

/// The record of an entry whose outputs were taken over from another key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Adoption {
    /// The entry the outputs came from.
    pub key: String,
    /// Which key components differed, and who allowed it, in words.
    pub reason: String,
}

/// What `commit` records besides the outputs.
#[derive(Debug, Clone, Default)]
pub struct CommitInfo {
    pub stage: String,
    pub kind: String,
    pub components: KeyComponents,
    pub started_unix: f64,
    pub metrics: Value,
    pub tool_version: String,
    pub environment: BTreeMap<String, String>,
    pub adopted_from: Option<Adoption>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.outputs.iter().map(|o| o.size).sum()
    }
}

/// The cache folder.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// Put `new` where `old` is in one step, so readers see the old entry or the new one and
/// never a missing one; afterwards `new`'s path holds the old entry.
fn exchange(new: &Path, old: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(new.as_os_str().as_bytes())?;
    let b = CString::new(old.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 reads them and nothing else.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A folder in which one attempt at an entry is assembled.
pub struct Staging {
    pub key: String,
    pub dir: PathBuf,
}

impl Staging {
    pub fn outputs(&self) -> PathBuf {
        self.dir.join("outputs")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log.txt")
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it), for manifests.
pub fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn is_hex_key(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Write `bytes` to `path` so a reader sees the old file or the new one, never a torn one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    // A file path always has a parent here (the cache's own paths are absolute or relative
    // to a folder); "" stands for the current folder.
    let dir = path.parent().unwrap_or(Path::new(""));
    fs::create_dir_all(dir).io("creating", dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    {
        let mut f = File::create(&tmp).io("creating", &tmp)?;
        f.write_all(bytes).io("writing", &tmp)?;
        f.sync_all().io("writing", &tmp)?;
    }
    fs::rename(&tmp, path).io("renaming into", path)?;
    Ok(())
}

/// Bytes free on the filesystem holding `path` (for an unprivileged writer).
pub fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct it is given and reads a NUL-terminated
    // path that lives across the call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return None;
        }
        Some(st.f_bavail as u64 * st.f_frsize as u64)
    }
}

/// Whether an error's text says a filesystem was full (ENOSPC, or a quota's EDQUOT): the
/// words of Rust's and the C library's messages, since a stage's error reaches the
/// executor as text from its log.
pub fn says_disk_full(text: &str) -> bool {
    [
        "No space left on device",
        "os error 28",
        "Disk quota exceeded",
        "os error 122",
    ]
    .iter()
    .any(|w| text.contains(w))
}

/// blake3 of a file's bytes, as hex.
pub fn hash_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).io("opening", path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).io("reading", path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Every file below `dir`, as sorted paths relative to it with `/` separators.
fn list_files(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let abs = dir.join(&rel);
        for e in fs::read_dir(&abs).io("listing", &abs)? {
            let e = e.io("listing", &abs)?;
            let r = rel.join(e.file_name());
            let ty = e.file_type().io("reading", &abs.join(e.file_name()))?;
            if ty.is_dir() {
                todo.push(r);
            } else if ty.is_file() {
                out.push(r.to_string_lossy().replace('\\', "/"));
            } else {
                return Err(CacheError::NotAPlainFile(abs.join(e.file_name())));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn hash_outputs(dir: &Path) -> Result<(Vec<OutputFile>, String)> {
    let mut files = Vec::new();
    let mut h = blake3::Hasher::new();
    for rel in list_files(dir)? {
        let p = dir.join(&rel);
        let size = fs::metadata(&p).io("reading", &p)?.len();
        let hash = hash_file(&p)?;
        put(&mut h, rel.as_bytes());
        put(&mut h, hash.as_bytes());
        files.push(OutputFile {
            path: rel,
            size,
            blake3: hash,
        });
    }
    Ok((files, h.finalize().to_hex().to_string()))
}

fn dir_size(p: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(p) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| dir_size(&e.path())).sum())
        .unwrap_or(0)
}

impl Cache {
    pub fn open(root: impl Into<PathBuf>) -> Result<Cache> {
        let root = root.into();
        for sub in ["entries", "staging", "scratch", "locks", "refs"] {
            let d = root.join(sub);
            fs::create_dir_all(&d).io("cannot create cache folder", &d)?;
        }
        Ok(Cache { root })
    }

    /// Bytes free for this cache on its filesystem (statvfs's blocks available to an
    /// unprivileged writer), if the system says.
    pub fn free_bytes(&self) -> Option<u64> {
        free_bytes(&self.root)
    }

    /// Checks that this process can write the cache, by creating and removing a file in
    /// `staging/`: a run checks before it starts anything, rather than failing at its first
    /// commit.
    pub fn check_writable(&self) -> Result<()> {
        let probe = self
            .root
            .join("staging")
            .join(format!(".write-probe-{}", std::process::id()));
        match fs::write(&probe, b"") {
            Ok(()) => {
                let _ = fs::remove_file(&probe);
                Ok(())
            }
            Err(source) => Err(CacheError::ReadOnly {
                path: self.root.clone(),
                source,
            }),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn checked(key: &str) -> Result<&str> {
        if !is_hex_key(key) {
            return Err(CacheError::NotAKey(key.to_string()));
        }
        Ok(key)
    }

    pub fn entry_dir(&self, key: &str) -> PathBuf {
        self.root.join("entries").join(key)
    }

    /// The manifest of a committed entry, if there is one.
    pub fn lookup(&self, key: &str) -> Result<Option<Manifest>> {
        let key = Self::checked(key)?;
        let path = self.entry_dir(key).join("manifest.json");
        match fs::read(&path) {
            Ok(bytes) => {
                let m: Manifest = serde_json::from_slice(&bytes).map_err(|source| {
                    CacheError::CorruptManifest {
                        path: path.clone(),
                        source,
                    }
                })?;
                Ok(Some(m))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).io("reading", &path),
        }
    }

    /// A fresh staging folder for `key`. Call with the key's lock held.
    pub fn staging(&self, key: &str) -> Result<Staging> {
        let key = Self::checked(key)?;
        let dir = self
            .root
            .join("staging")
            .join(format!("{key}-{}", std::process::id()));
        if dir.exists() {
            fs::remove_dir_all(&dir).io("removing", &dir)?;
        }
        fs::create_dir_all(dir.join("outputs")).io("creating", &dir)?;
        Ok(Staging {
            key: key.to_string(),
            dir,
        })
    }

    /// The staging folders of attempts at `key` now in progress (or left by dead ones).
    pub fn attempts(&self, key: &str) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = fs::read_dir(self.root.join("staging"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(key))
            .map(|e| e.path())
            .collect();
        dirs.sort();
        dirs
    }

    /// Scratch space that survives a failed attempt (checkpoints); removed at commit.
    pub fn scratch(&self, key: &str) -> Result<PathBuf> {
        let dir = self.scratch_path(Self::checked(key)?);
        fs::create_dir_all(&dir).io("creating", &dir)?;
        Ok(dir)
    }

    /// Where `key`'s scratch folder is, whether or not it exists (creates nothing).
    pub fn scratch_path(&self, key: &str) -> PathBuf {
        self.root.join("scratch").join(key)
    }

    /// Hash the staged outputs, write the manifest and move the entry into place. With
    /// `replace` (a forced recompute) an existing entry is swapped out in one step, so until
    /// this moment it stays whole and readable, and a failed attempt never loses it.
    pub fn commit(&self, staging: Staging, info: CommitInfo, replace: bool) -> Result<Manifest> {
        let (outputs, output_hash) = hash_outputs(&staging.outputs())?;
        let manifest = Manifest {
            key: staging.key.clone(),
            stage: info.stage,
            kind: info.kind,
            components: info.components,
            outputs,
            output_hash,
            started_unix: info.started_unix,
            seconds: now_unix() - info.started_unix,
            metrics: info.metrics,
            tool_version: info.tool_version,
            environment: info.environment,
            adopted_from: info.adopted_from,
        };
        write_atomic(
            &staging.dir.join("manifest.json"),
            &serde_json::to_vec_pretty(&manifest).map_err(|source| CacheError::Serialise {
                what: "a manifest",
                source,
            })?,
        )?;
        let dest = self.entry_dir(&staging.key);
        if !dest.exists() {
            if let Err(e) = fs::rename(&staging.dir, &dest) {
                // Another host committed the same key in between (a filesystem whose locks
                // do not reach across hosts): its entry is as good as ours.
                if !dest.join("manifest.json").exists() {
                    return Err(e).io("moving entry into", &dest);
                }
                fs::remove_dir_all(&staging.dir).io("removing", &staging.dir)?;
            }
        } else if replace {
            if exchange(&staging.dir, &dest).is_err() {
                // A filesystem without RENAME_EXCHANGE (NFS): two renames, with a window in
                // which the entry is absent, but never one in which it is half-written.
                let old = self
                    .root
                    .join("staging")
                    .join(format!("{}-old", staging.key));
                let _ = fs::remove_dir_all(&old);
                fs::rename(&dest, &old).io("moving aside", &dest)?;
                fs::rename(&staging.dir, &dest).io("moving entry into", &dest)?;
                fs::rename(&old, &staging.dir).io("moving aside", &old)?;
            }
            fs::remove_dir_all(&staging.dir).io("removing", &staging.dir)?;
        } else {
            // Same key, same inputs: the existing entry is as good as ours.
            fs::remove_dir_all(&staging.dir).io("removing", &staging.dir)?;
        }
        if let Ok(d) = File::open(self.root.join("entries")) {
            let _ = d.sync_all();
        }
        let _ = fs::remove_dir_all(self.root.join("scratch").join(&staging.key));
        Ok(manifest)
    }

    /// The first committed entry whose manifest `pick` accepts, preferring `preferred`.
    pub fn find(
        &self,
        preferred: Option<&str>,
        pick: impl Fn(&Manifest) -> bool,
    ) -> Result<Option<Manifest>> {
        let keys = self.keys()?;
        let ordered = preferred
            .filter(|p| keys.iter().any(|k| k == p))
            .map(str::to_string)
            .into_iter()
            .chain(
                keys.iter()
                    .filter(|k| Some(k.as_str()) != preferred)
                    .cloned(),
            );
        for key in ordered {
            if let Ok(Some(m)) = self.lookup(&key) {
                if pick(&m) {
                    return Ok(Some(m));
                }
            }
        }
        Ok(None)
    }

    /// Fill `staging` with the outputs and log of entry `from` (hard links where the
    /// filesystem allows: entries are never modified, so sharing their files is safe).
    pub fn stage_copy_of(&self, from: &str, staging: &Staging) -> Result<()> {
        let src = self.entry_dir(Self::checked(from)?);
        for rel in list_files(&src.join("outputs"))? {
            let (a, b) = (src.join("outputs").join(&rel), staging.outputs().join(&rel));
            if let Some(parent) = b.parent() {
                fs::create_dir_all(parent).io("creating", parent)?;
            }
            if fs::hard_link(&a, &b).is_err() {
                fs::copy(&a, &b).io("copying", &a)?;
            }
        }
        let _ = fs::copy(src.join("log.txt"), staging.log_path());
        Ok(())
    }

    /// Drop a failed attempt's staging folder (the scratch folder stays for resume).
    pub fn discard(&self, staging: Staging) {
        let _ = fs::remove_dir_all(staging.dir);
    }

    fn ref_path(&self, pipeline: &str, stage: &str) -> PathBuf {
        let safe = |s: &str| {
            if !s.is_empty()
                && !s.starts_with('.')
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            {
                s.to_string()
            } else {
                blake3::hash(s.as_bytes()).to_hex().to_string()
            }
        };
        self.root
            .join("refs")
            .join(safe(pipeline))
            .join(format!("{}.json", safe(stage)))
    }

    /// Remember which key a pipeline's stage last resolved to, for `plan` and `gc`.
    pub fn record_ref(
        &self,
        pipeline: &str,
        stage: &str,
        components: &KeyComponents,
    ) -> Result<()> {
        if self.read_ref(pipeline, stage).as_ref() == Some(components) {
            return Ok(());
        }
        write_atomic(
            &self.ref_path(pipeline, stage),
            &serde_json::to_vec_pretty(components).map_err(|source| CacheError::Serialise {
                what: "key components",
                source,
            })?,
        )
    }

    pub fn read_ref(&self, pipeline: &str, stage: &str) -> Option<KeyComponents> {
        let bytes = fs::read(self.ref_path(pipeline, stage)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::same_file;
    use std::collections::HashSet;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "relora-cache-{}-{}",
            std::process::id(),
            now_unix().to_bits()
        ));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn key_depends_on_every_component_and_is_unambiguous() {
        let mut a = KeyComponents::default();
        a.insert("params", "ab");
        a.insert("q", "c");
        let mut b = KeyComponents::default();
        b.insert("params", "a");
        b.insert("q", "bc");
        assert_ne!(a.key(), b.key());
        assert_eq!(a.key(), a.clone().key());
        assert_eq!(a.key().len(), 64);
    }

    #[test]
    fn commit_is_atomic_and_verify_finds_corruption() {
        let cache = Cache::open(tmp()).unwrap();
        let mut c = KeyComponents::default();
        c.insert("params", "{}");
        let key = c.key();
        assert!(cache.lookup(&key).unwrap().is_none());
        let lock = cache.lock(&key, |_| {}).unwrap();
        assert!(lock.stale_holder.is_none());
        let st = cache.staging(&key).unwrap();
        fs::create_dir_all(st.outputs().join("sub")).unwrap();
        fs::write(st.outputs().join("sub/a.txt"), b"hello").unwrap();
        // Not visible until committed.
        assert!(cache.lookup(&key).unwrap().is_none());
        let info = CommitInfo {
            stage: "s".into(),
            kind: "command".into(),
            components: c.clone(),
            started_unix: now_unix(),
            ..Default::default()
        };
        let m = cache.commit(st, info, false).unwrap();
        drop(lock);
        assert_eq!(m.outputs[0].path, "sub/a.txt");
        assert_eq!(
            cache.lookup(&key).unwrap().unwrap().output_hash,
            m.output_hash
        );
        assert!(cache.verify().unwrap().is_empty());
        fs::write(cache.entry_dir(&key).join("outputs/sub/a.txt"), b"HELLO").unwrap();
        let v = cache.verify().unwrap();
        assert_eq!(v.len(), 1);
        assert!(v[0].1.contains("sub/a.txt"), "{:?}", v);
        let r = cache.gc(&HashSet::new()).unwrap();
        assert_eq!(r.entries, 1);
        assert!(r.bytes >= 5);
        assert_eq!(r.locks, 1, "gc removes the lock files it can take");
        assert!(cache.keys().unwrap().is_empty());
    }

    fn commit_one(cache: &Cache, c: &KeyComponents, text: &[u8], replace: bool) -> Manifest {
        let key = c.key();
        let _lock = cache.lock(&key, |_| {}).unwrap();
        let st = cache.staging(&key).unwrap();
        fs::write(st.outputs().join("a.txt"), text).unwrap();
        let info = CommitInfo {
            stage: "s".into(),
            kind: "command".into(),
            components: c.clone(),
            ..Default::default()
        };
        cache.commit(st, info, replace).unwrap()
    }

    #[test]
    fn a_forced_recompute_keeps_the_old_entry_until_the_new_one_commits() {
        let cache = Cache::open(tmp()).unwrap();
        let mut c = KeyComponents::default();
        c.insert("params", "{}");
        let key = c.key();
        let old = commit_one(&cache, &c, b"old", false);
        // An attempt that fails (staged, then discarded) leaves the old entry whole.
        let lock = cache.lock(&key, |_| {}).unwrap();
        let st = cache.staging(&key).unwrap();
        fs::write(st.outputs().join("a.txt"), b"half").unwrap();
        cache.discard(st);
        drop(lock);
        assert_eq!(
            cache.lookup(&key).unwrap().unwrap().output_hash,
            old.output_hash
        );
        assert_eq!(
            fs::read(cache.entry_dir(&key).join("outputs/a.txt")).unwrap(),
            b"old"
        );
        // Without replace, a second commit keeps the first; with it, the new one wins.
        commit_one(&cache, &c, b"other", false);
        assert_eq!(
            fs::read(cache.entry_dir(&key).join("outputs/a.txt")).unwrap(),
            b"old"
        );
        let new = commit_one(&cache, &c, b"new", true);
        assert_ne!(new.output_hash, old.output_hash);
        assert_eq!(
            fs::read(cache.entry_dir(&key).join("outputs/a.txt")).unwrap(),
            b"new"
        );
        assert_eq!(
            cache.lookup(&key).unwrap().unwrap().output_hash,
            new.output_hash
        );
        assert!(fs::read_dir(cache.root().join("staging"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn gc_leaves_keys_that_a_running_stage_holds_and_cleans_locks() {
        let cache = Cache::open(tmp()).unwrap();
        let mut done = KeyComponents::default();
        done.insert("params", "done");
        commit_one(&cache, &done, b"x", false);
        let mut running = KeyComponents::default();
        running.insert("params", "running");
        let rk = running.key();
        let held = cache.lock(&rk, |_| {}).unwrap();
        let scratch = cache.scratch(&rk).unwrap();
        fs::write(scratch.join("ckpt"), b"step 50").unwrap();
        let st = cache.staging(&rk).unwrap();
        // Another process's view: a second Cache on the same folder.
        let other = Cache::open(cache.root()).unwrap();
        let r = other.gc(&HashSet::new()).unwrap();
        assert_eq!(r.entries, 1);
        assert_eq!(r.busy, vec![rk.clone()]);
        assert!(scratch.join("ckpt").exists() && st.dir.exists());
        assert!(!other.lock_path(&done.key()).exists());
        drop(held);
        // Once released, the next gc takes them.
        let r = other.gc(&HashSet::new()).unwrap();
        assert!(r.busy.is_empty());
        assert!(!scratch.exists() && !st.dir.exists());
        assert!(fs::read_dir(cache.root().join("locks"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn a_lock_file_removed_under_a_waiter_is_taken_again() {
        let cache = Cache::open(tmp()).unwrap();
        let key = KeyComponents::default().key();
        let first = cache.lock(&key, |_| {}).unwrap();
        let path = cache.lock_path(&key);
        // Held open, so the file system cannot give its inode to the file the waiter makes.
        let removed = fs::File::open(&path).unwrap();
        let c2 = cache.clone();
        let k2 = key.clone();
        let waiter = std::thread::spawn(move || {
            let l = c2.lock(&k2, |_| {}).unwrap();
            same_file(&l.file, &l.path)
        });
        std::thread::sleep(std::time::Duration::from_millis(100));
        // gc's move: remove the file while holding its lock, then let go. (Whether the path
        // is empty right after depends on how soon the waiter wakes and makes a new file,
        // so the test looks only at where things end.)
        first.remove();
        assert!(
            waiter.join().unwrap(),
            "the waiter must hold the file now at the path"
        );
        assert!(path.exists());
        assert!(
            !same_file(&removed, &path),
            "the file at the path must be a new one, not the removed one"
        );
    }

    #[test]
    fn keys_that_are_not_hex_are_refused() {
        let cache = Cache::open(tmp()).unwrap();
        assert!(matches!(
            cache.lookup("../../etc"),
            Err(CacheError::NotAKey(k)) if k == "../../etc"
        ));
        assert!(matches!(cache.staging("../x"), Err(CacheError::NotAKey(_))));
    }

    #[test]
    fn errors_name_the_file_they_concern() {
        let cache = Cache::open(tmp()).unwrap();
        let key = "ab".repeat(32);
        let manifest = cache.entry_dir(&key).join("manifest.json");
        fs::create_dir_all(manifest.parent().unwrap()).unwrap();
        fs::write(&manifest, b"{ not json").unwrap();
        match cache.lookup(&key) {
            Err(e @ CacheError::CorruptManifest { .. }) => {
                assert!(e.to_string().contains(&*manifest.to_string_lossy()), "{e}");
                assert!(e.to_string().contains("relora-pipe verify"), "{e}");
            }
            other => panic!("expected a corrupt manifest, got {other:?}"),
        }
        let missing = cache.root().join("no-such-folder").join("f");
        let e = hash_file(&missing).unwrap_err();
        assert_eq!(e.to_string(), format!("opening {}", missing.display()));
        // The I/O error itself is the source, for callers that print the chain.
        assert!(std::error::Error::source(&e).is_some());
    }
}
