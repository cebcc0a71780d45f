//! Inputs the fuzzers (fuzz/, scripts/faults/fuzz.sh) found to crash or hang a reader
//! (`crash-*`, `timeout-*`), kept in `fuzz/regressions/<target>/` and replayed here as
//! their targets feed them: each must now be an error that names the file, in well under
//! the fuzzers' 10 s limit. A new finding is a new file there.

use crate::corpus::{detect_format, for_each_doc};
use crate::OnBadRecord;
use std::path::PathBuf;

fn findings(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regressions")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no findings in {}", dir.display());
    out
}

/// fuzz/fuzz_targets/corpus.rs: the first byte picks the format and the bad-record rule.
#[test]
fn corpus_files_the_fuzzer_broke_are_errors_naming_the_file() {
    for (name, data) in findings("corpus") {
        let (pick, body) = data.split_first().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = ["c.jsonl", "c.json.gz", "c.txt", "c.parquet"][(pick % 4) as usize];
        let path = dir.path().join(file);
        std::fs::write(&path, body).unwrap();
        let on_bad = if pick & 4 == 0 {
            OnBadRecord::Error
        } else {
            OnBadRecord::Skip
        };
        let t0 = std::time::Instant::now();
        let r = for_each_doc(&path, detect_format(&path), "text", on_bad, |_| Ok(true));
        assert!(t0.elapsed().as_secs() < 5, "{name} took {:?}", t0.elapsed());
        let e = format!("{:#}", r.expect_err(&name));
        assert!(e.contains(&path.display().to_string()), "{name}: {e}");
    }
}

/// fuzz/fuzz_targets/shards.rs: the bytes as a split's only shard.
#[test]
fn shards_the_fuzzer_broke_are_errors_naming_the_file() {
    for (name, data) in findings("shards") {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000-00000.parquet");
        std::fs::write(&path, data).unwrap();
        let t0 = std::time::Instant::now();
        let r = crate::read_split(dir.path());
        assert!(t0.elapsed().as_secs() < 5, "{name} took {:?}", t0.elapsed());
        let e = format!("{:#}", r.expect_err(&name));
        assert!(e.contains(&path.display().to_string()), "{name}: {e}");
    }
}
