//! `download`: files from http(s) URLs, each pinned by its sha256, resumable.
//!
//! A partial file is kept in the stage's scratch folder; a rerun asks the server for the
//! rest (an HTTP Range request) and starts over only if the server cannot resume. Finished,
//! verified files wait in the scratch folder too, so a stage of many files that fails on the
//! twentieth keeps the first nineteen. A file whose sha256 differs from the pinned one is an
//! error, and is not kept.
//!
//! A file may go unpinned only when the stage says `allow_unpinned: true` (for sources whose
//! checksums could not be obtained when the pipeline was written): its first download is
//! trusted, and the stage prints the `sha256:` line to pin it with. Every download writes
//! `SHA256SUMS` beside the files.

use anyhow::{bail, Context, Result};
use relora_exec::{parse_params, Progress, StageContext, StageKind};
use relora_spec::{SpecError, StageSpec};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteFile {
    pub url: String,
    /// Required unless the stage sets `allow_unpinned`.
    #[serde(default)]
    pub sha256: Option<String>,
    /// File name in the outputs (default: the URL's last path segment).
    #[serde(default)]
    pub name: Option<String>,
}

impl RemoteFile {
    fn file_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let path = self.url.split(['?', '#']).next().unwrap_or_default();
            path.rsplit('/').next().unwrap_or_default().to_string()
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadParams {
    pub files: Vec<RemoteFile>,
    /// Trust the first download of files that have no `sha256`.
    #[serde(default)]
    pub allow_unpinned: bool,
}

pub struct Download;

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && !n.starts_with('.')
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

impl StageKind for Download {
    fn name(&self) -> &'static str {
        "download"
    }
    fn code(&self) -> &'static [(&'static str, &'static str)] {
        crate::code::DOWNLOAD
    }
    fn inputs(&self) -> Option<&'static [(&'static str, bool)]> {
        Some(&[])
    }
    fn validate(&self, stage: &StageSpec) -> Result<(), Vec<SpecError>> {
        let p: DownloadParams = parse_params(stage)?;
        let mut e = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, f) in p.files.iter().enumerate() {
            let idx = i.to_string();
            let at = |k: &'static str| ["params", "files", idx.as_str(), k];
            if !(f.url.starts_with("http://") || f.url.starts_with("https://")) {
                e.push(stage.error(&at("url"), format!("`{}` is not an http(s) URL", f.url)));
            }
            match &f.sha256 {
                Some(h) if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    e.push(stage.error(&at("sha256"), "sha256 must be 64 hex digits"));
                }
                None if !p.allow_unpinned => e.push(stage.error(
                    &["params", "files", idx.as_str()],
                    format!(
                        "`{}` has no sha256: pin it (`sha256: <64 hex digits>`), or set \
                         `allow_unpinned: true` on the stage to trust its first download",
                        f.url
                    ),
                )),
                _ => {}
            }
            let name = f.file_name();
            if !valid_name(&name) || !names.insert(name.clone()) {
                e.push(stage.error(
                    &at("name"),
                    format!("file name `{name}` must be unique and hold only letters, digits, `.`, `_`, `-`"),
                ));
            }
        }
        relora_spec::no_errors(e)
    }
    fn run(&self, ctx: &mut StageContext) -> Result<()> {
        let p: DownloadParams = serde_json::from_value(ctx.params.clone())?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let mut total = 0u64;
        let mut sums = String::new();
        let mut unpinned = Vec::new();
        for (i, f) in p.files.iter().enumerate() {
            let name = f.file_name();
            let done = ctx.scratch_dir.join(&name);
            let (got, bytes) = if let Some(got) = verified(&ctx.scratch_dir, &name, f)? {
                println!("{name}: already downloaded and verified");
                (got, std::fs::metadata(&done)?.len())
            } else {
                let part = ctx.scratch_dir.join(format!("{name}.part"));
                let bytes = fetch(&agent, &f.url, &part, |so_far| {
                    ctx.progress(&Progress {
                        step: i as u64,
                        total: p.files.len() as u64,
                        note: Some(format!("{name}: {:.1} MiB", so_far as f64 / 1048576.0)),
                        ..Default::default()
                    })
                })?;
                let got = sha256_file(&part)?;
                match &f.sha256 {
                    Some(want) if !got.eq_ignore_ascii_case(want) => {
                        let _ = std::fs::remove_file(&part);
                        bail!(
                            "{}: sha256 is {got}, the pipeline pins {want}; the download was discarded",
                            f.url
                        );
                    }
                    Some(_) => println!("{name}: {bytes} bytes, sha256 ok"),
                    None => println!("{name}: {bytes} bytes, unpinned, sha256 {got}"),
                }
                // Remember the verified hash, so a rerun after a later failure trusts it.
                std::fs::write(hash_record(&ctx.scratch_dir, &name), &got)?;
                std::fs::rename(&part, &done)?;
                (got, bytes)
            };
            if f.sha256.is_none() {
                unpinned.push(format!("{{url: {}, sha256: {got}}}", f.url));
            }
            sums.push_str(&format!("{got}  {name}\n"));
            total += bytes;
        }
        for f in &p.files {
            let name = f.file_name();
            std::fs::rename(ctx.scratch_dir.join(&name), ctx.out_dir.join(&name))?;
        }
        std::fs::write(ctx.out_dir.join("SHA256SUMS"), sums)?;
        if !unpinned.is_empty() {
            println!(
                "{} file(s) were trusted on first download; to pin them, replace their entries with:",
                unpinned.len()
            );
            for u in &unpinned {
                println!("  - {u}");
            }
        }
        ctx.metric("bytes", total);
        ctx.metric("unpinned_files", unpinned.len());
        Ok(())
    }
}

/// Where the sha256 of a finished download `name` is recorded in scratch.
fn hash_record(scratch: &Path, name: &str) -> std::path::PathBuf {
    scratch.join(format!("{name}.sha256"))
}

/// The sha256 of a finished download left in scratch by an earlier, failed run, if it still
/// matches what was recorded for it (and what the pipeline pins).
fn verified(scratch: &Path, name: &str, f: &RemoteFile) -> Result<Option<String>> {
    let done = scratch.join(name);
    let (Ok(recorded), true) = (
        std::fs::read_to_string(hash_record(scratch, name)),
        done.exists(),
    ) else {
        return Ok(None);
    };
    if f.sha256
        .as_ref()
        .is_some_and(|want| !want.eq_ignore_ascii_case(&recorded))
    {
        return Ok(None);
    }
    Ok((sha256_file(&done)? == recorded).then_some(recorded))
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Download `url` into `part`, continuing a partial file if the server allows; returns its size.
fn fetch(
    agent: &ureq::Agent,
    url: &str,
    part: &Path,
    mut progress: impl FnMut(u64),
) -> Result<u64> {
    let have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = agent.get(url);
    if have > 0 {
        req = req.header("Range", format!("bytes={have}-"));
    }
    let mut resp = req.call().with_context(|| format!("requesting {url}"))?;
    let status = resp.status().as_u16();
    let append = match status {
        206 if have > 0 => true,
        200 => false,
        // The partial file is already complete.
        416 if have > 0 => return Ok(have),
        s => bail!("{url}: the server answered HTTP {s}"),
    };
    if append {
        println!("resuming {url} at byte {have}");
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .with_context(|| format!("writing {}", part.display()))?;
    let mut done = if append { have } else { 0 };
    let mut reader = resp.body_mut().as_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut last = std::time::Instant::now();
    loop {
        let n = reader.read(&mut buf).with_context(|| {
            format!("{url}: the connection broke after {done} bytes; run again to resume")
        })?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])?;
        done += n as u64;
        if last.elapsed().as_secs() >= 1 {
            progress(done);
            last = std::time::Instant::now();
        }
    }
    file.sync_all()?;
    Ok(done)
}
