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
    use super::eta;
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
}
