//! Keeping the cache: listing its entries, `gc` (remove what no listed pipeline uses, and
//! leftovers of killed runs), `verify` (re-hash every entry's outputs against its
//! manifest) and the quarantine that `verify --repair` moves corrupt entries into.

use crate::{dir_size, hash_outputs, is_hex_key, Cache, CacheError, IoContext, Result};
use std::collections::HashSet;
use std::fs;
use std::path::PathBuf;

/// What `gc` did.
#[derive(Debug, Clone, Default)]
pub struct GcReport {
    /// Entries removed.
    pub entries: usize,
    /// Bytes freed (entries, scratch and staging folders).
    pub bytes: u64,
    /// Lock files removed.
    pub locks: usize,
    /// Keys left alone because a running stage holds their lock.
    pub busy: Vec<String>,
}

impl Cache {
    /// Every committed entry's key.
    pub fn keys(&self) -> Result<Vec<String>> {
        let mut keys: Vec<String> = fs::read_dir(self.root.join("entries"))
            .io("listing", &self.root.join("entries"))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|k| is_hex_key(k))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Remove every entry (and scratch folder) whose key is not in `keep`, and every lock
    /// file and dead staging folder. A key whose lock another process holds (a stage running
    /// now) is left alone, entry, scratch and all. Returns what was done.
    pub fn gc(&self, keep: &HashSet<String>) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut names: Vec<(String, &str)> = Vec::new();
        for sub in ["entries", "scratch"] {
            for e in fs::read_dir(self.root.join(sub))
                .io("listing", &self.root.join(sub))?
                .flatten()
            {
                names.push((e.file_name().to_string_lossy().to_string(), sub));
            }
        }
        for (name, sub) in names {
            if keep.contains(&name) || !is_hex_key(&name) {
                continue;
            }
            let Some(lock) = self.try_lock(&name)? else {
                report.busy.push(name);
                continue;
            };
            let path = self.root.join(sub).join(&name);
            report.bytes += dir_size(&path);
            if path.exists() {
                fs::remove_dir_all(&path).io("removing", &path)?;
            }
            if sub == "entries" {
                report.entries += 1;
            }
            drop(lock);
        }
        for e in fs::read_dir(self.root.join("staging"))
            .io("listing", &self.root.join("staging"))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            let key = name.get(..64).unwrap_or_default();
            if !is_hex_key(key) {
                continue;
            }
            // A staging folder whose key nobody holds belongs to a dead attempt.
            if let Some(lock) = self.try_lock(key)? {
                report.bytes += dir_size(&e.path());
                let _ = fs::remove_dir_all(e.path());
                drop(lock);
            }
        }
        for e in fs::read_dir(self.root.join("locks"))
            .io("listing", &self.root.join("locks"))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(key) = name.strip_suffix(".lock").filter(|k| is_hex_key(k)) else {
                continue;
            };
            if let Some(lock) = self.try_lock(key)? {
                lock.remove();
                report.locks += 1;
            }
        }
        report.busy.sort();
        report.busy.dedup();
        Ok(report)
    }

    /// Re-hash every entry's outputs; returns (key, problem) for each mismatch.
    pub fn verify(&self) -> Result<Vec<(String, String)>> {
        let mut problems = Vec::new();
        for key in self.keys()? {
            if let Some(why) = self.check(&key)? {
                problems.push((key, why));
            }
        }
        Ok(problems)
    }

    /// Re-hash one committed entry's outputs against its manifest: None when they match,
    /// else what is wrong (the stage, and the files changed or missing). An entry that is
    /// not there at all is not this function's business: Ok(None).
    pub fn check(&self, key: &str) -> Result<Option<String>> {
        let dir = self.entry_dir(key);
        if !dir.exists() {
            return Ok(None);
        }
        let m = match self.lookup(key) {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(Some("no manifest.json".into())),
            Err(e) => return Ok(Some(format!("{e:#}"))),
        };
        let (files, hash) = match hash_outputs(&dir.join("outputs")) {
            Ok(x) => x,
            Err(e) => return Ok(Some(format!("stage `{}`: {e:#}", m.stage))),
        };
        if hash == m.output_hash {
            return Ok(None);
        }
        let bad: Vec<String> = files
            .iter()
            .filter(|f| !m.outputs.contains(f))
            .map(|f| f.path.clone())
            .chain(
                m.outputs
                    .iter()
                    .filter(|o| !files.iter().any(|f| f.path == o.path))
                    .map(|o| format!("{} (missing)", o.path)),
            )
            .collect();
        Ok(Some(format!(
            "stage `{}`: changed outputs: {}",
            m.stage,
            bad.join(", ")
        )))
    }

    /// Moves entry `key` out of the cache into `quarantine/KEY-UNIXTIME`, so that the next
    /// run computes it again; nothing is deleted (`empty_quarantine` does that). Refused
    /// while a running stage holds the key's lock.
    pub fn quarantine(&self, key: &str) -> Result<PathBuf> {
        let Some(lock) = self.try_lock(key)? else {
            return Err(CacheError::Busy(key.to_string()));
        };
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir).io("creating", &dir)?;
        let to = dir.join(format!("{key}-{}", crate::now_unix() as u64));
        let from = self.entry_dir(key);
        fs::rename(&from, &to).io("moving into the quarantine", &from)?;
        drop(lock);
        Ok(to)
    }

    /// Deletes everything in the quarantine; returns (entries, bytes) removed.
    pub fn empty_quarantine(&self) -> Result<(usize, u64)> {
        let dir = self.root.join("quarantine");
        let Ok(list) = fs::read_dir(&dir) else {
            return Ok((0, 0));
        };
        let (mut n, mut bytes) = (0, 0);
        for e in list.flatten() {
            bytes += dir_size(&e.path());
            fs::remove_dir_all(e.path()).io("removing", &e.path())?;
            n += 1;
        }
        Ok((n, bytes))
    }
}
