//! The `relora-pipe` command line: a thin shell over relora-exec and relora-stages.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use relora_exec::{estimates, plan, Dag, Outcome, Registry, RunOptions, State};
use relora_spec::{ExecutorSpec, ExecutorType};
use relora_stages::registry;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "relora-pipe",
    version,
    about = "Declarative, cached pipelines for ReLoRA pre-training",
    after_help = "Example:\n  relora-pipe run pipelines/quickstart.yaml\n  relora-pipe plan pipelines/quickstart.yaml --set warm.lr=3e-3"
)]
struct Cli {
    /// Cache folder (default: $RELORA_CACHE, else ./cache).
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct PipelineArgs {
    /// The pipeline YAML file.
    file: PathBuf,
    /// Override a parameter: STAGE.PARAM=VALUE (VALUE is read as YAML); repeatable.
    #[arg(long = "set", value_name = "STAGE.PARAM=VALUE")]
    set: Vec<String>,
}

#[derive(clap::Args, Clone)]
struct ExecutorArgs {
    /// Where stages run: `local` child processes, or one `slurm` batch job each. Overrides
    /// the `executor:` block of the pipeline file and of the config file
    /// ($RELORA_CONFIG, else ~/.config/relora-pipe/config.yaml).
    #[arg(long, value_name = "local|slurm")]
    executor: Option<ExecutorType>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every stage that is not cached.
    #[command(
        after_help = "Example:\n  relora-pipe run pipelines/quickstart.yaml --jobs 2\n  relora-pipe run pipelines/quickstart.yaml --until warm --set warm.steps=50"
    )]
    Run {
        #[command(flatten)]
        p: PipelineArgs,
        #[command(flatten)]
        e: ExecutorArgs,
        /// Stages to run at once (batch jobs in flight, under Slurm).
        #[arg(long, short, default_value_t = 1)]
        jobs: usize,
        /// Recompute this stage even if cached; repeatable.
        #[arg(long)]
        force: Vec<String>,
        /// Run only this stage and what it depends on.
        #[arg(long)]
        until: Option<String>,
        /// After a failure, let independent stages finish.
        #[arg(long)]
        keep_going: bool,
        /// Reuse, for stages of this kind, the entries made by the previous code when only
        /// the code changed (an edit you know cannot change their outputs); recorded in each
        /// new entry's manifest. Repeatable.
        #[arg(long, value_name = "KIND")]
        accept_code_change: Vec<String>,
        /// Run even a stage that `plan --estimate` predicts will need more memory than this
        /// machine has (checked for stages that run here, on the CPU).
        #[arg(long)]
        force_memory: bool,
    },
    /// Say, for each stage, whether it is cached or will run, and why.
    #[command(
        after_help = "Example:\n  relora-pipe plan pipelines/quickstart.yaml --set warm.lr=1e-3\n  relora-pipe plan pipelines/paper.yaml --estimate\n  relora-pipe plan pipelines/quickstart.yaml --json"
    )]
    Plan {
        #[command(flatten)]
        p: PipelineArgs,
        #[command(flatten)]
        e: ExecutorArgs,
        #[arg(long)]
        json: bool,
        /// Also show what each stage will read and compute: tokens, FLOPs, data.
        #[arg(long)]
        estimate: bool,
    },
    /// Print the stage graph as a text tree, or as Graphviz DOT.
    #[command(
        after_help = "Example:\n  relora-pipe dag pipelines/quickstart.yaml --dot | dot -Tpng > dag.png"
    )]
    Dag {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(long)]
        dot: bool,
    },
    /// One line per stage: cached, stale or not run, with its key.
    #[command(after_help = "Example:\n  relora-pipe status pipelines/quickstart.yaml --json")]
    Status {
        #[command(flatten)]
        p: PipelineArgs,
        #[command(flatten)]
        e: ExecutorArgs,
        #[arg(long)]
        json: bool,
    },
    /// Stages side by side: the parameters (and inputs) that differ, and each one's final
    /// metrics (a stage name, or a matrix template for all its expansions).
    #[command(
        after_help = "Example:\n  relora-pipe compare pipelines/quickstart.yaml train-full train-control train-lora train-relora\n  relora-pipe compare pipelines/quickstart.yaml eval --json"
    )]
    Compare {
        #[command(flatten)]
        p: PipelineArgs,
        #[arg(required = true)]
        stages: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// A stage's entry: paths, metrics and manifest, and any table it produced.
    #[command(after_help = "Example:\n  relora-pipe show pipelines/quickstart.yaml report")]
    Show {
        #[command(flatten)]
        p: PipelineArgs,
        stage: String,
        #[arg(long)]
        json: bool,
    },
    /// Write a trained model as a Hugging Face transformers checkpoint directory.
    #[command(
        after_help = "Example:\n  relora-pipe export pipelines/quickstart.yaml train-relora --to hf/relora\n\nThe stage must be a cached train stage (the tokenizer is its `data` input's) or import stage; the\ndirectory loads with LlamaForCausalLM.from_pretrained and AutoTokenizer.from_pretrained."
    )]
    Export {
        #[command(flatten)]
        p: PipelineArgs,
        stage: String,
        /// The directory to write (replaced if it exists).
        #[arg(long)]
        to: PathBuf,
    },
    /// A folder for `tensorboard --logdir`: one run per stage that writes TensorBoard events
    /// (train stages), named after the stage, linking to its cached entry or its running
    /// attempt. Prints the folder.
    #[command(
        after_help = "Example:\n  tensorboard --logdir \"$(relora-pipe tensorboard pipelines/quickstart.yaml)\""
    )]
    Tensorboard {
        #[command(flatten)]
        p: PipelineArgs,
    },
    /// A local, read-only web dashboard: the DAG coloured by state (live while a `run`
    /// elsewhere makes progress), a page per stage, runs compared side by side.
    #[command(
        after_help = "Examples:\n  relora-pipe ui pipelines/paper-cpu.yaml            # http://127.0.0.1:8787/\n  relora-pipe ui pipelines/*.yaml --host 0.0.0.0    # prints a URL with a token"
    )]
    Ui {
        /// Pipeline files to show (one at a time, chosen in the page).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long, default_value_t = 8787)]
        port: u16,
        /// Bind address; any other than a loopback one requires the printed token.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
    },
    /// Remove cache entries that none of the given pipelines reference.
    #[command(
        after_help = "Examples:\n  relora-pipe gc --keep pipelines/paper.yaml --keep pipelines/ablation-130m.yaml\n  relora-pipe gc --quarantine"
    )]
    Gc {
        /// Pipelines whose entries to keep; repeatable.
        #[arg(long)]
        keep: Vec<PathBuf>,
        /// With no --keep: empty the cache.
        #[arg(long)]
        all: bool,
        /// Delete the entries `verify --repair` moved into the quarantine (alone, or with
        /// --keep or --all).
        #[arg(long)]
        quarantine: bool,
    },
    /// Re-hash every cache entry and report any whose files changed.
    #[command(after_help = "Examples:\n  relora-pipe verify\n  relora-pipe verify --repair")]
    Verify {
        /// Move each corrupt entry into the cache's `quarantine/` folder (nothing is
        /// deleted; `gc --quarantine` does that), so that the next `run` computes it again.
        #[arg(long)]
        repair: bool,
    },
    /// Internal: run one stage in this process (the executor's child).
    #[command(name = "__stage", hide = true)]
    Stage { job: PathBuf },
}

fn cache_dir(cli: &Option<PathBuf>) -> PathBuf {
    cli.clone()
        .or_else(|| std::env::var_os("RELORA_CACHE").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("cache"))
}

fn load(p: &PipelineArgs, reg: &Registry) -> Result<Dag> {
    let overrides = p
        .set
        .iter()
        .map(|s| relora_spec::Override::parse(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let pipeline = relora_spec::load(&p.file, &overrides)?;
    Ok(Dag::build(pipeline, reg)?)
}

/// The executor settings: the config file's `executor:` block, refined by the pipeline
/// file's, with `--executor` choosing the type last.
fn executor(dag: &Dag, reg: &Registry, args: &ExecutorArgs) -> Result<ExecutorSpec> {
    let mut spec = ExecutorSpec::default();
    if let Some(path) = relora_spec::config_path() {
        if let Some(block) = relora_spec::load_config(&path)? {
            relora_exec::check_executor_block(&block, reg)?;
            spec = block.spec.over(&spec);
        }
    }
    if let Some(block) = &dag.pipeline.executor {
        relora_exec::check_executor_block(block, reg)?;
        spec = block.spec.over(&spec);
    }
    if let Some(t) = args.executor {
        spec.kind = Some(t);
    }
    Ok(spec)
}

fn state_word(s: State) -> &'static str {
    match s {
        State::Cached => "cached",
        State::Stale => "stale",
        State::Run => "run",
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", causes(&e));
            ExitCode::from(2)
        }
    }
}

/// An error and its causes, joined by ": ", leaving out a cause that its parent's message
/// already quotes (a library's I/O error that prints its source, then the source again).
fn causes(e: &anyhow::Error) -> String {
    let mut out: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.last().is_some_and(|prev| prev.contains(&text)) {
            continue;
        }
        out.push(text);
    }
    out.join(": ")
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    let reg = registry();
    if let Cmd::Stage { job } = &cli.command {
        relora_exec::child_main(&reg, job)?;
        return Ok(ExitCode::SUCCESS);
    }
    let cache = relora_cache::Cache::open(cache_dir(&cli.cache_dir))?;
    if let Some(note) = relora_exec::code_salt_note() {
        eprintln!("{note}");
    }
    match cli.command {
        Cmd::Run {
            p,
            e,
            jobs,
            force,
            until,
            keep_going,
            accept_code_change,
            force_memory,
        } => {
            let dag = load(&p, &reg)?;
            let executor = executor(&dag, &reg, &e)?;
            let opts = RunOptions {
                executor,
                jobs,
                force,
                until,
                keep_going,
                accept_code_change,
                force_memory,
                gpus: relora_exec::visible_gpus(),
                exe: std::env::current_exe().context("locating this binary")?,
            };
            let report = relora_exec::run(&dag, &reg, &cache, &opts)?;
            let (mut ran, mut cached) = (0, 0);
            for (name, o) in &report.outcomes {
                match o {
                    Outcome::Computed { .. } => ran += 1,
                    Outcome::Cached => cached += 1,
                    Outcome::Adopted { from } => {
                        cached += 1;
                        eprintln!("adopted: {name} (outputs of entry {from}, made by other code)")
                    }
                    Outcome::Failed { .. } => eprintln!("failed: {name}"),
                    Outcome::Skipped { because } => {
                        eprintln!("skipped: {name} (because `{because}` did not finish)")
                    }
                    Outcome::NotSelected => {}
                }
            }
            eprintln!("{ran} stage(s) ran, {cached} cached");
            Ok(if report.interrupted {
                ExitCode::from(130)
            } else if report.failed() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Plan {
            p,
            e,
            json,
            estimate,
        } => {
            let dag = load(&p, &reg)?;
            let executor = executor(&dag, &reg, &e)?;
            print_plan(&dag, &reg, &cache, &executor, json, estimate)
        }
        Cmd::Status { p, e, json } => {
            let dag = load(&p, &reg)?;
            let executor = executor(&dag, &reg, &e)?;
            print_plan(&dag, &reg, &cache, &executor, json, false)
        }
        Cmd::Dag { p, dot } => {
            let dag = load(&p, &reg)?;
            print!("{}", if dot { dag.dot() } else { dag.text() });
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Show { p, stage, json } => show(&load(&p, &reg)?, &reg, &cache, &stage, json),
        Cmd::Compare { p, stages, json } => compare(&load(&p, &reg)?, &reg, &cache, &stages, json),
        Cmd::Export { p, stage, to } => export(&p, &load(&p, &reg)?, &reg, &cache, &stage, &to),
        Cmd::Tensorboard { p } => tensorboard(&load(&p, &reg)?, &reg, &cache),
        Cmd::Ui { files, port, host } => {
            for f in &files {
                // Refuse a file that does not load now; later edits show in the page.
                relora_spec::load(f, &[])?;
            }
            let token = if relora_ui::is_loopback(&host) {
                None
            } else {
                Some(relora_ui::random_token()?)
            };
            let board = relora_ui::Board {
                files,
                registry: relora_stages::registry(),
                cache,
                token,
                rates: Default::default(),
            };
            relora_ui::serve(board, &host, port, |url| {
                println!("relora-pipe ui: {url}");
                use std::io::Write;
                let _ = std::io::stdout().flush();
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Gc {
            keep,
            all,
            quarantine,
        } => {
            if quarantine {
                let (n, bytes) = cache.empty_quarantine()?;
                println!(
                    "emptied the quarantine: {n} entries, {bytes} bytes ({:.1} MiB)",
                    bytes as f64 / 1048576.0
                );
                if keep.is_empty() && !all {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            if keep.is_empty() && !all {
                bail!("name the pipelines whose entries to keep with --keep FILE, pass --all to empty the cache, or --quarantine to empty the quarantine");
            }
            let dags = keep
                .iter()
                .map(|f| {
                    load(
                        &PipelineArgs {
                            file: f.clone(),
                            set: vec![],
                        },
                        &reg,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let live = relora_exec::live_keys(&dags, &reg, &cache)?;
            let r = cache.gc(&live)?;
            for key in &r.busy {
                println!("kept {key}: a running stage holds its lock");
            }
            println!(
                "removed {} entries and {} lock files, freed {} bytes ({:.1} MiB)",
                r.entries,
                r.locks,
                r.bytes,
                r.bytes as f64 / 1048576.0
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify { repair } => {
            let n = cache.keys()?.len();
            let problems = cache.verify()?;
            for (key, why) in &problems {
                println!("CORRUPT {key}: {why}");
                if repair {
                    let to = cache.quarantine(key)?;
                    println!(
                        "  moved to {}; the next run computes it again",
                        to.display()
                    );
                }
            }
            println!("{n} entries checked, {} corrupt", problems.len());
            // Repaired, the cache is consistent again: nothing left to fail on.
            Ok(if problems.is_empty() || repair {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Cmd::Stage { .. } => unreachable!("handled above"),
    }
}

/// `compare`: the named stages (a template name stands for its expansions), side by side.
fn compare(
    dag: &Dag,
    reg: &Registry,
    cache: &relora_cache::Cache,
    names: &[String],
    json: bool,
) -> Result<ExitCode> {
    let plans = plan(dag, reg, cache)?;
    let mut picked = Vec::new();
    for n in names {
        let found: Vec<usize> = match dag.index_of(n) {
            Some(i) => vec![i],
            None => (0..dag.pipeline.stages.len())
                .filter(|&i| &dag.pipeline.stages[i].template == n)
                .collect(),
        };
        if found.is_empty() {
            bail!(
                "this pipeline has no stage or matrix template `{n}`{}",
                relora_spec::did_you_mean(n, plans.iter().map(|p| p.name.as_str()))
            );
        }
        picked.extend(found);
    }
    let (c, _) = relora_stages::compare::compare_planned(dag, &plans, cache, &picked);
    if json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", c.table());
    }
    Ok(ExitCode::SUCCESS)
}

fn show(
    dag: &Dag,
    reg: &Registry,
    cache: &relora_cache::Cache,
    stage: &str,
    json: bool,
) -> Result<ExitCode> {
    let plans = plan(dag, reg, cache)?;
    let Some(p) = plans.iter().find(|p| p.name == stage) else {
        bail!(
            "this pipeline has no stage `{stage}`{}",
            relora_spec::did_you_mean(stage, plans.iter().map(|p| p.name.as_str()))
        );
    };
    let manifest = match &p.key {
        Some(k) => cache.lookup(k)?,
        None => None,
    };
    let dir = p.key.as_ref().map(|k| cache.entry_dir(k));
    if json {
        let v = serde_json::json!({
            "name": p.name, "kind": p.kind, "key": p.key, "state": p.state,
            "reasons": p.reasons, "choices": p.choices, "path": dir, "manifest": manifest,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("stage:  {} ({})", p.name, p.kind);
    println!("state:  {}", state_word(p.state));
    for r in &p.reasons {
        println!("        - {r}");
    }
    for c in &p.choices {
        println!("        > {c}");
    }
    let Some(m) = manifest else {
        return Ok(ExitCode::SUCCESS);
    };
    let dir = dir.expect("a manifest implies a key");
    println!("key:    {}", m.key);
    println!("path:   {}", dir.display());
    println!("log:    {}", dir.join("log.txt").display());
    println!("ran:    {:.1}s", m.seconds);
    if let Some(a) = &m.adopted_from {
        println!("adopted from {}: {}", a.key, a.reason);
    }
    if !m.environment.is_empty() {
        let env: Vec<String> = m
            .environment
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("on:     {}", env.join(" "));
    }
    println!("outputs ({} bytes):", m.total_bytes());
    for o in &m.outputs {
        println!("  {:<40} {:>12}", o.path, o.size);
    }
    if !m.metrics.is_null() {
        println!("metrics:\n{}", serde_json::to_string_pretty(&m.metrics)?);
    }
    for o in m.outputs.iter().filter(|o| o.path.ends_with(".md")) {
        println!(
            "\n{}:\n{}",
            o.path,
            std::fs::read_to_string(dir.join("outputs").join(&o.path))?
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `plan` and `status`: each stage's state and reasons, where it would run, any batch job
/// now running it, and with `estimate` its size.
fn print_plan(
    dag: &Dag,
    reg: &Registry,
    cache: &relora_cache::Cache,
    executor: &ExecutorSpec,
    json: bool,
    estimate: bool,
) -> Result<ExitCode> {
    let plans = plan(dag, reg, cache)?;
    let placed = relora_exec::placements(dag, reg, executor)?;
    let jobs: Vec<Vec<(String, String)>> = plans
        .iter()
        .map(|p| match (&p.key, p.state) {
            (Some(key), State::Run | State::Stale) => relora_exec::jobs_in(&cache.attempts(key)),
            _ => Vec::new(),
        })
        .collect();
    let sizes = if estimate {
        estimates(dag, reg, cache, &plans)?
    } else {
        Vec::new()
    };
    if json {
        let rows: Vec<serde_json::Value> = plans
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["executor"] = placed[i].clone().into();
                if !jobs[i].is_empty() {
                    v["jobs"] = serde_json::json!(jobs[i]
                        .iter()
                        .map(|(id, state)| serde_json::json!({"id": id, "state": state}))
                        .collect::<Vec<_>>());
                }
                if let Some(e) = sizes.get(i) {
                    v["estimate"] = serde_json::to_value(e).unwrap_or_default();
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (i, s) in plans.iter().enumerate() {
        let key = s.key.as_deref().map(|k| &k[..12]).unwrap_or("?");
        println!(
            "{:<7} {:<32} {:<9} {key}",
            state_word(s.state),
            s.name,
            s.kind
        );
        for r in &s.reasons {
            println!("          - {r}");
        }
        for c in &s.choices {
            println!("          > {c}");
        }
        // Where it runs, when that is not simply a local child process.
        if executor.executor_type() != ExecutorType::Local || placed[i] != "local" {
            println!("          @ {}", placed[i]);
        }
        for (id, state) in &jobs[i] {
            println!("          ~ Slurm job {id}: {state}");
        }
        for line in sizes.get(i).map(|e| e.lines.as_slice()).unwrap_or(&[]) {
            println!("          = {line}");
        }
    }
    if estimate {
        // A stage's estimated compute is its `flops` fact (see StageKind::estimate).
        let flops: f64 = sizes
            .iter()
            .filter_map(|e| e.facts.get("flops").and_then(|f| f.as_f64()))
            .sum();
        let to_run: f64 = sizes
            .iter()
            .zip(&plans)
            .filter(|(_, p)| p.state != State::Cached)
            .filter_map(|(e, _)| e.facts.get("flops").and_then(|f| f.as_f64()))
            .sum();
        println!(
            "total: {flops:.3e} FLOPs, {to_run:.3e} of them in stages that would run \
             (≈ {:.1} H100-hours at 40% of 989 TFLOP/s)",
            to_run / (0.4 * 989e12) / 3600.0
        );
        let all = vec![true; plans.len()];
        let disk = relora_exec::DiskNeed::new(dag, cache, &plans, &sizes, &all);
        println!(
            "disk: the stages that would run write up to {} into the cache; {} free there",
            relora_exec::disk_size(disk.needed),
            disk.free
                .map_or("unknown".into(), |f| relora_exec::disk_size(f as f64))
        );
        if let Some(w) = disk.warning(cache) {
            println!("{w}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tensorboard`: `<cache>/tensorboard/<pipeline>/<stage>` links to each stage's events
/// folder (its entry's, else its newest attempt's while it runs), made afresh each call.
fn tensorboard(dag: &Dag, reg: &Registry, cache: &relora_cache::Cache) -> Result<ExitCode> {
    let plans = plan(dag, reg, cache)?;
    let root = cache.root().join("tensorboard").join(&dag.pipeline.name);
    if root.exists() {
        // Only links live here; removing them leaves what they point to.
        std::fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let mut runs = 0;
    for p in &plans {
        let Some(key) = &p.key else { continue };
        let mut places = vec![cache.entry_dir(key)];
        places.extend(cache.attempts(key).into_iter().rev());
        let Some(events) = places
            .into_iter()
            .map(|d| d.join("tensorboard"))
            .find(|d| d.is_dir())
        else {
            continue;
        };
        let link = root.join(&p.name);
        std::os::unix::fs::symlink(&events, &link)
            .with_context(|| format!("linking {} to {}", link.display(), events.display()))?;
        runs += 1;
    }
    eprintln!(
        "{runs} stage(s) with TensorBoard events; view them with: tensorboard --logdir {}",
        root.display()
    );
    println!("{}", root.display());
    Ok(ExitCode::SUCCESS)
}

/// `export`: the cached entry of a train stage, with its data input's tokenizer, as a
/// transformers directory; written beside `to` and renamed into place.
fn export(
    args: &PipelineArgs,
    dag: &Dag,
    reg: &Registry,
    cache: &relora_cache::Cache,
    stage: &str,
    to: &std::path::Path,
) -> Result<ExitCode> {
    let plans = plan(dag, reg, cache)?;
    let entry = |name: &str| -> Result<(PathBuf, String)> {
        let p = plans.iter().find(|p| p.name == name).with_context(|| {
            format!(
                "this pipeline has no stage `{name}`{}",
                relora_spec::did_you_mean(name, plans.iter().map(|p| p.name.as_str()))
            )
        })?;
        match (&p.state, &p.key) {
            (State::Cached, Some(key)) => Ok((cache.entry_dir(key).join("outputs"), key.clone())),
            _ => bail!(
                "stage `{name}` is not computed yet: run `relora-pipe run {} --until {name}` first",
                args.file.display()
            ),
        }
    };
    let (model_dir, key) = entry(stage)?;
    let spec = dag
        .index_of(stage)
        .map(|i| &dag.pipeline.stages[i])
        .context("the stage exists")?;
    // The tokenizer of the model's data; an import stage carries its own.
    let (data_dir, data) = match spec.inputs.get("data") {
        Some(data) => (entry(data)?.0, data.clone()),
        None if model_dir.join("tokenizer.json").is_file() => (model_dir.clone(), stage.to_string()),
        None => bail!(
            "stage `{stage}` has no `data` input to take the tokenizer from; export a train or import stage"
        ),
    };
    let tmp = to.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let provenance = format!(
        "pipeline `{}` ({}), stage `{stage}`, cache key {key}",
        dag.pipeline.name,
        args.file.display()
    );
    relora_stages::export::export_entry(
        &model_dir,
        &data_dir,
        (&format!("stage `{stage}`"), &format!("stage `{data}`")),
        None,
        Some(&provenance),
        &tmp,
    )?;
    if to.exists() {
        std::fs::remove_dir_all(to).with_context(|| format!("replacing {}", to.display()))?;
    }
    std::fs::rename(&tmp, to).with_context(|| format!("moving the export to {}", to.display()))?;
    println!("exported stage `{stage}` to {}", to.display());
    Ok(ExitCode::SUCCESS)
}
