//! A corpus file in each format the tokenize stage reads: JSON lines, gzipped JSON lines,
//! plain text, parquet (the first byte picks), with bad records an error or skipped.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relora_data::corpus::{detect_format, for_each_doc};
use relora_data::OnBadRecord;

fuzz_target!(|data: &[u8]| {
    relora_fuzz::report_caught_panics();
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let name = ["c.jsonl", "c.json.gz", "c.txt", "c.parquet"][(pick % 4) as usize];
    let on_bad = if pick & 4 == 0 {
        OnBadRecord::Error
    } else {
        OnBadRecord::Skip
    };
    let path = relora_fuzz::put(name, body);
    let _ = for_each_doc(&path, detect_format(&path), "text", on_bad, |d| {
        Ok(d.text.len() < 1 << 20)
    });
});
