//! End-to-end tests on the real `relora-pipe` binary: caching, invalidation, crashes,
//! concurrency, error messages, and a tiny ReLoRA pipeline on the bundled C4 sample.

/// The tokenize stage of the tiny pipelines: 200 documents of the bundled C4 sample (20 held
/// out), a 300-id BPE, shards of about 3,000 tokens. `DATA` stands for examples/data.
macro_rules! tiny_tokens_stage {
    () => {
        r#"  tokens:
    kind: tokenize
    params:
      train_files: DATA/c4-train.00000-of-01024.first1000.json.gz
      limit_docs: 200
      valid_docs: 20
      shard_tokens: 3000
      tokenizer: {type: bpe, vocab_size: 300}
"#
    };
}

#[path = "pipeline/disk.rs"]
mod disk;
#[path = "pipeline/parallel.rs"]
mod parallel;
#[path = "pipeline/select.rs"]
mod select;
#[path = "pipeline/slurm.rs"]
mod slurm;
#[path = "pipeline/storm.rs"]
mod storm;
#[path = "pipeline/ui.rs"]
mod ui;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_relora-pipe"))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(self.path())
            .env("RELORA_CACHE", self.path().join("cache"));
        c
    }
    fn run(&self, args: &[&str]) -> Output {
        self.run_with(args, &[])
    }
    /// Run with extra environment variables (RELORA_CODE_SALT, RAYON_NUM_THREADS, …).
    fn run_with(&self, args: &[&str], vars: &[(&str, &str)]) -> Output {
        let mut c = self.cmd(args);
        c.envs(vars.iter().copied());
        c.output().unwrap()
    }
    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, &[])
    }
    /// stdout and stderr of a command that must succeed.
    fn ok_with(&self, args: &[&str], vars: &[(&str, &str)]) -> String {
        let o = self.run_with(args, vars);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(o.status.success(), "relora-pipe {args:?} failed:\n{text}");
        text
    }
    fn plan(&self, file: &str, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["plan", file, "--json"];
        args.extend_from_slice(extra);
        let out = self.ok(&args);
        serde_json::from_str::<Vec<Value>>(&out[..out.rfind(']').unwrap() + 1]).unwrap()
    }
}

/// Stage names that ran (not cached) in a `run`'s output.
fn ran(out: &str) -> Vec<String> {
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.contains("] done in"))
        .map(|l| l[1..l.find(']').unwrap()].to_string())
        .collect();
    v.sort();
    v
}

const CHAIN: &str = r#"pipeline: chain
stages:
  a:
    kind: command
    params: {run: "echo A${x} > $OUT/a.txt", outputs: [a.txt]}
    matrix: {x: [1]}
    name: a
  b:
    kind: command
    inputs: {src: a}
    params: {run: "cat $IN_SRC/a.txt > $OUT/b.txt; echo B >> $OUT/b.txt"}
  c:
    kind: command
    inputs: {src: b}
    params: {run: "cat $IN_SRC/b.txt > $OUT/c.txt"}
  d:
    kind: command
    params: {run: "echo D > $OUT/d.txt"}
"#;

#[test]
fn editing_a_parameter_reruns_exactly_that_stage_and_its_dependents() {
    let env = Env::new();
    env.write("p.yaml", CHAIN);
    assert_eq!(ran(&env.ok(&["run", "p.yaml"])), ["a", "b", "c", "d"]);
    assert!(
        ran(&env.ok(&["run", "p.yaml"])).is_empty(),
        "a second run does nothing"
    );
    // Edit b: b and c re-run; plan says why.
    env.write("p.yaml", &CHAIN.replace("echo B", "echo BB"));
    let plan = env.plan("p.yaml", &[]);
    let b = plan.iter().find(|s| s["name"] == "b").unwrap();
    assert_eq!(b["state"], "stale");
    assert!(
        b["reasons"][0]
            .as_str()
            .unwrap()
            .contains("param `run` changed"),
        "{b}"
    );
    assert_eq!(
        plan.iter().find(|s| s["name"] == "a").unwrap()["state"],
        "cached"
    );
    assert_eq!(ran(&env.ok(&["run", "p.yaml"])), ["b", "c"]);
    // --set on the command line works the same way, and so does --force.
    assert_eq!(
        ran(&env.ok(&["run", "p.yaml", "--set", "d.run=echo E > $OUT/d.txt"])),
        ["d"]
    );
    assert_eq!(
        ran(&env.ok(&["run", "p.yaml", "--force", "a"])),
        ["a"],
        "same output: early cutoff"
    );
}

#[test]
fn early_cutoff_an_upstream_rerun_with_identical_output_reruns_nothing_after_it() {
    let env = Env::new();
    env.write("p.yaml", CHAIN);
    env.ok(&["run", "p.yaml"]);
    // A different command that writes the same bytes.
    env.write(
        "p.yaml",
        &CHAIN.replace("echo A${x} > $OUT/a.txt", "printf 'A${x}\\n' > $OUT/a.txt"),
    );
    assert_eq!(ran(&env.ok(&["run", "p.yaml"])), ["a"]);
}

#[test]
fn the_same_stage_reached_from_two_files_is_computed_once() {
    let env = Env::new();
    env.write("base.yaml", CHAIN);
    env.write(
        "other.yaml",
        "pipeline: other\nimports:\n  - file: base.yaml\n    stages: [b]\nstages:\n  e:\n    kind: command\n    inputs: {src: b}\n    params: {run: \"cat $IN_SRC/b.txt > $OUT/e.txt\"}\n",
    );
    env.ok(&["run", "base.yaml"]);
    assert_eq!(
        ran(&env.ok(&["run", "other.yaml"])),
        ["e"],
        "a and b come from the cache"
    );
    let k1 = env
        .plan("base.yaml", &[])
        .into_iter()
        .find(|s| s["name"] == "b")
        .unwrap()["key"]
        .clone();
    let k2 = env
        .plan("other.yaml", &[])
        .into_iter()
        .find(|s| s["name"] == "b")
        .unwrap()["key"]
        .clone();
    assert_eq!(k1, k2);
}

#[test]
fn bad_pipelines_get_errors_with_file_line_and_column() {
    let env = Env::new();
    env.write(
        "bad.yaml",
        "pipeline: x\nstages:\n  a:\n    kind: command\n    params: {run: [unclosed\n",
    );
    let o = env.run(&["plan", "bad.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("bad.yaml:5:") || err.contains("bad.yaml:6:"),
        "{err}"
    );
    env.write(
        "cycle.yaml",
        "pipeline: x\nstages:\n  a:\n    kind: command\n    inputs: {x: c}\n    params: {run: 'true'}\n  b:\n    kind: command\n    inputs: {x: a}\n    params: {run: 'true'}\n  c:\n    kind: command\n    inputs: {x: b}\n    params: {run: 'true'}\n",
    );
    let err = String::from_utf8_lossy(&env.run(&["run", "cycle.yaml"]).stderr).to_string();
    assert!(
        err.contains("cycle")
            && (err.contains("a -> b -> c -> a")
                || err.contains("b -> c -> a -> b")
                || err.contains("c -> a -> b -> c")),
        "{err}"
    );
    env.write(
        "typo.yaml",
        "pipeline: x\nstages:\n  t:\n    kind: trian\n  u:\n    kind: train\n    inputs: {data: t}\n    params: {model: llama_9m, method: full, steps: 1, lr: 0.1, lrr: 2}\n",
    );
    let err = String::from_utf8_lossy(&env.run(&["plan", "typo.yaml"]).stderr).to_string();
    assert!(
        err.contains("typo.yaml:4:5") && err.contains("did you mean `train`"),
        "{err}"
    );
    assert!(
        err.contains("typo.yaml:8:") && err.contains("unknown field `lrr`"),
        "{err}"
    );
}

#[test]
fn a_killed_run_leaves_nothing_half_written_and_the_rerun_completes() {
    let env = Env::new();
    env.write(
        "slow.yaml",
        "pipeline: slow\nstages:\n  s:\n    kind: command\n    params: {run: \"echo partial > $OUT/x.txt; sleep $(cat delay); echo done >> $OUT/x.txt\"}\n",
    );
    // The delay is read from a file outside the key, so the rerun has the same key (and lock).
    env.write("delay", "30");
    let mut child = env
        .cmd(&["run", "slow.yaml"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let staging = env.path().join("cache/staging");
    wait_until("stage never started", Duration::from_secs(20), || {
        std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0) > 0
    });
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(
        std::fs::read_dir(env.path().join("cache/entries"))
            .unwrap()
            .count(),
        0,
        "nothing committed"
    );
    // The rerun does the work again, quickly this time.
    env.write("delay", "0");
    let out = env.ok(&["run", "slow.yaml"]);
    assert_eq!(ran(&out), ["s"]);
    assert!(
        out.contains("cleared a stale lock left by process"),
        "{out}"
    );
    let out = env.ok(&["show", "slow.yaml", "s", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    let x = std::fs::read_to_string(Path::new(v["path"].as_str().unwrap()).join("outputs/x.txt"))
        .unwrap();
    assert_eq!(x, "partial\ndone\n");
    assert!(env.ok(&["verify"]).contains("0 corrupt"));
}

#[test]
fn two_concurrent_runs_compute_each_stage_once() {
    let env = Env::new();
    let log = env.path().join("executions.log");
    let mut yaml = String::from("pipeline: conc\nstages:\n");
    for name in ["p", "q", "r"] {
        yaml.push_str(&format!(
            "  {name}:\n    kind: command\n    params: {{run: \"echo {name} >> {}; sleep 1; echo {name} > $OUT/o.txt\"}}\n",
            log.display()
        ));
    }
    env.write("c.yaml", &yaml);
    let a = env
        .cmd(&["run", "c.yaml", "--jobs", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let b = env
        .cmd(&["run", "c.yaml", "--jobs", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(a.wait_with_output().unwrap().status.success());
    assert!(b.wait_with_output().unwrap().status.success());
    let mut lines: Vec<String> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    lines.sort();
    assert_eq!(lines, ["p", "q", "r"]);
}

#[test]
fn gc_keeps_what_listed_pipelines_use() {
    let env = Env::new();
    env.write("p.yaml", CHAIN);
    env.ok(&["run", "p.yaml"]);
    env.write("p.yaml", &CHAIN.replace("echo D", "echo DD"));
    env.ok(&["run", "p.yaml"]);
    let out = env.ok(&["gc", "--keep", "p.yaml"]);
    assert!(out.contains("removed 1 entries"), "{out}");
    assert!(ran(&env.ok(&["run", "p.yaml"])).is_empty());
    let o = env.run(&["gc"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--all"));
}

/// A tiny version of the quickstart: every ML stage kind, on 200 real C4 documents.
const TINY_ML: &str = concat!(
    r#"pipeline: tiny
defaults:
  train:
    model: {hidden: 32, intermediate: 64, heads: 2, layers: 2}
    seq_len: 32
    micro_batch: 4
    warmup: 2
    checkpoint_every: 5
    eval_every: 10
    eval_sequences: 8
    log_every: 10
    # Windows of 64 sequences over shards of ~3,000 tokens: runs cross both boundaries often.
    shuffle_window: 64
stages:
"#,
    tiny_tokens_stage!(),
    r#"  warm:
    kind: train
    inputs: {data: tokens}
    params: {method: full, steps: 10, total_steps: 60, lr: 1.0e-2}
  relora:
    kind: train
    inputs: {data: tokens, init: warm}
    params:
      method: relora
      steps: 60
      lr: 1.0e-2
      lora: {rank: 4, alpha: 8, dropout: 0.0}
      relora: {merge_every: 20, restart_warmup: 5, reset: {mode: magnitude, fraction: 0.9}}
  lora:
    kind: train
    inputs: {data: tokens}
    params: {method: lora, steps: 20, lr: 1.0e-2, lora: {rank: 4, alpha: 8, base: none}}
  eval:
    kind: eval
    matrix: {run: [relora, lora]}
    inputs: {model: "${run}", data: tokens}
    params: {tokens: 512}
  svd:
    kind: svd
    inputs: {final: relora, base: warm}
  report:
    kind: report
    inputs: {relora@tiny: eval-relora, lora@tiny: eval-lora, curve@relora: relora, svd@relora: svd}
"#
);

fn tiny_ml(env: &Env) -> PathBuf {
    let data = repo().join("examples/data");
    env.write(
        "tiny.yaml",
        &TINY_ML.replace("DATA", data.to_str().unwrap()),
    )
}

fn metrics(env: &Env, file: &str, stage: &str, extra: &[&str]) -> (PathBuf, Vec<Value>) {
    let mut args = vec!["show", file, stage, "--json"];
    args.extend_from_slice(extra);
    let v: Value = serde_json::from_str(&env.ok(&args)).unwrap();
    let dir = PathBuf::from(v["path"].as_str().unwrap()).join("outputs");
    let lines = std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (dir, lines)
}

#[test]
fn tiny_relora_pipeline_trains_merges_evaluates_and_reports() {
    let env = Env::new();
    tiny_ml(&env);
    env.ok(&["run", "tiny.yaml"]);
    let (_, m) = metrics(&env, "tiny.yaml", "relora", &[]);
    assert_eq!(m.len(), 60);
    for k in ["step", "loss", "lr", "grad_norm", "tokens"] {
        assert!(m[0].get(k).is_some(), "metrics lack {k}");
    }
    // Timings belong to the log and the manifest, not to outputs.
    assert!(m[0].get("tokens_per_s").is_none(), "{}", m[0]);
    // `compare`: what differs between the ReLoRA and LoRA stages, and their final metrics
    // as their outputs hold them.
    let c: Value =
        serde_json::from_str(&env.ok(&["compare", "tiny.yaml", "relora", "lora", "--json"]))
            .unwrap();
    let differs: std::collections::BTreeMap<String, Value> = c["differs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d[0].as_str().unwrap().to_string(), d[1].clone()))
        .collect();
    assert_eq!(differs["method"], serde_json::json!(["relora", "lora"]));
    assert_eq!(differs["inputs.init"], serde_json::json!(["warm", null]));
    assert!(
        !differs.contains_key("lora.rank"),
        "the same rank: {differs:?}"
    );
    let final_loss = c["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r[0] == "final train loss")
        .unwrap()[1][0]
        .as_f64()
        .unwrap();
    assert_eq!(final_loss, m.last().unwrap()["loss"].as_f64().unwrap());
    let table = env.ok(&["compare", "tiny.yaml", "eval"]);
    assert!(
        table.contains("inputs.model") && table.contains("perplexity"),
        "{table}"
    );
    // TensorBoard events beside the outputs: a version record, then one per step.
    let o = env.run(&["tensorboard", "tiny.yaml"]);
    assert!(o.status.success());
    let tb = PathBuf::from(String::from_utf8(o.stdout).unwrap().trim());
    let mut runs: Vec<String> = std::fs::read_dir(&tb)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    runs.sort();
    assert_eq!(runs, ["lora", "relora", "warm"]);
    let files: Vec<PathBuf> = std::fs::read_dir(tb.join("relora"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_string_lossy().contains("events.out.tfevents."));
    let bytes = std::fs::read(&files[0]).unwrap();
    let (mut at, mut records) = (0, 0);
    while at < bytes.len() {
        let len = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
        at += 8 + 4 + len + 4;
        records += 1;
    }
    assert_eq!(
        (at, records),
        (bytes.len(), 61),
        "a version record and 60 steps"
    );
    // Restarts at 20 and 40: the learning rate is 0 right after, and once the restart warmup
    // is over the loss has not jumped: the mean of the 5 steps after it stays within 0.25 nats
    // of the mean of the 5 steps before the merge (each step is a noisy 128-token batch).
    let mean = |r: std::ops::Range<usize>| {
        r.clone()
            .map(|i| m[i]["loss"].as_f64().unwrap())
            .sum::<f64>()
            / r.len() as f64
    };
    for merge in [20usize, 40] {
        assert_eq!(m[merge - 1]["event"], "merge+optimizer_reset");
        assert_eq!(m[merge]["lr"].as_f64().unwrap(), 0.0);
        let (before, after) = (mean(merge - 5..merge), mean(merge + 5..merge + 10));
        assert!(
            after < before + 0.25,
            "loss spike after the restart at {merge}: {before} -> {after}"
        );
    }
    let first = m[0]["loss"].as_f64().unwrap();
    let last = m[59]["loss"].as_f64().unwrap();
    assert!(
        last < first - 0.3,
        "ReLoRA loss did not fall: {first} -> {last}"
    );
    assert!(m[59]["perplexity"].as_f64().is_some());
    // The report holds both rows; the svd found more than rank-4 structure after 3 restarts.
    let show = env.ok(&["show", "tiny.yaml", "report"]);
    assert!(
        show.contains("Low-rank pre-training with ReLoRA")
            && show.contains("Low-rank pre-training with LoRA"),
        "{show}"
    );
    let svd: Value =
        serde_json::from_str(&env.ok(&["show", "tiny.yaml", "svd", "--json"])).unwrap();
    let spectrum: Value = serde_json::from_slice(
        &std::fs::read(Path::new(svd["path"].as_str().unwrap()).join("outputs/spectrum.json"))
            .unwrap(),
    )
    .unwrap();
    let q0 = &spectrum["matrices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "layers.0.q_proj")
        .unwrap()["singular_values"];
    let big = q0
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s.as_f64().unwrap() > 1e-4)
        .count();
    assert!(
        big > 4,
        "ReLoRA's update should exceed rank 4 after 3 merges, got {big}"
    );
    // Nothing re-runs; a cosmetic change re-runs nothing either.
    assert!(ran(&env.ok(&["run", "tiny.yaml"])).is_empty());
    assert!(ran(&env.ok(&["run", "tiny.yaml", "--set", "relora.log_every=3"])).is_empty());
    // A change to ReLoRA re-runs it and what depends on it, not the warm start.
    let r = ran(&env.ok(&["run", "tiny.yaml", "--set", "relora.lr=0.005"]));
    assert_eq!(r, ["eval-relora", "relora", "report", "svd"]);
    // bf16 compute (emulated on the CPU) is a different stage, and trains like f32.
    let bf16 = ["--set", "relora.dtype=bf16"];
    let r = ran(&env.ok(&["run", "tiny.yaml", bf16[0], bf16[1]]));
    assert_eq!(r, ["eval-relora", "relora", "report", "svd"]);
    let (dir, b) = metrics(&env, "tiny.yaml", "relora", &bf16);
    let log = std::fs::read_to_string(dir.parent().unwrap().join("log.txt")).unwrap();
    assert!(log.contains("bf16 compute"), "{log}");
    let (f32_last, bf16_last) = (last_mean(&m), last_mean(&b));
    eprintln!("relora final loss: f32 {f32_last:.4}, bf16 {bf16_last:.4}");
    assert!(
        (f32_last - bf16_last).abs() < 0.05,
        "final loss f32 {f32_last} vs bf16 {bf16_last}"
    );
}

/// Mean loss of the last 10 steps.
fn last_mean(m: &[Value]) -> f64 {
    m[m.len() - 10..]
        .iter()
        .map(|x| x["loss"].as_f64().unwrap())
        .sum::<f64>()
        / 10.0
}

#[test]
fn a_training_stage_killed_mid_run_resumes_from_its_checkpoint_bit_identically() {
    killed_mid_run_resumes_bit_identically(TINY_ML, "warm", &["--set", "warm.steps=40"]);
}

/// The tiny pipeline with a GaLore stage on its warm start: rank 4 of hidden 32, a new
/// subspace every 10 steps, so 30 steps cross two refreshes after the first.
const TINY_GALORE: &str = r#"  galore:
    kind: train
    inputs: {data: tokens, init: warm}
    params:
      method: galore
      steps: 30
      lr: 1.0e-2
      eps: 1.0e-6
      galore: {rank: 4, update_proj_gap: 10, scale: 0.25}
"#;

#[test]
fn galore_trains_low_rank_moments_and_resumes_bit_identically() {
    let yaml = format!("{TINY_ML}{TINY_GALORE}");
    let (_env, dir, m) = killed_mid_run_resumes_bit_identically(&yaml, "galore", &[]);
    // It learns: the validation loss at steps 10, 20, 30 (measured: 4.59, 4.29, 4.23).
    let eval: Vec<f64> = m.iter().filter_map(|x| x["eval_loss"].as_f64()).collect();
    assert_eq!(eval.len(), 3);
    assert!(
        eval[2] < eval[0] - 0.2,
        "the validation loss did not fall: {eval:?}"
    );
    // Adam's moments live in the projected space: q_proj (32×32, `std`: right side) keeps
    // 32×4, down_proj (32×64, wide: left side) 4×64; the embeddings keep full moments.
    let optim = std::fs::read(dir.join("checkpoint/optim.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(optim[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&optim[8..8 + header_len]).unwrap();
    let shape = |k: &str| header[k]["shape"].clone();
    assert_eq!(
        shape("m.layers.0.q_proj.weight"),
        serde_json::json!([32, 4])
    );
    assert_eq!(
        shape("v.layers.1.down_proj.weight"),
        serde_json::json!([4, 64])
    );
    assert_eq!(
        shape("galore_right.layers.0.q_proj.weight"),
        serde_json::json!([4, 32])
    );
    assert_eq!(
        shape("galore_left.layers.1.down_proj.weight"),
        serde_json::json!([32, 4])
    );
    assert_eq!(shape("m.embed_tokens.weight")[1], 32);
}

/// ReLoRA over a frozen W kept in bf16, int8 and NF4: merges quantise again (their error is
/// in the metrics), a killed run resumes from the compact W bit for bit, and the outputs
/// hold f32 merged weights as with an f32 W.
#[test]
fn relora_with_a_compact_frozen_w_merges_and_resumes_bit_identically() {
    for (format, worst) in [("bf16", 0.01), ("int8", 0.02), ("nf4", 0.15)] {
        let stage = format!(
            r#"  relora-q:
    kind: train
    inputs: {{data: tokens, init: warm}}
    params:
      method: relora
      steps: 30
      lr: 1.0e-2
      lora: {{rank: 4, alpha: 8, dropout: 0.0, frozen: {format}, block: 32}}
      relora: {{merge_every: 10, restart_warmup: 3, reset: {{mode: magnitude, fraction: 0.9}}}}
"#
        );
        let yaml = format!("{TINY_ML}{stage}");
        let (_env, dir, m) = killed_mid_run_resumes_bit_identically(&yaml, "relora-q", &[]);
        let errors: Vec<f64> = m.iter().filter_map(|x| x["quant_error"].as_f64()).collect();
        assert_eq!(errors.len(), 3, "{format}: one error per merge");
        assert!(
            errors.iter().all(|e| *e > 0.0 && *e < worst),
            "{format}: ‖W − Q(W)‖/‖W‖ after the merges {errors:?}"
        );
        let eval: Vec<f64> = m.iter().filter_map(|x| x["eval_loss"].as_f64()).collect();
        assert!(
            eval[2] < eval[0],
            "{format}: the validation loss did not fall: {eval:?}"
        );
        let weights = std::fs::read(dir.join("model.safetensors")).unwrap();
        let header_len = u64::from_le_bytes(weights[..8].try_into().unwrap()) as usize;
        let header: Value = serde_json::from_slice(&weights[8..8 + header_len]).unwrap();
        assert_eq!(header["layers.0.q_proj.weight"]["dtype"], "F32", "{format}");
        let train: Value =
            serde_json::from_slice(&std::fs::read(dir.join("train.json")).unwrap()).unwrap();
        assert_eq!(
            train["frozen_params"],
            2 * (4 * 32 * 32 + 3 * 32 * 64),
            "{format}"
        );
    }
}

/// A stage predicted to need more memory than the machine has is refused before anything
/// runs, with the prediction's parts; `plan --estimate` shows the same prediction.
#[test]
fn a_stage_too_big_for_this_machine_is_refused_before_anything_runs() {
    let env = Env::new();
    let data = repo().join("examples/data");
    // LLaMA 1B full-rank at 4,096 × 256 tokens a micro-batch: weights, gradients and
    // moments are 19 GB (a 300-token vocabulary), its activations 3.7 TB, more than any
    // machine this runs on.
    let yaml = format!(
        "pipeline: big\nstages:\n{}  huge:\n    kind: train\n    inputs: {{data: tokens}}\n    \
         params: {{method: full, model: llama_1b, steps: 2, lr: 1.0e-3, seq_len: 256, micro_batch: 4096}}\n",
        tiny_tokens_stage!()
    )
    .replace("DATA", data.to_str().unwrap());
    env.write("big.yaml", &yaml);
    let plan = env.ok(&["plan", "big.yaml", "--estimate"]);
    // 1.2B parameters × 16 bytes, and 4 bytes × 1M tokens × 24 layers × (10 · 2048 + 3 · 5461).
    let gb = |text: &str, after: &str| -> f64 {
        let rest = &text[text.find(after).unwrap_or_else(|| panic!("{text}")) + after.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    let predicted = gb(&plan, "peak memory ≈ ");
    assert!((predicted - 3733.0).abs() < 5.0, "{plan}");
    let out = env.run(&["run", "big.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        (gb(&err, "stage `huge` is predicted to need ") - predicted).abs() < 0.1,
        "{err}"
    );
    assert!(
        err.contains("activations of a micro-batch") && err.contains("--force-memory"),
        "{err}"
    );
    // Nothing ran, not even the tokenize stage it depends on.
    let entries = std::fs::read_dir(env.path().join("cache/entries"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(entries, 0, "{err}");
}

/// A CPU stage placed on Slurm is held to its memory request (sbatch `--mem`, per node):
/// refused before anything is submitted when one rank's predicted peak exceeds it; the
/// same stage with a request that fits is not refused (its `plan` says where it would run).
#[test]
fn a_stage_over_its_slurm_memory_request_is_refused_before_submission() {
    let env = Env::new();
    let data = repo().join("examples/data");
    let yaml = |mem: &str| {
        format!(
            "pipeline: slurm-mem\nexecutor:\n  type: slurm\n  local_kinds: [tokenize]\n  \
             resources:\n    train: {{memory: {mem}}}\nstages:\n{}  small:\n    kind: train\n    \
             inputs: {{data: tokens}}\n    params: {{method: full, model: {{hidden: 32, \
             intermediate: 64, heads: 2, layers: 2}}, steps: 2, lr: 1.0e-3, seq_len: 32, \
             micro_batch: 2}}\n",
            tiny_tokens_stage!()
        )
        .replace("DATA", data.to_str().unwrap())
    };
    // The process alone is predicted at 150 MB: 100M (MiB) cannot hold it.
    env.write("slurm.yaml", &yaml("100M"));
    let out = env.run(&["run", "slurm.yaml"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(
            "stage `small` is predicted to need 0.2 GB, more than its Slurm memory \
                      request (`memory: 100M`), 0.1 GB"
        ),
        "{err}"
    );
    assert!(err.contains("resources.memory"), "{err}");
    let entries = std::fs::read_dir(env.path().join("cache/entries"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(
        entries, 0,
        "nothing ran, not even the local tokenize stage: {err}"
    );
    // 4G fits: `plan` places it on Slurm and the memory check has nothing to say.
    env.write("slurm.yaml", &yaml("4G"));
    let plan = env.ok(&["plan", "slurm.yaml", "--estimate"]);
    assert!(plan.contains("sbatch --mem=4G"), "{plan}");
}

/// A GPU stage run here is held to its GPU's memory as `nvidia-smi` reports it. This
/// machine has no GPU: a stand-in `nvidia-smi` on PATH reports a 100 MiB card, so the
/// check (not the GPU) is what is tested; the stage is refused before anything runs.
#[test]
fn a_gpu_stage_over_its_gpus_memory_is_refused_before_anything_runs() {
    let env = Env::new();
    let data = repo().join("examples/data");
    let bin_dir = env.path().join("fake-bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    let smi = bin_dir.join("nvidia-smi");
    std::fs::write(&smi, "#!/bin/sh\necho 100\necho 80000\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&smi, std::fs::Permissions::from_mode(0o755)).unwrap();
    let yaml = format!(
        "pipeline: gpu-mem\nstages:\n{}  small:\n    kind: train\n    inputs: {{data: tokens}}\n    \
         params: {{method: full, device: cuda, model: {{hidden: 32, intermediate: 64, heads: 2, \
         layers: 2}}, steps: 2, lr: 1.0e-3, seq_len: 32, micro_batch: 2}}\n",
        tiny_tokens_stage!()
    )
    .replace("DATA", data.to_str().unwrap());
    env.write("gpu.yaml", &yaml);
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let out = env.run_with(
        &["run", "gpu.yaml"],
        &[("PATH", &path), ("RELORA_GPUS", "0,1")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(
            "stage `small` is predicted to need 0.2 GB, more than the memory of its \
                      GPU, 0.1 GB"
        ),
        "{err}"
    );
    let entries = std::fs::read_dir(env.path().join("cache/entries"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(entries, 0, "{err}");
}

/// `verify` finds nothing corrupt in `env`'s cache.
fn assert_verified(env: &Env) {
    let v = env.ok(&["verify"]);
    assert!(v.contains(" 0 corrupt"), "{v}");
}

/// After `gc --keep FILE`, nothing of a stage's attempts is left: no staging or scratch
/// folder.
fn assert_gc_leaves_no_attempts(env: &Env, file: &str) {
    env.ok(&["gc", "--keep", file]);
    for dir in ["staging", "scratch"] {
        let left: Vec<_> = std::fs::read_dir(env.path().join("cache").join(dir))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{dir} still holds {left:?}");
    }
}

/// Every file under `dir` (relative path → bytes).
fn files_below(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// Run `stage` of `yaml` once uninterrupted and once killed (SIGKILL to the orchestrator)
/// after its checkpoint at step 10, then resumed; the two must give the same bytes and
/// metrics. Returns the resumed run's environment (its cache), outputs folder and metrics.
fn killed_mid_run_resumes_bit_identically(
    yaml: &str,
    stage: &str,
    set: &[&str],
) -> (Env, PathBuf, Vec<Value>) {
    let data = repo().join("examples/data");
    let yaml = yaml.replace("DATA", data.to_str().unwrap());
    let mut args = vec!["run", "tiny.yaml", "--until", stage];
    args.extend_from_slice(set);
    let reference = Env::new();
    reference.write("tiny.yaml", &yaml);
    reference.ok(&args);
    let (ref_dir, ref_metrics) = metrics(&reference, "tiny.yaml", stage, set);

    let env = Env::new();
    env.write("tiny.yaml", &yaml);
    env.ok(&["run", "tiny.yaml", "--until", "tokens"]);
    let mut child = env.cmd(&args).stderr(Stdio::null()).spawn().unwrap();
    // Wait for the checkpoint at step 10 or later, then kill the orchestrator.
    wait_until("no checkpoint appeared", Duration::from_secs(90), || {
        latest_checkpoint(&env.path().join("cache")) >= 10
    });
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(800)); // the stage notices and exits
    let out = env.ok(&args);
    assert!(ran(&out).contains(&stage.to_string()), "{out}");
    let (dir, m) = metrics(&env, "tiny.yaml", stage, set);
    let log = std::fs::read_to_string(dir.parent().unwrap().join("log.txt")).unwrap();
    assert!(
        log.contains("resuming from the checkpoint at step"),
        "{log}"
    );
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(ref_dir.join("model.safetensors")).unwrap(),
        "resumed weights differ from an uninterrupted run"
    );
    assert_eq!(m, ref_metrics);
    // Every output file, the checkpoint and the record included, not only the weights.
    let (ours, theirs) = (files_below(&dir), files_below(&ref_dir));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (name, bytes) in &ours {
        assert!(
            bytes == &theirs[name],
            "{stage}: {name} differs after the resume"
        );
    }
    (env, dir, m)
}

/// A corrupt input entry is refused by the stage about to read it, naming the stage, the
/// entry and the file; `verify --repair` moves it into the quarantine, the next `run`
/// computes it again (same key, same bytes) and `gc --quarantine` empties the quarantine.
#[test]
fn a_corrupt_input_entry_is_refused_at_use_and_repaired() {
    let env = Env::new();
    tiny_ml(&env);
    env.ok(&["run", "tiny.yaml", "--until", "warm"]);
    let v: Value = serde_json::from_str(&env.ok(&["show", "tiny.yaml", "warm", "--json"])).unwrap();
    let entry = PathBuf::from(v["path"].as_str().unwrap());
    let f = entry.join("outputs/model.safetensors");
    let good = std::fs::read(&f).unwrap();
    let mut perm = std::fs::metadata(&f).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perm.set_readonly(false);
    std::fs::set_permissions(&f, perm).unwrap();
    // One bit of one weight: still a readable safetensors file, so only a hash can tell.
    let mut bad = good.clone();
    let mid = bad.len() - 100;
    bad[mid] ^= 1;
    std::fs::write(&f, &bad).unwrap();

    let o = env.run(&["run", "tiny.yaml", "--until", "relora"]);
    assert!(!o.status.success());
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        err.contains("stage `relora` cannot read its input `init`")
            && err.contains(entry.to_str().unwrap())
            && err.contains("stage `warm`: changed outputs: model.safetensors")
            && err.contains("relora-pipe verify --repair"),
        "{err}"
    );
    assert_eq!(env.run(&["verify"]).status.code(), Some(1));

    let out = env.ok(&["verify", "--repair"]);
    assert!(
        out.contains("1 corrupt") && out.contains("moved to"),
        "{out}"
    );
    assert!(!entry.exists(), "the corrupt entry is still in place");
    let quarantine = env.path().join("cache/quarantine");
    assert_eq!(std::fs::read_dir(&quarantine).unwrap().count(), 1);

    let out = env.ok(&["run", "tiny.yaml", "--until", "relora"]);
    assert!(ran(&out).contains(&"warm".to_string()), "{out}");
    assert_eq!(
        std::fs::read(&f).unwrap(),
        good,
        "recomputed, the same bytes"
    );
    assert!(env.ok(&["verify"]).contains(" 0 corrupt"));

    let out = env.ok(&["gc", "--quarantine"]);
    assert!(out.contains("emptied the quarantine: 1 entries"), "{out}");
    assert_eq!(std::fs::read_dir(&quarantine).unwrap().count(), 0);
}

/// A one-file HTTP server on 127.0.0.1 that honours Range requests. If `cut_at` is set, its
/// first answer announces the whole body but sends only that many bytes, then hangs up.
/// It stops after `max_requests` connections or 30 seconds.
fn serve(
    body: Vec<u8>,
    cut_at: Option<usize>,
    max_requests: usize,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "http://{}/c4-sample.json.gz",
        listener.local_addr().unwrap()
    );
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = log.clone();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let mut served = 0;
        while served < max_requests && t0.elapsed() < Duration::from_secs(30) {
            let Ok((stream, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            stream.set_nonblocking(false).unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut range_from = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    range_from = v.trim().trim_end_matches('-').parse().unwrap();
                }
            }
            seen.lock()
                .unwrap()
                .push(format!("range_from={range_from}"));
            let mut out = stream;
            let rest = &body[range_from..];
            let head = if range_from > 0 {
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {range_from}-{}/{}\r\nConnection: close\r\n\r\n",
                    rest.len(), body.len() - 1, body.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
            };
            out.write_all(head.as_bytes()).unwrap();
            match (served, cut_at) {
                (0, Some(cut)) => out.write_all(&rest[..cut]).unwrap(),
                _ => out.write_all(rest).unwrap(),
            }
            let _ = out.flush();
            served += 1;
        }
    });
    (url, log)
}

#[test]
fn download_resumes_after_a_broken_connection_checks_sha256_and_feeds_tokenize() {
    use sha2::Digest;
    let body =
        std::fs::read(repo().join("examples/data/c4-train.00000-of-01024.first1000.json.gz"))
            .unwrap();
    let sha: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (url, log) = serve(body.clone(), Some(300_000), 3);
    let env = Env::new();
    let yaml = format!(
        "pipeline: dl\nstages:\n  c4:\n    kind: download\n    params:\n      files:\n        - {{url: \"{url}\", sha256: {sha}}}\n  tokens:\n    kind: tokenize\n    inputs: {{corpus: c4}}\n    params:\n      train_files: c4-sample.json.gz\n      limit_docs: 100\n      valid_docs: 10\n      tokenizer: {{type: bpe, vocab_size: 300}}\n"
    );
    env.write("dl.yaml", &yaml);
    let first = env.run(&["run", "dl.yaml"]);
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(!first.status.success());
    assert!(
        err.contains("the connection broke after") && err.contains("run again to resume"),
        "{err}"
    );
    let out = env.ok(&["run", "dl.yaml"]);
    assert_eq!(ran(&out), ["c4", "tokens"]);
    assert_eq!(*log.lock().unwrap(), ["range_from=0", "range_from=300000"]);
    let v: Value = serde_json::from_str(&env.ok(&["show", "dl.yaml", "c4", "--json"])).unwrap();
    let got =
        std::fs::read(Path::new(v["path"].as_str().unwrap()).join("outputs/c4-sample.json.gz"))
            .unwrap();
    assert!(
        got == body,
        "the resumed download differs from the served file"
    );
    assert!(
        std::fs::read_to_string(Path::new(v["path"].as_str().unwrap()).join("log.txt"))
            .unwrap()
            .contains("resuming")
    );
    // A wrong checksum is refused, and nothing is committed.
    let (url2, _) = serve(body, None, 1);
    let bad = "0".repeat(64);
    env.write("bad.yaml", &format!("pipeline: bad\nstages:\n  c4:\n    kind: download\n    params:\n      files: [{{url: \"{url2}\", sha256: \"{bad}\"}}]\n"));
    let o = env.run(&["run", "bad.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains(&format!("sha256 is {sha}"))
            && err.contains("the download was discarded"),
        "{err}"
    );
}

#[test]
fn a_download_of_many_files_keeps_finished_ones_and_unpinned_files_need_consent() {
    use sha2::Digest;
    let hex = |b: &[u8]| -> String {
        sha2::Sha256::digest(b)
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect()
    };
    let small = b"one small file\n".repeat(1000);
    let big = std::fs::read(repo().join("examples/data/c4-train.00000-of-01024.first1000.json.gz"))
        .unwrap();
    let (u1, log1) = serve(small.clone(), None, 2);
    let (u2, log2) = serve(big.clone(), Some(300_000), 3);
    let env = Env::new();
    let stage = |extra: &str| {
        format!(
            "pipeline: dl\nstages:\n  c4:\n    kind: download\n    params:\n{extra}      files:\n        - {{url: \"{u1}\", name: a.txt}}\n        - {{url: \"{u2}\", sha256: {}}}\n",
            hex(&big)
        )
    };
    // Without consent, a missing sha256 is an error at the file's entry.
    env.write("nopin.yaml", &stage(""));
    let o = env.run(&["plan", "nopin.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("nopin.yaml:7:")
            && err.contains("has no sha256")
            && err.contains("allow_unpinned: true"),
        "{err}"
    );
    // With it: the second file's connection breaks; the rerun resumes it and does not fetch
    // the finished first file again.
    env.write("tofu.yaml", &stage("      allow_unpinned: true\n"));
    assert!(!env.run(&["run", "tofu.yaml"]).status.success());
    env.ok(&["run", "tofu.yaml"]);
    assert_eq!(
        log1.lock().unwrap().len(),
        1,
        "the finished file was fetched again"
    );
    assert_eq!(*log2.lock().unwrap(), ["range_from=0", "range_from=300000"]);
    let v: Value = serde_json::from_str(&env.ok(&["show", "tofu.yaml", "c4", "--json"])).unwrap();
    let entry = Path::new(v["path"].as_str().unwrap());
    assert_eq!(std::fs::read(entry.join("outputs/a.txt")).unwrap(), small);
    assert_eq!(
        std::fs::read_to_string(entry.join("outputs/SHA256SUMS")).unwrap(),
        format!("{}  a.txt\n{}  c4-sample.json.gz\n", hex(&small), hex(&big))
    );
    let log = std::fs::read_to_string(entry.join("log.txt")).unwrap();
    assert!(
        log.contains("a.txt: already downloaded and verified")
            && log.contains(&format!("{{url: {u1}, sha256: {}}}", hex(&small))),
        "{log}"
    );
}

#[test]
fn the_paper_pipelines_validate_and_the_ablations_import_the_130m_warm_start() {
    let env = Env::new();
    let plan = |f: &str| -> Vec<(String, Value)> {
        let file = repo().join("pipelines").join(f);
        env.plan(file.to_str().unwrap(), &[])
            .into_iter()
            .map(|s| (s["name"].as_str().unwrap().to_string(), s["key"].clone()))
            .collect()
    };
    let paper = plan("paper.yaml");
    let abl = plan("ablation-130m.yaml");
    // Table 2: four methods at four sizes, trained, evaluated and tabulated.
    for size in ["60m", "130m", "250m", "350m"] {
        for run in ["warm", "full", "relora", "lora", "control"] {
            let name = format!("{run}-{size}");
            assert!(paper.iter().any(|(n, _)| *n == name), "{name}");
        }
        for run in ["full", "relora", "lora", "control"] {
            let name = format!("eval-{run}-{size}");
            assert!(paper.iter().any(|(n, _)| *n == name), "{name}");
        }
    }
    // The ablations bring in the 130M warm start and its data, not the other sizes.
    let names: Vec<&str> = abl.iter().map(|(n, _)| n.as_str()).collect();
    for n in [
        "c4",
        "tokens",
        "warm-130m",
        "relora-130m",
        "eval-lora-130m",
        "table3",
    ] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    assert!(!names
        .iter()
        .any(|n| n.ends_with("-60m") || n.ends_with("-350m")));
    // The download (the root of both graphs) has one key, so everything after it is shared.
    let key = |v: &[(String, Value)]| v.iter().find(|(n, _)| n == "c4").unwrap().1.clone();
    assert!(key(&paper).is_string());
    assert_eq!(key(&paper), key(&abl));
}

#[test]
fn parallel_stages_that_need_a_gpu_never_share_one() {
    let env = Env::new();
    let mut yaml = String::from("pipeline: gpus\nstages:\n");
    for name in ["g1", "g2", "g3"] {
        yaml.push_str(&format!(
            "  {name}:\n    kind: command\n    resources: {{gpus: 1}}\n    params: {{run: \"echo {name} > $OUT/name; echo $CUDA_VISIBLE_DEVICES > $OUT/gpu; date +%s%N > $OUT/start; sleep 0.5; date +%s%N > $OUT/end\"}}\n"
        ));
    }
    env.write("g.yaml", &yaml);
    let out = env
        .cmd(&["run", "g.yaml", "--jobs", "3"])
        .env("RELORA_GPUS", "0,1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |stage: &str, f: &str| -> String {
        let v: Value = serde_json::from_str(&env.ok(&["show", "g.yaml", stage, "--json"])).unwrap();
        std::fs::read_to_string(
            Path::new(v["path"].as_str().unwrap())
                .join("outputs")
                .join(f),
        )
        .unwrap()
        .trim()
        .to_string()
    };
    let runs: Vec<(String, u128, u128)> = ["g1", "g2", "g3"]
        .iter()
        .map(|s| {
            (
                read(s, "gpu"),
                read(s, "start").parse().unwrap(),
                read(s, "end").parse().unwrap(),
            )
        })
        .collect();
    for (i, a) in runs.iter().enumerate() {
        assert!(a.0 == "0" || a.0 == "1", "gpu id {}", a.0);
        for b in &runs[i + 1..] {
            let overlap = a.1 < b.2 && b.1 < a.2;
            assert!(
                !(overlap && a.0 == b.0),
                "two stages ran at once on GPU {}",
                a.0
            );
        }
    }
    // Only two GPUs: the three stages cannot all have overlapped.
    let all_overlap = runs
        .iter()
        .all(|a| runs.iter().all(|b| a.1 < b.2 && b.1 < a.2));
    assert!(!all_overlap);
    // Asking for more GPUs than exist is an error before anything runs.
    let o = env
        .cmd(&["run", "g.yaml", "--force", "g1"])
        .env("RELORA_GPUS", "")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs 1 GPU(s) but 0 are available"));
}

#[test]
fn a_stage_that_names_its_gpu_gets_that_one_and_a_missing_one_is_an_error() {
    let env = Env::new();
    env.write(
        "pin.yaml",
        "pipeline: pin\nstages:\n  p:\n    kind: command\n    resources: {gpus: 1, gpu_ids: [1]}\n    params: {run: \"echo $CUDA_VISIBLE_DEVICES > $OUT/gpu\"}\n",
    );
    let o = env
        .cmd(&["run", "pin.yaml"])
        .env("RELORA_GPUS", "0,1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = manifest(&env, "pin.yaml", "p", &[]);
    let dir = env
        .path()
        .join("cache/entries")
        .join(m["key"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("outputs/gpu")).unwrap(),
        "1\n"
    );
    // The train kind's `device: cuda:N` pins GPU N the same way; on a machine whose GPUs
    // are 0 and 1, GPU 3 is an error naming the stage, before anything runs.
    tiny_ml(&env);
    let o = env
        .cmd(&["run", "tiny.yaml", "--set", "warm.device=cuda:3"])
        .env("RELORA_GPUS", "0,1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("stage `warm` asks for GPU 3"),
        "{err}"
    );
    assert!(ran(&err).is_empty(), "nothing runs: {err}");
}

/// Stages of `file` whose plan state is `state`, sorted.
fn in_state(env: &Env, file: &str, vars: &[(&str, &str)], state: &str) -> Vec<String> {
    let o = env.run_with(&["plan", file, "--json"], vars);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let plan: Vec<Value> = serde_json::from_slice(&o.stdout).unwrap();
    let mut v: Vec<String> = plan
        .iter()
        .filter(|s| s["state"] == state)
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// A stage's manifest (null when it has no entry), as `show --json` gives it.
fn manifest(env: &Env, file: &str, stage: &str, vars: &[(&str, &str)]) -> Value {
    let o = env.run_with(&["show", file, stage, "--json"], vars);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice::<Value>(&o.stdout).unwrap()["manifest"].clone()
}

#[test]
fn entries_made_by_other_code_are_not_reused_unless_the_user_accepts_it() {
    let env = Env::new();
    tiny_ml(&env);
    env.ok(&["run", "tiny.yaml"]);
    // RELORA_CODE_SALT stands in for an edit of one kind's code (it can only change keys).
    let report_edit = [("RELORA_CODE_SALT", "report=edit1")];
    let plan_out = env.ok_with(&["plan", "tiny.yaml"], &report_edit);
    assert!(
        plan_out.contains("code of kind report changed (crates/stages/src/report.rs)"),
        "{plan_out}"
    );
    assert!(
        plan_out.contains("--accept-code-change report"),
        "{plan_out}"
    );
    assert_eq!(
        in_state(&env, "tiny.yaml", &report_edit, "stale"),
        ["report"]
    );
    // A report-only change re-runs only the report.
    assert_eq!(
        ran(&env.ok_with(&["run", "tiny.yaml"], &report_edit)),
        ["report"]
    );

    // A training-code change: no train entry is reused. The re-runs give the same bytes
    // (same key inputs, same outputs), so nothing downstream runs again.
    let before = manifest(&env, "tiny.yaml", "relora", &[]);
    let train_edit = [("RELORA_CODE_SALT", "train=edit2")];
    let r = ran(&env.ok_with(&["run", "tiny.yaml"], &train_edit));
    assert_eq!(r, ["lora", "relora", "warm"]);
    let after = manifest(&env, "tiny.yaml", "relora", &train_edit);
    assert_ne!(before["key"], after["key"]);
    assert_eq!(
        before["output_hash"], after["output_hash"],
        "same inputs, same bytes"
    );

    // Another edit, declared harmless: the entries are adopted, visibly, not recomputed.
    let train_edit3 = [("RELORA_CODE_SALT", "train=edit3")];
    let out = env.ok_with(
        &["run", "tiny.yaml", "--accept-code-change", "train"],
        &train_edit3,
    );
    assert!(ran(&out).is_empty(), "{out}");
    assert!(out.contains("adopted: relora"), "{out}");
    let adopted = manifest(&env, "tiny.yaml", "relora", &train_edit3);
    assert_eq!(adopted["adopted_from"]["key"], after["key"]);
    let reason = adopted["adopted_from"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("code of kind train changed (crates/stages/src/train)")
            && reason.contains("--accept-code-change train"),
        "{reason}"
    );
    assert_eq!(adopted["output_hash"], after["output_hash"]);
    let shown = env.ok_with(&["show", "tiny.yaml", "relora"], &train_edit3);
    assert!(shown.contains("adopted from"), "{shown}");
    // An unknown kind is refused by name.
    let o = env.run(&["run", "tiny.yaml", "--accept-code-change", "trian"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("did you mean `train`?"));
}

#[test]
fn forcing_a_stage_gives_the_same_bytes_and_runs_nothing_downstream() {
    let env = Env::new();
    tiny_ml(&env);
    env.ok(&["run", "tiny.yaml", "--until", "relora"]);
    let tokens = manifest(&env, "tiny.yaml", "tokens", &[]);
    let warm = manifest(&env, "tiny.yaml", "warm", &[]);
    // Tokenize again: the same bytes (no timings in dataset.json), so the train stages
    // downstream keep their keys.
    let out = env.ok(&["run", "tiny.yaml", "--until", "relora", "--force", "tokens"]);
    assert_eq!(ran(&out), ["tokens"]);
    assert_eq!(
        manifest(&env, "tiny.yaml", "tokens", &[])["outputs"],
        tokens["outputs"]
    );
    // Train again with another (cosmetic) checkpoint period: the same bytes, state.json
    // included.
    let out = env.ok(&[
        "run",
        "tiny.yaml",
        "--until",
        "relora",
        "--force",
        "warm",
        "--set",
        "warm.checkpoint_every=3",
    ]);
    assert_eq!(ran(&out), ["warm"]);
    assert_eq!(
        manifest(&env, "tiny.yaml", "warm", &[])["outputs"],
        warm["outputs"]
    );
    // The manifest says what the run ran on.
    let m = manifest(&env, "tiny.yaml", "warm", &[]);
    for k in ["threads", "profile", "jobs", "target", "cpu_isa"] {
        assert!(m["environment"].get(k).is_some(), "{}", m["environment"]);
    }
}

#[test]
fn a_stage_wrapper_runs_each_stage_through_it_and_changes_no_key() {
    let env = Env::new();
    env.write(
        "w.yaml",
        "pipeline: w\nstages:\n  a:\n    kind: command\n    params: {run: \"echo wrapped by $WRAPPED_BY > $OUT/a.txt\"}\n",
    );
    let out = env.ok_with(
        &["run", "w.yaml"],
        &[("RELORA_STAGE_WRAPPER", "env WRAPPED_BY=wrapper")],
    );
    assert_eq!(ran(&out), ["a"]);
    let shown: Value =
        serde_json::from_slice(&env.run(&["show", "w.yaml", "a", "--json"]).stdout).unwrap();
    let dir = PathBuf::from(shown["path"].as_str().expect("a path"));
    let text = std::fs::read_to_string(dir.join("outputs/a.txt")).unwrap();
    assert_eq!(text.trim(), "wrapped by wrapper");
    // The same key without the wrapper: nothing runs again.
    assert!(ran(&env.ok(&["run", "w.yaml"])).is_empty());
}

#[test]
fn a_failed_forced_run_keeps_the_committed_entry() {
    let env = Env::new();
    // Fails while a file outside the key exists, so the forced run has the same key.
    env.write(
        "f.yaml",
        "pipeline: f\nstages:\n  a:\n    kind: command\n    params: {run: \"test ! -e fail-now && echo A > $OUT/a.txt\"}\n",
    );
    env.ok(&["run", "f.yaml"]);
    let before = manifest(&env, "f.yaml", "a", &[]);
    env.write("fail-now", "");
    let o = env.run(&["run", "f.yaml", "--force", "a"]);
    assert!(!o.status.success());
    let after = manifest(&env, "f.yaml", "a", &[]);
    assert_eq!(before["key"], after["key"]);
    let dir = env
        .path()
        .join("cache/entries")
        .join(after["key"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("outputs/a.txt")).unwrap(),
        "A\n"
    );
    assert!(ran(&env.ok(&["run", "f.yaml"])).is_empty(), "still cached");
}

fn alive(pid: &str) -> bool {
    Path::new(&format!("/proc/{}", pid.trim())).exists()
        && !std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .unwrap_or_default()
            .contains(") Z ")
}

/// The highest checkpoint step of any stage in the cache's scratch folders.
fn latest_checkpoint(cache: &Path) -> u64 {
    std::fs::read_dir(cache.join("scratch"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("checkpoints/latest")).ok())
        .filter_map(|l| l.trim().strip_prefix("ckpt-")?.parse().ok())
        .max()
        .unwrap_or(0)
}

/// Poll until `done` holds, failing with `what` after `limit`.
fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        assert!(t0.elapsed() < limit, "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(path: &Path, what: &str) {
    wait_until(
        &format!("{what} never happened"),
        Duration::from_secs(30),
        || path.exists(),
    );
}

#[test]
fn killing_the_orchestrator_stops_a_command_stage_and_what_it_started() {
    let env = Env::new();
    env.write(
        "k.yaml",
        "pipeline: k\nstages:\n  s:\n    kind: command\n    params: {run: \"echo $$ > shell.pid; sleep 300 & echo $! > sleep.pid; wait\"}\n",
    );
    let mut child = env
        .cmd(&["run", "k.yaml"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&env.path().join("sleep.pid"), "the stage's shell");
    let shell = std::fs::read_to_string(env.path().join("shell.pid")).unwrap();
    let sleep = std::fs::read_to_string(env.path().join("sleep.pid")).unwrap();
    assert!(alive(&shell) && alive(&sleep));
    child.kill().unwrap(); // SIGKILL: the orchestrator gets no chance to clean up
    child.wait().unwrap();
    wait_until(
        &format!("the stage's shell ({shell}) or its child ({sleep}) outlived the orchestrator"),
        Duration::from_secs(10),
        || !alive(&shell) && !alive(&sleep),
    );
}

#[test]
fn gc_during_a_run_leaves_the_running_stage_alone() {
    let env = Env::new();
    env.write(
        "g.yaml",
        "pipeline: g\nstages:\n  s:\n    kind: command\n    params: {run: \"echo step > $SCRATCH/ckpt; touch started; while [ ! -e go ]; do sleep 0.1; done; cat $SCRATCH/ckpt > $OUT/a.txt\"}\n",
    );
    let child = env
        .cmd(&["run", "g.yaml"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&env.path().join("started"), "the stage's start");
    let out = env.ok(&["gc", "--all"]);
    assert!(out.contains("a running stage holds its lock"), "{out}");
    env.write("go", "");
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = manifest(&env, "g.yaml", "s", &[]);
    let dir = env
        .path()
        .join("cache/entries")
        .join(m["key"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("outputs/a.txt")).unwrap(),
        "step\n"
    );
    // Once nothing runs, gc takes everything, lock files included.
    let out = env.ok(&["gc", "--all"]);
    assert!(out.contains("removed 1 entries and 1 lock files"), "{out}");
    assert_eq!(
        std::fs::read_dir(env.path().join("cache/locks"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn training_gives_the_same_bytes_on_one_thread_and_on_two() {
    let env = Env::new();
    let data = repo().join("examples/data/c4-train.00000-of-01024.first1000.json.gz");
    // Big enough that the matmuls are split across threads (hidden 128, 1024 tokens).
    env.write(
        "t.yaml",
        &format!(
            "pipeline: threads\nstages:\n  tokens:\n    kind: tokenize\n    params:\n      train_files: {}\n      limit_docs: 300\n      valid_docs: 20\n      tokenizer: {{type: bpe, vocab_size: 512}}\n  t:\n    kind: train\n    inputs: {{data: tokens}}\n    params: {{method: full, model: {{hidden: 128, intermediate: 352, heads: 4, layers: 2}}, seq_len: 128, micro_batch: 8, steps: 8, lr: 3.0e-3, warmup: 2, eval_sequences: 4}}\n",
            data.display()
        ),
    );
    let one = [("RAYON_NUM_THREADS", "1")];
    env.ok_with(&["run", "t.yaml"], &one);
    let a = manifest(&env, "t.yaml", "t", &one);
    assert_eq!(a["environment"]["threads"], "1");
    let two = [("RAYON_NUM_THREADS", "2")];
    env.ok_with(&["run", "t.yaml", "--force", "t"], &two);
    let b = manifest(&env, "t.yaml", "t", &two);
    assert_eq!(b["environment"]["threads"], "2");
    assert_eq!(
        a["output_hash"], b["output_hash"],
        "{}\n{}",
        a["outputs"], b["outputs"]
    );
}

#[test]
fn a_validation_split_too_small_to_evaluate_fails_before_any_training() {
    let env = Env::new();
    tiny_ml(&env);
    // One held-out document (1,084 tokens) is shorter than a 2,000-token sequence.
    let o = env.run(&[
        "run",
        "tiny.yaml",
        "--until",
        "warm",
        "--set",
        "tokens.valid_docs=1",
        "--set",
        "warm.seq_len=2000",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("holds no whole sequence of 2000 tokens") && err.contains("valid_docs"),
        "{err}"
    );
    assert!(
        !err.contains("step 1 "),
        "it failed after training began: {err}"
    );
}

#[test]
fn a_worker_that_panics_fails_its_stage_and_the_run_ends() {
    let env = Env::new();
    env.write("p.yaml", CHAIN);
    // `b` panics in the orchestrator's worker thread; with --keep-going the independent
    // stages still finish, `c` (after `b`) is skipped, and the run ends with an error.
    let o = env
        .cmd(&["run", "p.yaml", "--keep-going", "--jobs", "2"])
        .env("RELORA_TEST_WORKER_PANIC", "b")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("[b] FAILED: internal error: the worker for this stage panicked (injected"),
        "{err}"
    );
    assert!(
        err.contains("skipped: c (because `b` did not finish)"),
        "{err}"
    );
    assert_eq!(ran(&err), ["a", "d"]);
    // Without the fault the same run completes what is left.
    assert_eq!(ran(&env.ok(&["run", "p.yaml"])), ["b", "c"]);
}

/// The tiny pipeline plus a second corpus tokenized with `tokens`' tokenizer, a third with a
/// tokenizer of its own, and an evaluation of the warm start on each.
const SECOND_CORPUS: &str = r#"
  more:
    kind: tokenize
    inputs: {tokenizer: tokens}
    params:
      train_files: DATA/c4-train.00000-of-01024.first1000.json.gz
      limit_docs: 60
      valid_docs: 30
  foreign:
    kind: tokenize
    params:
      train_files: DATA/c4-train.00000-of-01024.first1000.json.gz
      limit_docs: 60
      valid_docs: 30
      tokenizer: {type: bpe, vocab_size: 280}
  eval-more:
    kind: eval
    inputs: {model: warm, data: more}
    params: {tokens: 512}
  eval-foreign:
    kind: eval
    inputs: {model: warm, data: foreign}
    params: {tokens: 512}
"#;

#[test]
fn a_second_corpus_shares_the_tokenizer_of_another_stage_and_eval_refuses_a_foreign_one() {
    let env = Env::new();
    let data = repo().join("examples/data");
    let text = TINY_ML.replace("DATA", data.to_str().unwrap())
        + &SECOND_CORPUS.replace("DATA", data.to_str().unwrap());
    env.write("two.yaml", &text);
    env.ok(&["run", "two.yaml", "--until", "eval-more"]);
    let out_of = |stage: &str| -> PathBuf {
        let v: Value =
            serde_json::from_str(&env.ok(&["show", "two.yaml", stage, "--json"])).unwrap();
        PathBuf::from(v["path"].as_str().unwrap()).join("outputs")
    };
    let (tokens, more) = (out_of("tokens"), out_of("more"));
    assert_eq!(
        std::fs::read(tokens.join("tokenizer.json")).unwrap(),
        std::fs::read(more.join("tokenizer.json")).unwrap(),
        "the second corpus is tokenized with the same tokenizer"
    );
    let manifest = |d: &Path| -> Value {
        serde_json::from_slice(&std::fs::read(d.join("dataset.json")).unwrap()).unwrap()
    };
    assert_eq!(
        manifest(&tokens)["tokenizer_blake3"],
        manifest(&more)["tokenizer_blake3"]
    );
    assert_eq!(manifest(&more)["valid"]["documents"], 30);
    let eval: Value =
        serde_json::from_slice(&std::fs::read(out_of("eval-more").join("eval.json")).unwrap())
            .unwrap();
    assert!(eval["perplexity"].as_f64().unwrap() > 1.0);

    let o = env.run(&["run", "two.yaml", "--until", "eval-foreign"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("input `model` (stage `warm`) was trained with tokenizer blake3:")
            && err.contains("but input `data` (stage `foreign`) was tokenized with blake3:")
            && err.contains("inputs: {tokenizer: STAGE}"),
        "{err}"
    );
}

#[test]
fn plan_estimate_gives_each_stage_its_tokens_flops_and_data() {
    let env = Env::new();
    tiny_ml(&env);
    env.ok(&["run", "tiny.yaml", "--until", "tokens"]);
    let plans = env.plan("tiny.yaml", &["--estimate"]);
    let stage = |name: &str| plans.iter().find(|p| p["name"] == name).unwrap().clone();
    let tokens = stage("tokens");
    let facts = &tokens["estimate"]["facts"];
    assert_eq!(
        facts["exact"], true,
        "the data stage is cached: its figures are exact"
    );
    let (vocab, train_tokens) = (
        facts["vocab_size"].as_u64().unwrap() as f64,
        facts["train_tokens"].as_u64().unwrap(),
    );
    // warm: full-rank, hidden 32, intermediate 64, 2 layers, seq_len 32, 10 steps of 4
    // sequences, evaluated once (step 10 is both a multiple of eval_every and the last) on 8
    // sequences.
    let weights = 2.0 * (4.0 * 32.0 * 32.0 + 3.0 * 32.0 * 64.0) + vocab * 32.0;
    let attention = 4.0 * 2.0 * 32.0 * 32.0;
    let tokens_read = 10.0 * 4.0 * 32.0;
    let want =
        (6.0 * weights + 3.0 * attention) * tokens_read + (2.0 * weights + attention) * 8.0 * 32.0;
    let warm = stage("warm");
    assert_eq!(warm["estimate"]["facts"]["flops"].as_f64().unwrap(), want);
    assert_eq!(
        warm["estimate"]["facts"]["tokens"].as_f64().unwrap(),
        tokens_read
    );
    let lines: Vec<String> = warm["estimate"]["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    let reads = lines.iter().find(|l| l.starts_with("reads")).unwrap();
    assert!(
        reads.contains(&format!(
            "of the {:.3}k training tokens",
            train_tokens as f64 / 1e3
        )),
        "{reads}"
    );
    // ReLoRA's frozen W costs 4 FLOPs a token, not 6: its estimate is below full-rank's
    // per token although it runs more matmuls (the factors).
    let relora = stage("relora");
    let per_token = |s: &Value| {
        s["estimate"]["facts"]["flops"].as_f64().unwrap()
            / s["estimate"]["facts"]["tokens"].as_f64().unwrap()
    };
    assert!(per_token(&relora) < per_token(&warm));
    let text = env.ok(&["plan", "tiny.yaml", "--estimate"]);
    assert!(
        text.contains("total: ") && text.contains("H100-hours"),
        "{text}"
    );
}

#[test]
fn export_and_import_round_trip_a_model_through_the_transformers_layout() {
    let env = Env::new();
    let data = repo().join("examples/data");
    let d = data.to_str().unwrap();
    let one = TINY_ML.replace("DATA", d)
        + r#"
  export-warm:
    kind: export
    inputs: {model: warm, tokenizer: tokens}
  eval-warm:
    kind: eval
    inputs: {model: warm, data: tokens}
    params: {tokens: 2048}
"#;
    env.write("one.yaml", &one);
    env.ok(&["run", "one.yaml", "--until", "eval-warm"]);
    env.ok(&["run", "one.yaml", "--until", "export-warm"]);
    let out_of = |file: &str, stage: &str| -> PathBuf {
        let v: Value = serde_json::from_str(&env.ok(&["show", file, stage, "--json"])).unwrap();
        PathBuf::from(v["path"].as_str().unwrap()).join("outputs")
    };
    let staged = out_of("one.yaml", "export-warm");
    let text = env.ok(&["export", "one.yaml", "warm", "--to", "hf-warm"]);
    assert!(text.contains("exported stage `warm`"), "{text}");
    let hf = env.path().join("hf-warm");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
    ] {
        assert!(staged.join(f).is_file() && hf.join(f).is_file(), "{f}");
    }
    assert_eq!(
        std::fs::read(staged.join("model.safetensors")).unwrap(),
        std::fs::read(hf.join("model.safetensors")).unwrap(),
        "the stage and the command write the same weights"
    );
    let card = std::fs::read_to_string(hf.join("README.md")).unwrap();
    assert!(
        card.contains("stage `warm`, cache key") && card.contains("| steps | 10"),
        "{card}"
    );
    let config: Value =
        serde_json::from_slice(&std::fs::read(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "LlamaForCausalLM");
    assert_eq!(config["hidden_size"], 32);

    let two = TINY_ML.replace("DATA", d)
        + &r#"
  imported:
    kind: import
    params: {path: hf-warm}
  eval-warm:
    kind: eval
    inputs: {model: warm, data: tokens}
    params: {tokens: 2048}
  eval-imported:
    kind: eval
    inputs: {model: imported, data: tokens}
    params: {tokens: 2048}
  more:
    kind: tokenize
    inputs: {tokenizer: imported}
    params:
      train_files: DATA/c4-train.00000-of-01024.first1000.json.gz
      limit_docs: 60
      valid_docs: 10
  continued:
    kind: train
    inputs: {data: more, init: imported}
    params:
      method: relora
      steps: 4
      lr: 1.0e-2
      lora: {rank: 4, alpha: 8, dropout: 0.0}
      relora: {merge_every: 2, restart_warmup: 1}
"#
        .replace("DATA", d);
    env.write("two.yaml", &two);
    env.ok(&["run", "two.yaml", "--until", "eval-imported"]);
    let eval = |stage: &str| -> Value {
        serde_json::from_slice(&std::fs::read(out_of("two.yaml", stage).join("eval.json")).unwrap())
            .unwrap()
    };
    assert_eq!(
        eval("eval-imported")["perplexity"],
        eval("eval-warm")["perplexity"],
        "the imported model is the same function"
    );
    let tensors = |stage: &str| {
        candle_core::safetensors::load(
            out_of("two.yaml", stage).join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (tensors("warm"), tensors("imported"));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = b[name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(x == y, "{name} differs after the round trip");
    }
    // Exported again from the import, the weights are the same bytes.
    env.ok(&["export", "two.yaml", "imported", "--to", "hf-again"]);
    assert_eq!(
        std::fs::read(env.path().join("hf-again/model.safetensors")).unwrap(),
        std::fs::read(hf.join("model.safetensors")).unwrap()
    );
    // ReLoRA continues pre-training the imported checkpoint, on data tokenized with its
    // tokenizer.
    let out = env.ok(&["run", "two.yaml", "--until", "continued"]);
    assert!(ran(&out).contains(&"continued".to_string()), "{out}");

    // A directory of another architecture is refused at plan time, naming the file.
    std::fs::create_dir_all(env.path().join("gpt2")).unwrap();
    env.write(
        "gpt2/config.json",
        r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}"#,
    );
    env.write(
        "three.yaml",
        "pipeline: three\nstages:\n  imported:\n    kind: import\n    params: {path: gpt2}\n",
    );
    let o = env.run(&["plan", "three.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("three.yaml:5") && err.contains("config.json: model_type is `gpt2`"),
        "{err}"
    );
}

#[test]
fn the_config_files_executor_is_refined_by_the_pipeline_and_the_flag() {
    let env = Env::new();
    let config = env.write(
        "config.yaml",
        "executor:\n  type: slurm\n  partition: shared\n  resources:\n    command: {cpus: 2}\n    default: {time_limit: \"1:00:00\"}\n",
    );
    env.write(
        "e.yaml",
        "pipeline: e\nexecutor: {partition: gpu}\nstages:\n  a:\n    kind: command\n    params: {run: \"true\"}\n",
    );
    let vars = [("RELORA_CONFIG", config.to_str().unwrap())];
    let plan = env.ok_with(&["plan", "e.yaml"], &vars);
    assert!(
        plan.contains("@ slurm: sbatch --partition=gpu --time=1:00:00 --cpus-per-task=2"),
        "{plan}"
    );
    let plan = env.ok_with(&["plan", "e.yaml", "--executor", "local"], &vars);
    assert!(!plan.contains("@ "), "{plan}");
    env.write(
        "config.yaml",
        "executor:\n  type: slurm\n  resources:\n    comand: {cpus: 2}\n",
    );
    let o = env.run_with(&["plan", "e.yaml"], &vars);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("config.yaml:4:")
            && err.contains("executor.resources.comand")
            && err.contains("command"),
        "{err}"
    );
}

/// `checkpoint_activations` recomputes each block in the backward pass: the stage trains to
/// the same bytes as without it (ReLoRA with LoRA dropout and merges), and `plan
/// --estimate` predicts the smaller activation memory.
#[test]
fn checkpointed_activations_train_to_the_same_bytes() {
    let stage = |name: &str, extra: &str| {
        format!(
            r#"  {name}:
    kind: train
    inputs: {{data: tokens, init: warm}}
    params:
      method: relora
      steps: 20
      lr: 1.0e-2
      lora: {{rank: 4, alpha: 8, dropout: 0.1}}
      relora: {{merge_every: 10, restart_warmup: 3, reset: {{mode: magnitude, fraction: 0.9}}}}{extra}
"#
        )
    };
    let yaml = format!(
        "{TINY_ML}{}{}",
        stage("plain", ""),
        stage("recomputed", "\n      checkpoint_activations: true")
    )
    .replace("DATA", repo().join("examples/data").to_str().unwrap());
    let env = Env::new();
    env.write("tiny.yaml", &yaml);
    env.ok(&["run", "tiny.yaml", "--until", "plain"]);
    env.ok(&["run", "tiny.yaml", "--until", "recomputed"]);
    let (plain, m0) = metrics(&env, "tiny.yaml", "plain", &[]);
    let (recomputed, m1) = metrics(&env, "tiny.yaml", "recomputed", &[]);
    assert_ne!(plain, recomputed, "two stages, two keys");
    assert_eq!(m0.len(), 20);
    assert_eq!(m0, m1, "metrics differ");
    for f in ["model.safetensors", "lora_update.safetensors"] {
        assert_eq!(
            std::fs::read(plain.join(f)).unwrap(),
            std::fs::read(recomputed.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let plans = env.plan("tiny.yaml", &["--estimate"]);
    let activations = |name: &str| {
        plans.iter().find(|p| p["name"] == name).unwrap()["estimate"]["facts"]["activation_bytes"]
            .as_f64()
            .unwrap()
    };
    // 4 bytes × 128 tokens × (2 layers × (10·32 + 3·64)) against (2 × 32 + 10·32 + 3·64).
    assert_eq!(activations("plain"), 4.0 * 128.0 * 2.0 * 512.0);
    assert_eq!(activations("recomputed"), 4.0 * 128.0 * (64.0 + 512.0));
}

/// A cache on a read-only filesystem is refused before anything runs, naming the folder and
/// what to do. Mounts a tmpfs (needs root, as CI runs).
#[test]
fn a_read_only_cache_is_refused_before_anything_runs() {
    let env = Env::new();
    tiny_ml(&env);
    let cache = env.path().join("ro-cache");
    std::fs::create_dir(&cache).unwrap();
    let mount = |args: &[&str]| {
        let o = Command::new("mount").args(args).output().unwrap();
        assert!(
            o.status.success(),
            "mount {args:?} (this test needs root): {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    let dir = cache.to_str().unwrap();
    mount(&["-t", "tmpfs", "-o", "size=16m", "tmpfs", dir]);
    // The cache's folders exist; then the filesystem turns read-only.
    let vars = [("RELORA_CACHE", dir)];
    env.ok_with(&["plan", "tiny.yaml"], &vars);
    mount(&["-o", "remount,ro", dir]);
    let o = env.run_with(&["run", "tiny.yaml"], &vars);
    let _ = Command::new("umount").arg(dir).status();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains(&format!("the cache folder {dir} cannot be written"))
            && err.contains("--cache-dir or RELORA_CACHE"),
        "{err}"
    );
    assert!(!err.contains("running"), "a stage started: {err}");
}

/// A checkpointed-activations stage (ReLoRA with dropout and merges) killed mid-run
/// resumes to every output file of an uninterrupted run.
#[test]
fn a_killed_checkpointed_activations_stage_resumes_bit_identically() {
    let stage = r#"  relora-ckpt:
    kind: train
    inputs: {data: tokens, init: warm}
    params:
      method: relora
      steps: 30
      lr: 1.0e-2
      checkpoint_activations: true
      lora: {rank: 4, alpha: 8, dropout: 0.1}
      relora: {merge_every: 10, restart_warmup: 3, reset: {mode: magnitude, fraction: 0.9}}
"#;
    let yaml = format!("{TINY_ML}{stage}");
    let (_env, _dir, m) = killed_mid_run_resumes_bit_identically(&yaml, "relora-ckpt", &[]);
    assert_eq!(m.len(), 30);
}
