//! The systemd notify protocol (`sd_notify(3)`) as both daemons speak it under a `Type=notify`
//! unit: `READY=1` once the daemon really serves, `STATUS=` lines for `systemctl status`,
//! `EXTEND_TIMEOUT_USEC=` while a start waits on someone else, `WATCHDOG=1` pings and
//! `STOPPING=1`. All of it only when systemd asked for it by setting `NOTIFY_SOCKET`: without it
//! a [`Notifier`] sends nothing, its ticker never fires, and the daemon behaves as before.
//!
//! Watchdog pings come from whoever calls [`Notifier::alive`], never from a thread of their own:
//! each daemon calls it from a loop whose progress shows that the process works (the agent's
//! heartbeat loop, the scheduler's round trip to its Raft core), so a stuck daemon stops pinging
//! and systemd restarts it.
//!
//! Children inherit `NOTIFY_SOCKET` (the crate reads it at every send, so it stays set): the
//! agent's listener keeper and the tools it runs never write to it, tenant engines start with an
//! empty environment, and the units say `NotifyAccess=main`, so systemd takes only the daemon's
//! own messages.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{info, warn};

/// Without a watchdog, how often [`Notifier::alive`] is due (it extends a start that waits).
const PACE_WITHOUT_WATCHDOG: Duration = Duration::from_secs(10);
/// A `STATUS=` line longer than this is cut (it is shown in one line of `systemctl status`).
const STATUS_MAX: usize = 400;

/// Sends notifications to the service manager, or nothing when none listens.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    inner: Option<Arc<Inner>>,
}

#[derive(Debug)]
struct Inner {
    /// `WATCHDOG_USEC`, when it names this process.
    watchdog: Option<Duration>,
    /// The last `STATUS=` sent, so an unchanged one is not sent again.
    status: Mutex<String>,
    /// The last send failed (logged once until one succeeds again).
    failing: AtomicBool,
}

impl Notifier {
    /// A notifier for this process: on when `NOTIFY_SOCKET` is set, with a watchdog when
    /// `WATCHDOG_USEC` is (and `WATCHDOG_PID`, if set, is this process).
    pub fn from_env() -> Self {
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Self::default();
        }
        let watchdog = sd_notify::watchdog_enabled().filter(|d| !d.is_zero());
        info!(watchdog = ?watchdog, "systemd notifications on (NOTIFY_SOCKET is set)");
        Self {
            inner: Some(Arc::new(Inner {
                watchdog,
                status: Mutex::new(String::new()),
                failing: AtomicBool::new(false),
            })),
        }
    }

    /// Whether anything is sent at all.
    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// The watchdog timeout systemd enforces, if any.
    pub fn watchdog(&self) -> Option<Duration> {
        self.inner.as_ref().and_then(|i| i.watchdog)
    }

    /// How often [`Notifier::alive`] is due: half the watchdog timeout, as `sd_watchdog_enabled(3)`
    /// advises; `None` when notifications are off.
    pub fn alive_every(&self) -> Option<Duration> {
        self.inner.as_ref().map(|i| pace(i.watchdog))
    }

    /// A ticker at [`Notifier::alive_every`], for a daemon's own loop; it never fires when
    /// notifications are off.
    pub fn ticker(&self) -> AliveTicker {
        AliveTicker(self.alive_every().map(|every| {
            let mut interval = tokio::time::interval(every);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        }))
    }

    /// `READY=1` with a status: the daemon serves.
    pub fn ready(&self, status: &str) {
        if let Some(inner) = &self.inner {
            let line = status_line(status);
            self.send(&[NotifyState::Ready, NotifyState::Status(&line)]);
            *inner.status.lock().unwrap_or_else(PoisonError::into_inner) = line;
        }
    }

    /// `STATUS=`, when it changed since the last one sent.
    pub fn status(&self, status: &str) {
        if let Some(inner) = &self.inner {
            let line = status_line(status);
            let mut last = inner.status.lock().unwrap_or_else(PoisonError::into_inner);
            if *last != line {
                self.send(&[NotifyState::Status(&line)]);
                *last = line;
            }
        }
    }

    /// `STOPPING=1` with a status: the daemon is shutting down.
    pub fn stopping(&self, status: &str) {
        if let Some(inner) = &self.inner {
            let line = status_line(status);
            self.send(&[NotifyState::Stopping, NotifyState::Status(&line)]);
            *inner.status.lock().unwrap_or_else(PoisonError::into_inner) = line;
        }
    }

    /// The caller's loop made progress: a watchdog ping (when systemd keeps a watchdog) and,
    /// while `starting` (not ready yet: the agent waiting for the scheduler), the start timeout
    /// extended by three paces, so a start that waits is not failed while one that hangs is.
    pub fn alive(&self, starting: bool) {
        if let Some(inner) = &self.inner {
            let states = alive_states(inner.watchdog, starting);
            if !states.is_empty() {
                self.send(&states);
            }
        }
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        let Some(inner) = &self.inner else {
            return;
        };
        match sd_notify::notify(states) {
            Ok(()) => {
                if inner.failing.swap(false, Ordering::Relaxed) {
                    info!("systemd notifications go through again");
                }
            }
            Err(e) => {
                if !inner.failing.swap(true, Ordering::Relaxed) {
                    warn!(error = %e, "cannot notify systemd (NOTIFY_SOCKET); retrying with the next notification");
                }
            }
        }
    }
}

/// How often a daemon shows it is alive, given the watchdog timeout.
fn pace(watchdog: Option<Duration>) -> Duration {
    watchdog.map_or(PACE_WITHOUT_WATCHDOG, |w| w / 2)
}

/// What [`Notifier::alive`] sends.
fn alive_states(watchdog: Option<Duration>, starting: bool) -> Vec<NotifyState<'static>> {
    let mut states = Vec::new();
    if watchdog.is_some() {
        states.push(NotifyState::Watchdog);
    }
    if starting {
        let usec = (pace(watchdog) * 3).as_micros();
        states.push(NotifyState::ExtendTimeoutUsec(
            u32::try_from(usec).unwrap_or(u32::MAX),
        ));
    }
    states
}

/// `status` as one `STATUS=` line: control characters escaped (a newline would start another
/// assignment), at most [`STATUS_MAX`] bytes.
fn status_line(status: &str) -> String {
    let mut line = crate::text::escape_control(status);
    if line.len() > STATUS_MAX {
        let mut end = STATUS_MAX;
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str("...");
    }
    line
}

/// Fires at a [`Notifier`]'s pace, or never when notifications are off.
#[derive(Debug)]
pub struct AliveTicker(Option<tokio::time::Interval>);

impl AliveTicker {
    /// Waits for the next tick (the first one at once).
    pub async fn tick(&mut self) {
        match &mut self.0 {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(states: &[NotifyState<'_>]) -> String {
        states.iter().map(|s| format!("{s}\n")).collect()
    }

    #[test]
    fn off_sends_nothing_and_never_ticks() {
        let off = Notifier::default();
        assert!(!off.is_enabled());
        assert_eq!(off.alive_every(), None);
        assert_eq!(off.watchdog(), None);
        off.ready("ready");
        off.alive(true);
        off.stopping("stopping");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut ticker = off.ticker();
            assert!(
                tokio::time::timeout(Duration::from_millis(50), ticker.tick())
                    .await
                    .is_err(),
                "an off notifier's ticker fired"
            );
        });
    }

    #[test]
    fn pings_at_half_the_watchdog_and_extends_a_waiting_start() {
        let watchdog = Some(Duration::from_secs(30));
        assert_eq!(pace(watchdog), Duration::from_secs(15));
        assert_eq!(pace(None), PACE_WITHOUT_WATCHDOG);
        assert_eq!(text(&alive_states(watchdog, false)), "WATCHDOG=1\n");
        assert_eq!(
            text(&alive_states(watchdog, true)),
            "WATCHDOG=1\nEXTEND_TIMEOUT_USEC=45000000\n"
        );
        assert_eq!(
            text(&alive_states(None, true)),
            "EXTEND_TIMEOUT_USEC=30000000\n"
        );
        assert!(alive_states(None, false).is_empty());
    }

    #[test]
    fn a_status_is_one_bounded_line() {
        assert_eq!(
            status_line("registering: refused\nREADY=1"),
            "registering: refused\\x0aREADY=1"
        );
        let long = "é".repeat(STATUS_MAX);
        let line = status_line(&long);
        assert!(line.len() <= STATUS_MAX + 3, "{}", line.len());
        assert!(line.ends_with("..."));
    }
}
