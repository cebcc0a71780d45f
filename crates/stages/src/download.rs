//! `download`: files from http(s) URLs, each pinned by its sha256, resumable.
//!
//! A partial file is kept in the stage's scratch folder; a rerun asks the server for the
//! rest (an HTTP Range request) and starts over only if the server cannot resume. A file
//! whose sha256 differs from the pinned one is an error, and is not kept.

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
    pub sha256: String,
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
    fn version(&self) -> u32 {
        1
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
            if f.sha256.len() != 64 || !f.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                e.push(stage.error(&at("sha256"), "sha256 must be 64 hex digits"));
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
        for (i, f) in p.files.iter().enumerate() {
            let name = f.file_name();
            let part = ctx.scratch_dir.join(format!("{name}.part"));
            let bytes = fetch(&agent, &f.url, &part, |done| {
                ctx.progress(&Progress {
                    step: i as u64,
                    total: p.files.len() as u64,
                    note: Some(format!("{name}: {:.1} MiB", done as f64 / 1048576.0)),
                    ..Default::default()
                })
            })?;
            let got = sha256_file(&part)?;
            if !got.eq_ignore_ascii_case(&f.sha256) {
                let _ = std::fs::remove_file(&part);
                bail!(
                    "{}: sha256 is {got}, the pipeline pins {}; the download was discarded",
                    f.url,
                    f.sha256
                );
            }
            std::fs::rename(&part, ctx.out_dir.join(&name))?;
            println!("{name}: {bytes} bytes, sha256 ok");
            total += bytes;
        }
        ctx.metric("bytes", total);
        Ok(())
    }
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
