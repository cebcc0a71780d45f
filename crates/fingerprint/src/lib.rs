//! relora-fingerprint: a fingerprint of the source code a stage kind's outputs depend on.
//!
//! Stage keys cover a fingerprint of the code that computes them, so an entry made by one
//! version of the model or the loader is never handed out by another (as Nix and Bazel hash
//! the toolchain and DVC the scripts). The fingerprint is computed at build time by the
//! build script of `relora-stages`, from *normalised* Rust source: comments (doc comments
//! too), whitespace, trailing commas and `#[cfg(test)]` modules are dropped before hashing,
//! so an edit that cannot change a result (a comment, `cargo fmt`, a new unit test) keeps
//! every cached entry, while any change to a token of the code that runs invalidates.
//!
//! Dependency versions that decide numerics (candle, gemm, tokenizers, arrow, …) are read
//! from `Cargo.lock` and recorded in plain text, so `plan` can say which one moved.
//!
//! This crate knows nothing of stages or caches: only files, tokens and hashes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// One lexical token of normalised Rust source.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// An identifier, keyword or number (a run of `[A-Za-z0-9_]`, with `.`-free parts).
    Word(String),
    /// A string, byte-string, raw-string or char literal, verbatim.
    Literal(String),
    /// Any other character.
    Punct(char),
}

/// Split Rust source into tokens, dropping comments and whitespace.
fn lex(src: &str) -> Vec<Token> {
    let s: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let word = |c: char| c.is_alphanumeric() || c == '_';
    while i < s.len() {
        let c = s[i];
        let next = s.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest in Rust.
            let mut depth = 0;
            while i < s.len() {
                if s[i] == '/' && s.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if s[i] == '*' && s.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if let Some(end) = raw_string_end(&s, i) {
            out.push(Token::Literal(s[i..end].iter().collect()));
            i = end;
        } else if c == '"' {
            let start = i;
            i += 1;
            while i < s.len() && s[i] != '"' {
                i += if s[i] == '\\' { 2 } else { 1 };
            }
            i = (i + 1).min(s.len());
            // A `b` prefix was lexed as a word already; that keeps `b"x"` distinct from `"x"`.
            out.push(Token::Literal(s[start..i].iter().collect()));
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
            if next == Some('\\') {
                let start = i;
                i += 2;
                while i < s.len() && s[i] != '\'' {
                    i += 1;
                }
                i = (i + 1).min(s.len());
                out.push(Token::Literal(s[start..i].iter().collect()));
            } else if s.get(i + 2) == Some(&'\'') {
                out.push(Token::Literal(s[i..i + 3].iter().collect()));
                i += 3;
            } else {
                out.push(Token::Punct('\''));
                i += 1;
            }
        } else if word(c) {
            let start = i;
            while i < s.len() && word(s[i]) {
                i += 1;
            }
            out.push(Token::Word(s[start..i].iter().collect()));
        } else {
            out.push(Token::Punct(c));
            i += 1;
        }
    }
    out
}

/// If a raw string (`r"…"`, `r#"…"#`, `br#"…"#`) starts at `i`, the index just past it.
fn raw_string_end(s: &[char], i: usize) -> Option<usize> {
    if i > 0 && (s[i - 1].is_alphanumeric() || s[i - 1] == '_') {
        return None;
    }
    let mut j = i;
    if s.get(j) == Some(&'b') {
        j += 1;
    }
    if s.get(j) != Some(&'r') {
        return None;
    }
    j += 1;
    let mut hashes = 0;
    while s.get(j) == Some(&'#') {
        hashes += 1;
        j += 1;
    }
    if s.get(j) != Some(&'"') {
        return None;
    }
    j += 1;
    while j < s.len() {
        if s[j] == '"' && (1..=hashes).all(|k| s.get(j + k) == Some(&'#')) {
            return Some(j + 1 + hashes);
        }
        j += 1;
    }
    Some(s.len())
}

/// Drop `#[cfg(test)] mod name { … }` and `#[cfg(test)] mod name;`: test code cannot change
/// what a stage computes.
fn strip_test_modules(tokens: Vec<Token>) -> Vec<Token> {
    let attr: Vec<Token> = lex("#[cfg(test)]");
    let mut out = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        let is_attr = tokens[i..].starts_with(&attr);
        let after = i + attr.len();
        let is_mod = is_attr
            && tokens.get(after) == Some(&Token::Word("mod".into()))
            && matches!(tokens.get(after + 1), Some(Token::Word(_)));
        if !is_mod {
            out.push(tokens[i].clone());
            i += 1;
            continue;
        }
        let mut j = after + 2;
        match tokens.get(j) {
            Some(Token::Punct(';')) => j += 1,
            Some(Token::Punct('{')) => {
                let mut depth = 0usize;
                while j < tokens.len() {
                    match tokens[j] {
                        Token::Punct('{') => depth += 1,
                        Token::Punct('}') => {
                            depth -= 1;
                            if depth == 0 {
                                j += 1;
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            _ => {
                out.push(tokens[i].clone());
                i += 1;
                continue;
            }
        }
        i = j;
    }
    out
}

/// Rust source with comments, whitespace, trailing commas and test modules removed: two
/// sources that differ only in those normalise to the same text.
pub fn normalize_rust(src: &str) -> String {
    let tokens = strip_test_modules(lex(src));
    let mut out = String::with_capacity(src.len() / 2);
    let mut prev_word = false;
    for (k, t) in tokens.iter().enumerate() {
        match t {
            Token::Punct(',') => {
                // rustfmt adds and removes trailing commas before a closing bracket.
                if matches!(tokens.get(k + 1), Some(Token::Punct(')' | ']' | '}'))) {
                    continue;
                }
                out.push(',');
                prev_word = false;
            }
            Token::Punct(c) => {
                out.push(*c);
                prev_word = false;
            }
            Token::Word(w) | Token::Literal(w) => {
                // Keep one space between words so `a as u8` never reads as `aasu8`.
                if prev_word {
                    out.push(' ');
                }
                out.push_str(w);
                prev_word = true;
            }
        }
    }
    out
}

/// Every file below `dir`, sorted, as paths relative to it.
fn files_below(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(dir.join(&rel))? {
            let e = e?;
            let r = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                todo.push(r);
            } else {
                out.push(r);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a source file is test-only (a crate's `src/tests.rs` and friends).
fn is_test_file(rel: &Path) -> bool {
    rel.file_name().is_some_and(|n| n == "tests.rs")
}

/// The fingerprint of one part of the code: a crate folder (its `src/**/*.rs`, normalised,
/// its CUDA kernels `src/**/*.cu` and its `assets/**`, byte for byte), a module folder (its
/// `**/*.rs`) or a single `.rs` file. Returns 16 hex digits and the files read, for the
/// build script's `rerun-if-changed`.
pub fn fingerprint_part(root: &Path, part: &str) -> std::io::Result<(String, Vec<PathBuf>)> {
    let path = root.join(part);
    let mut h = blake3::Hasher::new();
    let mut read = Vec::new();
    let mut add = |rel: &str, bytes: &[u8]| {
        h.update(&(rel.len() as u64).to_le_bytes());
        h.update(rel.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    if path.is_file() {
        let src = std::fs::read_to_string(&path)?;
        add(part, normalize_rust(&src).as_bytes());
        read.push(path);
    } else {
        // A crate has `src/` (and maybe `assets/`); a module folder inside one is all source.
        let subs: &[(&str, bool)] = if path.join("src").is_dir() {
            &[("src", true), ("assets", false)]
        } else {
            &[("", true)]
        };
        for &(sub, rust) in subs {
            let dir = path.join(sub);
            if !dir.is_dir() {
                continue;
            }
            for rel in files_below(&dir)? {
                let file = dir.join(&rel);
                let name = match sub {
                    "" => rel.to_string_lossy().to_string(),
                    _ => format!("{sub}/{}", rel.to_string_lossy()),
                };
                let ext = rel.extension().and_then(|e| e.to_str());
                if rust && ext == Some("cu") {
                    // CUDA kernels run as the Rust code does; hashed byte for byte.
                    add(&name, &std::fs::read(&file)?);
                } else if rust {
                    if ext != Some("rs") || is_test_file(&rel) {
                        continue;
                    }
                    add(
                        &name,
                        normalize_rust(&std::fs::read_to_string(&file)?).as_bytes(),
                    );
                } else {
                    add(&name, &std::fs::read(&file)?);
                }
                read.push(file);
            }
        }
        if read.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} holds no source to fingerprint", path.display()),
            ));
        }
    }
    Ok((h.finalize().to_hex()[..16].to_string(), read))
}

/// Package name → version, from a `Cargo.lock`.
pub fn locked_versions(lock: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut name: Option<String> = None;
    for line in lock.lines() {
        let value = |l: &str, key: &str| {
            l.strip_prefix(key)
                .map(|v| v.trim().trim_matches('"').to_string())
        };
        if line.trim() == "[[package]]" {
            name = None;
        } else if let Some(n) = value(line, "name = ") {
            name = Some(n);
        } else if let (Some(v), Some(n)) = (value(line, "version = "), name.take()) {
            // The first version seen wins when a crate is locked at two versions; both are
            // deterministic, which is all a fingerprint needs.
            out.entry(n).or_insert(v);
        }
    }
    out
}

/// `name version` for each of `crates`, joined: readable in a manifest and in `plan`.
pub fn dependency_versions(lock: &BTreeMap<String, String>, crates: &[&str]) -> String {
    let mut s = String::new();
    for c in crates {
        let v = lock.get(*c).map(String::as_str).unwrap_or("absent");
        if !s.is_empty() {
            s.push_str(", ");
        }
        let _ = write!(s, "{c} {v}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_whitespace_and_trailing_commas_do_not_matter() {
        let a = "/// Doc.\nfn f(a: u32, b: u32) -> u32 {\n    // why\n    a + b /* sum */\n}\n";
        let b = "fn f(\n    a: u32,\n    b: u32,\n) -> u32 { a+b }";
        assert_eq!(normalize_rust(a), normalize_rust(b));
        assert_eq!(normalize_rust(a), "fn f(a:u32,b:u32)->u32{a+b}");
    }

    #[test]
    fn tokens_that_run_do_matter() {
        let base = normalize_rust("fn f(x: f32) -> f32 { x * 2.0 }");
        for changed in [
            "fn f(x: f32) -> f32 { x * 3.0 }",
            "fn f(x: f32) -> f32 { x / 2.0 }",
            "fn g(x: f32) -> f32 { x * 2.0 }",
            "fn f(x: f32) -> f32 { (x * 2.0) }",
        ] {
            assert_ne!(normalize_rust(changed), base, "{changed}");
        }
        // Words stay apart: `a as u8` is not `aas u8`.
        assert_ne!(normalize_rust("a as u8"), normalize_rust("aas u8"));
    }

    #[test]
    fn literals_are_kept_verbatim_and_comment_markers_inside_them_are_not_comments() {
        let n = normalize_rust(r##"let s = "a // b"; let r = r#"x /* y "# ; let c = '"';"##);
        assert_eq!(n, r##"let s="a // b";let r=r#"x /* y "#;let c='"';"##);
        assert_ne!(
            normalize_rust(r#"let s = "a  b";"#),
            normalize_rust(r#"let s = "a b";"#)
        );
        // A lifetime is not a char literal.
        assert_eq!(
            normalize_rust("fn f<'a>(x: &'a str) {}"),
            "fn f<'a>(x:&'a str){}"
        );
        // Nested block comments.
        assert_eq!(normalize_rust("a /* x /* y */ z */ b"), "a b");
    }

    #[test]
    fn test_modules_are_dropped() {
        let with = "fn f() {}\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn t() { assert!(true); }\n}\n#[cfg(test)]\nmod more;\nfn g() {}";
        assert_eq!(normalize_rust(with), normalize_rust("fn f() {} fn g() {}"));
        // A cfg(test) item that is not a module is kept (it may be used by code that runs).
        assert!(normalize_rust("#[cfg(test)] fn h() {}").contains("fn h"));
    }

    #[test]
    fn parts_hash_source_and_assets_and_skip_test_files() {
        let dir = std::env::temp_dir().join(format!("relora-fp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("c/src")).unwrap();
        std::fs::write(dir.join("c/src/lib.rs"), "pub fn f() -> u8 { 1 }").unwrap();
        let (h1, files) = fingerprint_part(&dir, "c").unwrap();
        assert_eq!(files.len(), 1);
        std::fs::write(dir.join("c/src/tests.rs"), "fn t() {}").unwrap();
        std::fs::write(
            dir.join("c/src/lib.rs"),
            "// c\npub fn f() -> u8 {\n    1\n}\n",
        )
        .unwrap();
        assert_eq!(fingerprint_part(&dir, "c").unwrap().0, h1);
        std::fs::create_dir_all(dir.join("c/assets")).unwrap();
        std::fs::write(dir.join("c/assets/font.ttf"), [0u8, 1, 2]).unwrap();
        let h2 = fingerprint_part(&dir, "c").unwrap().0;
        // A module folder inside a crate: its Rust files, nested ones included.
        std::fs::create_dir_all(dir.join("c/src/m/sub")).unwrap();
        std::fs::write(dir.join("c/src/m/mod.rs"), "mod sub;").unwrap();
        std::fs::write(dir.join("c/src/m/sub/x.rs"), "pub fn x() {}").unwrap();
        let (m1, files) = fingerprint_part(&dir, "c/src/m").unwrap();
        assert_eq!(files.len(), 2);
        std::fs::write(dir.join("c/src/m/sub/x.rs"), "pub fn x() { }\nfn y() {}").unwrap();
        assert_ne!(fingerprint_part(&dir, "c/src/m").unwrap().0, m1);
        assert_ne!(h2, h1);
        std::fs::write(dir.join("c/src/lib.rs"), "pub fn f() -> u8 { 2 }").unwrap();
        let h3 = fingerprint_part(&dir, "c").unwrap().0;
        assert_ne!(h3, h2);
        // CUDA kernels count; other files under src (a C++ test harness) do not.
        std::fs::write(dir.join("c/src/k.cu"), "__global__ void k() {}").unwrap();
        let h4 = fingerprint_part(&dir, "c").unwrap().0;
        assert_ne!(h4, h3);
        std::fs::write(dir.join("c/src/check.cpp"), "int main() {}").unwrap();
        assert_eq!(fingerprint_part(&dir, "c").unwrap().0, h4);
        assert_eq!(fingerprint_part(&dir, "c/src/lib.rs").unwrap().0.len(), 16);
        assert!(fingerprint_part(&dir, "missing").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn versions_come_from_the_lock_file() {
        let lock = "version = 4\n\n[[package]]\nname = \"candle-core\"\nversion = \"0.11.1\"\nsource = \"x\"\n\n[[package]]\nname = \"gemm\"\nversion = \"0.19.0\"\n";
        let v = locked_versions(lock);
        assert_eq!(v["candle-core"], "0.11.1");
        assert_eq!(
            dependency_versions(&v, &["candle-core", "gemm", "nope"]),
            "candle-core 0.11.1, gemm 0.19.0, nope absent"
        );
    }
}
