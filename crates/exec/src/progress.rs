//! One live line per running stage on a terminal; plain, rate-limited lines otherwise.

use crate::{Outcome, Progress};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use relora_cache::LockHolder;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

pub struct Display {
    multi: Option<MultiProgress>,
    bars: HashMap<String, ProgressBar>,
    last_plain: HashMap<String, Instant>,
    /// When each stage's first progress report came, and its step then: the rate for ETAs
    /// counts only steps made in this run (a resumed stage starts past 0).
    first: HashMap<String, (Instant, u64)>,
}

/// Time left at the rate so far: `done` steps in `elapsed`, `left` steps to go.
pub(crate) fn eta(elapsed: Duration, done: u64, left: u64) -> Option<String> {
    if done == 0 || left == 0 {
        return None;
    }
    let secs = (elapsed.as_secs_f64() / done as f64 * left as f64).round() as u64;
    Some(match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    })
}

/// The whole run's time left: the estimated FLOPs its stages have still to do (their
/// estimates' `flops`, less each running stage's progress) at the FLOP rate this run has
/// made so far, since the first such stage reported. Stages without a FLOP estimate
/// (tokenize, command) do not count, nor does the time before them.
pub(crate) struct RunEta {
    start: Option<Instant>,
    /// Each stage's FLOPs, for the stages this run computes (0 for the others).
    flops: Vec<f64>,
    /// Fraction done of each stage: when this run first saw it, and now.
    first: HashMap<usize, f64>,
    now: HashMap<usize, f64>,
    last_plain: Option<Instant>,
}

impl RunEta {
    pub(crate) fn new(flops: Vec<f64>) -> RunEta {
        RunEta {
            start: None,
            flops,
            first: HashMap::new(),
            now: HashMap::new(),
            last_plain: None,
        }
    }

    /// Stage `i` is `done` of its way (0 to 1).
    pub(crate) fn update(&mut self, i: usize, done: f64) {
        if self.flops.get(i).is_some_and(|&f| f > 0.0) && self.start.is_none() {
            self.start = Some(Instant::now());
        }
        self.first.entry(i).or_insert(done);
        self.now.insert(i, done);
    }

    pub(crate) fn left(&self) -> Option<String> {
        let frac = |i: usize| self.now.get(&i).copied().unwrap_or(0.0);
        let made: f64 = (0..self.flops.len())
            .map(|i| self.flops[i] * (frac(i) - self.first.get(&i).copied().unwrap_or(0.0)))
            .sum();
        let left: f64 = (0..self.flops.len())
            .map(|i| self.flops[i] * (1.0 - frac(i)))
            .sum();
        if made <= 0.0 || left <= 0.0 {
            return None;
        }
        // In FLOPs as "steps": eta() only needs the ratio.
        eta(
            self.start?.elapsed(),
            made.round() as u64,
            left.round() as u64,
        )
    }
}

fn describe(p: &Progress) -> String {
    let mut s = String::new();
    if let Some(l) = p.loss {
        s.push_str(&format!("loss {l:.4}  "));
    }
    if let Some(t) = p.tokens_per_s {
        s.push_str(&format!("{t:.0} tok/s  "));
    }
    if let Some(n) = &p.note {
        s.push_str(n);
    }
    s
}

impl Display {
    pub fn new() -> Display {
        let multi = std::io::stderr()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Display {
            multi,
            bars: HashMap::new(),
            last_plain: HashMap::new(),
            first: HashMap::new(),
        }
    }

    pub fn started(&mut self, stage: &str) {
        match &self.multi {
            Some(m) => {
                let bar = m.add(ProgressBar::new(0));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:.bold} [{bar:30}] {pos}/{len} {msg} (ETA {eta})",
                    )
                    .expect("static template")
                    .progress_chars("=> "),
                );
                bar.set_prefix(stage.to_string());
                bar.enable_steady_tick(Duration::from_millis(250));
                self.bars.insert(stage.to_string(), bar);
            }
            None => eprintln!("[{stage}] running"),
        }
    }

    pub fn waiting(&mut self, stage: &str, holder: Option<LockHolder>) {
        let who = holder
            .map(|h| h.to_string())
            .unwrap_or("another run".into());
        self.line(&format!("[{stage}] waiting: {who} is computing this entry"));
    }

    pub fn stale_lock(&mut self, stage: &str, holder: &LockHolder) {
        self.line(&format!(
            "[{stage}] cleared a stale lock left by {holder}, which died mid-stage; recomputing"
        ));
    }

    /// A line about a stage that is not progress (a batch job's state).
    pub fn note(&mut self, text: &str) {
        self.line(text);
    }

    pub fn progress(&mut self, stage: &str, p: &Progress) {
        if let Some(bar) = self.bars.get(stage) {
            bar.set_length(p.total);
            bar.set_position(p.step);
            bar.set_message(describe(p));
            return;
        }
        let now = Instant::now();
        let (t0, step0) = *self.first.entry(stage.to_string()).or_insert((now, p.step));
        let due = self
            .last_plain
            .get(stage)
            .is_none_or(|t| now.duration_since(*t) >= Duration::from_secs(10));
        if due || p.step == p.total {
            self.last_plain.insert(stage.to_string(), now);
            // A total of 0 means the stage cannot know it in advance.
            let total = if p.total == 0 {
                String::new()
            } else {
                format!("/{}", p.total)
            };
            let left = eta(
                now.duration_since(t0),
                p.step.saturating_sub(step0),
                p.total.saturating_sub(p.step),
            )
            .map(|e| format!("  ETA {e}"))
            .unwrap_or_default();
            eprintln!("[{stage}] {}{total} {}{left}", p.step, describe(p));
        }
    }

    /// The whole run's ETA: a bar's message on a terminal, else a line every 30 s.
    pub(crate) fn run_eta(&mut self, run: &mut RunEta, stages_left: usize) {
        let Some(left) = run.left() else { return };
        let text = format!("[run] {stages_left} stage(s) to finish, ETA {left}");
        match &self.multi {
            Some(m) => {
                let bar = self.bars.entry("\0run".into()).or_insert_with(|| {
                    let b = m.insert(0, ProgressBar::new_spinner());
                    b.set_style(ProgressStyle::with_template("{msg}").expect("static template"));
                    b
                });
                bar.set_message(text);
            }
            None => {
                let now = Instant::now();
                if run
                    .last_plain
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30))
                {
                    run.last_plain = Some(now);
                    eprintln!("{text}");
                }
            }
        }
    }

    fn line(&self, text: &str) {
        match &self.multi {
            Some(m) => {
                let _ = m.println(text);
            }
            None => eprintln!("{text}"),
        }
    }

    pub fn finished(&mut self, stage: &str, o: &Outcome) {
        self.first.remove(stage);
        if let Some(bar) = self.bars.remove(stage) {
            bar.finish_and_clear();
        }
        match o {
            Outcome::Cached => self.line(&format!("[{stage}] cached")),
            Outcome::Computed { seconds } => self.line(&format!("[{stage}] done in {seconds:.1}s")),
            Outcome::Adopted { from } => self.line(&format!(
                "[{stage}] reused entry {} made by other code (--accept-code-change)",
                &from[..from.len().min(12)]
            )),
            _ => {}
        }
    }

    pub fn failed(&mut self, stage: &str, message: &str) {
        if let Some(bar) = self.bars.remove(stage) {
            bar.abandon();
        }
        self.line(&format!("[{stage}] FAILED: {message}"));
    }

    pub fn clear(&mut self) {
        for (_, bar) in self.bars.drain() {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{eta, RunEta};
    use std::time::Duration;

    #[test]
    fn eta_extrapolates_the_rate_of_this_run() {
        // 50 steps in 100 s: 2 s a step, 150 to go.
        assert_eq!(eta(Duration::from_secs(100), 50, 150).unwrap(), "5m00s");
        assert_eq!(eta(Duration::from_secs(10), 10, 5).unwrap(), "5s");
        assert_eq!(eta(Duration::from_secs(3600), 1, 2).unwrap(), "2h00m");
        assert_eq!(eta(Duration::from_secs(5), 0, 10), None, "no rate yet");
        assert_eq!(eta(Duration::from_secs(5), 10, 0), None, "finished");
    }

    #[test]
    fn the_runs_eta_counts_flops_made_in_this_run_only() {
        // Stage 0 (100 FLOPs) resumed at half way and now at three quarters: 25 made;
        // 25 left of it and 300 of stage 1: 325 left, 13 times what was made.
        let mut r = RunEta::new(vec![100.0, 300.0, 0.0]);
        r.update(2, 0.5);
        assert!(r.start.is_none(), "a stage without FLOPs starts no clock");
        r.update(0, 0.5);
        assert_eq!(r.left(), None, "nothing made yet");
        r.update(0, 0.75);
        r.start = r.start.map(|t| t - Duration::from_secs(10));
        assert_eq!(r.left().unwrap(), "2m10s");
    }
}
