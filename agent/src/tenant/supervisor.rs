//! The tenant's lifecycle as a state machine, one task per tenant. It decides; the `Runtime` does
//! the host-side work. Phases and what moves between them:
//!
//! ```text
//!            ┌────────── restart ──────────┐
//!            ▼                             │
//! resume ─► Start ─ ready ─► Running ─ exit ─► Backoff ─ timer ─► Start
//!  new  ─►   │  └─ error ─► Backoff / Failed (after MAX_FAILURES in a row)
//!            │                 Failed ─ restart ─► Start
//!            │            Running ─ idle_after without clients, or `hibernate` ─► Hibernated
//!            └ recorded hibernated ─► Hibernated ─ a client, or `wake` ─► Wake ─ ready ─► Running
//!  any phase ─ delete ─► Delete (graceful stop only for a ready engine, else kill) ─► gone
//!  any phase ─ shutdown ─► the task ends; the engine keeps running unless asked to stop it
//!  any phase ─ resize ─► limits now, storage grow now or retried (`resize_pending`)
//! ```
//!
//! Hibernation (`stop`: the engine stops, `freeze`: its cgroup freezes) keeps the record, cgroup,
//! volume and port, so a wake is only a spawn (or a thaw) and a readiness wait. The proxy counts
//! clients; the decision to hibernate is taken with the proxy already holding new clients, and a
//! client counted in between cancels it, so no client ever reaches an engine that is stopping.
//! The intent (`hibernated` in the record) is written before the engine stops or freezes: an
//! agent started later keeps the tenant hibernated (a frozen engine stays frozen).
//!
//! Requests that arrive in the middle of a step wait for it to end, except in the two waits that
//! can be long (an init, an engine becoming ready), which a delete or shutdown interrupts: the
//! next step kills whatever the interrupted one left in the cgroup. A tenant resumed after an agent
//! restart is not announced until the supervisor knows whether its engine is still there, so an
//! adopted engine is never reported `starting`.

use std::sync::Arc;
use std::time::Duration;

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{Resources, TenantState};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use super::record::TenantRecord;
use super::runtime::{EngineProcess, Runtime};
use super::Observed;
use crate::crash_point;
use crate::proxy::{Clients, Upstream};

/// Failures in a row (without a minute of healthy running between them) before `failed`.
pub const MAX_FAILURES: u32 = 5;
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Running this long resets the failure count.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// How often a storage grow that failed is tried again.
const GROW_RETRY: Duration = Duration::from_secs(30);
/// An engine not ready after this long is reported so (it is not killed: see `wait_ready`).
const READY_NOTICE: Duration = Duration::from_secs(120);
/// How often the host-side preparation of an adopted engine is tried again.
const PREPARE_RETRY: Duration = Duration::from_secs(5);
/// How long a tenant found on disk with its engine stopped waits for the scheduler's word
/// before it starts anyway (the scheduler unreachable: the tenant's availability comes first).
pub const UNHEARD_START_WAIT: Duration = Duration::from_secs(30);

/// What the agent asks of a tenant's task.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Delete,
    /// Restart the engine once for this generation (`dormantctl tenant restart`).
    Restart(u64),
    Resize(Resources),
    /// End the task without deleting anything; the engine keeps running unless `stop_engine`.
    Shutdown {
        stop_engine: bool,
    },
    /// A new hibernation policy.
    Policy {
        idle_after: IdleAfter,
        mode: HibernateMode,
    },
    /// Hibernate now (`dormantctl tenant hibernate`), once for this generation.
    Hibernate(u64),
    /// Wake now (`dormantctl tenant wake`), once for this generation.
    Wake(u64),
    /// The scheduler's desired set has arrived (and a delete in it was sent first): a tenant
    /// found on disk with its engine stopped may start now.
    DesiredSetHeard,
}

/// What ends a wait in `Hibernated`.
enum Asleep {
    Client,
    ProxyGone,
    FrozenExit(crate::process::Exit),
    Request(Option<Request>),
}

/// The requests that end a wait early.
enum Interrupt {
    Delete,
    Shutdown {
        stop_engine: bool,
    },
    /// Only while an engine becomes ready (which may never happen): the operator's way out.
    Restart(u64),
}

enum Phase<E> {
    Start {
        adopt: bool,
    },
    Running(E),
    /// The engine is stopped (`frozen` is `None`) or frozen; a client that speaks beyond the
    /// `spoke_at` count wakes it (a TCP probe that connects and closes does not).
    Hibernated {
        frozen: Option<E>,
        spoke_at: u64,
    },
    Backoff(String),
    Failed(String),
    Delete {
        engine: Option<E>,
        ready: bool,
    },
    Exit {
        engine: Option<E>,
        ready: bool,
        stop_engine: bool,
    },
}

pub struct Supervisor<R: Runtime> {
    rt: R,
    record: TenantRecord,
    requests: mpsc::UnboundedReceiver<Request>,
    /// Requests that arrived during a step, handled when it ends.
    deferred: Vec<Request>,
    /// A restart asked for (its generation) and not done yet.
    restart_wanted: Option<u64>,
    status: watch::Sender<Observed>,
    ready: watch::Sender<Upstream>,
    /// Told whenever the state the scheduler sees changes.
    changed: Arc<Notify>,
    failures: u32,
    restarts: u64,
    /// The storage size not reached yet, with the reason.
    grow_pending: bool,
    /// The scheduler's desired set has come since this agent started (see `start`).
    desired_set_heard: bool,
    /// The proxy's client counts: idle and wake decisions.
    clients: watch::Receiver<Clients>,
    /// A manual hibernate asked for (its generation), taken when the engine runs.
    hibernate_wanted: Option<u64>,
    /// A manual wake asked for (its generation).
    wake_wanted: Option<u64>,
    /// Set while a wake is under way: when it began.
    waking_since: Option<Instant>,
    hibernations: u64,
    wakes: u64,
}

/// Waits for `work` while taking requests: a delete or shutdown ends the wait (dropping `work`),
/// and so does a restart where `restart_interrupts`; anything else is deferred until the step is
/// over.
async fn until_interrupted<T>(
    work: impl std::future::Future<Output = T>,
    requests: &mut mpsc::UnboundedReceiver<Request>,
    deferred: &mut Vec<Request>,
    restart_interrupts: bool,
) -> Result<T, Interrupt> {
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            req = requests.recv() => match req {
                Some(Request::Delete) => return Err(Interrupt::Delete),
                Some(Request::Shutdown { stop_engine }) => return Err(Interrupt::Shutdown { stop_engine }),
                Some(Request::Restart(generation)) if restart_interrupts => return Err(Interrupt::Restart(generation)),
                // The handle went away without a word: the agent is exiting.
                None => return Err(Interrupt::Shutdown { stop_engine: false }),
                Some(other) => deferred.push(other),
            },
        }
    }
}

/// Sleeps until `at`, or forever when there is none.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// `work` (an engine becoming ready), saying so in the tenant's reason when it takes longer than
/// `READY_NOTICE`; it is never cut short.
async fn noting_slow<T>(
    work: impl std::future::Future<Output = T>,
    status: &watch::Sender<Observed>,
    changed: &Notify,
) -> T {
    tokio::pin!(work);
    tokio::select! {
        out = &mut work => return out,
        () = tokio::time::sleep(READY_NOTICE) => {}
    }
    warn!(after = ?READY_NOTICE, "engine not ready yet; still waiting");
    status.send_modify(|o| {
        // Announced even for an adopted engine: the scheduler must not keep showing `running`.
        o.state = TenantState::Starting;
        o.announced = true;
        o.reason = Some(format!(
            "engine not ready after {}s; still waiting (a long crash recovery?)",
            READY_NOTICE.as_secs()
        ));
    });
    changed.notify_one();
    work.await
}

impl<R: Runtime> Supervisor<R> {
    pub fn new(
        rt: R,
        record: TenantRecord,
        requests: mpsc::UnboundedReceiver<Request>,
        status: watch::Sender<Observed>,
        ready: watch::Sender<Upstream>,
        changed: Arc<Notify>,
        clients: watch::Receiver<Clients>,
    ) -> Self {
        Self {
            clients,
            hibernate_wanted: None,
            wake_wanted: None,
            waking_since: None,
            hibernations: 0,
            wakes: 0,
            rt,
            record,
            requests,
            deferred: Vec::new(),
            restart_wanted: None,
            status,
            ready,
            changed,
            failures: 0,
            restarts: 0,
            grow_pending: false,
            desired_set_heard: false,
        }
    }

    fn set(&self, state: TenantState, reason: Option<String>) {
        let mut changed = false;
        self.status.send_modify(|o| {
            if o.state != state || !o.announced || o.reason != reason {
                if !o.announced {
                    // A resumed tenant's first report: what it was before is the scheduler's.
                    info!(to = %state, reason = reason.as_deref().unwrap_or(""), "tenant state after resuming");
                } else if o.state != state {
                    info!(from = %o.state, to = %state, reason = reason.as_deref().unwrap_or(""), "tenant state");
                }
                changed = true;
            }
            o.state = state;
            o.reason = reason;
            o.announced = true;
        });
        if changed {
            self.changed.notify_one();
        }
    }

    /// Runs the tenant until it is deleted or the task is shut down.
    pub async fn run(mut self) {
        let mut phase = if self.record.deleting {
            Phase::Delete {
                engine: None,
                ready: false,
            }
        } else {
            Phase::Start { adopt: true }
        };
        loop {
            phase = match phase {
                Phase::Start { adopt } => self.start(adopt).await,
                Phase::Running(engine) => self.running(engine).await,
                Phase::Hibernated { frozen, spoke_at } => self.hibernated(frozen, spoke_at).await,
                Phase::Backoff(reason) => self.backoff(reason).await,
                Phase::Failed(reason) => self.failed(reason).await,
                Phase::Delete { engine, ready } => {
                    self.delete(engine, ready).await;
                    return;
                }
                Phase::Exit {
                    engine,
                    ready,
                    stop_engine,
                } => {
                    if stop_engine {
                        // Gracefully only if ready: see `delete`.
                        match engine {
                            Some(e) if ready => self.rt.stop(&e).await,
                            _ => {
                                let _ = self.rt.kill_all().await;
                            }
                        }
                    } else {
                        // The next agent takes the port and the open connections over.
                        self.rt.hand_over().await;
                    }
                    return;
                }
            };
        }
    }

    async fn interrupted(
        &mut self,
        i: Interrupt,
        engine: Option<R::Engine>,
        ready: bool,
    ) -> Phase<R::Engine> {
        match i {
            Interrupt::Delete => Phase::Delete { engine, ready },
            Interrupt::Shutdown { stop_engine } => Phase::Exit {
                engine,
                ready,
                stop_engine,
            },
            Interrupt::Restart(generation) => {
                // An engine that is not ready is killed, never signalled (see `delete`); the
                // next one runs at this generation.
                info!(
                    generation,
                    "restart requested while the engine was not ready"
                );
                self.want_restart(generation);
                if let Err(e) = self.rt.kill_all().await {
                    warn!(error = %e, "killing the engine for the restart");
                }
                self.failures = 0;
                Phase::Start { adopt: false }
            }
        }
    }

    /// Waits for [`Request::DesiredSetHeard`], at most [`UNHEARD_START_WAIT`]; a delete or shutdown
    /// interrupts, anything else waits for the next step.
    async fn until_desired_set_heard(&mut self) -> Result<(), Interrupt> {
        let deadline = Instant::now() + UNHEARD_START_WAIT;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    warn!(waited = ?UNHEARD_START_WAIT, "no word from the scheduler: starting the stopped engine anyway");
                    return Ok(());
                }
                req = self.requests.recv() => match req {
                    Some(Request::DesiredSetHeard) => {
                        self.desired_set_heard = true;
                        return Ok(());
                    }
                    Some(Request::Delete) => return Err(Interrupt::Delete),
                    Some(Request::Shutdown { stop_engine }) => return Err(Interrupt::Shutdown { stop_engine }),
                    None => return Err(Interrupt::Shutdown { stop_engine: false }),
                    Some(other) => self.deferred.push(other),
                },
            }
        }
    }

    /// Handles what arrived during the last step; returns a phase only for a delete or shutdown.
    async fn take_deferred(&mut self) {
        for req in std::mem::take(&mut self.deferred) {
            match req {
                Request::Resize(resources) => self.resize(resources).await,
                Request::Restart(generation) => self.want_restart(generation),
                Request::Policy { idle_after, mode } => self.set_policy(idle_after, mode).await,
                Request::Hibernate(generation) => {
                    if generation > self.record.spec.hibernate_generation {
                        self.hibernate_wanted =
                            Some(generation.max(self.hibernate_wanted.unwrap_or(0)));
                    }
                }
                Request::Wake(generation) => {
                    if generation > self.record.spec.wake_generation {
                        self.wake_wanted = Some(generation.max(self.wake_wanted.unwrap_or(0)));
                    }
                }
                Request::DesiredSetHeard => self.desired_set_heard = true,
                // Never deferred (they interrupt).
                Request::Delete | Request::Shutdown { .. } => {}
            }
        }
    }

    fn want_restart(&mut self, generation: u64) {
        if generation > self.record.spec.restart_generation {
            self.restart_wanted = Some(generation.max(self.restart_wanted.unwrap_or(0)));
        }
    }

    /// Records that the engine now runs at the restart generation asked for, and that no
    /// restart is under way.
    async fn restart_done(&mut self) {
        let mut changed = self.record.restarting_from.take().is_some();
        if let Some(generation) = self.restart_wanted.take() {
            self.record.spec.restart_generation = generation;
            changed = true;
        }
        if changed {
            if let Err(e) = self.rt.write_record(&self.record).await {
                warn!(error = %e, "recording the restart generation");
            }
            let generation = self.record.spec.restart_generation;
            self.status
                .send_modify(|o| o.restart_generation = generation);
            self.changed.notify_one();
        }
    }

    async fn start(&mut self, adopt: bool) -> Phase<R::Engine> {
        self.ready.send_replace(Upstream::Waiting);
        self.status.send_modify(|o| o.pid = None);
        // The engine an earlier agent left running is looked for first (reading only): a
        // failure to prepare the host side must never kill it.
        let mut adopted = if adopt { self.rt.adopt() } else { None };
        if let (Some(engine), Some(old)) = (&adopted, self.record.restarting_from) {
            if engine.pid() == old {
                // A restart was under way when the agent died, and this is still the engine
                // being replaced: finish the restart.
                info!(
                    pid = old,
                    "finishing a restart interrupted by an agent restart"
                );
                self.rt.stop(engine).await;
                adopted = None;
            }
        }
        loop {
            let Err(e) = self.rt.prepare(&self.record).await else {
                break;
            };
            let Some(engine) = adopted else {
                return self.start_failed(e.to_string()).await;
            };
            let reason = format!("its engine keeps running; preparing the host side failed: {e}");
            warn!(reason = %reason, "will retry");
            self.set(TenantState::Starting, Some(reason));
            // The pause also ends if the kept engine dies: then it is an ordinary start.
            let pause = until_interrupted(
                async {
                    tokio::select! {
                        () = tokio::time::sleep(PREPARE_RETRY) => true,
                        _ = engine.exited() => false,
                    }
                },
                &mut self.requests,
                &mut self.deferred,
                false,
            )
            .await;
            match pause {
                Ok(true) => adopted = Some(engine),
                Ok(false) => adopted = None,
                Err(i) => return self.interrupted(i, Some(engine), true).await,
            }
        }
        self.take_deferred().await;
        self.try_grow().await;
        if let Some(engine) = adopted {
            if self.record.restarting_from.take().is_some() {
                // The restart had replaced the engine before the agent died: it is done (a
                // newer restart asked for meanwhile stays wanted).
                if let Err(e) = self.rt.write_record(&self.record).await {
                    warn!(error = %e, "recording the finished restart");
                }
            }
            if self.record.hibernated {
                match self.record.spec.hibernate {
                    // Frozen (or being frozen) when the agent stopped: it stays so. Freezing
                    // again finishes a freeze the crash cut short.
                    HibernateMode::Freeze => match self.rt.freeze().await {
                        Ok(()) => return self.now_hibernated(Some(engine), 0),
                        Err(e) => {
                            warn!(error = %e, "freezing the hibernated engine again; it runs")
                        }
                    },
                    // Being stopped when the agent stopped (or frozen before the mode changed to
                    // stop): the hibernation is finished as recorded.
                    HibernateMode::Stop => {
                        info!("finishing a hibernation interrupted by an agent restart");
                        if let Err(e) = self.rt.thaw().await {
                            warn!(error = %e, "thawing the engine to stop it");
                        }
                        self.rt.stop(&engine).await;
                        self.rt.reclaim_memory().await;
                        return self.now_hibernated(None, 0);
                    }
                }
            }
            // A frozen engine never becomes ready: thawed first (nothing to do if it runs).
            if let Err(e) = self.rt.thaw().await {
                warn!(error = %e, "thawing the adopted engine");
            }
            return self.until_ready(engine).await;
        }
        if adopt && !self.status.borrow().announced && !self.desired_set_heard {
            // Found on disk with its engine stopped (the host rebooted, the engine died while no
            // agent ran), running or hibernated: it may have been deleted (`--force`) while this
            // host was away, so it starts, or waits for a client to wake it, only once the
            // scheduler's desired set has come, a delete first. Clients meanwhile wait.
            if let Err(i) = self.until_desired_set_heard().await {
                return self.interrupted(i, None, false).await;
            }
        }
        if self.record.hibernated && adopt && self.rt.is_initialized() {
            // Hibernated when the agent stopped: it stays so until a client comes. Any client
            // that spoke to this agent (counts start at 0) wakes it.
            return self.now_hibernated(None, 0);
        }
        if self.status.borrow().state != TenantState::Starting || !self.status.borrow().announced {
            self.set(TenantState::Starting, None);
        }
        if !self.rt.is_initialized() {
            let init = until_interrupted(
                self.rt.initialize(&self.record.spec),
                &mut self.requests,
                &mut self.deferred,
                false,
            )
            .await;
            match init {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return self.start_failed(e.to_string()).await,
                Err(i) => return self.interrupted(i, None, false).await,
            }
            self.take_deferred().await;
        }
        let engine = match self.rt.spawn_engine(&self.record.spec).await {
            Ok(engine) => engine,
            Err(e) => return self.start_failed(e.to_string()).await,
        };
        // A fresh engine runs at whatever generation was asked for so far.
        self.restart_done().await;
        self.until_ready(engine).await
    }

    /// Waits until `engine` answers (a delete, shutdown or restart ends the wait), then runs it.
    async fn until_ready(&mut self, engine: R::Engine) -> Phase<R::Engine> {
        let ready = until_interrupted(
            noting_slow(self.rt.wait_ready(&engine), &self.status, &self.changed),
            &mut self.requests,
            &mut self.deferred,
            true,
        )
        .await;
        match ready {
            Ok(Ok(())) => Phase::Running(engine),
            Ok(Err(e)) => self.start_failed(e.to_string()).await,
            Err(Interrupt::Restart(generation)) if self.answers_now(&engine).await => {
                // Asked while its readiness was still being checked (an adopted engine, which
                // usually answers at once): a ready engine is restarted the graceful way, with
                // its intent recorded first, from `running`.
                self.want_restart(generation);
                Phase::Running(engine)
            }
            Err(i) => self.interrupted(i, Some(engine), false).await,
        }
    }

    /// Whether `engine` answers within a moment.
    async fn answers_now(&self, engine: &R::Engine) -> bool {
        matches!(
            tokio::time::timeout(Duration::from_millis(500), self.rt.wait_ready(engine)).await,
            Ok(Ok(()))
        )
    }

    async fn running(&mut self, mut engine: R::Engine) -> Phase<R::Engine> {
        self.ready.send_replace(Upstream::Ready);
        self.status.send_modify(|o| o.pid = Some(engine.pid()));
        self.set(TenantState::Running, None);
        if let Some(began) = self.waking_since.take() {
            let took = began.elapsed();
            self.wakes += 1;
            let wakes = self.wakes;
            self.status.send_modify(|o| {
                o.wakes = wakes;
                o.last_wake = Some(took);
                o.wake_durations.observe(took);
            });
            info!(took_ms = took.as_secs_f64() * 1000.0, "tenant woke");
        }
        if self.record.hibernated {
            // Written now, with clients already served: the fsync stays off the wake's path.
            self.record.hibernated = false;
            self.write_record_or_warn("recording the wake").await;
        }
        let since = Instant::now();
        let oom_before = self.rt.oom_kills();
        // When the last client that spoke left (or the engine became ready): idleness counts
        // from here.
        let mut idle_since = Instant::now();
        let mut speaking_before = self.clients.borrow_and_update().speaking;
        let mut clients_gone = false;
        loop {
            self.take_deferred().await;
            // Read here, at every turn, so a close seen while another branch ran still moves
            // the idle clock (never a stale one that hibernates at once).
            let speaking = self.clients.borrow_and_update().speaking;
            if speaking == 0 && speaking_before > 0 {
                idle_since = Instant::now();
            }
            speaking_before = speaking;
            if let Some(generation) = self.wake_wanted.take() {
                // Already awake: only noted.
                self.record.spec.wake_generation = generation;
                self.write_record_or_warn("recording the wake generation")
                    .await;
                self.publish_generations();
            }
            // A requested hibernation waits for the open client connections to close: it never
            // cuts a client off, nor leaves one on a frozen engine.
            if let (Some(generation), 0) = (self.hibernate_wanted, speaking) {
                info!(generation, "hibernate requested");
                self.hibernate_wanted = None;
                match self.hibernate(engine, Some(generation)).await {
                    Ok(phase) => return phase,
                    Err(kept) => {
                        engine = kept;
                        self.hibernate_wanted = Some(generation);
                    }
                }
                continue;
            }
            if let Some(generation) = self.restart_wanted.take() {
                info!(generation, "restart requested");
                self.ready.send_replace(Upstream::Waiting);
                self.set(TenantState::Starting, Some("restart requested".into()));
                // The intent first: an agent that dies from here on finishes this restart, and
                // never does it twice (see `TenantRecord::restarting_from`).
                self.record.spec.restart_generation = generation;
                self.record.restarting_from = Some(engine.pid());
                if let Err(e) = self.rt.write_record(&self.record).await {
                    warn!(error = %e, "recording the restart intent");
                }
                crash_point!("restart.after_intent");
                self.rt.stop(&engine).await;
                crash_point!("restart.after_stop");
                self.failures = 0;
                return Phase::Start { adopt: false };
            }
            let retry_grow = tokio::time::sleep(GROW_RETRY);
            let idle_after = self.record.spec.idle_after.duration();
            let idle_at = match idle_after {
                Some(d) if speaking == 0 => Some(idle_since + d),
                _ => None,
            };
            tokio::select! {
                // A client came, spoke or left: looked at on the next turn.
                changed = self.clients.changed(), if !clients_gone => {
                    clients_gone = changed.is_err();
                }
                () = sleep_until_some(idle_at) => {
                    info!(idle_after = %self.record.spec.idle_after, "no client connection for idle_after: hibernating");
                    match self.hibernate(engine, None).await {
                        Ok(phase) => return phase,
                        Err(kept) => engine = kept,
                    }
                    idle_since = Instant::now();
                }
                exit = engine.exited() => {
                    self.ready.send_replace(Upstream::Waiting);
                    if since.elapsed() >= HEALTHY_AFTER {
                        self.failures = 0;
                    }
                    let reason = if self.rt.oom_kills() > oom_before {
                        format!(
                            "engine OOM-killed at its memory limit ({})",
                            self.record.spec.resources.memory
                        )
                    } else {
                        format!("engine {exit}")
                    };
                    return self.start_failed(reason).await;
                }
                req = self.requests.recv() => match req {
                    Some(Request::Delete) => return Phase::Delete { engine: Some(engine), ready: true },
                    Some(Request::Shutdown { stop_engine }) => return Phase::Exit { engine: Some(engine), ready: true, stop_engine },
                    None => return Phase::Exit { engine: Some(engine), ready: true, stop_engine: false },
                    Some(other) => self.deferred.push(other),
                },
                () = retry_grow, if self.grow_pending => self.try_grow().await,
            }
        }
    }

    /// Counts a failure: kills what is left, then backs off or gives up.
    async fn start_failed(&mut self, reason: String) -> Phase<R::Engine> {
        self.ready.send_replace(Upstream::Waiting);
        // Whatever is left of a failed engine goes before the next try.
        if let Err(e) = self.rt.kill_all().await {
            warn!(error = %e, "cleaning up after the engine");
        }
        self.failures += 1;
        warn!(failures = self.failures, reason = %reason, "engine failed");
        if self.failures >= MAX_FAILURES {
            Phase::Failed(format!("{reason} ({} failures in a row)", self.failures))
        } else {
            Phase::Backoff(reason)
        }
    }

    async fn backoff(&mut self, reason: String) -> Phase<R::Engine> {
        let delay = BACKOFF_START
            .saturating_mul(1 << (self.failures.saturating_sub(1)).min(16))
            .min(BACKOFF_MAX);
        self.set(
            TenantState::Starting,
            Some(format!("restarting after: {reason}")),
        );
        self.status.send_modify(|o| o.pid = None);
        let until = Instant::now() + delay;
        loop {
            self.take_deferred().await;
            if self.restart_wanted.is_some() {
                self.failures = 0;
                // Taken now (see `failed`).
                self.restart_done().await;
                break;
            }
            tokio::select! {
                () = tokio::time::sleep_until(until) => break,
                req = self.requests.recv() => match req {
                    Some(Request::Delete) => return Phase::Delete { engine: None, ready: false },
                    Some(Request::Shutdown { stop_engine }) => return Phase::Exit { engine: None, ready: false, stop_engine },
                    None => return Phase::Exit { engine: None, ready: false, stop_engine: false },
                    Some(other) => self.deferred.push(other),
                },
            }
        }
        self.restarts += 1;
        let restarts = self.restarts;
        self.status.send_modify(|o| o.restarts = restarts);
        Phase::Start { adopt: false }
    }

    async fn failed(&mut self, reason: String) -> Phase<R::Engine> {
        // No engine is coming: clients are closed at once rather than left waiting.
        self.ready.send_replace(Upstream::Down);
        self.waking_since = None;
        if self.record.hibernated {
            // A wake that failed: the next agent must not take it for hibernated.
            self.record.hibernated = false;
            self.write_record_or_warn("recording the failed wake").await;
        }
        self.set(TenantState::Failed, Some(reason));
        self.status.send_modify(|o| o.pid = None);
        loop {
            self.take_deferred().await;
            if self.restart_wanted.is_some() {
                info!("restart requested: starting again from failed");
                self.failures = 0;
                // Taken now, not when an engine is up: a start that fails again backs off and
                // fails as usual instead of retrying at once for the same request.
                self.restart_done().await;
                self.set(TenantState::Starting, Some("restart requested".into()));
                return Phase::Start { adopt: false };
            }
            match self.requests.recv().await {
                Some(Request::Delete) => {
                    return Phase::Delete {
                        engine: None,
                        ready: false,
                    }
                }
                Some(Request::Shutdown { stop_engine }) => {
                    return Phase::Exit {
                        engine: None,
                        ready: false,
                        stop_engine,
                    }
                }
                None => {
                    return Phase::Exit {
                        engine: None,
                        ready: false,
                        stop_engine: false,
                    }
                }
                Some(other) => self.deferred.push(other),
            }
        }
    }

    async fn write_record_or_warn(&self, what: &'static str) {
        if let Err(e) = self.rt.write_record(&self.record).await {
            warn!(error = %e, "{what}");
        }
    }

    fn publish_generations(&self) {
        let (h, w) = (
            self.record.spec.hibernate_generation,
            self.record.spec.wake_generation,
        );
        let mut changed = false;
        self.status.send_modify(|o| {
            changed = (o.hibernate_generation, o.wake_generation) != (h, w);
            o.hibernate_generation = h;
            o.wake_generation = w;
        });
        if changed {
            self.changed.notify_one();
        }
    }

    async fn set_policy(&mut self, idle_after: IdleAfter, mode: HibernateMode) {
        if (idle_after, mode) == (self.record.spec.idle_after, self.record.spec.hibernate) {
            return;
        }
        self.record.spec.idle_after = idle_after;
        self.record.spec.hibernate = mode;
        self.write_record_or_warn("recording the hibernation policy")
            .await;
        info!(%idle_after, %mode, "hibernation policy in force");
    }

    /// Hibernates a running engine. From the first step new clients wait (and will wake it);
    /// a client that spoke in between keeps the engine running instead. Gives the engine back
    /// when it keeps running.
    async fn hibernate(
        &mut self,
        engine: R::Engine,
        generation: Option<u64>,
    ) -> Result<Phase<R::Engine>, R::Engine> {
        self.ready.send_replace(Upstream::Hibernated);
        let clients = *self.clients.borrow();
        if clients.speaking > 0 {
            info!("a client connected as the tenant was to hibernate: it stays awake");
            self.ready.send_replace(Upstream::Ready);
            return Err(engine);
        }
        self.record.hibernated = true;
        if let Some(g) = generation {
            self.record.spec.hibernate_generation = g;
        }
        self.write_record_or_warn("recording the hibernation").await;
        self.publish_generations();
        crash_point!("hibernate.after_intent");
        let mode = self.record.spec.hibernate;
        let frozen = match mode {
            HibernateMode::Stop => {
                self.rt.stop(&engine).await;
                // The page cache of its files stays charged to the cgroup otherwise.
                self.rt.reclaim_memory().await;
                None
            }
            HibernateMode::Freeze => match self.rt.freeze().await {
                Ok(()) => Some(engine),
                Err(e) => {
                    warn!(error = %e, "freezing the engine failed; it keeps running");
                    if let Err(e) = self.rt.thaw().await {
                        warn!(error = %e, "thawing after the failed freeze");
                    }
                    self.record.hibernated = false;
                    self.write_record_or_warn("recording the cancelled hibernation")
                        .await;
                    self.ready.send_replace(Upstream::Ready);
                    return Err(engine);
                }
            },
        };
        crash_point!("hibernate.after_stop");
        self.hibernations += 1;
        let hibernations = self.hibernations;
        self.status.send_modify(|o| o.hibernations = hibernations);
        info!(%mode, "tenant hibernated");
        Ok(self.now_hibernated(frozen, clients.spoke))
    }

    /// Enters `Hibernated`: clients wait and wake the tenant.
    fn now_hibernated(&mut self, frozen: Option<R::Engine>, spoke_at: u64) -> Phase<R::Engine> {
        self.ready.send_replace(Upstream::Hibernated);
        self.status
            .send_modify(|o| o.pid = frozen.as_ref().map(EngineProcess::pid));
        self.set(TenantState::Hibernated, None);
        Phase::Hibernated { frozen, spoke_at }
    }

    /// Hibernated until a client arrives or a wake is asked for.
    async fn hibernated(
        &mut self,
        mut frozen: Option<R::Engine>,
        spoke_at: u64,
    ) -> Phase<R::Engine> {
        loop {
            self.take_deferred().await;
            if self.restart_wanted.is_some() {
                // A restart of a hibernated tenant starts a fresh engine now.
                info!("restart requested while hibernated");
                if frozen.take().is_some() {
                    if let Err(e) = self.rt.kill_all().await {
                        warn!(error = %e, "killing the frozen engine for the restart");
                    }
                }
                self.record.hibernated = false;
                self.failures = 0;
                return Phase::Start { adopt: false };
            }
            if let Some(generation) = self.hibernate_wanted.take() {
                // Already hibernated: only noted.
                self.record.spec.hibernate_generation = generation;
                self.write_record_or_warn("recording the hibernate generation")
                    .await;
                self.publish_generations();
            }
            if let Some(generation) = self.wake_wanted.take() {
                info!(generation, "wake requested");
                self.record.spec.wake_generation = generation;
                self.publish_generations();
                return self.wake(frozen).await;
            }
            let frozen_exit = async {
                match &frozen {
                    Some(engine) => engine.exited().await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                woken = self.clients.wait_for(|c| c.spoke > spoke_at) => match woken {
                    Ok(_) => Asleep::Client,
                    Err(_) => Asleep::ProxyGone,
                },
                exit = frozen_exit => Asleep::FrozenExit(exit),
                req = self.requests.recv() => Asleep::Request(req),
            };
            match event {
                Asleep::Client => return self.wake(frozen).await,
                // The proxy's counters are gone: only the agent's end does that.
                Asleep::ProxyGone | Asleep::Request(None) => {
                    return Phase::Exit {
                        engine: frozen,
                        ready: false,
                        stop_engine: false,
                    }
                }
                Asleep::FrozenExit(exit) => {
                    warn!(%exit, "the frozen engine ended; the next wake starts a new one");
                    frozen = None;
                    // A process started in a frozen cgroup would never run.
                    if let Err(e) = self.rt.thaw().await {
                        warn!(error = %e, "thawing the empty cgroup");
                    }
                    self.status.send_modify(|o| o.pid = None);
                }
                Asleep::Request(Some(Request::Delete)) => {
                    let ready = self.thawed(frozen.is_some()).await;
                    return Phase::Delete {
                        engine: frozen,
                        ready,
                    };
                }
                Asleep::Request(Some(Request::Shutdown { stop_engine })) => {
                    // An agent exiting leaves a frozen engine frozen; stopping it needs a thaw.
                    let ready = stop_engine && self.thawed(frozen.is_some()).await;
                    return Phase::Exit {
                        engine: frozen,
                        ready,
                        stop_engine,
                    };
                }
                Asleep::Request(Some(other)) => self.deferred.push(other),
            }
        }
    }

    /// Thaws a frozen engine so it can handle its stop signal; false if there is none or the
    /// thaw failed (then it is killed rather than stopped).
    async fn thawed(&self, frozen: bool) -> bool {
        if !frozen {
            return false;
        }
        match self.rt.thaw().await {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "thawing the engine to stop it");
                false
            }
        }
    }

    /// Wakes a hibernated tenant: a thaw, or a spawn and a readiness wait (no preparation: the
    /// cgroup, volume and configuration stayed in place). Clients wait meanwhile.
    async fn wake(&mut self, frozen: Option<R::Engine>) -> Phase<R::Engine> {
        self.waking_since = Some(Instant::now());
        self.ready.send_replace(Upstream::Waiting);
        self.set(TenantState::Waking, None);
        if let Some(engine) = frozen {
            return match self.rt.thaw().await {
                Ok(()) => Phase::Running(engine),
                Err(e) => self.start_failed(format!("thawing the engine: {e}")).await,
            };
        }
        match self.rt.spawn_engine(&self.record.spec).await {
            Ok(engine) => self.until_ready(engine).await,
            Err(e) => self.start_failed(e.to_string()).await,
        }
    }

    /// Stops the engine (gracefully only if it is ready to handle its stop signal: an engine
    /// still starting, PID 1 of its namespace without its handlers yet, would ignore it and the
    /// delete would wait out the whole stop timeout), then removes everything, retrying until it
    /// is all gone.
    async fn delete(&mut self, engine: Option<R::Engine>, ready: bool) {
        self.ready.send_replace(Upstream::Down);
        self.set(TenantState::Deleting, None);
        if !self.record.deleting {
            self.record.deleting = true;
            if let Err(e) = self.rt.write_record(&self.record).await {
                // The delete goes on; a crash now would bring the tenant back until the
                // scheduler's delete reaches the next agent.
                warn!(error = %e, "recording the delete intent");
            }
            crash_point!("delete.after_intent");
        }
        match engine {
            Some(e) if ready => self.rt.stop(&e).await,
            _ => {
                if let Err(e) = self.rt.kill_all().await {
                    warn!(error = %e, "killing the tenant's processes");
                }
            }
        }
        crash_point!("delete.after_stop");
        let mut delay = Duration::from_millis(100);
        loop {
            match self.rt.remove().await {
                Ok(()) => break,
                Err(e) => {
                    warn!(error = %e, "removing tenant; will retry");
                    self.set(TenantState::Deleting, Some(e.to_string()));
                    let _ = self.rt.kill_all().await;
                    // An agent shutting down stops retrying: the intent is recorded, and the
                    // next agent finishes the delete.
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        req = self.requests.recv() => {
                            if matches!(req, Some(Request::Shutdown { .. }) | None) {
                                return;
                            }
                        }
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        info!("tenant deleted from this host");
        self.status.send_modify(|o| o.gone = true);
        self.changed.notify_one();
    }

    /// New resources: the record first (the intent), then CPU and memory at once, then the
    /// storage grow, which may have to wait (`resize_pending` says why) without holding the rest.
    async fn resize(&mut self, resources: Resources) {
        if resources == self.record.spec.resources {
            return;
        }
        self.record.spec.resources = resources;
        if let Err(e) = self.rt.write_record(&self.record).await {
            warn!(error = %e, "recording the new resources");
        }
        crash_point!("resize.after_record");
        if let Err(e) = self.rt.apply_limits(&resources).await {
            warn!(error = %e, "applying new CPU and memory limits");
        }
        crash_point!("resize.after_limits");
        info!(cpu = %resources.cpu, memory = %resources.memory, storage = %resources.storage, "tenant resized");
        self.try_grow().await;
    }

    /// Grows the volume to the record's size; on failure the resize stays pending, with why.
    async fn try_grow(&mut self) {
        let storage = self.record.spec.resources.storage;
        match self.rt.grow_storage(storage.0).await {
            Ok(()) => {
                if self.grow_pending {
                    info!(storage = %storage, "storage grow done");
                }
                self.grow_pending = false;
                self.set_resize_pending(None);
            }
            Err(e) => {
                let reason = format!("storage {storage}: {e}");
                if !self.grow_pending {
                    warn!(reason = %reason, "storage grow failed; will retry");
                }
                self.grow_pending = true;
                self.set_resize_pending(Some(reason));
            }
        }
    }

    fn set_resize_pending(&self, pending: Option<String>) {
        let mut changed = false;
        self.status.send_modify(|o| {
            changed = o.resize_pending != pending;
            o.resize_pending = pending;
        });
        if changed {
            self.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
