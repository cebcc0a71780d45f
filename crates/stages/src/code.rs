//! The fingerprint of the code each stage kind runs, made at build time by `build.rs` (see
//! relora-fingerprint): `(part, fingerprint)` pairs, one per crate or module the kind's
//! outputs depend on, plus the versions of the crates.io packages that decide its numbers.
//! The executor puts each pair into the stage's key as `code.<part>`.

include!(concat!(env!("OUT_DIR"), "/code_fingerprints.rs"));
