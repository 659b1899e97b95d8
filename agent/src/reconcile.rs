//! Level-triggered reconciliation: compare the desired set the scheduler last sent with the
//! tenants this host runs, and act on the difference. `plan` is pure and carries the tests;
//! `Tenants` executes the plan through tenant tasks.

use std::collections::BTreeMap;
use std::sync::Arc;

use dormant_common::{Resources, TenantName};
use tracing::info;

use crate::host::Host;
use crate::tenant::{TenantHandle, TenantSpec};

/// What the scheduler wants for one tenant on this node.
#[derive(Debug, Clone, PartialEq)]
pub enum Want {
    Running(TenantSpec),
    Deleted { uid: u64 },
}

/// The scheduler's desired set for this node, as of `version`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    pub version: u64,
    pub tenants: BTreeMap<TenantName, Want>,
}

/// What runs here, as far as planning cares.
#[derive(Debug, Clone, PartialEq)]
pub struct Present {
    pub uid: u64,
    pub deleting: bool,
    pub resources: Resources,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start(TenantSpec),
    Delete(TenantName),
    /// New resources for a running tenant (applied in place).
    Resize(TenantName, Resources),
}

/// The actions that move `present` towards `desired`.
pub fn plan(desired: &Desired, present: &BTreeMap<TenantName, Present>) -> Vec<Action> {
    let mut actions = Vec::new();
    for (name, p) in present {
        if p.deleting {
            continue;
        }
        let keep =
            matches!(desired.tenants.get(name), Some(Want::Running(spec)) if spec.uid == p.uid);
        if !keep {
            actions.push(Action::Delete(name.clone()));
        }
    }
    for (name, want) in &desired.tenants {
        // A tenant of the same name with another uid must be gone before the new one starts.
        match (want, present.get(name)) {
            (Want::Running(spec), None) => actions.push(Action::Start(spec.clone())),
            (Want::Running(spec), Some(p))
                if p.uid == spec.uid && !p.deleting && p.resources != spec.resources =>
            {
                actions.push(Action::Resize(name.clone(), spec.resources));
            }
            _ => {}
        }
    }
    actions
}

/// The tenant tasks on this host.
#[derive(Debug)]
pub struct Tenants {
    host: Arc<Host>,
    pub handles: BTreeMap<TenantName, TenantHandle>,
}

impl Tenants {
    pub fn new(host: Arc<Host>) -> Self {
        Self {
            host,
            handles: BTreeMap::new(),
        }
    }

    /// Starts tasks for tenant records found on disk, so their endpoints answer and running
    /// engines are adopted before the scheduler is even reachable.
    pub fn resume_from_disk(&mut self) {
        for spec in crate::tenant::load_records(&self.host) {
            info!(tenant_id = %spec.name, uid = spec.uid, "resuming tenant found on disk");
            let name = spec.name.clone();
            self.handles
                .insert(name, TenantHandle::start(self.host.clone(), spec));
        }
    }

    pub fn present(&self) -> BTreeMap<TenantName, Present> {
        self.handles
            .iter()
            .map(|(name, h)| {
                (
                    name.clone(),
                    Present {
                        uid: h.spec.uid,
                        deleting: h.is_deleting(),
                        resources: h.spec.resources,
                    },
                )
            })
            .collect()
    }

    /// Drops tasks that have finished (deleted tenants), then applies the plan.
    pub fn reconcile(&mut self, desired: &Desired) {
        self.handles.retain(|_, h| !h.is_finished());
        for action in plan(desired, &self.present()) {
            match action {
                Action::Start(spec) => {
                    info!(tenant_id = %spec.name, uid = spec.uid, "starting tenant");
                    let name = spec.name.clone();
                    self.handles
                        .insert(name, TenantHandle::start(self.host.clone(), spec));
                }
                Action::Delete(name) => {
                    if let Some(h) = self.handles.get_mut(&name) {
                        info!(tenant_id = %name, "deleting tenant");
                        h.delete();
                    }
                }
                Action::Resize(name, resources) => {
                    if let Some(h) = self.handles.get_mut(&name) {
                        h.resize(resources);
                    }
                }
            }
        }
    }

    /// Ends every task; engines keep running unless `stop_engines`.
    pub async fn shutdown(self, stop_engines: bool) {
        for (_, h) in self.handles {
            h.shutdown(stop_engines).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use dormant_common::{Bytes, MilliCpu, Resources};

    use super::*;

    fn name(n: &str) -> TenantName {
        TenantName::parse(n).unwrap()
    }

    fn spec(n: &str, uid: u64) -> TenantSpec {
        TenantSpec {
            name: name(n),
            uid,
            engine: "postgres".into(),
            resources: Resources {
                cpu: MilliCpu(500),
                memory: Bytes(1 << 29),
                storage: Bytes(1 << 30),
            },
            port: 20000,
            password: "pw".into(),
            restart_generation: 0,
        }
    }

    fn desired(wants: Vec<(&str, Want)>) -> Desired {
        Desired {
            version: 1,
            tenants: wants.into_iter().map(|(n, w)| (name(n), w)).collect(),
        }
    }

    fn present(items: Vec<(&str, u64, bool)>) -> BTreeMap<TenantName, Present> {
        items
            .into_iter()
            .map(|(n, uid, deleting)| {
                (
                    name(n),
                    Present {
                        uid,
                        deleting,
                        resources: spec(n, uid).resources,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn plan_resizes_a_running_tenant_whose_resources_changed() {
        let mut bigger = spec("a", 1);
        bigger.resources.storage = Bytes(2 << 30);
        let d = desired(vec![("a", Want::Running(bigger.clone()))]);
        assert_eq!(
            plan(&d, &present(vec![("a", 1, false)])),
            vec![Action::Resize(name("a"), bigger.resources)]
        );
        // Not while it is being deleted, and not for another tenant of the same name.
        assert!(plan(&d, &present(vec![("a", 1, true)])).is_empty());
        let d2 = desired(vec![("a", Want::Running(spec("a", 2)))]);
        assert_eq!(
            plan(&d2, &present(vec![("a", 1, false)])),
            vec![Action::Delete(name("a"))]
        );
    }

    #[test]
    fn plan_starts_missing_tenant() {
        let d = desired(vec![("a", Want::Running(spec("a", 1)))]);
        assert_eq!(
            plan(&d, &present(vec![])),
            vec![Action::Start(spec("a", 1))]
        );
    }

    #[test]
    fn plan_does_nothing_when_in_step() {
        let d = desired(vec![("a", Want::Running(spec("a", 1)))]);
        assert!(plan(&d, &present(vec![("a", 1, false)])).is_empty());
    }

    #[test]
    fn plan_deletes_what_is_marked_deleted_or_unknown() {
        let d = desired(vec![("a", Want::Deleted { uid: 1 })]);
        let p = present(vec![("a", 1, false), ("stray", 9, false)]);
        assert_eq!(
            plan(&d, &p),
            vec![Action::Delete(name("a")), Action::Delete(name("stray"))]
        );
    }

    #[test]
    fn plan_does_not_delete_twice() {
        let d = desired(vec![]);
        assert!(plan(&d, &present(vec![("a", 1, true)])).is_empty());
    }

    #[test]
    fn plan_replaces_a_recreated_tenant_only_after_the_old_one_is_gone() {
        let d = desired(vec![("a", Want::Running(spec("a", 2)))]);
        assert_eq!(
            plan(&d, &present(vec![("a", 1, false)])),
            vec![Action::Delete(name("a"))]
        );
        assert!(plan(&d, &present(vec![("a", 1, true)])).is_empty());
        assert_eq!(
            plan(&d, &present(vec![])),
            vec![Action::Start(spec("a", 2))]
        );
    }
}
