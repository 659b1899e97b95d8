//! The supervisor's transitions, without root: `FakeRuntime` (a fake, named as one) records the
//! steps asked of it and lets each test decide how the engine behaves. Time is tokio's paused
//! clock, so backoffs and retries pass at once and in order.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{Bytes, MilliCpu, Resources, TenantState};
use tokio::sync::{mpsc, watch, Notify};

use super::{Request, Supervisor, MAX_FAILURES};
use crate::process::Exit;
use crate::proxy::{Clients, Upstream};
use crate::tenant::record::{TenantAssignment, TenantRecord};
use crate::tenant::runtime::{EngineProcess, Runtime};
use crate::tenant::{Observed, TenantError};

/// One engine process of the fake: the test makes it ready or makes it exit.
#[derive(Clone)]
struct FakeEngine {
    pid: i32,
    ready: watch::Sender<bool>,
    exit: watch::Sender<Option<Exit>>,
}

impl FakeEngine {
    fn new(pid: i32) -> Self {
        Self {
            pid,
            ready: watch::channel(false).0,
            exit: watch::channel(None).0,
        }
    }
    fn make_ready(&self) {
        self.ready.send_replace(true);
    }
    fn crash(&self) {
        self.exit
            .send_replace(Some(Exit::Signal(nix::sys::signal::Signal::SIGKILL)));
    }
}

impl EngineProcess for FakeEngine {
    fn pid(&self) -> i32 {
        self.pid
    }
    async fn exited(&self) -> Exit {
        let mut rx = self.exit.subscribe();
        let exit = rx.wait_for(Option::is_some).await.map(|e| *e);
        exit.ok().flatten().unwrap_or(Exit::Unknown)
    }
}

/// What the fake host holds and how it behaves; shared between the test and the runtime.
#[derive(Default)]
struct FakeHost {
    /// Every step asked, in order.
    steps: Vec<String>,
    initialized: bool,
    /// An engine an earlier agent left running.
    running: Option<FakeEngine>,
    /// Engines spawned, in order.
    spawned: Vec<FakeEngine>,
    /// Spawned engines become ready at once unless this is false.
    ready_at_once: bool,
    /// Init waits until the test lets it finish.
    init_blocks: bool,
    /// Errors for the next storage grows, front first; then grows succeed.
    grow_errors: VecDeque<String>,
    /// Errors for the next removals.
    remove_errors: VecDeque<String>,
    /// Errors for the next preparations.
    prepare_errors: VecDeque<String>,
    /// Every record written.
    records: Vec<TenantRecord>,
    limits: Vec<Resources>,
    removed: bool,
    /// The cgroup is frozen.
    frozen: bool,
    /// The next freeze fails.
    freeze_fails: bool,
}

#[derive(Clone)]
struct FakeRuntime(Arc<Mutex<FakeHost>>);

impl FakeRuntime {
    fn host(&self) -> std::sync::MutexGuard<'_, FakeHost> {
        self.0.lock().unwrap()
    }
    fn step(&self, s: &str) {
        self.host().steps.push(s.to_string());
    }
}

fn fail(what: &str) -> TenantError {
    TenantError::Io {
        what: "fake",
        path: what.into(),
        source: std::io::Error::other(what.to_string()),
    }
}

impl Runtime for FakeRuntime {
    type Engine = FakeEngine;

    async fn prepare(&mut self, record: &TenantRecord) -> Result<(), TenantError> {
        self.step("prepare");
        if let Some(e) = self.host().prepare_errors.pop_front() {
            return Err(fail(&e));
        }
        self.host().records.push(record.clone());
        Ok(())
    }
    fn is_initialized(&self) -> bool {
        self.host().initialized
    }
    async fn initialize(&mut self, _spec: &TenantAssignment) -> Result<(), TenantError> {
        self.step("initialize");
        if self.host().init_blocks {
            std::future::pending::<()>().await;
        }
        self.host().initialized = true;
        Ok(())
    }
    fn adopt(&mut self) -> Option<FakeEngine> {
        self.step("adopt");
        self.host().running.clone()
    }
    async fn spawn_engine(&mut self, _spec: &TenantAssignment) -> Result<FakeEngine, TenantError> {
        self.step("spawn");
        let mut host = self.host();
        let engine = FakeEngine::new(100 + i32::try_from(host.spawned.len()).unwrap());
        if host.ready_at_once {
            engine.make_ready();
        }
        host.spawned.push(engine.clone());
        host.running = Some(engine.clone());
        Ok(engine)
    }
    async fn wait_ready(&self, engine: &FakeEngine) -> Result<(), TenantError> {
        let mut ready = engine.ready.subscribe();
        tokio::select! {
            _ = ready.wait_for(|r| *r) => Ok(()),
            exit = engine.exited() => Err(TenantError::ExitedBeforeReady { exit, log_tail: String::new() }),
        }
    }
    async fn stop(&self, engine: &FakeEngine) {
        self.step("stop");
        engine.exit.send_replace(Some(Exit::Code(0)));
        self.host().running = None;
    }
    async fn freeze(&self) -> Result<(), TenantError> {
        self.step("freeze");
        if std::mem::take(&mut self.host().freeze_fails) {
            return Err(fail("freeze"));
        }
        self.host().frozen = true;
        Ok(())
    }
    async fn thaw(&self) -> Result<(), TenantError> {
        // Only a real thaw is a step: thawing what runs does nothing.
        if std::mem::take(&mut self.host().frozen) {
            self.step("thaw");
        }
        Ok(())
    }
    async fn reclaim_memory(&self) {
        self.step("reclaim");
    }
    async fn kill_all(&self) -> Result<usize, TenantError> {
        self.step("kill_all");
        let running = self.host().running.take();
        if let Some(e) = &running {
            e.exit
                .send_replace(Some(Exit::Signal(nix::sys::signal::Signal::SIGKILL)));
        }
        Ok(usize::from(running.is_some()))
    }
    fn oom_kills(&self) -> u64 {
        0
    }
    async fn write_record(&self, record: &TenantRecord) -> Result<(), TenantError> {
        self.host().records.push(record.clone());
        Ok(())
    }
    async fn apply_limits(&mut self, resources: &Resources) -> Result<(), TenantError> {
        self.step("apply_limits");
        self.host().limits.push(*resources);
        Ok(())
    }
    async fn grow_storage(&self, _bytes: u64) -> Result<(), TenantError> {
        match self.host().grow_errors.pop_front() {
            Some(e) => Err(fail(&e)),
            None => Ok(()),
        }
    }
    async fn hand_over(&mut self) {}
    async fn remove(&mut self) -> Result<(), TenantError> {
        self.step("remove");
        if let Some(e) = self.host().remove_errors.pop_front() {
            return Err(fail(&e));
        }
        self.host().removed = true;
        Ok(())
    }
}

/// Never idle unless a test says so: paused time jumps ahead whenever the tenant waits.
fn spec() -> TenantAssignment {
    TenantAssignment {
        idle_after: IdleAfter::Never,
        ..crate::tenant::record::sample_spec("acme", dormant_common::TenantUid::new(7))
    }
}

/// A supervisor running on a fake host.
struct Harness {
    rt: FakeRuntime,
    requests: mpsc::UnboundedSender<Request>,
    status: watch::Receiver<Observed>,
    ready: watch::Receiver<Upstream>,
    /// The proxy's client counts, as the test makes clients come and go.
    clients: watch::Sender<Clients>,
    task: tokio::task::JoinHandle<()>,
}

fn start(host: FakeHost, record: TenantRecord, announced: bool) -> Harness {
    let rt = FakeRuntime(Arc::new(Mutex::new(host)));
    let (requests, rx) = mpsc::unbounded_channel();
    let (status_tx, status) = watch::channel(Observed::initial(
        &record.spec,
        TenantState::Starting,
        announced,
    ));
    let (ready_tx, ready) = watch::channel(Upstream::Waiting);
    let (clients, clients_rx) = watch::channel(Clients::default());
    let sup = Supervisor::new(
        rt.clone(),
        record,
        rx,
        status_tx,
        ready_tx,
        Arc::new(Notify::new()),
        clients_rx,
    );
    let task = tokio::spawn(sup.run());
    Harness {
        rt,
        requests,
        status,
        ready,
        clients,
        task,
    }
}

fn new_tenant() -> Harness {
    start(
        FakeHost {
            ready_at_once: true,
            ..Default::default()
        },
        TenantRecord::new(spec()),
        true,
    )
}

impl Harness {
    async fn wait_state(&mut self, state: TenantState) -> Observed {
        self.status
            .wait_for(|o| o.state == state && o.announced)
            .await
            .unwrap()
            .clone()
    }
    async fn wait_gone(&mut self) {
        self.status.wait_for(|o| o.gone).await.unwrap();
    }
    fn steps(&self) -> Vec<String> {
        self.rt.host().steps.clone()
    }
    fn send(&self, r: Request) {
        self.requests.send(r).unwrap();
    }
    /// A client connects through the proxy.
    fn connect(&self) {
        self.clients.send_modify(|c| {
            c.open += 1;
            c.accepted += 1;
            c.spoke += 1;
            c.speaking += 1;
        });
    }
    /// A client disconnects.
    fn disconnect(&self) {
        self.clients.send_modify(|c| {
            c.open -= 1;
            c.speaking -= 1;
        });
    }
    /// Lets the supervisor run until it waits for something.
    async fn settle(&self) {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_tenant_is_prepared_initialised_spawned_and_running_once_ready() {
    let mut h = start(
        FakeHost::default(), // not ready at once
        TenantRecord::new(spec()),
        true,
    );
    h.wait_state(TenantState::Starting).await;
    h.settle().await;
    assert_eq!(h.steps(), ["adopt", "prepare", "initialize", "spawn"]);
    // Spawned, not ready: no client is let through and it is not reported running.
    assert_eq!(*h.ready.borrow(), Upstream::Waiting);
    assert_eq!(h.status.borrow().state, TenantState::Starting);
    let engine = h.rt.host().spawned[0].clone();
    engine.make_ready();
    let o = h.wait_state(TenantState::Running).await;
    assert_eq!(o.pid, Some(100));
    assert_eq!(*h.ready.borrow(), Upstream::Ready);
    // The record was written (by prepare) before anything else happened.
    assert_eq!(h.rt.host().records[0], TenantRecord::new(spec()));
}

#[tokio::test(start_paused = true)]
async fn a_resumed_tenant_with_its_engine_alive_is_adopted_and_never_reported_starting() {
    let engine = FakeEngine::new(42);
    let mut h = start(
        FakeHost {
            initialized: true,
            running: Some(engine.clone()),
            ..Default::default()
        },
        TenantRecord::new(spec()),
        false,
    );
    h.settle().await;
    // Until the adopted engine answers, nothing is announced.
    assert!(!h.status.borrow().announced);
    engine.make_ready();
    let o = h.wait_state(TenantState::Running).await;
    assert_eq!(o.pid, Some(42));
    assert_eq!(h.steps(), ["adopt", "prepare"]);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_tenant_whose_engine_died_is_started_and_says_so() {
    let mut h = start(
        FakeHost {
            initialized: true,
            ready_at_once: true,
            ..Default::default()
        },
        TenantRecord::new(spec()),
        false,
    );
    // Nothing starts before the scheduler's desired set has come: it may say delete.
    h.settle().await;
    assert_eq!(h.steps(), ["adopt", "prepare"]);
    h.send(Request::DesiredSetHeard);
    h.wait_state(TenantState::Running).await;
    assert_eq!(h.steps(), ["adopt", "prepare", "spawn"]);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_tenant_whose_engine_died_and_that_the_scheduler_deleted_never_starts() {
    let mut h = start(
        FakeHost {
            initialized: true,
            ready_at_once: true,
            ..Default::default()
        },
        TenantRecord::new(spec()),
        false,
    );
    h.settle().await;
    // The desired set's delete goes before its "heard".
    h.send(Request::Delete);
    h.send(Request::DesiredSetHeard);
    h.wait_gone().await;
    assert!(!h.steps().contains(&"spawn".to_string()), "{:?}", h.steps());
}

#[tokio::test(start_paused = true)]
async fn a_resumed_tenant_whose_engine_died_starts_anyway_when_the_scheduler_stays_silent() {
    let began = tokio::time::Instant::now();
    let mut h = start(
        FakeHost {
            initialized: true,
            ready_at_once: true,
            ..Default::default()
        },
        TenantRecord::new(spec()),
        false,
    );
    h.wait_state(TenantState::Running).await;
    assert!(began.elapsed() >= super::UNHEARD_START_WAIT);
    assert_eq!(h.steps(), ["adopt", "prepare", "spawn"]);
}

#[tokio::test(start_paused = true)]
async fn a_crashing_engine_restarts_with_backoff_then_fails_after_max_failures() {
    let mut h = new_tenant();
    h.wait_state(TenantState::Running).await;
    for n in 1..=MAX_FAILURES {
        let engine = h.rt.host().spawned.last().unwrap().clone();
        engine.crash();
        if n < MAX_FAILURES {
            let o = h
                .status
                .wait_for(|o| o.state == TenantState::Running && o.restarts == u64::from(n))
                .await
                .unwrap()
                .clone();
            assert_eq!(o.pid, Some(100 + i32::try_from(n).unwrap()));
        }
    }
    let o = h.wait_state(TenantState::Failed).await;
    let reason = o.reason.unwrap();
    assert!(reason.contains("killed by SIGKILL"), "{reason}");
    // Clients of a failed tenant are closed at once, not left waiting for no engine.
    assert_eq!(*h.ready.borrow(), Upstream::Down);
    assert!(reason.contains("5 failures in a row"), "{reason}");
    assert_eq!(h.rt.host().spawned.len(), MAX_FAILURES as usize);
    // Each failure cleaned the cgroup before the next try.
    let kills = h.steps().iter().filter(|s| *s == "kill_all").count();
    assert_eq!(kills, MAX_FAILURES as usize);
}

#[tokio::test(start_paused = true)]
async fn restart_brings_a_failed_tenant_back_and_records_the_generation() {
    let mut h = new_tenant();
    h.wait_state(TenantState::Running).await;
    for _ in 0..MAX_FAILURES {
        let engine = h.rt.host().spawned.last().unwrap().clone();
        engine.crash();
        h.settle().await;
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    }
    h.wait_state(TenantState::Failed).await;
    let spawned = h.rt.host().spawned.len();
    h.send(Request::Restart(1));
    let o = h.wait_state(TenantState::Running).await;
    assert_eq!(o.restart_generation, 1);
    assert_eq!(h.rt.host().spawned.len(), spawned + 1);
    let last = h.rt.host().records.last().unwrap().clone();
    assert_eq!(last.spec.restart_generation, 1);
    // An old generation asks for nothing.
    h.send(Request::Restart(1));
    h.settle().await;
    assert_eq!(h.rt.host().spawned.len(), spawned + 1);
}

#[tokio::test(start_paused = true)]
async fn restart_of_a_running_engine_stops_it_gracefully_and_starts_a_new_one() {
    let mut h = new_tenant();
    h.wait_state(TenantState::Running).await;
    h.send(Request::Restart(3));
    h.status
        .wait_for(|o| o.state == TenantState::Running && o.restart_generation == 3)
        .await
        .unwrap();
    let steps = h.steps();
    let stop = steps.iter().position(|s| s == "stop").expect("stopped");
    assert_eq!(steps[stop + 1..], ["prepare", "spawn"]);
    assert_eq!(h.status.borrow().pid, Some(101));
}

#[tokio::test(start_paused = true)]
async fn delete_of_a_ready_engine_stops_it_gracefully_then_removes_everything() {
    let mut h = new_tenant();
    h.wait_state(TenantState::Running).await;
    h.send(Request::Delete);
    h.wait_gone().await;
    let steps = h.steps();
    assert_eq!(steps[steps.len() - 2..], ["stop", "remove"]);
    // The intent was recorded before anything was removed.
    assert!(h.rt.host().records.last().unwrap().deleting);
    assert!(h.rt.host().removed);
}

#[tokio::test(start_paused = true)]
async fn delete_of_an_engine_not_ready_yet_kills_it_instead_of_waiting() {
    let mut h = start(FakeHost::default(), TenantRecord::new(spec()), true);
    h.wait_state(TenantState::Starting).await;
    h.settle().await;
    assert_eq!(h.rt.host().spawned.len(), 1);
    h.send(Request::Delete);
    h.wait_gone().await;
    let steps = h.steps();
    assert!(!steps.contains(&"stop".to_string()), "{steps:?}");
    assert_eq!(steps[steps.len() - 2..], ["kill_all", "remove"]);
}

#[tokio::test(start_paused = true)]
async fn delete_during_init_kills_the_init_and_never_starts_the_engine() {
    let mut h = start(
        FakeHost {
            init_blocks: true,
            ..Default::default()
        },
        TenantRecord::new(spec()),
        true,
    );
    h.wait_state(TenantState::Starting).await;
    h.settle().await;
    assert_eq!(h.steps().last().unwrap(), "initialize");
    h.send(Request::Delete);
    h.wait_gone().await;
    assert_eq!(
        h.steps(),
        ["adopt", "prepare", "initialize", "kill_all", "remove"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_delete_under_way_when_the_agent_died_is_finished_without_starting_anything() {
    let mut record = TenantRecord::new(spec());
    record.deleting = true;
    let mut h = start(
        FakeHost {
            initialized: true,
            ..Default::default()
        },
        record,
        true,
    );
    h.wait_gone().await;
    assert_eq!(h.steps(), ["kill_all", "remove"]);
}

#[tokio::test(start_paused = true)]
async fn removal_is_retried_until_everything_is_gone() {
    let mut h = start(
        FakeHost {
            ready_at_once: true,
            remove_errors: VecDeque::from(["busy".to_string(), "still busy".to_string()]),
            ..Default::default()
        },
        TenantRecord::new(spec()),
        true,
    );
    h.wait_state(TenantState::Running).await;
    h.send(Request::Delete);
    h.wait_gone().await;
    assert_eq!(h.steps().iter().filter(|s| *s == "remove").count(), 3);
}

#[tokio::test(start_paused = true)]
async fn resize_applies_cpu_and_memory_at_once_even_when_the_storage_grow_must_wait() {
    let mut h = start(
        FakeHost {
            ready_at_once: true,
            ..Default::default()
        },
        TenantRecord::new(spec()),
        true,
    );
    h.wait_state(TenantState::Running).await;
    h.rt.host().grow_errors = VecDeque::from(["resize2fs: Permission denied".to_string()]);
    let bigger = Resources {
        cpu: MilliCpu(1500),
        memory: Bytes(512 << 20),
        storage: Bytes(2 << 30),
    };
    h.send(Request::Resize(bigger));
    let o = h
        .status
        .wait_for(|o| o.resize_pending.is_some())
        .await
        .unwrap()
        .clone();
    let pending = o.resize_pending.unwrap();
    assert!(pending.contains("Permission denied"), "{pending}");
    assert!(pending.contains("storage 2GiB"), "{pending}");
    assert_eq!(h.rt.host().limits, [bigger]);
    // The new resources were recorded (the intent) before they were applied.
    assert_eq!(h.rt.host().records.last().unwrap().spec.resources, bigger);
    // The engine was not restarted, and the grow is retried until it lands.
    assert_eq!(h.rt.host().spawned.len(), 1);
    h.status
        .wait_for(|o| o.resize_pending.is_none())
        .await
        .unwrap();
    assert_eq!(h.status.borrow().state, TenantState::Running);
}

#[tokio::test(start_paused = true)]
async fn shutdown_leaves_the_engine_running() {
    let mut h = new_tenant();
    h.wait_state(TenantState::Running).await;
    h.send(Request::Shutdown { stop_engine: false });
    let steps = {
        let rt = h.rt.clone();
        h.task.await.unwrap();
        let steps = rt.host().steps.clone();
        steps
    };
    assert!(
        !steps.iter().any(|s| s == "stop" || s == "kill_all"),
        "{steps:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failing_preparation_never_kills_an_adopted_engine() {
    let engine = FakeEngine::new(42);
    engine.make_ready();
    let mut h = start(
        FakeHost {
            initialized: true,
            running: Some(engine.clone()),
            prepare_errors: VecDeque::from(["disk full".to_string(), "disk full".to_string()]),
            ..Default::default()
        },
        TenantRecord::new(spec()),
        false,
    );
    let o = h
        .status
        .wait_for(|o| o.announced && o.reason.is_some())
        .await
        .unwrap()
        .clone();
    assert!(o.reason.unwrap().contains("disk full"));
    let o = h.wait_state(TenantState::Running).await;
    assert_eq!(o.pid, Some(42));
    let steps = h.steps();
    assert!(
        !steps.iter().any(|s| s == "kill_all" || s == "stop"),
        "{steps:?}"
    );
    assert_eq!(steps.iter().filter(|s| *s == "prepare").count(), 3);
}

/// A record of restart 1 under way, replacing the engine with `pid`.
fn restarting_from(pid: i32) -> TenantRecord {
    let mut record = TenantRecord::new(spec());
    record.spec.restart_generation = 1;
    record.restarting_from = Some(pid);
    record
}

/// The agent died during a restart, before the old engine stopped: the restart is finished,
/// once.
#[tokio::test(start_paused = true)]
async fn a_restart_interrupted_before_the_stop_is_finished_once() {
    let old = FakeEngine::new(42);
    old.make_ready();
    let record = restarting_from(42);
    let mut h = start(
        FakeHost {
            initialized: true,
            ready_at_once: true,
            running: Some(old),
            ..Default::default()
        },
        record,
        false,
    );
    let o = h.wait_state(TenantState::Running).await;
    assert_eq!(o.pid, Some(100));
    assert_eq!(h.steps(), ["adopt", "stop", "prepare", "spawn"]);
    let last = h.rt.host().records.last().unwrap().clone();
    assert_eq!(last.restarting_from, None);
    assert_eq!(last.spec.restart_generation, 1);
    // The desired set still says generation 1: nothing more happens.
    h.send(Request::Restart(1));
    h.settle().await;
    assert_eq!(h.rt.host().spawned.len(), 1);
}

/// The agent died during a restart after the new engine started: it is adopted, not restarted
/// again.
#[tokio::test(start_paused = true)]
async fn a_restart_interrupted_after_the_new_engine_started_is_not_done_twice() {
    let new = FakeEngine::new(43);
    new.make_ready();
    let record = restarting_from(42);
    let mut h = start(
        FakeHost {
            initialized: true,
            running: Some(new),
            ..Default::default()
        },
        record,
        false,
    );
    let o = h.wait_state(TenantState::Running).await;
    assert_eq!(o.pid, Some(43));
    assert_eq!(h.steps(), ["adopt", "prepare"]);
    assert_eq!(h.rt.host().records.last().unwrap().restarting_from, None);
}

/// An agent told to stop its engines on exit kills one that is not ready instead of signalling
/// it (it may not have its handlers yet).
#[tokio::test(start_paused = true)]
async fn stopping_on_exit_kills_an_engine_that_is_not_ready() {
    let h = start(FakeHost::default(), TenantRecord::new(spec()), true);
    h.settle().await;
    assert_eq!(h.rt.host().spawned.len(), 1);
    h.send(Request::Shutdown { stop_engine: true });
    let rt = h.rt.clone();
    h.task.await.unwrap();
    let steps = rt.host().steps.clone();
    assert_eq!(
        steps.last().map(String::as_str),
        Some("kill_all"),
        "{steps:?}"
    );
    assert!(!steps.iter().any(|s| s == "stop"), "{steps:?}");
}

/// An engine that takes longer than the notice to be ready is reported so, and not killed.
#[tokio::test(start_paused = true)]
async fn a_slow_engine_is_reported_not_killed() {
    let mut h = start(
        FakeHost {
            initialized: true,
            ..Default::default()
        },
        TenantRecord::new(spec()),
        true,
    );
    let o = h
        .status
        .wait_for(|o| {
            o.reason
                .as_deref()
                .is_some_and(|r| r.contains("not ready after"))
        })
        .await
        .unwrap()
        .clone();
    assert_eq!(o.state, TenantState::Starting);
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    assert!(!h.steps().iter().any(|s| s == "kill_all"));
    h.rt.host().spawned[0].make_ready();
    h.wait_state(TenantState::Running).await;
}

/// An engine that does not become ready is no trap: `tenant restart` kills it (never signals it)
/// and starts a new one, at the generation asked for.
#[tokio::test(start_paused = true)]
async fn restart_of_an_engine_that_never_becomes_ready_starts_a_new_one() {
    let mut h = start(FakeHost::default(), TenantRecord::new(spec()), true);
    h.wait_state(TenantState::Starting).await;
    h.settle().await;
    assert_eq!(h.rt.host().spawned.len(), 1);
    h.send(Request::Restart(1));
    h.status
        .wait_for(|o| o.restart_generation == 1)
        .await
        .unwrap();
    h.settle().await;
    assert_eq!(h.rt.host().spawned.len(), 2);
    let steps = h.steps();
    assert!(!steps.iter().any(|s| s == "stop"), "{steps:?}");
    assert_eq!(
        h.rt.host().records.last().unwrap().spec.restart_generation,
        1
    );
}

/// An adopted engine that stays unready is reported once the notice passes, not left showing
/// whatever the scheduler last heard.
#[tokio::test(start_paused = true)]
async fn a_slow_adopted_engine_is_reported() {
    let engine = FakeEngine::new(42);
    let h = start(
        FakeHost {
            initialized: true,
            running: Some(engine),
            ..Default::default()
        },
        TenantRecord::new(spec()),
        false,
    );
    let mut status = h.status.clone();
    let o = status.wait_for(|o| o.announced).await.unwrap().clone();
    assert_eq!(o.state, TenantState::Starting);
    assert!(o.reason.unwrap().contains("not ready after"));
}

/// A tenant that hibernates after `idle` without clients, in `mode`.
fn idle_tenant(idle: u64, mode: HibernateMode) -> Harness {
    let spec = TenantAssignment {
        idle_after: IdleAfter::After(std::time::Duration::from_secs(idle)),
        hibernate: mode,
        ..spec()
    };
    start(
        FakeHost {
            ready_at_once: true,
            ..Default::default()
        },
        TenantRecord::new(spec),
        true,
    )
}

#[tokio::test(start_paused = true)]
async fn an_idle_tenant_hibernates_by_stopping_its_engine_and_a_client_wakes_it() {
    let mut h = idle_tenant(30, HibernateMode::Stop);
    h.wait_state(TenantState::Running).await;
    let began = tokio::time::Instant::now();
    let o = h.wait_state(TenantState::Hibernated).await;
    assert_eq!(began.elapsed().as_secs(), 30, "hibernated after idle_after");
    assert_eq!((o.hibernations, o.pid), (1, None));
    assert_eq!(*h.ready.borrow(), Upstream::Hibernated);
    let steps = h.steps();
    assert_eq!(steps[steps.len() - 2..], ["stop", "reclaim"]);
    // The intent was recorded before the engine stopped.
    assert!(h.rt.host().records.last().unwrap().hibernated);
    // A client arrives: the engine is spawned (nothing prepared again) and the client served.
    h.connect();
    let o = h.wait_state(TenantState::Running).await;
    assert_eq!((o.wakes, o.pid), (1, Some(101)));
    assert!(o.last_wake.is_some());
    assert_eq!(*h.ready.borrow(), Upstream::Ready);
    let steps = h.steps();
    assert_eq!(steps[steps.len() - 3..], ["stop", "reclaim", "spawn"]);
    assert!(!h.rt.host().records.last().unwrap().hibernated);
}

#[tokio::test(start_paused = true)]
async fn an_open_connection_keeps_a_tenant_awake_and_idleness_counts_from_its_close() {
    let mut h = idle_tenant(30, HibernateMode::Stop);
    h.wait_state(TenantState::Running).await;
    h.connect();
    h.settle().await;
    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    assert_eq!(h.status.borrow().state, TenantState::Running);
    let closed = tokio::time::Instant::now();
    h.disconnect();
    h.wait_state(TenantState::Hibernated).await;
    assert_eq!(closed.elapsed().as_secs(), 30);
}

#[tokio::test(start_paused = true)]
async fn a_tenant_with_idle_after_never_stays_awake_but_hibernates_when_asked() {
    let mut h = new_tenant();
    h.wait_state(TenantState::Running).await;
    tokio::time::sleep(std::time::Duration::from_secs(24 * 3600)).await;
    assert_eq!(h.status.borrow().state, TenantState::Running);
    h.send(Request::Hibernate(1));
    let o = h.wait_state(TenantState::Hibernated).await;
    assert_eq!(o.hibernate_generation, 1);
    assert_eq!(
        h.rt.host()
            .records
            .last()
            .unwrap()
            .spec
            .hibernate_generation,
        1
    );
    // An old generation asks for nothing; a wake wakes it without a client.
    h.send(Request::Hibernate(1));
    h.send(Request::Wake(1));
    let o = h.wait_state(TenantState::Running).await;
    assert_eq!((o.wakes, o.wake_generation), (1, 1));
    assert_eq!(h.rt.host().spawned.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn freeze_mode_freezes_and_thaws_the_same_engine() {
    let mut h = idle_tenant(5, HibernateMode::Freeze);
    h.wait_state(TenantState::Running).await;
    let o = h.wait_state(TenantState::Hibernated).await;
    // The engine is kept (frozen), not stopped.
    assert_eq!(o.pid, Some(100));
    assert!(h.rt.host().frozen);
    assert!(!h.steps().contains(&"stop".to_string()));
    h.connect();
    let o = h.wait_state(TenantState::Running).await;
    assert_eq!((o.pid, o.wakes), (Some(100), 1));
    assert_eq!(h.rt.host().spawned.len(), 1);
    let steps = h.steps();
    assert_eq!(steps[steps.len() - 2..], ["freeze", "thaw"]);
}

#[tokio::test(start_paused = true)]
async fn a_freeze_that_fails_leaves_the_engine_running_and_serving() {
    let mut h = idle_tenant(5, HibernateMode::Freeze);
    h.rt.host().freeze_fails = true;
    h.wait_state(TenantState::Running).await;
    h.settle().await;
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    h.settle().await;
    assert!(h.steps().contains(&"freeze".to_string()));
    assert_eq!(h.status.borrow().state, TenantState::Running);
    assert_eq!(*h.ready.borrow(), Upstream::Ready);
    assert!(!h.rt.host().records.last().unwrap().hibernated);
    // The next idle period tries again, and succeeds.
    h.wait_state(TenantState::Hibernated).await;
}

#[tokio::test(start_paused = true)]
async fn a_wake_that_cannot_start_the_engine_ends_failed_and_closes_waiting_clients() {
    let mut h = idle_tenant(5, HibernateMode::Stop);
    h.wait_state(TenantState::Running).await;
    h.wait_state(TenantState::Hibernated).await;
    // From now on every engine dies before it is ready.
    h.rt.host().ready_at_once = false;
    h.connect();
    h.wait_state(TenantState::Waking).await;
    for _ in 0..MAX_FAILURES {
        h.settle().await;
        if let Some(e) = h.rt.host().spawned.last() {
            e.crash();
        }
        h.settle().await;
        tokio::time::sleep(std::time::Duration::from_secs(31)).await;
    }
    let o = h.wait_state(TenantState::Failed).await;
    assert!(o.reason.unwrap().contains("before it was ready"));
    assert_eq!(*h.ready.borrow(), Upstream::Down, "waiting clients closed");
    // A later agent does not take it for hibernated.
    assert!(!h.rt.host().records.last().unwrap().hibernated);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_hibernated_tenant_stays_hibernated_until_a_client_comes() {
    let mut record = TenantRecord::new(spec());
    record.hibernated = true;
    let mut h = start(
        FakeHost {
            initialized: true,
            ready_at_once: true,
            ..Default::default()
        },
        record,
        false,
    );
    h.wait_state(TenantState::Hibernated).await;
    assert_eq!(h.steps(), ["adopt", "prepare"]);
    assert_eq!(*h.ready.borrow(), Upstream::Hibernated);
    h.connect();
    h.wait_state(TenantState::Running).await;
    assert_eq!(h.steps(), ["adopt", "prepare", "spawn"]);
}

#[tokio::test(start_paused = true)]
async fn a_resumed_frozen_tenant_stays_frozen_and_a_resumed_running_one_is_thawed() {
    let engine = FakeEngine::new(42);
    engine.make_ready();
    let mut record = TenantRecord::new(TenantAssignment {
        hibernate: HibernateMode::Freeze,
        ..spec()
    });
    record.hibernated = true;
    let mut h = start(
        FakeHost {
            initialized: true,
            running: Some(engine.clone()),
            frozen: true,
            ..Default::default()
        },
        record.clone(),
        false,
    );
    let o = h.wait_state(TenantState::Hibernated).await;
    assert_eq!(o.pid, Some(42));
    assert_eq!(h.steps(), ["adopt", "prepare", "freeze"]);
    // Not recorded hibernated, yet frozen (an operator's doing): thawed, never left waiting.
    record.hibernated = false;
    let mut h = start(
        FakeHost {
            initialized: true,
            running: Some(engine),
            frozen: true,
            ..Default::default()
        },
        record,
        false,
    );
    h.wait_state(TenantState::Running).await;
    assert_eq!(h.steps(), ["adopt", "prepare", "thaw"]);
}

#[tokio::test(start_paused = true)]
async fn delete_of_a_frozen_tenant_thaws_it_then_stops_and_removes_it() {
    let mut h = idle_tenant(5, HibernateMode::Freeze);
    h.wait_state(TenantState::Hibernated).await;
    h.send(Request::Delete);
    h.wait_gone().await;
    let steps = h.steps();
    assert_eq!(
        steps[steps.len() - 4..],
        ["freeze", "thaw", "stop", "remove"]
    );
}

#[tokio::test(start_paused = true)]
async fn restart_of_a_hibernated_tenant_starts_a_fresh_engine() {
    let mut h = idle_tenant(5, HibernateMode::Stop);
    h.wait_state(TenantState::Hibernated).await;
    h.send(Request::Restart(1));
    let o = h
        .status
        .wait_for(|o| o.state == TenantState::Running && o.restart_generation == 1)
        .await
        .unwrap()
        .clone();
    assert_eq!(o.pid, Some(101));
    assert!(!h.rt.host().records.last().unwrap().hibernated);
}

#[tokio::test(start_paused = true)]
async fn a_policy_change_takes_effect_on_a_running_tenant() {
    let mut h = new_tenant();
    h.wait_state(TenantState::Running).await;
    h.send(Request::Policy {
        idle_after: IdleAfter::After(std::time::Duration::from_secs(2)),
        mode: HibernateMode::Freeze,
    });
    h.wait_state(TenantState::Hibernated).await;
    assert!(h.rt.host().frozen);
    let last = h.rt.host().records.last().unwrap().clone();
    assert_eq!(last.spec.hibernate, HibernateMode::Freeze);
}

#[tokio::test(start_paused = true)]
async fn a_requested_hibernation_waits_for_open_clients_to_leave() {
    let mut h = new_tenant();
    h.wait_state(TenantState::Running).await;
    h.connect();
    h.send(Request::Hibernate(1));
    h.settle().await;
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    assert_eq!(h.status.borrow().state, TenantState::Running);
    h.disconnect();
    let o = h.wait_state(TenantState::Hibernated).await;
    assert_eq!(o.hibernate_generation, 1);
}

#[tokio::test(start_paused = true)]
async fn a_silent_connection_neither_keeps_a_tenant_awake_nor_wakes_it() {
    let mut h = idle_tenant(30, HibernateMode::Stop);
    h.wait_state(TenantState::Running).await;
    // A TCP probe: connected, never a byte.
    h.clients.send_modify(|c| {
        c.open += 1;
        c.accepted += 1;
    });
    h.wait_state(TenantState::Hibernated).await;
    h.clients.send_modify(|c| {
        c.open += 1;
        c.accepted += 1;
    });
    h.settle().await;
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    assert_eq!(h.status.borrow().state, TenantState::Hibernated);
}

#[tokio::test(start_paused = true)]
async fn a_hibernation_cut_short_by_an_agent_restart_is_finished() {
    let engine = FakeEngine::new(42);
    engine.make_ready();
    let mut record = TenantRecord::new(spec());
    record.hibernated = true;
    let mut h = start(
        FakeHost {
            initialized: true,
            running: Some(engine),
            ..Default::default()
        },
        record,
        false,
    );
    let o = h.wait_state(TenantState::Hibernated).await;
    assert_eq!(o.pid, None);
    assert_eq!(h.steps(), ["adopt", "prepare", "stop", "reclaim"]);
}

#[tokio::test(start_paused = true)]
async fn a_restart_asked_while_an_adopted_engine_is_checked_is_graceful_if_it_answers() {
    let engine = FakeEngine::new(42);
    let mut h = start(
        FakeHost {
            initialized: true,
            running: Some(engine.clone()),
            ready_at_once: true,
            ..Default::default()
        },
        TenantRecord::new(spec()),
        false,
    );
    h.settle().await;
    h.send(Request::Restart(1));
    h.settle().await;
    // It answers within the moment the supervisor gives it: stopped gracefully, intent first.
    engine.make_ready();
    h.status
        .wait_for(|o| o.state == TenantState::Running && o.restart_generation == 1)
        .await
        .unwrap();
    let steps = h.steps();
    assert!(steps.contains(&"stop".to_string()), "{steps:?}");
    assert!(h
        .rt
        .host()
        .records
        .iter()
        .any(|r| r.restarting_from == Some(42)));
}
