//! Routes answered without a server: what is refused, and how.

use super::*;

fn board(token: Option<&str>) -> (tempfile::TempDir, Board) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        "pipeline: p\nstages:\n  a:\n    kind: command\n    params: {run: 'echo A > $OUT/a.txt'}\n",
    )
    .unwrap();
    let cache = Cache::open(dir.path().join("cache")).unwrap();
    let b = Board {
        files: vec![file],
        registry: relora_stages::registry(),
        cache,
        token: token.map(str::to_string),
        rates: Rates::default(),
    };
    (dir, b)
}

#[test]
fn unknown_routes_are_404_and_nothing_but_get_is_answered() {
    let (_d, b) = board(None);
    assert_eq!(b.handle("GET", "/").status, 200);
    assert_eq!(b.handle("GET", "/api/state?p=0").status, 200);
    assert_eq!(b.handle("GET", "/nope").status, 404);
    assert_eq!(b.handle("GET", "/api/state?p=7").status, 404);
    assert_eq!(b.handle("GET", "/api/stage?p=0&s=zz").status, 404);
    for m in ["POST", "PUT", "DELETE", "PATCH"] {
        assert_eq!(b.handle(m, "/api/state?p=0").status, 405, "{m}");
    }
    let page = String::from_utf8(b.handle("GET", "/").body).unwrap();
    assert!(
        !page.contains("http://") && !page.contains("https://"),
        "the page fetches nothing from elsewhere"
    );
}

#[test]
fn a_token_is_required_when_one_is_set() {
    let (_d, b) = board(Some("s3cret"));
    assert_eq!(b.handle("GET", "/").status, 401);
    assert_eq!(b.handle("GET", "/api/state?p=0").status, 401);
    assert_eq!(b.handle("GET", "/api/state?p=0&token=wrong").status, 401);
    assert_eq!(b.handle("GET", "/api/state?p=0&token=s3cret").status, 200);
    assert_eq!(b.handle("GET", "/?token=s3cret").status, 200);
}

#[test]
fn paths_outside_an_entrys_outputs_are_refused() {
    let (_d, b) = board(None);
    for f in [
        "../manifest.json",
        "%2e%2e/manifest.json",
        "%2e%2e%2fmanifest.json",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "/etc/passwd",
        "%2Fetc%2Fpasswd",
        "a/../../x",
        "",
    ] {
        let r = b.handle("GET", &format!("/api/file?p=0&s=a&f={f}"));
        assert_eq!(r.status, 404, "{f}");
    }
    assert_eq!(b.handle("GET", "/api/file?p=0&s=a&f=%zz").status, 400);
    assert!(is_loopback("127.0.0.1") && is_loopback("::1") && is_loopback("localhost"));
    assert!(!is_loopback("0.0.0.0") && !is_loopback("10.1.2.3"));
}
