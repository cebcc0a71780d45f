//! Every bad setting is an error before anything runs: a table of bad pipelines, each
//! rejected at its exact file:line:col and key path with its message, and a fuzz test over
//! mutations of the bundled pipelines (no panic, and every error placed in a file).

use relora_exec::Dag;
use relora_spec::SpecError;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Load and check a pipeline file as `plan` does; the errors, or none.
fn check_file(path: &Path) -> Vec<SpecError> {
    let registry = crate::registry();
    match relora_spec::load(path, &[]) {
        Err(e) => e.0,
        Ok(p) => match Dag::build(p, &registry) {
            Ok(_) => Vec::new(),
            Err(e) => e.0,
        },
    }
}

const HEADER: &str = "pipeline: t
defaults:
  train:
    seq_len: 16
    micro_batch: 4
    model: {hidden: 32, intermediate: 64, heads: 2, layers: 2}
stages:
  tokens:
    kind: tokenize
    params:
      train_files: DATA
      limit_docs: 50
      valid_docs: 10
      tokenizer: {type: bpe, vocab_size: 300}
  warm:
    kind: train
    inputs: {data: tokens}
    params: {method: full, steps: 10, lr: 1.0e-2}
";

/// One bad pipeline: the stage (or other text) appended to HEADER, with `#<` ending the
/// line the error must point at; the column is that of `at` on the line (its first
/// occurrence), the key path and a part of the message.
struct Case {
    text: &'static str,
    at: &'static str,
    key_path: &'static str,
    message: &'static str,
}

const fn case(
    text: &'static str,
    at: &'static str,
    key_path: &'static str,
    message: &'static str,
) -> Case {
    Case {
        text,
        at,
        key_path,
        message,
    }
}

/// A train stage `s` over `tokens` with the given extra parameter lines.
macro_rules! train {
    ($method:literal $(, $line:literal)*) => {
        concat!(
            "  s:\n    kind: train\n    inputs: {data: tokens}\n    params:\n      method: ",
            $method, "\n      steps: 20\n      lr: 1.0e-2\n",
            $("      ", $line, "\n",)*
        )
    };
}

/// A relora stage `s` on the warm start with the given `relora:` lines.
macro_rules! relora {
    ($($line:literal),*) => {
        concat!(
            "  s:\n    kind: train\n    inputs: {data: tokens, init: warm}\n    params:\n",
            "      method: relora\n      steps: 40\n      lr: 1.0e-2\n      relora:\n",
            $("        ", $line, "\n",)*
        )
    };
}

const CASES: &[Case] = &[
    case(train!("full", "micro_batch: 0 #<"), "micro_batch", "stages.s.params.micro_batch", "micro_batch must be at least 1"),
    case(train!("full", "seq_len: 0 #<"), "seq_len", "stages.s.params.seq_len", "seq_len must be at least 2"),
    case(train!("full", "seq_len: 1 #<"), "seq_len", "stages.s.params.seq_len", "n - 1 predictions"),
    case(train!("full", "batch_tokens: 100 #<"), "batch_tokens", "stages.s.params.batch_tokens", "positive multiple of micro_batch × seq_len (64)"),
    case(train!("full", "batch_tokens: 192", "parallel: {ranks: 2} #<"), "ranks", "stages.s.params.parallel.ranks", "must be at least 1 and divide the micro-batches of a step (3 = "),
    case(train!("full", "batch_tokens: 256", "parallel: {ranks: 2}", "device: \"cuda:1\" #<"), "device", "stages.s.params.device", "device `cuda:N` names one GPU, but parallel.ranks (2)"),
    case("  s:\n    kind: train\n    inputs: {data: tokens}\n    params:\n      method: full\n      steps: 20\n      lr: .nan #<\n", "lr", "stages.s.params.lr", "lr must be a finite number, not NaN"),
    case("  s:\n    kind: train\n    inputs: {data: tokens}\n    params:\n      method: full\n      steps: 20\n      lr: .inf #<\n", "lr", "stages.s.params.lr", "not infinite"),
    case("  s:\n    kind: train\n    inputs: {data: tokens}\n    params:\n      method: full\n      steps: 20\n      lr: -0.5 #<\n", "lr", "stages.s.params.lr", "lr must be in (0, ∞); got -0.5"),
    case(train!("full", "min_lr_ratio: 1.5 #<"), "min_lr_ratio", "stages.s.params.min_lr_ratio", "must be in [0, 1]; got 1.5"),
    case(train!("full", "warmup: 20 #<"), "warmup", "stages.s.params.warmup", "warmup (20) must be shorter than the schedule (20 steps)"),
    case(train!("full", "total_steps: 5 #<"), "total_steps", "stages.s.params.total_steps", "cannot be less than this stage's steps (20)"),
    case(train!("full", "clip_grad: 0.0 #<"), "clip_grad", "stages.s.params.clip_grad", "clip_grad must be in (0, ∞)"),
    case(train!("full", "weight_decay: -0.1 #<"), "weight_decay", "stages.s.params.weight_decay", "weight_decay must be in [0, ∞)"),
    case(train!("full", "beta1: 1.0 #<"), "beta1", "stages.s.params.beta1", "beta1 must be in [0, 1); got 1"),
    case(train!("full", "beta2: 1.5 #<"), "beta2", "stages.s.params.beta2", "beta2 must be in [0, 1)"),
    case(train!("full", "eps: 0 #<"), "eps", "stages.s.params.eps", "eps must be in (0, ∞)"),
    case(train!("full", "eval_sequences: 0 #<"), "eval_sequences", "stages.s.params.eval_sequences", "eval_sequences must be at least 1"),
    case(train!("full", "device: gpu #<"), "device", "stages.s.params.device", "unknown device `gpu`: use cpu, cuda, cuda:N"),
    case(train!("full", "device: \"cuda:x\" #<"), "device", "stages.s.params.device", "unknown device `cuda:x`"),
    case(train!("full", "dtype: bf17 #<"), "dtype", "stages.s.params.dtype", "unknown variant `bf17`"),
    case(train!("full", "schedule: linear #<"), "schedule", "stages.s.params.schedule", "unknown variant `linear`"),
    case(train!("full", "packing: squash #<"), "packing", "stages.s.params.packing", "unknown variant `squash`"),
    case(train!("full", "stepz: 3 #<"), "stepz", "stages.s.params.stepz", "unknown field `stepz`"),
    case(train!("full", "model: {hidden: 32, intermediate: 64, heads: 2, layers: 2, dropout: 0.1} #<"), "dropout", "stages.s.params.model.dropout", "unknown field `dropout`"),
    case(train!("full", "model: {hidden: 30, intermediate: 64, heads: 4, layers: 2} #<"), "model", "stages.s.params.model", "must split into 4 heads of even size"),
    case(train!("full", "model: {hidden: 32, intermediate: 0, heads: 2, layers: 2} #<"), "intermediate", "stages.s.params.model.intermediate", "intermediate must be at least 1"),
    case(train!("full", "model: {hidden: 32, intermediate: 64, heads: 2, layers: 0} #<"), "model", "stages.s.params.model", "model dimensions must be positive"),
    case(train!("full", "model: llama_7b #<"), "model", "stages.s.params.model", "unknown model `llama_7b`"),
    case(train!("full", "init_mode: continue #<"), "init_mode", "stages.s.params.init_mode", "init_mode continue needs an `init` input"),
    case(train!("full", "lora: {rank: 8} #<"), "lora", "stages.s.params.lora", "`lora:` is not used by method full; remove it, or pick a method that reads it (relora, lora, control)"),
    case(train!("control", "lora: {rank: 0} #<"), "rank", "stages.s.params.lora.rank", "lora.rank must be at least 1"),
    case(train!("sgd #<"), "method", "stages.s.params.method", "unknown training method `sgd`; known: full, relora, lora, control, galore"),
    case(train!("lora", "lora: {rank: 0} #<"), "rank", "stages.s.params.lora.rank", "lora.rank must be at least 1"),
    case(train!("lora", "lora: {rank: 4, dropout: 1.0} #<"), "dropout", "stages.s.params.lora.dropout", "lora.dropout must be in [0, 1); got 1"),
    case(train!("lora", "lora: {rank: 4, alpha: 0} #<"), "alpha", "stages.s.params.lora.alpha", "lora.alpha must be in (0, ∞)"),
    case(train!("lora", "lora: {rnk: 4} #<"), "rnk", "stages.s.params.lora.rnk", "unknown field `rnk`"),
    case(train!("lora", "lora: {rank: 4, init: xavier} #<"), "init", "stages.s.params.lora.init", "unknown variant `xavier`"),
    case(train!("galore", "model: {hidden: 32, intermediate: 64, heads: 2, layers: 2}", "galore: {rank: 33} #<"), "rank", "stages.s.params.galore.rank", "galore.rank (33) cannot exceed the smaller side of every projection (min(hidden, intermediate) = 32)"),
    case(train!("galore", "galore: {rank: 0} #<"), "rank", "stages.s.params.galore.rank", "galore.rank must be at least 1"),
    case(train!("galore", "galore: {rank: 8, update_proj_gap: 0} #<"), "update_proj_gap", "stages.s.params.galore.update_proj_gap", "galore.update_proj_gap must be at least 1"),
    case(train!("galore", "galore: {rank: 8, scale: 0} #<"), "scale", "stages.s.params.galore.scale", "galore.scale must be in (0, ∞); got 0"),
    case(train!("galore", "galore: {rank: 8, proj_type: diagonal} #<"), "proj_type", "stages.s.params.galore.proj_type", "unknown variant `diagonal`"),
    case(train!("full", "galore: {rank: 8} #<"), "galore", "stages.s.params.galore", "`galore:` is not used by method full; remove it, or pick a method that reads it (galore)"),
    case(train!("lora", "lora: {rank: 4, frozen: nf4, block: 0} #<"), "block", "stages.s.params.lora.block", "lora.block must be at least 1 (weights per NF4 scale)"),
    case(train!("lora", "lora: {rank: 4, base: none, frozen: int8} #<"), "frozen", "stages.s.params.lora.frozen", "lora.frozen: int8 stores the frozen W, and `base: none` has none"),
    case(train!("control", "lora: {rank: 4, frozen: int8} #<"), "frozen", "stages.s.params.lora.frozen", "Control trains a full-rank model with no frozen W"),
    case(train!("lora", "lora: {rank: 4, frozen: int4} #<"), "frozen", "stages.s.params.lora.frozen", "unknown variant `int4`"),
    case(train!("relora #<"), "method", "stages.s.params.method", "method `relora` needs a `relora:` section"),
    case(train!("full", "relora: {merge_every: 5} #<"), "relora", "stages.s.params.relora", "`relora:` is not used by method full; remove it, or pick a method that reads it (relora)"),
    case(relora!("merge_every: 0 #<"), "merge_every", "stages.s.params.relora.merge_every", "relora.merge_every must be at least 1"),
    case(relora!("merge_every: 10", "reset_every: 0 #<"), "reset_every", "stages.s.params.relora.reset_every", "relora.reset_every must be at least 1"),
    case(relora!("merge_every: 10", "reset: {mode: magnitude, fraction: 1.5} #<"), "fraction", "stages.s.params.relora.reset.fraction", "relora.reset.fraction must be in [0, 1]; got 1.5"),
    case(relora!("merge_every: 10", "reset: {mode: random, fraction: -0.1} #<"), "fraction", "stages.s.params.relora.reset.fraction", "got -0.1"),
    case(relora!("merge_every: 10", "reset: {mode: prune} #<"), "mode", "stages.s.params.relora.reset.mode", "unknown variant `prune`"),
    case(relora!("merge_every: 10", "restart_warmup: 0 #<"), "restart_warmup", "stages.s.params.relora.restart_warmup", "restart_warmup 0 turns the jagged schedule into a plain cosine"),
    case(relora!("merge_every: 10", "restart_warmup: 10 #<"), "restart_warmup", "stages.s.params.relora.restart_warmup", "restart_warmup (10) must be shorter than merge_every (10)"),
    case(relora!("merge_every: 10", "jagged: maybe #<"), "jagged", "stages.s.params.relora.jagged", "invalid type"),
    case("  s:\n    kind: train\n    inputs: {data: tokens, init: warm}\n    params:\n      method: relora\n      steps: 40\n      lr: 1.0e-2\n      lora: {rank: 4, base: none} #<\n      relora: {merge_every: 10}\n", "base", "stages.s.params.lora.base", "only for method lora"),
    case("  s:\n    kind: train\n    inputs: {data: tokens, init: warm} #<\n    params: {method: control, steps: 5, lr: 1.0e-2}\n", "init", "stages.s.inputs.init", "it takes no init"),
    case("  s:\n    kind: eval\n    inputs: {model: warm, data: tokens}\n    params:\n      micro_batch: 0 #<\n", "micro_batch", "stages.s.params.micro_batch", "micro_batch must be at least 1"),
    case("  s:\n    kind: eval\n    inputs: {model: warm, data: tokens}\n    params:\n      seq_len: 1 #<\n", "seq_len", "stages.s.params.seq_len", "seq_len must be at least 2"),
    case("  s:\n    kind: eval\n    inputs: {model: warm, data: tokens}\n    params:\n      tokens: 0 #<\n", "tokens", "stages.s.params.tokens", "tokens must be at least 1"),
    case("  s:\n    kind: eval\n    inputs: {model: warm, data: tokens}\n    params:\n      device: \"cuda:\" #<\n", "device", "stages.s.params.device", "unknown device `cuda:`"),
    case("  s:\n    kind: svd\n    inputs: {final: warm}\n    params:\n      bins: 0 #<\n", "bins", "stages.s.params.bins", "bins must be at least 1"),
    case("  s:\n    kind: svd\n    inputs: {final: warm}\n    params:\n      threshold: -1 #<\n", "threshold", "stages.s.params.threshold", "threshold must be in (0, ∞)"),
    case("  s:\n    kind: svd\n    inputs: {final: warm}\n    params:\n      range: [2, 0] #<\n", "range", "stages.s.params.range", "finite lo < hi"),
    case("  s:\n    kind: tokenize\n    params:\n      train_files: DATA\n      valid_docs: 0 #<\n      tokenizer: {type: bpe, vocab_size: 300}\n", "valid_docs", "stages.s.params.valid_docs", "valid_docs must be at least 1"),
    case("  s:\n    kind: tokenize\n    params:\n      train_files: DATA\n      shard_tokens: 0 #<\n      tokenizer: {type: bpe, vocab_size: 300}\n", "shard_tokens", "stages.s.params.shard_tokens", "shard_tokens must be at least 1"),
    case("  s:\n    kind: tokenize\n    params:\n      train_files: DATA\n      limit_docs: 100 #<\n      tokenizer: {type: bpe, vocab_size: 300}\n", "limit_docs", "stages.s.params.limit_docs", "limit_docs (100) leaves no training documents"),
    case("  s:\n    kind: tokenize\n    params:\n      train_files: DATA\n      tokenizer: {type: bpe, vocab_size: 100} #<\n", "vocab_size", "stages.s.params.tokenizer.vocab_size", "vocab_size must be at least 259"),
    case("  s:\n    kind: tokenize\n    params:\n      train_files: DATA\n      tokenizer: {type: wordpiece, vocab_size: 300} #<\n", "type", "stages.s.params.tokenizer.type", "unknown variant `wordpiece`"),
    case("  s:\n    kind: tokenize\n    inputs: {tokenizer: tokens}\n    params:\n      train_files: DATA\n      tokenizer: {type: bpe, vocab_size: 300} #<\n", "tokenizer", "stages.s.params.tokenizer", "the tokenizer comes from the `tokenizer` input"),
    case("  s:\n    kind: tokenize\n    params: #<\n      train_files: DATA\n", "params", "stages.s.params", "say where the tokenizer comes from"),
    case("  s:\n    kind: tokenize\n    params:\n      train_files: DATA\n      tokenizer: {type: unigram, vocab_size: 300, sample_docs: 0} #<\n", "sample_docs", "stages.s.params.tokenizer.sample_docs", "sample_docs must be at least 1"),
    case(train!("full", "shuffle_window: 0 #<"), "shuffle_window", "stages.s.params.shuffle_window", "shuffle_window must be at least 1"),
    case(train!("full", "loader_threads: 0 #<"), "loader_threads", "stages.s.params.loader_threads", "loader_threads must be at least 1"),
    case("  s:\n    kind: trainn #<\n    inputs: {data: tokens}\n", "kind", "stages.s.kind", "unknown stage kind `trainn`; did you mean `train`?"),
    case("  s:\n    kind: eval\n    inputs: {model: wram, data: tokens} #<\n", "model", "stages.s.inputs.model", "did you mean `warm`?"),
    case("  s:\n    kind: train\n    inputs: {data: tokens}\n    params: {method: full, steps: 20, lr: 1.0e-2, micro_batch: 0} #<\n", "micro_batch", "stages.s.params.micro_batch", "micro_batch must be at least 1"),
];

/// The cases whose bad value sits outside a stage (defaults, nesting) replace the header.
const HEADER_CASES: &[(&str, &str, &str, &str, &str)] = &[
    (
        "  train:\n",
        "  trian: {seq_len: 8} #<\n  train:\n",
        "trian",
        "defaults.trian",
        "`defaults` names kind `trian`, which does not exist; did you mean `train`?",
    ),
    (
        "    micro_batch: 4\n",
        "    micro_batch: 0 #<\n",
        "micro_batch",
        "defaults.train.micro_batch",
        "micro_batch must be at least 1 (sequences per pass); got 0 (for stage `warm`)",
    ),
    (
        "    seq_len: 16\n",
        "    seq_len: 1 #<\n",
        "seq_len",
        "defaults.train.seq_len",
        "seq_len must be at least 2",
    ),
];

fn expected_position(text: &str, at: &str) -> (usize, usize) {
    let (n, line) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.ends_with("#<"))
        .expect("each case marks its line with #<");
    let col = line
        .find(at)
        .unwrap_or_else(|| panic!("`{at}` not on line {line}"))
        + 1;
    (n + 1, col)
}

fn data_glob() -> String {
    repo()
        .join("examples/data/c4-train.00000-of-01024.first1000.json.gz")
        .display()
        .to_string()
}

fn assert_rejected(dir: &Path, name: &str, text: &str, at: &str, key_path: &str, message: &str) {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).unwrap();
    let errors = check_file(&path);
    let (line, col) = expected_position(text, at);
    let found = errors.iter().any(|e| {
        e.file == path
            && (e.pos.line, e.pos.col) == (line, col)
            && e.key_path == key_path
            && e.message.contains(message)
    });
    let shown: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
    assert!(
        found,
        "{name}: expected {}:{line}:{col}: at `{key_path}`: …{message}…\ngot:\n{}\nin:\n{text}",
        path.display(),
        shown.join("\n")
    );
}

#[test]
fn every_bad_setting_is_rejected_at_its_place_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let header = HEADER.replace("DATA", &data_glob());
    // The header alone is a good pipeline.
    let ok = dir.path().join("ok.yaml");
    std::fs::write(&ok, &header).unwrap();
    let errors: Vec<String> = check_file(&ok).iter().map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    for (i, c) in CASES.iter().enumerate() {
        let text = format!("{header}{}", c.text.replace("DATA", &data_glob()));
        assert_rejected(
            dir.path(),
            &format!("case{i}"),
            &text,
            c.at,
            c.key_path,
            c.message,
        );
    }
    for (i, (from, to, at, key_path, message)) in HEADER_CASES.iter().enumerate() {
        let text = header.replacen(from, to, 1);
        assert_rejected(
            dir.path(),
            &format!("header{i}"),
            &text,
            at,
            key_path,
            message,
        );
    }
    assert!(CASES.len() + HEADER_CASES.len() >= 40);
}

#[test]
fn a_deeply_nested_file_is_rejected_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.yaml");
    let depth = 100_000;
    let text = format!(
        "pipeline: x\nstages: {}{}\n",
        "[".repeat(depth),
        "]".repeat(depth)
    );
    std::fs::write(&path, &text).unwrap();
    let started = std::time::Instant::now();
    let errors = check_file(&path);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (errors[0].pos.line, errors[0].pos.col),
        (2, 9 + relora_spec::MAX_NESTING)
    );
    assert!(errors[0].message.contains("nesting deeper than"));
    // Not a timing assertion on the happy path: a regression here took over 20 s.
    assert!(started.elapsed().as_secs() < 10);
}

/// A small deterministic generator for the fuzz test (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const VALUES: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    ".nan",
    ".inf",
    "-.inf",
    "1e308",
    "18446744073709551616",
    "\"\"",
    "[]",
    "{}",
    "null",
    "true",
    "cuda:9",
    "auto",
    "\"${x}\"",
    "${",
    "[1, [2, [3]]]",
    "{a: 1}",
    "0.5",
    "1.5",
    "-0.0",
    "'x'",
    "~",
    "*missing",
    "&a 3",
    "!!binary aGk=",
];

/// One random edit of a pipeline's text.
fn mutate(text: &str, rng: &mut Rng) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.is_empty() {
        return "x".into();
    }
    let i = rng.below(lines.len());
    match rng.below(8) {
        0 => {
            lines.remove(i);
        }
        1 => {
            let l = lines[i].clone();
            lines.insert(rng.below(lines.len()), l);
        }
        2 => {
            let j = rng.below(lines.len());
            lines.swap(i, j);
        }
        3 | 4 => {
            // Replace a value after a `key:` with a hostile one.
            if let Some(k) = lines[i].find(": ") {
                let v = VALUES[rng.below(VALUES.len())];
                lines[i] = format!("{}: {v}", &lines[i][..k]);
            }
        }
        5 => {
            let l = &lines[i];
            let cut = rng.below(l.len() + 1);
            if l.is_char_boundary(cut) {
                lines[i] = l[..cut].to_string();
            }
        }
        6 => {
            let pad = " ".repeat(rng.below(5));
            lines[i] = if rng.below(2) == 0 {
                format!("{pad}{}", lines[i])
            } else {
                lines[i].trim_start().to_string()
            };
        }
        _ => {
            let chars = [
                '{', '}', '[', ']', ':', '-', '"', '\'', '#', '&', '*', '|', '\t', '%',
            ];
            let c = chars[rng.below(chars.len())];
            let at = rng.below(lines[i].len() + 1);
            if lines[i].is_char_boundary(at) {
                lines[i].insert(at, c);
            }
        }
    }
    lines.join("\n")
}

#[test]
fn mutated_bundled_pipelines_never_panic_and_every_error_has_a_place() {
    // The mutants sit where the bundled ones do, so their relative paths and imports resolve.
    let dir = tempfile::tempdir().unwrap();
    let pipelines = dir.path().join("pipelines");
    std::fs::create_dir_all(&pipelines).unwrap();
    std::os::unix::fs::symlink(repo().join("examples"), dir.path().join("examples")).unwrap();
    let sources: Vec<(String, String)> = ["quickstart", "paper-cpu", "paper", "ablation-130m"]
        .iter()
        .map(|n| {
            let text = std::fs::read_to_string(repo().join(format!("pipelines/{n}.yaml"))).unwrap();
            std::fs::write(pipelines.join(format!("{n}.yaml")), &text).unwrap();
            (n.to_string(), text)
        })
        .collect();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let (mut rejected, cases) = (0, 10_000);
    for case in 0..cases {
        let (name, text) = &sources[case % sources.len()];
        let mut t = text.clone();
        for _ in 0..1 + rng.below(3) {
            t = mutate(&t, &mut rng);
        }
        let path = pipelines.join(format!("mutant-{name}.yaml"));
        std::fs::write(&path, &t).unwrap();
        let errors = std::panic::catch_unwind(|| check_file(&path))
            .unwrap_or_else(|_| panic!("case {case} panicked on:\n{t}"));
        rejected += usize::from(!errors.is_empty());
        for e in &errors {
            assert!(
                e.pos.line >= 1 && e.pos.col >= 1 && e.file.starts_with(&pipelines),
                "case {case}: an error without a place: {e}\nin:\n{t}"
            );
            assert!(e.to_string().starts_with(&format!(
                "{}:{}:{}: ",
                e.file.display(),
                e.pos.line,
                e.pos.col
            )));
        }
    }
    // Most mutants are bad; a fuzz run that rejected nothing would test nothing.
    assert!(
        rejected > cases / 4,
        "only {rejected} of {cases} mutants were rejected"
    );
}
