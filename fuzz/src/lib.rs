//! What the fuzz targets share: a private scratch folder per process (in /dev/shm when it
//! exists), since every reader under test takes a path.

use std::path::{Path, PathBuf};
use std::sync::{Once, OnceLock};

/// libfuzzer-sys aborts on any panic, even one our code catches (the readers turn a
/// dependency's panic on corrupt data into an error). This hook only prints; a panic that
/// escapes the target still ends in libfuzzer-sys's abort, and is reported as a crash.
pub fn report_caught_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| std::panic::set_hook(Box::new(|info| eprintln!("(caught?) {info}"))));
}

/// This process's scratch folder, made once.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("relora-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

/// Write `bytes` to `name` in the scratch folder (a sub-folder if `name` has one).
pub fn put(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch().join(name);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).expect("a folder");
    }
    std::fs::write(&p, bytes).expect("a scratch file");
    p
}

/// `data` cut at each 0xff 0x00 0xff marker into at most `n` parts (the last takes the
/// rest): one fuzz input drives several files.
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(3).position(|w| w == [0xff, 0x00, 0xff]) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + 3..];
            }
            None => break,
        }
    }
    out.push(rest);
    while out.len() < n {
        out.push(&[]);
    }
    out
}
