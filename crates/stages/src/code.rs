//! The fingerprint of the code each stage kind runs, made at build time by `build.rs` (see
//! relora-fingerprint): `(part, fingerprint)` pairs, one per crate or module the kind's
//! outputs depend on, plus the versions of the crates.io packages that decide its numbers.
//! The executor puts each pair into the stage's key as `code.<part>`.

include!(concat!(env!("OUT_DIR"), "/code_fingerprints.rs"));

/// Whether two strings are equal, at compile time.
const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// Two checkouts building into one target folder share this crate's build-script output
// (cargo hashes path packages relative to their workspace), so the fingerprints above could
// describe the other checkout's code, and keys would not change when this one's code does.
const _: () = assert!(
    same(FINGERPRINTED_CRATE, env!("CARGO_MANIFEST_DIR")),
    "relora-stages: the code fingerprints were made for another checkout that shares this \
     target folder; run `touch crates/stages/build.rs` and build again, and give each \
     checkout its own CARGO_TARGET_DIR"
);
