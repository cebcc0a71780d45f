//! relora-ui: `relora-pipe ui`, a local, read-only web dashboard of pipelines and their
//! cache: the DAG coloured by each stage's state (updated by polling while a `run` in
//! another terminal makes progress), a page per stage (parameters, key, inputs, outputs,
//! log, curves, a report's tables and figures), and runs compared side by side.
//!
//! It serves one embedded page (`page.html`, with its script and styles inline: nothing is
//! fetched from elsewhere) and a few JSON routes, all GET. No route runs, deletes or writes
//! anything. It binds 127.0.0.1 by default; bound elsewhere, every request must carry the
//! random token printed with the URL, or gets 401. The one route that serves files serves
//! a cached entry's outputs, and refuses any path that would leave them.

mod state;

use anyhow::{Context, Result};
use relora_cache::Cache;
use relora_exec::Registry;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

pub use state::Rates;

const PAGE: &str = include_str!("page.html");

/// A dashboard over these pipeline files and this cache.
pub struct Board {
    pub files: Vec<PathBuf>,
    pub registry: Registry,
    pub cache: Cache,
    /// Required on every request when set (a non-loopback bind).
    pub token: Option<String>,
    pub rates: Rates,
}

/// One answer: status, content type, body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, v: &serde_json::Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: serde_json::to_vec(v).unwrap_or_default(),
        }
    }
    fn error(status: u16, message: &str) -> Reply {
        Reply::json(status, &json!({ "error": message }))
    }
}

/// `%41` → `A`, `+` → space; None for a malformed escape or text that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The path and the query's (name, value) pairs of a request URL, decoded.
fn split_url(url: &str) -> Option<(String, Vec<(String, String)>)> {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    let mut q = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        q.push((percent_decode(k)?, percent_decode(v)?));
    }
    Some((percent_decode(path)?, q))
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

impl Board {
    /// Answer one request. Everything the server does goes through here.
    pub fn handle(&self, method: &str, url: &str) -> Reply {
        if method != "GET" && method != "HEAD" {
            return Reply::error(405, "read-only: only GET is answered");
        }
        let Some((path, q)) = split_url(url) else {
            return Reply::error(400, "malformed URL");
        };
        if let Some(token) = &self.token {
            if param(&q, "token") != Some(token.as_str()) {
                return Reply::error(401, "this dashboard needs the token printed with its URL");
            }
        }
        let pipeline = || -> Result<&PathBuf, Reply> {
            let id: usize = param(&q, "p")
                .unwrap_or("0")
                .parse()
                .map_err(|_| Reply::error(400, "p must be a number"))?;
            self.files
                .get(id)
                .ok_or_else(|| Reply::error(404, "no such pipeline"))
        };
        let result = match path.as_str() {
            "/" | "/index.html" => {
                return Reply {
                    status: 200,
                    content_type: "text/html; charset=utf-8",
                    body: PAGE.as_bytes().to_vec(),
                }
            }
            "/api/pipelines" => Ok(Reply::json(
                200,
                &json!(self
                    .files
                    .iter()
                    .enumerate()
                    .map(|(i, f)| json!({"id": i, "file": f.display().to_string()}))
                    .collect::<Vec<_>>()),
            )),
            "/api/state" => match pipeline() {
                Err(r) => return r,
                Ok(f) => {
                    state::snapshot(f, &self.registry, &self.cache, &self.rates).map(|body| Reply {
                        status: 200,
                        content_type: "application/json",
                        body,
                    })
                }
            },
            "/api/stage" => match (pipeline(), param(&q, "s")) {
                (Err(r), _) => return r,
                (_, None) => return Reply::error(400, "name the stage: s=NAME"),
                (Ok(f), Some(s)) => {
                    state::stage(f, s, &self.registry, &self.cache).map(|v| match v {
                        Some(v) => Reply::json(200, &v),
                        None => Reply::error(404, "no such stage"),
                    })
                }
            },
            "/api/compare" => match pipeline() {
                Err(r) => return r,
                Ok(f) => {
                    let names: Vec<String> = q
                        .iter()
                        .filter(|(k, _)| k == "s")
                        .map(|(_, v)| v.clone())
                        .collect();
                    state::compare(f, &names, &self.registry, &self.cache)
                        .map(|v| Reply::json(200, &v))
                }
            },
            "/api/file" => match (pipeline(), param(&q, "s"), param(&q, "f")) {
                (Err(r), _, _) => return r,
                (Ok(f), Some(s), Some(rel)) => {
                    state::output_file(f, s, rel, &self.registry, &self.cache).map(|p| match p {
                        Some(p) => file_reply(&p),
                        None => Reply::error(404, "no such output file"),
                    })
                }
                _ => return Reply::error(400, "name the stage and file: s=NAME&f=PATH"),
            },
            _ => return Reply::error(404, "no such page"),
        };
        result.unwrap_or_else(|e| Reply::error(500, &format!("{e:#}")))
    }
}

fn file_reply(p: &std::path::Path) -> Reply {
    let name = p.to_string_lossy();
    let content_type = match name.rsplit('.').next() {
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("json") | Some("jsonl") => "application/json",
        _ => "text/plain; charset=utf-8",
    };
    match std::fs::read(p) {
        Ok(body) => Reply {
            status: 200,
            content_type,
            body,
        },
        Err(_) => Reply::error(404, "no such output file"),
    }
}

/// 16 random bytes as hex, from the kernel.
pub fn random_token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the dashboard's token")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Whether a bind address is this machine only.
pub fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Serve until the process ends; `on_ready(url)` is called once the port is bound.
pub fn serve(board: Board, host: &str, port: u16, on_ready: impl FnOnce(String)) -> Result<()> {
    let server = tiny_http::Server::http((host, port))
        .map_err(|e| anyhow::anyhow!("cannot listen on {host}:{port}: {e}"))?;
    let bound = server
        .server_addr()
        .to_ip()
        .map(|a| a.port())
        .unwrap_or(port);
    let url = match &board.token {
        Some(t) => format!("http://{host}:{bound}/?token={t}"),
        None => format!("http://{host}:{bound}/"),
    };
    on_ready(url);
    let server = Arc::new(server);
    let board = Arc::new(board);
    // A few workers: a slow plan for one tab does not stall another's polls.
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (server, board) = (server.clone(), board.clone());
            std::thread::spawn(move || {
                while let Ok(req) = server.recv() {
                    let reply = board.handle(req.method().as_str(), req.url());
                    let header = tiny_http::Header::from_bytes("Content-Type", reply.content_type)
                        .expect("a valid header");
                    let cache = tiny_http::Header::from_bytes("Cache-Control", "no-store")
                        .expect("a valid header");
                    let response = tiny_http::Response::from_data(reply.body)
                        .with_status_code(reply.status)
                        .with_header(header)
                        .with_header(cache);
                    let _ = req.respond(response);
                    // A big pipeline's plan is built per request and dropped after it:
                    // give its pages back, so the server holds little between polls.
                    // SAFETY: malloc_trim only releases free memory to the system.
                    unsafe {
                        libc::malloc_trim(0);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
