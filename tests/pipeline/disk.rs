//! Full disks: the cache on a small tmpfs (mounted and unmounted by the test, as root, as
//! CI runs), filled at a chosen moment. Each case asserts the error (the path it could not
//! write, the stage's estimated need, what to do), that what was committed before is
//! intact (`verify`), and that after space is freed the next run finishes: a train stage
//! from its last checkpoint, to the same bytes as an uninterrupted run.

use super::{assert_gc_leaves_no_attempts, assert_verified, files_below, repo, Env};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs at `dir`, unmounted when dropped.
struct SmallFs {
    dir: PathBuf,
}

impl SmallFs {
    fn mount(dir: &Path, size: &str) -> SmallFs {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mount tmpfs (these tests need root): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        SmallFs {
            dir: dir.to_path_buf(),
        }
    }

    /// More room: what "space was freed" looks like to the cache.
    fn grow(&self, size: &str) {
        let o = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    fn free(&self) -> u64 {
        relora_cache::free_bytes(&self.dir).unwrap()
    }

    /// A file of zeros taking all but `leave` bytes (to the page).
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        let mut left = self.free().saturating_sub(leave) / 4096;
        while left > 0 {
            if f.write_all(&chunk).is_err() {
                break;
            }
            left -= 1;
        }
        f.sync_all().unwrap();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Tokens, a full-rank train stage checkpointing every 5 of its 20 steps, an export.
fn pipeline(env: &Env) {
    let data = repo().join("examples/data");
    let yaml = format!(
        "pipeline: disk\nstages:\n{}  train:\n    kind: train\n    inputs: {{data: tokens}}\n    \
         params: {{method: full, model: {{hidden: 32, intermediate: 64, heads: 2, layers: 2}}, \
         steps: 20, lr: 1.0e-3, seq_len: 32, micro_batch: 2, checkpoint_every: 5}}\n  \
         export:\n    kind: export\n    inputs: {{model: train, tokenizer: tokens}}\n",
        tiny_tokens_stage!()
    )
    .replace("DATA", data.to_str().unwrap());
    env.write("disk.yaml", &yaml);
}

/// The outputs of `stage` in `env`'s cache.
fn outputs(env: &Env, stage: &str) -> PathBuf {
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["show", "disk.yaml", stage, "--json"])).unwrap();
    PathBuf::from(v["path"].as_str().unwrap()).join("outputs")
}

fn failed(env: &Env, args: &[&str]) -> String {
    let o = env.run(args);
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "it should have failed:\n{err}");
    err
}

/// The advice every full-disk failure ends with, for `stage`.
fn assert_advice(err: &str, stage: &str) {
    assert!(
        err.contains("is full:") && err.contains(&format!("stage `{stage}` writes up to ")),
        "{err}"
    );
    assert!(
        err.contains("relora-pipe gc") && err.contains("--cache-dir"),
        "{err}"
    );
}

/// The four moments of the issue, one cache: a shard, a checkpoint, a commit, an export.
#[test]
fn a_full_disk_fails_clearly_keeps_what_was_done_and_the_next_run_resumes() {
    // The uninterrupted run, on the ordinary disk: what every resumed run must equal.
    let reference = Env::new();
    pipeline(&reference);
    reference.ok(&["run", "disk.yaml"]);
    let checkpoint_bytes: u64 = files_below(&outputs(&reference, "train").join("checkpoint"))
        .values()
        .map(|b| b.len() as u64)
        .sum();

    let env = Env::new();
    pipeline(&env);
    let fs = SmallFs::mount(&env.path().join("cache"), "96k");

    // 1. A tokenize shard: 96 kB holds the tokenizer, not the ~0.4 MB of shards.
    let err = failed(&env, &["run", "disk.yaml"]);
    assert!(
        err.contains(".parquet") && err.contains("No space left on device"),
        "the shard's path and the reason: {err}"
    );
    assert_advice(&err, "tokens");
    fs.grow("16m");

    // 2. A checkpoint: room for the first (step 5), not for the second beside it.
    env.ok(&["run", "disk.yaml", "--until", "tokens"]);
    let filler = fs.fill_leaving(checkpoint_bytes * 3 / 2 + 64 * 1024);
    let err = failed(&env, &["run", "disk.yaml"]);
    assert!(
        err.contains("saving the checkpoint at step 10 (the previous one is kept)")
            && err.contains("checkpoints/ckpt-00000010.partial-")
            && err.contains("No space left on device"),
        "{err}"
    );
    assert_advice(&err, "train");
    assert_verified(&env);
    std::fs::remove_file(&filler).unwrap();

    // 3. The commit: paused just before it, the disk filled, then let go.
    let marker = env.path().join("paused");
    let child = env
        .cmd(&["run", "disk.yaml", "--until", "train"])
        .env(
            "RELORA_PAUSE_AT",
            format!("commit:train:{}", marker.display()),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !marker.exists() {
        assert!(start.elapsed().as_secs() < 120, "never reached the commit");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let filler = fs.fill_leaving(0);
    std::fs::remove_file(&marker).unwrap();
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("manifest.json") && err.contains("No space left on device"),
        "the manifest's path and the reason: {err}"
    );
    assert_advice(&err, "train");
    assert_verified(&env);
    std::fs::remove_file(&filler).unwrap();

    // Space back: the train stage resumes from its last checkpoint (step 15) and commits
    // the same bytes as the uninterrupted run.
    env.ok(&["run", "disk.yaml", "--until", "train"]);
    let log = std::fs::read_to_string(outputs(&env, "train").join("../log.txt")).unwrap();
    assert!(
        log.contains("resuming from the checkpoint at step 15"),
        "{log}"
    );
    assert_eq!(
        files_below(&outputs(&env, "train")),
        files_below(&outputs(&reference, "train"))
    );

    // 4. The export: less room than its weights.
    let filler = fs.fill_leaving(64 * 1024);
    let err = failed(&env, &["run", "disk.yaml"]);
    assert!(err.contains("No space left on device"), "{err}");
    assert_advice(&err, "export");
    assert_verified(&env);
    std::fs::remove_file(&filler).unwrap();
    env.ok(&["run", "disk.yaml"]);
    assert_eq!(
        files_below(&outputs(&env, "export")),
        files_below(&outputs(&reference, "export"))
    );
    assert_verified(&env);

    // Nothing of the failed attempts is left once gc has run.
    assert_gc_leaves_no_attempts(&env, "disk.yaml");
}

/// `plan --estimate` warns when the cache's filesystem has less free space than the stages
/// that would run write.
#[test]
fn plan_estimate_warns_when_the_cache_has_too_little_space() {
    let env = Env::new();
    pipeline(&env);
    let _fs = SmallFs::mount(&env.path().join("cache"), "256k");
    let plan = env.ok(&["plan", "disk.yaml", "--estimate"]);
    assert!(
        plan.contains("warning: the stages that would run write up to 1.7 MB into the cache"),
        "{plan}"
    );
}
