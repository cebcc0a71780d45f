//! Keeping the cache: listing its entries, `gc` (remove what no listed pipeline uses, and
//! leftovers of killed runs) and `verify` (re-hash every entry's outputs against its
//! manifest).

use crate::{dir_size, hash_outputs, is_hex_key, Cache, IoContext, Result};
use std::collections::HashSet;
use std::fs;

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
            let m = match self.lookup(&key) {
                Ok(Some(m)) => m,
                Ok(None) => {
                    problems.push((key, "no manifest.json".into()));
                    continue;
                }
                Err(e) => {
                    problems.push((key, format!("{e:#}")));
                    continue;
                }
            };
            match hash_outputs(&self.entry_dir(&key).join("outputs")) {
                Ok((files, hash)) => {
                    if hash != m.output_hash {
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
                        problems.push((
                            key,
                            format!("stage `{}`: changed outputs: {}", m.stage, bad.join(", ")),
                        ));
                    }
                }
                Err(e) => problems.push((key, format!("{e:#}"))),
            }
        }
        Ok(problems)
    }
}
