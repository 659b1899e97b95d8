//! Measurements: request latencies and errors by gRPC code, the closed-loop client driver both
//! benchmarks' request phases share, and per-process CPU time from `/proc`.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Latencies of successful requests and error counts, gathered while `recording` is on.
#[derive(Debug, Default)]
pub struct Recorder {
    recording: AtomicBool,
    samples: Mutex<Samples>,
}

#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub ok: Vec<Duration>,
    pub errors: BTreeMap<String, u64>,
    /// The first message seen for each error code, so a run that fails says why.
    pub first_error: BTreeMap<String, String>,
}

impl Samples {
    pub fn errors_total(&self) -> u64 {
        self.errors.values().sum()
    }

    /// `Unavailable=3, DeadlineExceeded=1`, or `none`.
    pub fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "none".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| match self.first_error.get(k) {
                Some(first) => format!("{k}={v}, first: {first:?}"),
                None => format!("{k}={v}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Recorder {
    pub fn new(recording: bool) -> Self {
        Self {
            recording: AtomicBool::new(recording),
            samples: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Samples> {
        // A panicking recorder thread leaves plain data behind; keep using it.
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn record(&self, latency: Duration, result: Result<(), &tonic::Status>) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        let mut s = self.lock();
        match result {
            Ok(()) => s.ok.push(latency),
            Err(status) => {
                let code = format!("{:?}", status.code());
                *s.errors.entry(code.clone()).or_default() += 1;
                s.first_error
                    .entry(code)
                    .or_insert_with(|| status.message().to_string());
            }
        }
    }

    /// Clears what was gathered and starts (or keeps) recording.
    pub fn start(&self) {
        *self.lock() = Samples::default();
        self.recording.store(true, Ordering::Relaxed);
    }

    /// Stops recording and returns what was gathered.
    pub fn stop(&self) -> Samples {
        self.recording.store(false, Ordering::Relaxed);
        std::mem::take(&mut *self.lock())
    }
}

/// p50/p99/max of a set of latencies (nearest rank on the sorted samples).
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub count: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

impl Latency {
    pub fn of(samples: &[Duration]) -> Self {
        let mut v = samples.to_vec();
        v.sort_unstable();
        // Nearest rank, in per mille: the smallest sample with at least that share of all samples
        // at or below it.
        let rank = |per_mille: usize| -> Duration {
            if v.is_empty() {
                return Duration::ZERO;
            }
            let n = v.len();
            v[(n * per_mille).div_ceil(1000).clamp(1, n) - 1]
        };
        Self {
            count: v.len(),
            p50: rank(500),
            p99: rank(990),
            max: v.last().copied().unwrap_or_default(),
        }
    }

    pub fn text(&self) -> String {
        format!("{} / {} / {}", ms(self.p50), ms(self.p99), ms(self.max))
    }

    pub fn json(&self) -> Value {
        json!({
            "samples": self.count,
            "p50_ms": self.p50.as_secs_f64() * 1e3,
            "p99_ms": self.p99.as_secs_f64() * 1e3,
            "max_ms": self.max.as_secs_f64() * 1e3,
        })
    }
}

pub fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// What one request of a load phase came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Succeeded and did what we measure (a create that got a node; a put).
    Done,
    /// Succeeded without doing it (a create left pending).
    OkOnly,
}

#[derive(Debug, Clone)]
pub struct LoadResult {
    pub elapsed: Duration,
    pub done: u64,
    pub ok_only: u64,
    pub samples: Samples,
}

impl LoadResult {
    pub fn rate(&self) -> f64 {
        per_sec(self.done, self.elapsed)
    }
}

pub fn per_sec(n: u64, over: Duration) -> f64 {
    let s = over.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// Runs `clients` concurrent closed loops: each takes the next request number (0-based) and
/// calls `call` with one of `conns` (round robin by client), until `total` requests were issued.
/// Every request's latency counts, whether it was the first or the last.
pub async fn drive<C, F, Fut>(clients: usize, total: usize, conns: &[C], call: F) -> LoadResult
where
    C: Clone + Send + 'static,
    F: Fn(C, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Outcome, tonic::Status>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let call = Arc::new(call);
    let rec = Arc::new(Recorder::new(true));
    let done = Arc::new(AtomicUsize::new(0));
    let ok_only = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for c in 0..clients.max(1) {
        let conn = conns[c % conns.len()].clone();
        let (next, call, rec) = (next.clone(), call.clone(), rec.clone());
        let (done, ok_only) = (done.clone(), ok_only.clone());
        set.spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total {
                    break;
                }
                let t0 = Instant::now();
                let r = call(conn.clone(), n).await;
                let dt = t0.elapsed();
                match r {
                    Ok(o) => {
                        rec.record(dt, Ok(()));
                        let counter = if o == Outcome::Done { &done } else { &ok_only };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => rec.record(dt, Err(&s)),
                }
            }
        });
    }
    while set.join_next().await.is_some() {}
    LoadResult {
        elapsed: start.elapsed(),
        done: done.load(Ordering::Relaxed) as u64,
        ok_only: ok_only.load(Ordering::Relaxed) as u64,
        samples: rec.stop(),
    }
}

/// CPU time (user + system, all threads) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) may hold spaces and parentheses; the fields after the last ')'
    // start at field 3 (state), so utime (14) and stime (15) are at 11 and 12 there.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("{path}: no ')'"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .with_context(|| format!("{path}: field {} is not a number", i + 3))
    };
    let ticks = field(11)? + field(12)?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0);
    let Some(hz) = hz else {
        bail!("sysconf(CLK_TCK) gave no value");
    };
    Ok(Duration::from_secs_f64(ticks as f64 / hz as f64))
}

/// Cores used between two `cpu_time` readings `wall` apart.
pub fn cores(before: Duration, after: Duration, wall: Duration) -> f64 {
    let w = wall.as_secs_f64();
    if w > 0.0 {
        after.saturating_sub(before).as_secs_f64() / w
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let l = Latency::of(&v);
        assert_eq!(l.p50, Duration::from_millis(50));
        assert_eq!(l.p99, Duration::from_millis(99));
        assert_eq!(l.max, Duration::from_millis(100));
    }

    #[test]
    fn empty_latencies_are_zero() {
        let l = Latency::of(&[]);
        assert_eq!(l.count, 0);
        assert_eq!(l.max, Duration::ZERO);
    }

    #[test]
    fn own_cpu_time_reads() {
        assert!(cpu_time(std::process::id()).is_ok());
    }
}
