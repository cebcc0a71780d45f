//! Data-parallel training over MPI, on the real binary. Built with `--features mpi` (as
//! `.ci/run` does), the stages run under `mpirun`; without it, a stage of several ranks must
//! say how to get a binary that has MPI.

use super::repo;
#[cfg(not(feature = "mpi"))]
use super::Env;

#[cfg(not(feature = "mpi"))]
#[test]
fn without_mpi_a_stage_of_several_ranks_says_how_to_build_one() {
    let env = Env::new();
    env.write("dp.yaml", &pipeline(20, 1500));
    let o = env.run(&["run", "dp.yaml", "--until", "full-dp"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("built without MPI") && err.contains("--features mpi"),
        "{err}"
    );
}

/// Full-rank, ReLoRA (merges every 10 steps, magnitude resets, dropout off) and GaLore (a
/// new subspace every 10 steps), each once
/// with one rank accumulating 2 micro-batches of 4 per step and once with 2 ranks taking
/// one each; and a long 2-rank ReLoRA stage to kill.
pub(crate) fn pipeline(steps: u64, long_steps: u64) -> String {
    let data = repo().join("examples/data");
    let tokens = tiny_tokens_stage!().replace("DATA", &data.display().to_string());
    format!(
        r#"pipeline: dp
defaults:
  train:
    model: {{hidden: 32, intermediate: 64, heads: 2, layers: 2}}
    seq_len: 32
    micro_batch: 4
    batch_tokens: 256
    warmup: 2
    checkpoint_every: 5
    eval_every: 10
    eval_sequences: 8
    shuffle_window: 64
stages:
{tokens}  warm:
    kind: train
    inputs: {{data: tokens}}
    params: {{method: full, steps: 10, total_steps: 100, lr: 1.0e-2}}
  full:
    kind: train
    matrix: {{ranks: [1, 2]}}
    name: "full-${{ranks}}"
    inputs: {{data: tokens}}
    params: {{method: full, steps: {steps}, lr: 1.0e-2, parallel: {{ranks: "${{ranks}}"}}}}
  full-dp:
    kind: train
    inputs: {{data: tokens}}
    params: {{method: full, steps: {steps}, lr: 1.0e-2, parallel: {{ranks: 2}}}}
  relora:
    kind: train
    matrix: {{ranks: [1, 2]}}
    name: "relora-${{ranks}}"
    inputs: {{data: tokens, init: warm}}
    params: &relora
      method: relora
      steps: {steps}
      total_steps: 100
      lr: 1.0e-2
      parallel: {{ranks: "${{ranks}}"}}
      lora: {{rank: 4, alpha: 8, dropout: 0.0}}
      relora: {{merge_every: 10, restart_warmup: 3, reset: {{mode: magnitude, fraction: 0.9}}}}
  galore:
    kind: train
    matrix: {{ranks: [1, 2]}}
    name: "galore-${{ranks}}"
    inputs: {{data: tokens, init: warm}}
    params:
      method: galore
      steps: {steps}
      total_steps: 100
      lr: 1.0e-2
      parallel: {{ranks: "${{ranks}}"}}
      galore: {{rank: 4, update_proj_gap: 10}}
  long:
    kind: train
    inputs: {{data: tokens, init: warm}}
    params:
      <<: *relora
      steps: {long_steps}
      total_steps: {long_steps}
      checkpoint_every: 50
      parallel: {{ranks: 2}}
"#
    )
}

#[cfg(feature = "mpi")]
mod with_mpi {
    use super::super::{latest_checkpoint, metrics, ran, wait_until, Env};
    use super::pipeline;
    use serde_json::Value;
    use std::path::PathBuf;
    use std::process::Stdio;
    use std::time::Duration;

    fn entry(env: &Env, stage: &str) -> PathBuf {
        let v: Value =
            serde_json::from_str(&env.ok(&["show", "dp.yaml", stage, "--json"])).unwrap();
        PathBuf::from(v["path"].as_str().unwrap())
    }

    fn model_bytes(env: &Env, stage: &str) -> Vec<u8> {
        std::fs::read(entry(env, stage).join("outputs/model.safetensors")).unwrap()
    }

    #[test]
    fn two_ranks_equal_one_rank_accumulating_their_micro_batches() {
        let env = Env::new();
        env.write("dp.yaml", &pipeline(30, 1500));
        for stage in [
            "full-1", "full-2", "relora-1", "relora-2", "galore-1", "galore-2",
        ] {
            env.ok(&["run", "dp.yaml", "--until", stage]);
        }
        for (one, two) in [
            ("full-1", "full-2"),
            ("relora-1", "relora-2"),
            ("galore-1", "galore-2"),
        ] {
            let (_, a) = metrics(&env, "dp.yaml", one, &[]);
            let (_, b) = metrics(&env, "dp.yaml", two, &[]);
            assert_eq!(a.len(), 30);
            // Each rank computes exactly the micro-batch the single process computes, and
            // the sum of two gradients is one addition, the same in either order: so the
            // curves and weights are not close but equal, merges and resets included.
            for (x, y) in a.iter().zip(&b) {
                for k in ["loss", "grad_norm", "eval_loss"] {
                    assert_eq!(
                        x.get(k),
                        y.get(k),
                        "{one} vs {two} at step {}: {k}",
                        x["step"]
                    );
                }
            }
            assert!(b.iter().any(|m| m.get("event").is_some()) || !one.starts_with("relora"));
            assert!(
                model_bytes(&env, one) == model_bytes(&env, two),
                "{one} and {two} trained different weights"
            );
            let log = std::fs::read_to_string(entry(&env, two).join("log.txt")).unwrap();
            assert!(
                log.contains("rank 1:") && log.contains("all-reduces"),
                "{log}"
            );
        }
    }

    /// The pid of rank `rank` of a stage running for `env`, from /proc.
    fn rank_pid(env: &Env, rank: u32) -> Option<u32> {
        let cache = format!("RELORA_CACHE={}", env.path().join("cache").display());
        let want = format!("OMPI_COMM_WORLD_RANK={rank}");
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let environ = std::fs::read(e.path().join("environ")).ok()?;
            let has = |hay: &[u8], s: &str| hay.split(|&b| b == 0).any(|x| x == s.as_bytes());
            (has(&cmd, "__stage") && has(&environ, &want) && has(&environ, &cache)).then_some(pid)
        })
    }

    #[test]
    fn a_killed_two_rank_relora_stage_resumes_to_the_same_result() {
        let reference = Env::new();
        reference.write("dp.yaml", &pipeline(30, 400));
        reference.ok(&["run", "dp.yaml", "--until", "long"]);

        let env = Env::new();
        env.write("dp.yaml", &pipeline(30, 400));
        env.ok(&["run", "dp.yaml", "--until", "warm"]);
        let mut run = env
            .cmd(&["run", "dp.yaml", "--until", "long"])
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_until(
            "no checkpoint at step 100",
            Duration::from_secs(120),
            || latest_checkpoint(&env.path().join("cache")) >= 100,
        );
        run.kill().unwrap(); // SIGKILL: the ranks must notice and stop
        run.wait().unwrap();
        wait_until(
            "the ranks outlived the orchestrator",
            Duration::from_secs(10),
            || rank_pid(&env, 0).is_none() && rank_pid(&env, 1).is_none(),
        );
        let out = env.ok(&["run", "dp.yaml", "--until", "long"]);
        assert_eq!(ran(&out), ["long"]);
        let log = std::fs::read_to_string(entry(&env, "long").join("log.txt")).unwrap();
        assert!(
            log.contains("resuming from the checkpoint at step"),
            "{log}"
        );
        assert!(
            model_bytes(&env, "long") == model_bytes(&reference, "long"),
            "the resumed 2-rank run trained other weights than an uninterrupted one"
        );
        let (_, a) = metrics(&env, "dp.yaml", "long", &[]);
        let (_, b) = metrics(&reference, "dp.yaml", "long", &[]);
        assert_eq!(a, b);
    }

    #[test]
    fn a_rank_that_dies_fails_the_stage_naming_it_and_commits_nothing() {
        let env = Env::new();
        env.write("dp.yaml", &pipeline(30, 100_000));
        env.ok(&["run", "dp.yaml", "--until", "warm"]);
        let run = env
            .cmd(&["run", "dp.yaml", "--until", "long"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_until("rank 1 never started", Duration::from_secs(60), || {
            rank_pid(&env, 1).is_some() && latest_checkpoint(&env.path().join("cache")) >= 50
        });
        let pid = rank_pid(&env, 1).unwrap();
        // SAFETY-free: kill(1) is a command here.
        assert!(std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success());
        let out = run.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("rank 1 of 2 failed"), "{err}");
        let plan = env.plan("dp.yaml", &[]);
        let long = plan.iter().find(|r| r["name"] == "long").unwrap();
        assert_eq!(long["state"], "run", "a failed stage must commit nothing");
    }
}
