//! The kill storm: a tiny pipeline with every stage kind (tokenize, full-rank and ReLoRA
//! training with checkpoints, LoRA, eval, svd, report, export, a command stage) is started
//! and killed at random moments, again and again: SIGKILL to the orchestrator, SIGKILL to
//! a stage's process group, SIGTERM or SIGINT to the orchestrator. When a run gets to the
//! end before its kill, the cache is emptied and the storm goes on. Then one last run
//! without a kill, and the checks: every output byte-identical to an uninterrupted run's,
//! `verify` finds nothing corrupt, no lock held by the dead blocks that run, no process of
//! ours is left, and after `gc` no staging or scratch folder remains.
//!
//! `cargo test --test pipeline storm` makes 10 kills from a fixed seed;
//! `scripts/kill-storm.sh` makes 100 (RELORA_STORM_KILLS, RELORA_STORM_SEED) and prints
//! what happened.

use super::{assert_gc_leaves_no_attempts, assert_verified, files_below, repo, Env, TINY_ML};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// TINY_ML, plus an export and a command stage.
fn pipeline(env: &Env) {
    let data = repo().join("examples/data");
    let yaml = format!(
        "{}  export:\n    kind: export\n    inputs: {{model: relora, tokenizer: tokens}}\n  \
         digest:\n    kind: command\n    inputs: {{eval: eval-relora, svd: svd}}\n    \
         params: {{run: \"sleep 0.5; cat $IN_EVAL/*.json $IN_SVD/*.json | cksum > $OUT/digest.txt\", \
         outputs: [digest.txt]}}\n",
        TINY_ML
    )
    .replace("DATA", data.to_str().unwrap());
    env.write("storm.yaml", &yaml);
}

/// Every stage's outputs: stage → (relative path → bytes).
fn all_outputs(env: &Env) -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let v: serde_json::Value =
        serde_json::from_str(&env.ok(&["status", "storm.yaml", "--json"])).unwrap();
    let mut out = BTreeMap::new();
    for s in v.as_array().unwrap() {
        let name = s["name"].as_str().unwrap().to_string();
        let key = s["key"].as_str().unwrap();
        let dir = env.path().join("cache/entries").join(key).join("outputs");
        out.insert(name, files_below(&dir));
    }
    out
}

/// splitmix64: a fixed stream of draws from a seed.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The pids of processes whose command line or working folder mentions `dir`: the
/// orchestrators, stage processes and shells of this test.
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = dir.to_string_lossy().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmd = std::fs::read(e.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        let cwd = std::fs::read_link(e.path().join("cwd"))
            .map(|p| p.to_string_lossy().to_string())
            .unwrap_or_default();
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .unwrap_or_default()
            .contains(") Z ");
        if !zombie && (cmd.contains(&needle) || cwd.starts_with(&needle)) {
            out.push((pid, cmd));
        }
    }
    out
}

/// The process group of a stage process the orchestrator `orchestrator` started, if one
/// runs now.
fn stage_group(orchestrator: u32) -> Option<i32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid pgrp ...: the fields after the last ')'.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let (ppid, pgrp): (u32, i32) = (f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?);
        if ppid == orchestrator {
            return Some(pgrp);
        }
    }
    None
}

#[derive(Default, Debug)]
pub struct StormReport {
    pub kills: BTreeMap<&'static str, usize>,
    /// Runs that reached the end before their kill (the cache was emptied after each).
    pub completed: usize,
    pub seconds: f64,
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory effects; a pid that has exited makes it fail harmlessly.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run the storm: `kills` kills drawn from `seed`, each at a moment within an
/// uninterrupted run's duration of its run's start. Panics on the first broken promise.
pub fn storm(kills: usize, seed: u64) -> StormReport {
    let t0 = Instant::now();
    let reference = Env::new();
    pipeline(&reference);
    reference.ok(&["run", "storm.yaml", "--jobs", "2"]);
    let horizon = t0.elapsed();
    let want = all_outputs(&reference);

    let env = Env::new();
    pipeline(&env);
    let mut draws = Draws(seed);
    let mut report = StormReport::default();
    let mut done = 0;
    while done < kills {
        let mut child = env
            .cmd(&["run", "storm.yaml", "--jobs", "2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        let delay = Duration::from_millis(draws.below(horizon.as_millis() as u64));
        let started = Instant::now();
        while started.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "a run without a kill failed");
            report.completed += 1;
            env.ok(&["gc", "--all"]);
            continue;
        }
        let how = match draws.below(4) {
            0 => {
                signal(pid as i32, libc::SIGKILL);
                "SIGKILL to the orchestrator"
            }
            1 => match stage_group(pid) {
                Some(g) => {
                    signal(-g, libc::SIGKILL);
                    "SIGKILL to a stage's process group"
                }
                None => {
                    signal(pid as i32, libc::SIGKILL);
                    "SIGKILL to the orchestrator"
                }
            },
            2 => {
                signal(pid as i32, libc::SIGTERM);
                "SIGTERM to the orchestrator"
            }
            _ => {
                signal(pid as i32, libc::SIGINT);
                "SIGINT to the orchestrator"
            }
        };
        // A killed stage fails its run; SIGINT cancels and exits: every run must end.
        assert!(
            wait_or_kill(&mut child, Duration::from_secs(60)).is_some(),
            "the run did not end within a minute of {how}"
        );
        *report.kills.entry(how).or_default() += 1;
        done += 1;
    }
    // The last run, uninterrupted: no lock left by the dead may block it.
    let out = env.ok(&["run", "storm.yaml", "--jobs", "2"]);
    assert!(
        !out.contains("waiting:"),
        "a stale lock held the run up: {out}"
    );
    let got = all_outputs(&env);
    let mut differ = Vec::new();
    for (stage, files) in &want {
        let theirs = got.get(stage).cloned().unwrap_or_default();
        for (file, bytes) in files {
            if theirs.get(file) != Some(bytes) {
                differ.push(format!("{stage}/{file}"));
            }
        }
        for file in theirs.keys().filter(|f| !files.contains_key(*f)) {
            differ.push(format!("{stage}/{file} (extra)"));
        }
    }
    if !differ.is_empty() {
        // Keep both caches for a look.
        let (a, b) = (reference.dir.keep(), env.dir.keep());
        panic!(
            "outputs differ from an uninterrupted run's: {differ:?} (kills so far: {:?}; \
             reference {}, storm {})",
            report.kills,
            a.display(),
            b.display()
        );
    }
    assert_verified(&env);
    // Stages stop within half a second of their orchestrator's end.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_under(env.path());
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "processes outlived the storm: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_gc_leaves_no_attempts(&env, "storm.yaml");
    report.seconds = t0.elapsed().as_secs_f64();
    report
}

#[test]
fn a_kill_storm_loses_nothing_and_leaves_nothing_behind() {
    let kills = std::env::var("RELORA_STORM_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let seed = std::env::var("RELORA_STORM_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20261204);
    let report = storm(kills, seed);
    println!(
        "STORM {} kills (seed {seed}): {:?}; {} run(s) reached the end before their kill; {:.0} s",
        kills, report.kills, report.completed, report.seconds
    );
}
