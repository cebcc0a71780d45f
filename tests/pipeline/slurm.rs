//! The Slurm executor on a real one-node Slurm cluster (`scripts/slurm/cluster.sh`), which
//! this test starts and stops itself. Without Slurm installed (or without root, which its
//! daemons need) the test says so and passes, unless RELORA_REQUIRE_SLURM=1, as `.ci/run`
//! sets after installing it.

use super::{bin, latest_checkpoint, repo, wait_until, Env};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// A cluster started for this test; dropping it stops its daemons by their PIDs.
struct Cluster {
    dir: tempfile::TempDir,
    conf: PathBuf,
}

impl Cluster {
    fn start() -> Option<Cluster> {
        let script = repo().join("scripts/slurm/cluster.sh");
        let installed = Command::new("sh")
            .args([
                "-c",
                "command -v slurmctld && command -v slurmd && command -v munged",
            ])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        if !installed || !root {
            let why = if installed {
                "its daemons need root"
            } else {
                "Slurm is not installed (scripts/slurm/cluster.sh install)"
            };
            assert!(
                std::env::var("RELORA_REQUIRE_SLURM").is_err(),
                "RELORA_REQUIRE_SLURM is set but {why}"
            );
            eprintln!("SKIPPED the Slurm executor test: {why}");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        // Ports away from a real cluster's and from another test run's.
        let port = 20000 + (std::process::id() % 10000) * 2;
        let out = Command::new("bash")
            .arg(&script)
            .args(["start", dir.path().to_str().unwrap()])
            .env("RELORA_SLURM_PORT", port.to_string())
            .output()
            .unwrap();
        let cluster = Cluster {
            conf: dir.path().join("slurm.conf"),
            dir,
        };
        assert!(
            out.status.success(),
            "cluster.sh start failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Some(cluster)
    }

    /// A command run against this cluster.
    fn cmd(&self, env: &Env, args: &[&str]) -> Command {
        let mut c = env.cmd(args);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    /// stdout + stderr, and whether it succeeded.
    fn run(&self, env: &Env, args: &[&str]) -> (bool, String) {
        let o = self.cmd(env, args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), text)
    }

    fn ok(&self, env: &Env, args: &[&str]) -> String {
        let (ok, text) = self.run(env, args);
        assert!(ok, "relora-pipe {args:?} failed:\n{text}");
        text
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join("scripts/slurm/cluster.sh"))
            .args(["stop", self.dir.path().to_str().unwrap()])
            .status();
    }
}

/// tokenize → a warm start of a few steps → two ReLoRA phases → eval → report. The second
/// phase is long enough (about 10 s) to be cancelled mid-run.
const PIPELINE: &str = concat!(
    r#"pipeline: slurm-tiny
defaults:
  train:
    model: {hidden: 32, intermediate: 64, heads: 2, layers: 2}
    seq_len: 32
    micro_batch: 4
    warmup: 2
    checkpoint_every: 20
    eval_every: 100
    eval_sequences: 8
    log_every: 20
    shuffle_window: 64
stages:
"#,
    tiny_tokens_stage!(),
    r#"  warm:
    kind: train
    inputs: {data: tokens}
    params: {method: full, steps: 10, total_steps: 60, lr: 1.0e-2}
  phase1:
    kind: train
    inputs: {data: tokens, init: warm}
    params: &relora
      method: relora
      steps: 40
      total_steps: 2000
      lr: 1.0e-2
      lora: {rank: 4, alpha: 8, dropout: 0.0}
      relora: {merge_every: 20, restart_warmup: 5, reset: {mode: magnitude, fraction: 0.9}}
  phase2:
    kind: train
    inputs: {data: tokens, init: phase1}
    params:
      <<: *relora
      init_mode: continue
      steps: 1960
  eval:
    kind: eval
    inputs: {model: phase2, data: tokens}
    params: {tokens: 512}
  report:
    kind: report
    inputs: {relora@tiny: eval, curve@relora: phase2}
"#
);

/// Each stage's key and output hash, from `status --json` and its manifest.
fn keys_and_outputs(env: &Env, file: &str) -> Vec<(String, String, String)> {
    let plan = env.plan(file, &[]);
    plan.iter()
        .map(|row| {
            let name = row["name"].as_str().unwrap().to_string();
            let key = row["key"].as_str().unwrap().to_string();
            let manifest: Value = serde_json::from_slice(
                &std::fs::read(
                    env.path()
                        .join("cache/entries")
                        .join(&key)
                        .join("manifest.json"),
                )
                .unwrap_or_else(|e| panic!("stage {name} has no entry: {e}")),
            )
            .unwrap();
            (
                name,
                key,
                manifest["output_hash"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The Slurm job now running stage `stage`, from the staging folder of its attempt.
fn job_of(env: &Env, stage: &str) -> Option<String> {
    for e in std::fs::read_dir(env.path().join("cache/staging"))
        .ok()?
        .flatten()
    {
        let job: Value = match std::fs::read(e.path().join("job.json")) {
            Ok(b) => serde_json::from_slice(&b).ok()?,
            Err(_) => continue,
        };
        if job["stage"] == stage {
            if let Ok(id) = std::fs::read_to_string(e.path().join("slurm-job")) {
                return Some(id.trim().to_string());
            }
        }
    }
    None
}

/// A fresh environment holding PIPELINE as p.yaml.
fn pipeline_env() -> Env {
    let data = repo().join("examples/data");
    let env = Env::new();
    env.write("p.yaml", &PIPELINE.replace("DATA", data.to_str().unwrap()));
    env
}

/// Returns the local run's environment, which later scenarios compare with.
fn scenario_a_pipeline_gives_a_local_runs_keys_and_bytes_and_survives_scancel(c: &Cluster) -> Env {
    let local = pipeline_env();
    local.ok(&["run", "p.yaml", "--jobs", "2"]);

    let env = pipeline_env();
    let plan = c.ok(&env, &["plan", "p.yaml", "--executor", "slurm"]);
    assert!(plan.contains("@ slurm"), "{plan}");
    let run = c
        .cmd(
            &env,
            &["run", "p.yaml", "--executor", "slurm", "--jobs", "2"],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Cancel the second phase's job once it has checkpointed past step 200 (phase 2 starts
    // at step 40 and ends at 2000).
    wait_until(
        "phase2 never checkpointed under Slurm",
        Duration::from_secs(120),
        || job_of(&env, "phase2").is_some() && latest_checkpoint(&env.path().join("cache")) >= 200,
    );
    let job = job_of(&env, "phase2").unwrap();
    let status = c.ok(&env, &["status", "p.yaml", "--executor", "slurm"]);
    assert!(
        status.contains(&format!("Slurm job {job}: RUNNING on ci")),
        "{status}"
    );
    let scancel = Command::new("scancel")
        .arg(&job)
        .env("SLURM_CONF", &c.conf)
        .status()
        .unwrap();
    assert!(scancel.success());
    let out = run.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "Slurm job {job} ended CANCELLED; submitting it again (2 of 3)"
        )),
        "{text}"
    );

    // Same keys, same output bytes as the local run, stage by stage, although phase 2 was
    // cancelled and resumed from its checkpoint on another job.
    assert_eq!(
        keys_and_outputs(&env, "p.yaml"),
        keys_and_outputs(&local, "p.yaml")
    );
    let entry = |e: &Env| -> PathBuf {
        let plan = e.plan("p.yaml", &[]);
        let key = plan.iter().find(|r| r["name"] == "phase2").unwrap()["key"]
            .as_str()
            .unwrap()
            .to_string();
        e.path().join("cache/entries").join(key)
    };
    let log = std::fs::read_to_string(entry(&env).join("log.txt")).unwrap();
    assert!(
        log.contains("resuming from the checkpoint at step"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(entry(&env).join("outputs/model.safetensors")).unwrap(),
        std::fs::read(entry(&local).join("outputs/model.safetensors")).unwrap(),
        "the resumed model differs from an uninterrupted local run's"
    );
    // The batch files are gone from the entry; its log says how long Slurm took.
    let files: Vec<String> = std::fs::read_dir(entry(&env))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !files
            .iter()
            .any(|f| f.starts_with("slurm") || f == "job.sh"),
        "{files:?}"
    );
    assert!(log.contains("s from submission to start"), "{log}");
    let again = c.ok(&env, &["run", "p.yaml", "--executor", "slurm"]);
    assert!(again.contains("0 stage(s) ran"), "{again}");
    local
}

fn scenario_a_failing_stage_shows_its_exit_code_and_log(c: &Cluster) {
    let env = Env::new();
    env.write(
        "f.yaml",
        "pipeline: f\nstages:\n  bad:\n    kind: command\n    params: {run: \"echo preparing; echo something broke >&2; exit 3\"}\n",
    );
    let (ok, text) = c.run(&env, &["run", "f.yaml", "--executor", "slurm"]);
    assert!(!ok, "{text}");
    assert!(text.contains("[bad] FAILED: Slurm job"), "{text}");
    assert!(text.contains("(exit code 2)"), "{text}");
    assert!(text.contains("exit status: 3"), "{text}");
    assert!(
        text.contains("preparing") && text.contains("something broke"),
        "{text}"
    );
}

fn scenario_two_orchestrators_over_one_cache_compute_each_stage_once(c: &Cluster) {
    let env = Env::new();
    let count = env.path().join("executions.log");
    let mut yaml = String::from("pipeline: conc\nstages:\n");
    for name in ["p", "q", "r"] {
        yaml.push_str(&format!(
            "  {name}:\n    kind: command\n    params: {{run: \"echo {name} >> {}; sleep 1; echo {name} > $OUT/o.txt\"}}\n",
            count.display()
        ));
    }
    env.write("c.yaml", &yaml);
    let spawn = || {
        c.cmd(
            &env,
            &["run", "c.yaml", "--executor", "slurm", "--jobs", "2"],
        )
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    let mut lines: Vec<String> = std::fs::read_to_string(&count)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(lines, ["p", "q", "r"]);
}

fn scenario_a_gpu_request_on_a_node_without_gres_names_the_stage(c: &Cluster) {
    let env = Env::new();
    env.write(
        "g.yaml",
        "pipeline: g\nstages:\n  needs-gpu:\n    kind: command\n    params: {run: \"nvidia-smi\"}\n    resources: {gpus: 1, time_limit: \"5:00\"}\n",
    );
    let plan = c.ok(&env, &["plan", "g.yaml", "--executor", "slurm"]);
    assert!(
        plan.contains("--gres=gpu:1") && plan.contains("--time=5:00"),
        "{plan}"
    );
    let (ok, text) = c.run(&env, &["run", "g.yaml", "--executor", "slurm"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("Slurm refused the job for stage `needs-gpu`")
            && text.contains("Invalid generic resource"),
        "{text}"
    );
}

fn scenario_ctrl_c_cancels_the_runs_jobs(c: &Cluster) {
    let env = Env::new();
    env.write(
        "s.yaml",
        "pipeline: s\nstages:\n  slow:\n    kind: command\n    params: {run: \"sleep 300\"}\n",
    );
    let run = c
        .cmd(&env, &["run", "s.yaml", "--executor", "slurm"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the job never started", Duration::from_secs(30), || {
        job_of(&env, "slow").is_some_and(|id| job_state(c, &id) == "RUNNING")
    });
    let job = job_of(&env, "slow").unwrap();
    let kill = Command::new("kill")
        .args(["-INT", &run.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = run.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{text}");
    assert!(
        text.contains(&format!("cancelling Slurm job {job}")),
        "{text}"
    );
    assert_eq!(job_state(c, &job), "CANCELLED");
    let plan = env.plan("s.yaml", &[]);
    assert_eq!(plan[0]["state"], "run", "nothing may be committed");
}

fn job_state(c: &Cluster, id: &str) -> String {
    let out = Command::new("scontrol")
        .args(["-o", "show", "job", id])
        .env("SLURM_CONF", &c.conf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|t| t.strip_prefix("JobState="))
        .unwrap_or("")
        .to_string()
}

fn scenario_local_kinds_stay_on_this_machine(c: &Cluster) {
    let env = Env::new();
    env.write(
        "l.yaml",
        "pipeline: l\nexecutor: {type: slurm, local_kinds: [command]}\nstages:\n  here:\n    kind: command\n    params: {run: \"echo x > $OUT/x.txt\"}\n",
    );
    let plan = c.ok(&env, &["plan", "l.yaml"]);
    assert!(plan.contains("@ local"), "{plan}");
    let out = c.ok(&env, &["run", "l.yaml"]);
    assert!(!out.contains("Slurm job"), "{out}");
    let v: Value =
        serde_json::from_str(&c.ok(&env, &["show", "l.yaml", "here", "--json"])).unwrap();
    assert_eq!(v["manifest"]["environment"]["executor"], "local", "{v}");
}

fn scenario_a_node_that_cannot_see_the_cache_is_named(c: &Cluster) {
    let env = Env::new();
    // One node sees everything; an output path that does not exist there stands in for a
    // cache folder the node does not mount.
    env.write(
        "n.yaml",
        "pipeline: n\nexecutor: {type: slurm, sbatch_args: [\"--output=/nonexistent/folder/%j.out\"]}\nstages:\n  a:\n    kind: command\n    params: {run: \"echo x > $OUT/x.txt\"}\n",
    );
    let (ok, text) = c.run(&env, &["run", "n.yaml"]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("failed on node ci before the stage started")
            && text.contains("that node cannot see the cache folder"),
        "{text}"
    );
}

/// A 2-rank ReLoRA stage as one job of 2 tasks (`srun --mpi=pmix`) trains what one local
/// process accumulating both micro-batches trains.
#[cfg(feature = "mpi")]
fn scenario_a_data_parallel_stage_runs_as_one_job_of_two_tasks(c: &Cluster) {
    let env = Env::new();
    env.write("dp.yaml", &super::parallel::pipeline(30, 100));
    env.ok(&["run", "dp.yaml", "--until", "relora-1"]);
    let plan = c.ok(&env, &["plan", "dp.yaml", "--executor", "slurm"]);
    assert!(plan.contains("--ntasks=2"), "{plan}");
    c.ok(
        &env,
        &[
            "run",
            "dp.yaml",
            "--until",
            "relora-2",
            "--executor",
            "slurm",
        ],
    );
    let model = |stage: &str| {
        let v: Value =
            serde_json::from_str(&env.ok(&["show", "dp.yaml", stage, "--json"])).unwrap();
        let dir = PathBuf::from(v["path"].as_str().unwrap());
        let log = std::fs::read_to_string(dir.join("log.txt")).unwrap();
        (
            std::fs::read(dir.join("outputs/model.safetensors")).unwrap(),
            log,
        )
    };
    let (one, _) = model("relora-1");
    let (two, log) = model("relora-2");
    assert!(
        log.contains("rank 1:") && log.contains("slurm: job"),
        "{log}"
    );
    assert!(one == two, "the 2-task Slurm job trained other weights");
}

/// Any Slurm job now running a stage of `env`'s cache, from its attempts' staging folders.
fn any_job(env: &Env) -> Option<String> {
    std::fs::read_dir(env.path().join("cache/staging"))
        .ok()?
        .flatten()
        .find_map(|e| std::fs::read_to_string(e.path().join("slurm-job")).ok())
        .map(|id| id.trim().to_string())
}

/// The kill storm under Slurm (issue #26): a few runs, each hit at a moment drawn from a
/// fixed seed by `scancel` of the running job or a SIGKILL to its `slurmstepd`; then one
/// run to the end gives a local run's keys and bytes, with no job or process left and
/// nothing corrupt.
fn scenario_a_kill_storm_under_slurm_loses_nothing(c: &Cluster, local: &Env) {
    let env = pipeline_env();
    let mut seed = 20261204u64;
    for k in 0..4 {
        let mut run = c
            .cmd(
                &env,
                &["run", "p.yaml", "--executor", "slurm", "--jobs", "2"],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(500 + (seed >> 33) % 4000);
        std::thread::sleep(delay);
        wait_until("no Slurm job started", Duration::from_secs(60), || {
            any_job(&env).is_some() || run.try_wait().unwrap().is_some()
        });
        if let Some(job) = any_job(&env) {
            let ok = if k % 2 == 0 {
                Command::new("scancel")
                    .arg(&job)
                    .env("SLURM_CONF", &c.conf)
                    .status()
                    .unwrap()
                    .success()
            } else {
                // The job's step daemon dies as a node's would: the job fails.
                Command::new("pkill")
                    .args(["-9", "-f", &format!("slurmstepd: \\[{job}\\.")])
                    .status()
                    .unwrap()
                    .code()
                    .is_some_and(|c| c <= 1)
            };
            assert!(ok, "could not hit job {job}");
        }
        // Each run ends: it resubmits the job or fails the stage, never hangs.
        wait_until(
            "a run under the storm never ended",
            Duration::from_secs(180),
            || run.try_wait().unwrap().is_some(),
        );
    }
    c.ok(
        &env,
        &["run", "p.yaml", "--executor", "slurm", "--jobs", "2"],
    );
    assert_eq!(
        keys_and_outputs(&env, "p.yaml"),
        keys_and_outputs(local, "p.yaml")
    );
    super::assert_verified(&env);
    let queue = Command::new("squeue")
        .args(["--noheader", "--format=%i %j"])
        .env("SLURM_CONF", &c.conf)
        .output()
        .unwrap();
    let queue = String::from_utf8_lossy(&queue.stdout);
    assert!(
        !queue.contains("relora:"),
        "jobs left in the queue: {queue}"
    );
}

#[test]
fn the_slurm_executor_runs_pipelines_on_a_real_cluster() {
    let Some(cluster) = Cluster::start() else {
        return;
    };
    assert!(bin().exists());
    scenario_a_failing_stage_shows_its_exit_code_and_log(&cluster);
    scenario_a_gpu_request_on_a_node_without_gres_names_the_stage(&cluster);
    scenario_two_orchestrators_over_one_cache_compute_each_stage_once(&cluster);
    scenario_ctrl_c_cancels_the_runs_jobs(&cluster);
    scenario_local_kinds_stay_on_this_machine(&cluster);
    scenario_a_node_that_cannot_see_the_cache_is_named(&cluster);
    #[cfg(feature = "mpi")]
    scenario_a_data_parallel_stage_runs_as_one_job_of_two_tasks(&cluster);
    let local =
        scenario_a_pipeline_gives_a_local_runs_keys_and_bytes_and_survives_scancel(&cluster);
    scenario_a_kill_storm_under_slurm_loses_nothing(&cluster, &local);
}
