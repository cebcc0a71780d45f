//! Sweeps that choose: a `select` stage picks each group's learning rate on the validation
//! split, the test split scores the winners, and the choice is part of downstream keys.

use super::{ran, repo, Env};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Two depths × two learning rates × two seeds of a tiny model; `select` picks a rate per
/// depth by mean validation perplexity; `eval-test` scores each depth's winner per seed on
/// the held-out test split. `tie` is a sweep over a variable no parameter uses, so its two
/// candidates are one entry: a tie, broken by the declared rule.
const SWEEP: &str = r#"pipeline: sweep
defaults:
  train:
    model: {hidden: 32, intermediate: 64, heads: 2, layers: "${layers}"}
    seq_len: 32
    micro_batch: 4
    warmup: 2
    eval_every: 100
    log_every: 5
stages:
  tokens:
    kind: tokenize
    params:
      train_files: DATA/c4-train.00000-of-01024.first1000.json.gz
      limit_docs: 200
      valid_docs: 20
      test_docs: 20
      shard_tokens: 3000
      tokenizer: {type: bpe, vocab_size: 300}
  train:
    kind: train
    matrix: {layers: [1, 2], lr: [2.0e-4, 1.0e-2], seed: [0, 1]}
    name: "train-${layers}-lr${lr}-seed${seed}"
    inputs: {data: tokens}
    params: {method: full, steps: 12, lr: "${lr}", seed: "${seed}"}
  eval-valid:
    kind: eval
    matrix: {layers: [1, 2], lr: [2.0e-4, 1.0e-2], seed: [0, 1]}
    inputs: {model: "train-${layers}-lr${lr}-seed${seed}", data: tokens}
    params: {tokens: 512}
  choose:
    kind: select
    inputs: {runs: eval-valid}
    params: {by: valid perplexity, group_by: [layers], over: [seed], tie_break: lowest lr}
  eval-test:
    kind: eval
    matrix: {layers: [1, 2], seed: [0, 1]}
    inputs: {model: "train-${layers}-lr${choose.lr}-seed${seed}", data: tokens}
    params: {tokens: 512, split: test}
  tie-eval:
    kind: eval
    matrix: {tag: [a, b]}
    inputs: {model: train-1-lr0.01-seed0, data: tokens}
    params: {tokens: 512}
  tie:
    kind: select
    inputs: {runs: tie-eval}
    params: {by: valid perplexity, tie_break: highest tag}
"#;

fn sweep(env: &Env, text: &str) -> PathBuf {
    let data = repo().join("examples/data");
    env.write("sweep.yaml", &text.replace("DATA", data.to_str().unwrap()))
}

fn show(env: &Env, stage: &str) -> Value {
    serde_json::from_str(&env.ok(&["show", "sweep.yaml", stage, "--json"])).unwrap()
}

fn output(env: &Env, stage: &str, file: &str) -> Value {
    let v = show(env, stage);
    let path = PathBuf::from(v["path"].as_str().unwrap())
        .join("outputs")
        .join(file);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

#[test]
fn select_picks_each_groups_winner_on_valid_and_the_test_split_scores_only_it() {
    let env = Env::new();
    sweep(&env, SWEEP);
    // Before anything ran, the plan says who will choose.
    let plan = env.ok(&["plan", "sweep.yaml"]);
    assert!(
        plan.contains("input `model` is one of 2 stages, chosen by `choose` when it has run"),
        "{plan}"
    );
    assert!(plan.contains("chooses inputs of 4 stage(s)"), "{plan}");
    let out = env.ok(&["run", "sweep.yaml", "--jobs", "2"]);
    // The tie's two candidates are one entry: computed once.
    assert_eq!(
        ran(&out)
            .iter()
            .filter(|s| s.starts_with("tie-eval"))
            .count(),
        1,
        "{out}"
    );

    // 200 documents: 160 train, 20 valid, then 20 test, held out last.
    let data = output(&env, "tokens", "dataset.json");
    let docs = |split: &str| data[split]["documents"].as_u64().unwrap();
    assert_eq!((docs("train"), docs("valid"), docs("test")), (160, 20, 20));

    // The winner is the rate of lowest mean validation perplexity over the seeds, per depth.
    let choice = output(&env, "choose", "choice.json");
    for layers in ["1", "2"] {
        let mean = |lr: &str| {
            ["0", "1"]
                .iter()
                .map(|s| {
                    output(&env, &format!("eval-valid-{layers}-{lr}-{s}"), "eval.json")
                        ["perplexity"]
                        .as_f64()
                        .unwrap()
                })
                .sum::<f64>()
                / 2.0
        };
        let (low, high) = (mean("0.0002"), mean("0.01"));
        assert_ne!(low, high);
        let want = if low < high { "0.0002" } else { "0.01" };
        let group = choice["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["group"]["layers"] == layers)
            .unwrap();
        assert_eq!(group["chosen"]["lr"], want, "{choice}");

        // Each test eval read the winner of its own depth and seed, on the test split.
        for seed in ["0", "1"] {
            let test = show(&env, &format!("eval-test-{layers}-{seed}"));
            let comps = &test["manifest"]["components"];
            let winner = show(&env, &format!("train-{layers}-lr{want}-seed{seed}"));
            assert_eq!(comps["input.model"], winner["manifest"]["output_hash"]);
            assert_eq!(comps["choice.model"], format!("lr={want}"));
            let ev = output(&env, &format!("eval-test-{layers}-{seed}"), "eval.json");
            assert_eq!(ev["split"], "test");
            let valid = output(
                &env,
                &format!("eval-valid-{layers}-{want}-{seed}"),
                "eval.json",
            );
            assert_ne!(ev["perplexity"], valid["perplexity"]);
        }
    }
    let plan = env.ok(&["plan", "sweep.yaml"]);
    assert!(plan.contains("`choose` chose lr="), "{plan}");

    // A tie goes by the declared rule, and says so.
    let tie = output(&env, "tie", "selection.json");
    assert_eq!(tie["groups"][0]["tied"], 2, "{tie}");
    assert_eq!(tie["groups"][0]["chosen"]["tag"], "b", "{tie}");

    // Run again: nothing runs.
    let again = env.ok(&["run", "sweep.yaml"]);
    assert!(ran(&again).is_empty(), "{again}");

    // A losing candidate changes: it, its eval and the select run again; the winner is the
    // same, so every test eval stays cached.
    let losers: BTreeMap<&str, &str> = choice["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let l = g["group"]["layers"].as_str().unwrap();
            let lr = g["chosen"]["lr"].as_str().unwrap();
            (
                if l == "1" { "1" } else { "2" },
                if lr == "0.01" { "0.0002" } else { "0.01" },
            )
        })
        .collect();
    let loser = format!("train-1-lr{}-seed1", losers["1"]);
    let set = format!("{loser}.clip_grad=0.5");
    let out = env.ok(&["run", "sweep.yaml", "--set", &set]);
    let ran = ran(&out);
    assert!(ran.contains(&loser), "{out}");
    assert!(ran.contains(&"choose".to_string()), "{out}");
    let now = output(&env, "choose", "choice.json");
    let tests_ran = ran.iter().any(|s| s.starts_with("eval-test-1-"));
    assert_eq!(tests_ran, now != choice, "{out}");
    assert!(!ran.iter().any(|s| s.starts_with("eval-test-2-")), "{out}");
}

#[test]
fn bad_selections_are_plan_time_errors_at_their_line() {
    let env = Env::new();
    let cases = [
        (
            "group_by: [layers]",
            "group_by: [depth]",
            ":34:",
            "group_by names `depth`, which is not a matrix variable of the inputs (they sweep layers, lr, seed)",
        ),
        (
            "by: valid perplexity, group_by",
            "by: test perplexity, group_by",
            ":34:",
            "scores the valid split, so the inputs do not report it",
        ),
        (
            "matrix: {layers: [1, 2], seed: [0, 1]}",
            "matrix: {layers: [1, 2, 3], seed: [0, 1]}",
            ":38:",
            "no stage's name fits it",
        ),
        (
            "      test_docs: 20\n",
            "      test_files: DATA/c4-train.00000-of-01024.first1000.json.gz\n",
            ":17:",
            "is in both the train and the test split",
        ),
    ];
    for (from, to, at, message) in cases {
        assert!(SWEEP.contains(from), "{from}");
        sweep(&env, &SWEEP.replacen(from, to, 1));
        let o = env.run(&["plan", "sweep.yaml"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{to}: {err}");
        assert!(
            err.contains(&format!("sweep.yaml{at}")) && err.contains(message),
            "{to}: {err}"
        );
    }
}
