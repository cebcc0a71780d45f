//! A token shard folder (parquet files of token-id lists), read as training reads it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    relora_fuzz::report_caught_panics();
    let dir = relora_fuzz::scratch().join("split");
    let _ = std::fs::remove_dir_all(&dir);
    relora_fuzz::put("split/00000-00000.parquet", data);
    let _ = relora_data::read_split(&dir);
});
