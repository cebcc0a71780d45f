//! The executor's config file (`~/.config/relora-pipe/config.yaml`): parsed and checked
//! against the stage kinds, as every command does before it runs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    relora_fuzz::report_caught_panics();
    let path = relora_fuzz::put("config.yaml", data);
    if let Ok(Some(block)) = relora_spec::load_config(&path) {
        let _ = relora_exec::check_executor_block(&block, &relora_stages::registry());
    }
});
