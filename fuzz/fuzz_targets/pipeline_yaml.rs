//! A pipeline file: parsed, expanded (matrix, defaults, imports) and validated by every
//! stage kind, as `relora-pipe plan` does. Any input may be refused; none may panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    relora_fuzz::report_caught_panics();
    let path = relora_fuzz::put("pipeline.yaml", data);
    if let Ok(p) = relora_spec::load(&path, &[]) {
        let _ = relora_exec::Dag::build(p, &relora_stages::registry());
    }
});
