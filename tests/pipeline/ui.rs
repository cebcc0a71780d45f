//! `relora-pipe ui`: the dashboard over real HTTP, and in a real browser (Debian's
//! `chromium`, headless) while a pipeline runs. Without chromium the browser test says so
//! and passes, unless RELORA_REQUIRE_CHROMIUM=1 (as `.ci/run` sets, after installing it).
//! Screenshots are kept in target/ui-screenshots/.

use super::{repo, tiny_ml, wait_until, Env};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `relora-pipe ui`, stopped when dropped.
struct Ui {
    child: Child,
    url: String,
}

impl Drop for Ui {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_ui(env: &Env, args: &[&str]) -> Ui {
    let mut all = vec!["ui"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--port", "0"]);
    let mut child = env
        .cmd(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("relora-pipe ui: ")
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
    Ui { child, url }
}

/// (status, body) of one request, over a plain socket.
fn request(url: &str, method: &str, path: &str) -> (u16, String) {
    let hostport = url
        .strip_prefix("http://")
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .replace("0.0.0.0", "127.0.0.1");
    let mut s = TcpStream::connect(&hostport).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    (status, body)
}

/// Every file under the cache with its bytes: what the dashboard must not change.
fn snapshot(env: &Env) -> std::collections::BTreeMap<String, Vec<u8>> {
    super::files_below(&env.path().join("cache"))
}

#[test]
fn the_dashboard_answers_only_reads_and_never_leaves_the_cache() {
    let env = Env::new();
    env.write("chain.yaml", super::CHAIN);
    env.ok(&["run", "chain.yaml"]);
    let before = snapshot(&env);
    let ui = start_ui(&env, &["chain.yaml"]);
    let (status, page) = request(&ui.url, "GET", "/");
    assert_eq!(status, 200);
    assert!(page.contains("<svg") || page.contains("relora-pipe"));
    assert!(!page.contains("https://") && !page.contains("http://"));
    let (status, state) = request(&ui.url, "GET", "/api/state?p=0");
    assert_eq!(status, 200, "{state}");
    for s in ["\"a\"", "\"b\"", "\"c\"", "\"d\""] {
        assert!(state.contains(s), "{state}");
    }
    assert_eq!(
        request(&ui.url, "GET", "/api/file?p=0&s=a&f=a.txt"),
        (200, "A1\n".into())
    );
    for path in [
        "/nope",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/etc/passwd",
        "/api/file?p=0&s=a&f=../manifest.json",
        "/api/file?p=0&s=a&f=%2e%2e%2fmanifest.json",
        "/api/file?p=0&s=a&f=..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/file?p=0&s=a&f=/etc/passwd",
        "/api/file?p=0&s=a&f=%2Fetc%2Fpasswd",
        "/api/file?p=0&s=../a&f=a.txt",
    ] {
        assert_eq!(request(&ui.url, "GET", path).0, 404, "{path}");
    }
    for method in ["POST", "PUT", "DELETE"] {
        assert_eq!(
            request(&ui.url, method, "/api/state?p=0").0,
            405,
            "{method}"
        );
    }
    assert_eq!(snapshot(&env), before, "a request changed the cache");
    drop(ui);

    // Bound beyond loopback: a token in the printed URL, and 401 without it.
    let ui = start_ui(&env, &["chain.yaml", "--host", "0.0.0.0"]);
    let token = ui.url.split("token=").nth(1).expect("a token in the URL");
    assert!(token.len() >= 32, "{}", ui.url);
    assert_eq!(request(&ui.url, "GET", "/").0, 401);
    assert_eq!(request(&ui.url, "GET", "/api/state?p=0").0, 401);
    assert_eq!(request(&ui.url, "GET", "/api/state?p=0&token=nope").0, 401);
    assert_eq!(
        request(&ui.url, "GET", &format!("/api/state?p=0&token={token}")).0,
        200
    );
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser"].iter().find_map(|name| {
        let out = Command::new("which").arg(name).output().ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    })
}

/// The page's DOM after its script has run (and a screenshot of it when `shot` is given).
fn dom(browser: &PathBuf, url: &str, shot: Option<&str>) -> String {
    let headless = |extra: &[String]| {
        let mut c = Command::new(browser);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1400,900",
            "--virtual-time-budget=6000",
        ]);
        c.args(extra).arg(url);
        c.output().unwrap()
    };
    if let Some(name) = shot {
        let dir = repo().join("target/ui-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        headless(&[format!("--screenshot={}", dir.join(name).display())]);
    }
    String::from_utf8_lossy(&headless(&["--dump-dom".to_string()]).stdout).to_string()
}

/// The text of the running stage's progress line in the graph, e.g. `step 120/3000 …`.
fn step_of(dom: &str, stage: &str) -> Option<u64> {
    let at = dom.find(&format!("data-stage=\"{stage}\" data-state=\"running\""))?;
    let rest = &dom[at..];
    let s = rest.find("step ")? + 5;
    rest[s..].split('/').next()?.parse().ok()
}

const LIVE: &str = r#"
  slow:
    kind: train
    inputs: {data: tokens}
    params: {method: full, steps: 4000, lr: 1.0e-2, model: {hidden: 64, intermediate: 128, heads: 2, layers: 2}}
  fast:
    kind: train
    matrix: {lr: [1.0e-3, 1.0e-2]}
    inputs: {data: tokens}
    params: {method: full, steps: 20, lr: "${lr}"}
  broken:
    kind: command
    params: {run: "echo about to fail; exit 3"}
"#;

#[test]
fn the_dashboard_in_a_browser_follows_a_running_pipeline() {
    let Some(browser) = chromium() else {
        assert!(
            std::env::var("RELORA_REQUIRE_CHROMIUM").is_err(),
            "RELORA_REQUIRE_CHROMIUM is set but chromium is not installed"
        );
        eprintln!(
            "chromium is not installed: the browser test did not run (apt-get install chromium)"
        );
        return;
    };
    let env = Env::new();
    let file = tiny_ml(&env);
    let text = std::fs::read_to_string(&file).unwrap();
    // The tiny pipeline's tokens, then stages of its own: one slow enough to watch.
    let head = &text[..text.find("  warm:").unwrap()];
    env.write("live.yaml", &format!("{head}{LIVE}"));
    let mut run = env
        .cmd(&["run", "live.yaml", "--jobs", "3", "--keep-going"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ui = start_ui(&env, &["live.yaml"]);
    let cache = env.path().join("cache");
    wait_until(
        "the slow stage reports steps",
        Duration::from_secs(120),
        || {
            std::fs::read_dir(cache.join("scratch"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.path().join("metrics.jsonl").exists())
        },
    );
    wait_until("the broken stage fails", Duration::from_secs(60), || {
        std::fs::read_dir(cache.join("scratch"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("last-failure.log").exists())
    });
    let first = dom(&browser, &ui.url, Some("graph-running.png"));
    for stage in ["tokens", "slow", "fast-0.001", "fast-0.01", "broken"] {
        assert!(
            first.contains(&format!("data-stage=\"{stage}\"")),
            "{stage} missing:\n{first}"
        );
    }
    assert!(
        first.contains("data-stage=\"broken\" data-state=\"failed\""),
        "{first}"
    );
    assert!(first.contains("exit status: 3"), "{first}");
    let step1 = step_of(&first, "slow").unwrap_or_else(|| panic!("no running step:\n{first}"));
    std::thread::sleep(Duration::from_secs(2));
    let second = dom(&browser, &ui.url, None);
    let step2 = step_of(&second, "slow").unwrap_or_else(|| panic!("no running step:\n{second}"));
    assert!(
        step2 > step1,
        "the step did not advance: {step1} then {step2}"
    );
    let _ = run.kill();
    let _ = run.wait();

    // A finished stage's page: its loss curve has a point per metrics line.
    let show: serde_json::Value =
        serde_json::from_str(&env.ok(&["show", "live.yaml", "fast-0.01", "--json"])).unwrap();
    let metrics = PathBuf::from(show["path"].as_str().unwrap()).join("outputs/metrics.jsonl");
    let lines = std::fs::read_to_string(metrics).unwrap().lines().count();
    let page = dom(
        &browser,
        &format!("{}#/stage/fast-0.01", ui.url),
        Some("stage.png"),
    );
    assert!(
        page.contains(&format!("data-series=\"loss\" data-points=\"{lines}\"")),
        "want {lines} loss points:\n{page}"
    );
    // Compare: the parameter that differs is named.
    let cmp = dom(
        &browser,
        &format!("{}#/compare?s=fast-0.001&s=fast-0.01", ui.url),
        Some("compare.png"),
    );
    let table = &cmp[cmp
        .find("id=\"compare-table\"")
        .unwrap_or_else(|| panic!("{cmp}"))..];
    assert!(table.contains("<td>lr</td>"), "{table}");
}
