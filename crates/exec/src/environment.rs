//! What a run records about the machine it ran on (the manifest's `environment`: results
//! of floating-point code can depend on it), and the threads each stage computes with.

use std::collections::BTreeMap;

/// What a run ran on, for the manifest: results of floating-point code can depend on these
/// (see the README's cache section), so two entries can be compared by them.
pub fn environment(jobs: usize) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert("threads".into(), stage_threads(jobs).to_string());
    env.insert("jobs".into(), jobs.to_string());
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    env.insert("profile".into(), profile.into());
    env.insert(
        "target".into(),
        format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS),
    );
    if let Some(caches) = cpu_caches() {
        env.insert("cpu_caches".into(), caches);
    }
    env.insert("cpu_isa".into(), cpu_isa());
    if let Some(commit) = git_commit() {
        env.insert("commit".into(), commit);
    }
    if let Some(h) = relora_cache::hostname() {
        env.insert("host".into(), h);
    }
    if let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") {
        if let Some(model) = info.lines().find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']))
        }) {
            env.insert("cpu".into(), model.trim().to_string());
        }
    }
    env
}

/// The CPU's data cache sizes (`L1d 48K, L2 1024K, L3 32768K`). candle's matmuls (gemm)
/// size their blocks from these, so the order in which long sums are added, and with it
/// the last bits of a result, depends on them.
fn cpu_caches() -> Option<String> {
    let mut out = Vec::new();
    for i in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
        else {
            continue;
        };
        if kind.trim() == "Instruction" {
            continue;
        }
        let d = if kind.trim() == "Data" { "d" } else { "" };
        out.push(format!("L{}{d} {}", level.trim(), size.trim()));
    }
    (!out.is_empty()).then(|| out.join(", "))
}

/// The vector extensions that choose the matmul kernels at run time (`avx512f avx2 fma`;
/// `none` on an x86-64 CPU with none of them; the architecture's name elsewhere). An AVX2
/// and an AVX-512 machine run different kernels, which block their sums differently, so the
/// last bits of a result may differ between them (see the README's cache section).
fn cpu_isa() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        let found: Vec<&str> = [
            ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
            ("avx2", std::arch::is_x86_feature_detected!("avx2")),
            ("fma", std::arch::is_x86_feature_detected!("fma")),
        ]
        .into_iter()
        .filter_map(|(name, has)| has.then_some(name))
        .collect();
        if found.is_empty() {
            "none".into()
        } else {
            found.join(" ")
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        std::env::consts::ARCH.into()
    }
}

/// The git commit of the working folder (the repository the pipeline runs from), with
/// `-dirty` when tracked files differ from it; None outside a repository.
fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let clean = std::process::Command::new("git")
        .args(["diff", "--quiet", "HEAD", "--"])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    Some(if clean {
        commit
    } else {
        format!("{commit}-dirty")
    })
}

/// The run's environment plus the GPUs this stage held (how `device: auto` resolved) and
/// the executor that ran it.
pub(crate) fn stage_environment(
    env: &BTreeMap<String, String>,
    gpus: &[u32],
    executor: &str,
) -> BTreeMap<String, String> {
    let mut env = env.clone();
    env.insert("executor".into(), executor.into());
    let ids: Vec<String> = gpus.iter().map(u32::to_string).collect();
    env.insert(
        "gpus".into(),
        if ids.is_empty() {
            "none".into()
        } else {
            ids.join(",")
        },
    );
    env
}

/// Compute threads for each stage when `jobs` run at once: the cores shared out, unless the
/// user set RAYON_NUM_THREADS. Each stage would otherwise start a thread per core, and on 2
/// cores two training stages at once each ran 8 times slower than one alone, a quarter of
/// the work in all (threads taking turns). Results do not depend on the thread count
/// (checked: identical bytes on 1 and 2 threads), so keys are unaffected.
pub(crate) fn threads_per_stage(jobs: usize) -> Option<usize> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() || jobs <= 1 {
        return None;
    }
    Some((cores() / jobs).max(1))
}

/// The threads a stage computes with: ours, else the user's RAYON_NUM_THREADS, else one
/// per core (rayon's own default).
pub(crate) fn stage_threads(jobs: usize) -> usize {
    threads_per_stage(jobs)
        .or_else(|| {
            std::env::var("RAYON_NUM_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&n: &usize| n > 0)
        })
        .unwrap_or_else(cores)
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_names_what_results_may_depend_on() {
        let env = environment(2);
        for k in ["threads", "jobs", "profile", "target", "cpu_isa"] {
            assert!(env.contains_key(k), "{k} missing from {env:?}");
        }
        assert_eq!(env["jobs"], "2");
    }
}
