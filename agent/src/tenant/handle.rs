//! The reconciler's handle on one tenant's task: requests go in (delete, restart, resize,
//! shutdown), the observed state comes out, and usage is read from the cgroup and the volume
//! without asking the task. Nothing here blocks: the work happens in the task.

use std::sync::Arc;

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{Resources, TenantState};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::record::{TenantAssignment, TenantRecord};
use super::runtime::HostRuntime;
use super::supervisor::{Request, Supervisor};
use super::Observed;
use crate::cgroup::{TenantCgroup, Usage};
use crate::host::Host;
use crate::proxy::{ProxyStats, Traffic};

#[derive(Debug)]
pub struct TenantHandle {
    /// The spec as last asked of the task (resources and restart generation included).
    pub spec: TenantAssignment,
    pub status: watch::Receiver<Observed>,
    requests: mpsc::UnboundedSender<Request>,
    task: JoinHandle<()>,
    cgroup: Box<dyn TenantCgroup>,
    volume: crate::volume::Volume,
    deleting: bool,
    proxy: Arc<ProxyStats>,
}

impl TenantHandle {
    /// A tenant new to this host (from the desired set).
    pub fn create(host: Arc<Host>, spec: TenantAssignment) -> Self {
        Self::start(host, TenantRecord::new(spec), true)
    }

    /// A tenant whose record an earlier agent left: its engine is adopted if it still runs, an
    /// operation under way (a delete) is finished.
    pub fn resume(host: Arc<Host>, record: TenantRecord) -> Self {
        Self::start(host, record, false)
    }

    fn start(host: Arc<Host>, record: TenantRecord, announced: bool) -> Self {
        let spec = record.spec.clone();
        let deleting = record.deleting;
        let state = if deleting {
            TenantState::Deleting
        } else {
            TenantState::Starting
        };
        let (status_tx, status) =
            watch::channel(Observed::initial(&spec, state, announced || deleting));
        let (requests, rx) = mpsc::unbounded_channel();
        let (ready, ready_rx) = watch::channel(crate::proxy::Upstream::Waiting);
        let proxy = Arc::new(ProxyStats::default());
        let runtime = HostRuntime::new(host.clone(), &spec, ready_rx, proxy.clone());
        let supervisor = Supervisor::new(
            runtime,
            record,
            rx,
            status_tx,
            ready,
            host.changed.clone(),
            proxy.clients(),
        );
        let span = tracing::info_span!("tenant", tenant_id = %spec.name, uid = spec.uid.get());
        let task = tokio::spawn(tracing::Instrument::instrument(supervisor.run(), span));
        Self {
            cgroup: host.cgroups.tenant(&spec.name),
            volume: host.paths(&spec.name, spec.uid).volume(),
            spec,
            status,
            requests,
            task,
            deleting,
            proxy,
        }
    }

    pub fn delete(&mut self) {
        if !self.deleting {
            self.deleting = true;
            let _ = self.requests.send(Request::Delete);
        }
    }

    /// Tells the task the scheduler's desired set has come (see `Request::DesiredSetHeard`).
    pub fn desired_set_heard(&self) {
        let _ = self.requests.send(Request::DesiredSetHeard);
    }

    pub fn is_deleting(&self) -> bool {
        self.deleting
    }

    /// Restarts the engine once for `generation` (ignored unless it is newer).
    pub fn restart(&mut self, generation: u64) {
        if generation > self.spec.restart_generation && !self.deleting {
            self.spec.restart_generation = generation;
            let _ = self.requests.send(Request::Restart(generation));
        }
    }

    /// A new hibernation policy, in force from the next idle check.
    pub fn set_policy(&mut self, idle_after: IdleAfter, mode: HibernateMode) {
        if (idle_after, mode) != (self.spec.idle_after, self.spec.hibernate) && !self.deleting {
            self.spec.idle_after = idle_after;
            self.spec.hibernate = mode;
            let _ = self.requests.send(Request::Policy { idle_after, mode });
        }
    }

    /// Hibernates now, once for `generation` (ignored unless it is newer).
    pub fn hibernate(&mut self, generation: u64) {
        if generation > self.spec.hibernate_generation && !self.deleting {
            self.spec.hibernate_generation = generation;
            let _ = self.requests.send(Request::Hibernate(generation));
        }
    }

    /// Wakes now, once for `generation` (ignored unless it is newer).
    pub fn wake(&mut self, generation: u64) {
        if generation > self.spec.wake_generation && !self.deleting {
            self.spec.wake_generation = generation;
            let _ = self.requests.send(Request::Wake(generation));
        }
    }

    /// The proxy's counters and open connections.
    pub fn traffic(&self) -> Traffic {
        self.proxy.traffic()
    }

    /// New resources, applied by the task in place (the engine keeps running).
    pub fn resize(&mut self, resources: Resources) {
        if resources != self.spec.resources && !self.deleting {
            self.spec.resources = resources;
            let _ = self.requests.send(Request::Resize(resources));
        }
    }

    /// True once a delete has removed everything, or the task has ended.
    pub fn is_finished(&self) -> bool {
        self.status.borrow().gone || self.task.is_finished()
    }

    pub fn observed(&self) -> Observed {
        self.status.borrow().clone()
    }

    pub fn usage(&self) -> Option<Usage> {
        self.cgroup.usage().ok()
    }

    /// Bytes used on the tenant's volume (`None` while it is not mounted).
    pub fn volume_used_bytes(&self) -> Option<u64> {
        self.volume.usage().map(|u| u.used_bytes)
    }

    /// Ends the task without deleting anything; the engine keeps running unless `stop_engine`.
    pub async fn shutdown(self, stop_engine: bool) {
        let _ = self.requests.send(Request::Shutdown { stop_engine });
        let _ = self.task.await;
    }
}
