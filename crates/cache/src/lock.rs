//! The per-key lock that makes concurrent runs compute each entry once: a file lock (flock)
//! the kernel drops when its holder dies, with the holder's pid and host written inside so
//! a waiter can say whom it waits for and a stale holder can be named.

use crate::{Cache, IoContext, Result};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Held while an entry is being computed; dropping it releases the lock.
pub struct EntryLock {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    /// A previous holder that died without releasing the lock cleanly.
    pub stale_holder: Option<LockHolder>,
}

/// This machine's name, if the kernel says it.
pub fn hostname() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
}

/// Who holds (or held) a key's lock, as it wrote itself into the lock file. The host
/// matters when the cache is shared by machines: a pid alone names nothing there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockHolder {
    /// The holder's process id, on `host`.
    pub pid: u32,
    /// The holder's machine (empty in lock files of older versions).
    pub host: String,
}

impl LockHolder {
    /// This process.
    pub fn me() -> LockHolder {
        LockHolder {
            pid: std::process::id(),
            host: hostname().unwrap_or_default(),
        }
    }

    /// `PID HOST` as written by [`Cache::lock`] (or a bare pid, as older versions wrote).
    pub(crate) fn parse(text: &str) -> Option<LockHolder> {
        let mut it = text.split_whitespace();
        let pid = it.next()?.parse().ok()?;
        Some(LockHolder {
            pid,
            host: it.next().unwrap_or_default().to_string(),
        })
    }
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "process {}", self.pid)?;
        if !self.host.is_empty() {
            write!(f, " on {}", self.host)?;
        }
        Ok(())
    }
}

impl Drop for EntryLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

impl EntryLock {
    /// Remove the lock file while holding it (for `gc`). Anyone who opened the old file and
    /// then gets its lock sees that the path no longer names it and starts again.
    pub(crate) fn remove(self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether `file` is still the file at `path` (a lock file can be removed by `gc` between
/// open and lock).
pub(crate) fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

impl Cache {
    /// Take the key's lock, waiting for another process that holds it.
    pub fn lock(&self, key: &str, on_wait: impl FnMut(Option<LockHolder>)) -> Result<EntryLock> {
        let key = Self::checked(key)?;
        let (mut file, path) = self
            .acquire(key, true, on_wait)?
            .expect("a waiting acquire always takes the lock");
        let mut prev = String::new();
        use std::io::Seek;
        file.seek(std::io::SeekFrom::Start(0))
            .io("reading lock", &path)?;
        file.read_to_string(&mut prev).io("reading lock", &path)?;
        // A clean release empties the file, so a name left in it is a holder that died.
        let me = LockHolder::me();
        let stale_holder = LockHolder::parse(&prev).filter(|h| *h != me);
        // Only the holder of this lock builds this key, so any staging folder left for it
        // belongs to a dead attempt.
        let staging = self.root.join("staging");
        for e in fs::read_dir(&staging).io("listing", &staging)?.flatten() {
            if e.file_name().to_string_lossy().starts_with(key) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
        file.set_len(0).io("writing lock", &path)?;
        file.seek(std::io::SeekFrom::Start(0))
            .io("writing lock", &path)?;
        write!(file, "{} {}", me.pid, me.host).io("writing lock", &path)?;
        file.sync_all().io("writing lock", &path)?;
        Ok(EntryLock {
            file,
            path,
            stale_holder,
        })
    }

    /// Who holds the key's lock now, read without taking it (nothing is written): the
    /// holder named in the lock file, if that process is alive on this host.
    pub fn live_holder(&self, key: &str) -> Option<LockHolder> {
        let text = fs::read_to_string(self.lock_path(key)).ok()?;
        let h = LockHolder::parse(&text)?;
        let here = hostname().unwrap_or_default();
        let alive = Path::new("/proc").join(h.pid.to_string()).exists();
        ((h.host.is_empty() || h.host == here) && alive).then_some(h)
    }

    pub(crate) fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    /// Open and lock the key's lock file; `wait: false` returns None when another process
    /// holds it. Retries when `gc` removed the file between our open and our lock.
    fn acquire(
        &self,
        key: &str,
        wait: bool,
        mut on_wait: impl FnMut(Option<LockHolder>),
    ) -> Result<Option<(File, PathBuf)>> {
        let path = self.lock_path(key);
        loop {
            let mut file = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .io("opening lock", &path)?;
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) if !wait => return Ok(None),
                Err(fs::TryLockError::WouldBlock) => {
                    let mut s = String::new();
                    let _ = file.read_to_string(&mut s);
                    on_wait(LockHolder::parse(&s));
                    file.lock().io("locking", &path)?;
                }
                Err(fs::TryLockError::Error(e)) => return Err(e).io("locking", &path),
            }
            if same_file(&file, &path) {
                return Ok(Some((file, path)));
            }
        }
    }

    /// The key's lock if nobody holds it now (for `gc`, which must never wait on a run).
    pub(crate) fn try_lock(&self, key: &str) -> Result<Option<EntryLock>> {
        Ok(self
            .acquire(key, false, |_| {})?
            .map(|(file, path)| EntryLock {
                file,
                path,
                stale_holder: None,
            }))
    }
}
