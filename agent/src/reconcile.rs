//! Level-triggered reconciliation: compare the desired set the scheduler last sent with the
//! tenants this host runs, and act on the difference. `plan` is pure and carries the tests;
//! `Tenants` executes the plan through tenant tasks.
//!
//! A tenant is removed from this host only on an explicit delete for its name *and* uid. A tenant
//! missing from the set, or wanted with another uid, is kept and logged: a desired set from a
//! scheduler whose state was lost or is not ours must never wipe a volume.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{Resources, TenantName, TenantUid};
use tracing::{info, warn};

use crate::host::Host;
use crate::tenant::{TenantAssignment, TenantHandle};

/// What the scheduler wants for one tenant on this node.
#[derive(Debug, Clone, PartialEq)]
pub enum Want {
    Running(TenantAssignment),
    Deleted { uid: TenantUid },
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
    pub uid: TenantUid,
    pub deleting: bool,
    pub resources: Resources,
    pub restart_generation: u64,
    pub idle_after: IdleAfter,
    pub hibernate: HibernateMode,
    pub hibernate_generation: u64,
    pub wake_generation: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start(TenantAssignment),
    Delete(TenantName),
    /// New resources for a running tenant (applied in place).
    Resize(TenantName, Resources),
    /// Restart the engine once for this generation.
    Restart(TenantName, u64),
    /// A new hibernation policy (idle time, mode).
    Policy(TenantName, IdleAfter, HibernateMode),
    /// Hibernate now, or wake now, once for this generation.
    Hibernate(TenantName, u64),
    Wake(TenantName, u64),
    /// Kept although the desired set does not want it (missing, or another uid): logged, never
    /// deleted.
    Keep(TenantName, &'static str),
}

/// The actions that move `present` towards `desired`.
pub fn plan(desired: &Desired, present: &BTreeMap<TenantName, Present>) -> Vec<Action> {
    let mut actions = Vec::new();
    for (name, p) in present {
        if p.deleting {
            continue;
        }
        match desired.tenants.get(name) {
            Some(Want::Deleted { uid }) if *uid == p.uid => {
                actions.push(Action::Delete(name.clone()));
            }
            Some(Want::Running(spec)) if spec.uid == p.uid => {
                if p.resources != spec.resources {
                    actions.push(Action::Resize(name.clone(), spec.resources));
                }
                if spec.restart_generation > p.restart_generation {
                    actions.push(Action::Restart(name.clone(), spec.restart_generation));
                }
                if (spec.idle_after, spec.hibernate) != (p.idle_after, p.hibernate) {
                    actions.push(Action::Policy(
                        name.clone(),
                        spec.idle_after,
                        spec.hibernate,
                    ));
                }
                if spec.hibernate_generation > p.hibernate_generation {
                    actions.push(Action::Hibernate(name.clone(), spec.hibernate_generation));
                }
                if spec.wake_generation > p.wake_generation {
                    actions.push(Action::Wake(name.clone(), spec.wake_generation));
                }
            }
            None => actions.push(Action::Keep(name.clone(), "not in the desired set")),
            Some(_) => actions.push(Action::Keep(
                name.clone(),
                "the desired set names another tenant (uid) of this name",
            )),
        }
    }
    for (name, want) in &desired.tenants {
        if let (Want::Running(spec), None) = (want, present.get(name)) {
            actions.push(Action::Start(spec.clone()));
        }
    }
    actions
}

/// The tenant tasks on this host.
#[derive(Debug)]
pub struct Tenants {
    host: Arc<Host>,
    pub handles: BTreeMap<TenantName, TenantHandle>,
    /// Tenants already logged as kept against the desired set (logged once, not every beat).
    kept: BTreeSet<TenantName>,
    /// Tenant directories whose record cannot be read: nothing of that name is started here
    /// (it would take over the directory, uid file and image) until an operator looks.
    quarantined: BTreeSet<String>,
    /// A desired set has come since this agent started: tenants found on disk were told.
    heard: bool,
}

impl Tenants {
    pub fn new(host: Arc<Host>) -> Self {
        Self {
            host,
            handles: BTreeMap::new(),
            heard: false,
            kept: BTreeSet::new(),
            quarantined: BTreeSet::new(),
        }
    }

    /// Starts tasks for tenant records found on disk, so their endpoints answer and running
    /// engines are adopted before the scheduler is even reachable; deletes under way finish.
    pub fn resume(&mut self, records: Vec<crate::tenant::TenantRecord>, quarantined: Vec<String>) {
        self.quarantined = quarantined.into_iter().collect();
        for record in records {
            info!(tenant_id = %record.spec.name, uid = record.spec.uid.get(), deleting = record.deleting, "resuming tenant found on disk");
            let name = record.spec.name.clone();
            self.handles
                .insert(name, TenantHandle::resume(self.host.clone(), record));
        }
    }

    /// Tenants resumed from disk whose port is not open yet (neither taken back from the keeper
    /// nor bound) and whose task has not reported anything either (one that cannot open its port
    /// reports why): the agent tells systemd it is ready once none is left.
    pub fn ports_pending(&self) -> usize {
        self.handles
            .iter()
            .filter(|(name, h)| {
                !h.is_finished()
                    && !h.is_deleting()
                    && !h.status.borrow().announced
                    && !self.host.endpoints.is_listening(name.as_str())
            })
            .count()
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
                        restart_generation: h.spec.restart_generation,
                        idle_after: h.spec.idle_after,
                        hibernate: h.spec.hibernate,
                        hibernate_generation: h.spec.hibernate_generation,
                        wake_generation: h.spec.wake_generation,
                    },
                )
            })
            .collect()
    }

    /// Drops tasks that have finished (deleted tenants), then applies the plan.
    pub fn reconcile(&mut self, desired: &Desired) {
        self.handles.retain(|_, h| !h.is_finished());
        let mut kept = BTreeSet::new();
        for action in plan(desired, &self.present()) {
            match action {
                Action::Start(spec) if self.quarantined.contains(spec.name.as_str()) => {
                    if !self.kept.contains(&spec.name) {
                        warn!(tenant_id = %spec.name, "not starting: a tenant directory of this name has an unreadable record");
                    }
                    kept.insert(spec.name);
                }
                Action::Start(spec) => {
                    info!(tenant_id = %spec.name, uid = spec.uid.get(), "starting tenant");
                    let name = spec.name.clone();
                    self.handles
                        .insert(name, TenantHandle::create(self.host.clone(), spec));
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
                Action::Restart(name, generation) => {
                    if let Some(h) = self.handles.get_mut(&name) {
                        info!(tenant_id = %name, generation, "restart requested");
                        h.restart(generation);
                    }
                }
                Action::Policy(name, idle_after, mode) => {
                    if let Some(h) = self.handles.get_mut(&name) {
                        info!(tenant_id = %name, idle_after = %idle_after, mode = %mode, "hibernation policy changed");
                        h.set_policy(idle_after, mode);
                    }
                }
                Action::Hibernate(name, generation) => {
                    if let Some(h) = self.handles.get_mut(&name) {
                        info!(tenant_id = %name, generation, "hibernate requested");
                        h.hibernate(generation);
                    }
                }
                Action::Wake(name, generation) => {
                    if let Some(h) = self.handles.get_mut(&name) {
                        info!(tenant_id = %name, generation, "wake requested");
                        h.wake(generation);
                    }
                }
                Action::Keep(name, why) => {
                    if !self.kept.contains(&name) {
                        warn!(tenant_id = %name, why, "keeping a tenant the scheduler does not want here; only an explicit delete removes it");
                    }
                    kept.insert(name);
                }
            }
        }
        self.kept = kept;
        if !self.heard {
            // After the deletes above: a tenant deleted while this host was away never starts.
            self.heard = true;
            for h in self.handles.values() {
                h.desired_set_heard();
            }
        }
    }

    /// Ends every task, all at once (each hands its connections over, which may take a few
    /// seconds for a slow reader: one tenant must not hold up the others); engines keep running
    /// unless `stop_engines`.
    pub async fn shutdown(self, stop_engines: bool) {
        let mut tasks = tokio::task::JoinSet::new();
        for (_, h) in self.handles {
            tasks.spawn(h.shutdown(stop_engines));
        }
        while tasks.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use dormant_common::Bytes;

    use super::*;

    fn name(n: &str) -> TenantName {
        TenantName::parse(n).unwrap()
    }

    fn spec(n: &str, uid: TenantUid) -> TenantAssignment {
        crate::tenant::record::sample_spec(n, uid)
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
                let uid = TenantUid::new(uid);
                (
                    name(n),
                    Present {
                        uid,
                        deleting,
                        resources: spec(n, uid).resources,
                        restart_generation: 0,
                        idle_after: IdleAfter::default(),
                        hibernate: HibernateMode::default(),
                        hibernate_generation: 0,
                        wake_generation: 0,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn plan_resizes_a_running_tenant_whose_resources_changed() {
        let mut bigger = spec("a", TenantUid::new(1));
        bigger.resources.storage = Bytes(2 << 30);
        let d = desired(vec![("a", Want::Running(bigger.clone()))]);
        assert_eq!(
            plan(&d, &present(vec![("a", 1, false)])),
            vec![Action::Resize(name("a"), bigger.resources)]
        );
        // Not while it is being deleted.
        assert!(plan(&d, &present(vec![("a", 1, true)])).is_empty());
    }

    #[test]
    fn plan_changes_the_policy_and_hibernates_or_wakes_once_per_new_generation() {
        let mut want = spec("a", TenantUid::new(1));
        want.idle_after = IdleAfter::Never;
        want.hibernate_generation = 2;
        want.wake_generation = 1;
        let d = desired(vec![("a", Want::Running(want))]);
        let mut here = present(vec![("a", 1, false)]);
        assert_eq!(
            plan(&d, &here),
            vec![
                Action::Policy(name("a"), IdleAfter::Never, HibernateMode::Stop),
                Action::Hibernate(name("a"), 2),
                Action::Wake(name("a"), 1),
            ]
        );
        let p = here.get_mut(&name("a")).unwrap();
        p.idle_after = IdleAfter::Never;
        p.hibernate_generation = 2;
        p.wake_generation = 1;
        assert!(plan(&d, &here).is_empty());
    }

    #[test]
    fn plan_restarts_once_per_new_generation() {
        let mut again = spec("a", TenantUid::new(1));
        again.restart_generation = 2;
        let d = desired(vec![("a", Want::Running(again))]);
        assert_eq!(
            plan(&d, &present(vec![("a", 1, false)])),
            vec![Action::Restart(name("a"), 2)]
        );
        let mut done = present(vec![("a", 1, false)]);
        done.get_mut(&name("a")).unwrap().restart_generation = 2;
        assert!(plan(&d, &done).is_empty());
    }

    #[test]
    fn plan_starts_missing_tenant() {
        let d = desired(vec![("a", Want::Running(spec("a", TenantUid::new(1))))]);
        assert_eq!(
            plan(&d, &present(vec![])),
            vec![Action::Start(spec("a", TenantUid::new(1)))]
        );
    }

    #[test]
    fn plan_does_nothing_when_in_step() {
        let d = desired(vec![("a", Want::Running(spec("a", TenantUid::new(1))))]);
        assert!(plan(&d, &present(vec![("a", 1, false)])).is_empty());
    }

    #[test]
    fn plan_deletes_only_on_an_explicit_delete_of_that_uid() {
        let d = desired(vec![(
            "a",
            Want::Deleted {
                uid: TenantUid::new(1),
            },
        )]);
        let p = present(vec![("a", 1, false), ("stray", 9, false)]);
        assert_eq!(
            plan(&d, &p),
            vec![
                Action::Delete(name("a")),
                Action::Keep(name("stray"), "not in the desired set")
            ]
        );
        // A delete of another tenant of the same name removes nothing here.
        let d = desired(vec![(
            "a",
            Want::Deleted {
                uid: TenantUid::new(2),
            },
        )]);
        assert!(matches!(
            plan(&d, &present(vec![("a", 1, false)])).as_slice(),
            [Action::Keep(..)]
        ));
    }

    /// An empty set (a scheduler whose state was lost) deletes nothing.
    #[test]
    fn plan_keeps_everything_against_an_empty_set() {
        let p = present(vec![("a", 1, false), ("b", 2, false)]);
        assert!(plan(&desired(vec![]), &p)
            .iter()
            .all(|a| matches!(a, Action::Keep(..))));
    }

    #[test]
    fn plan_does_not_delete_twice() {
        let d = desired(vec![(
            "a",
            Want::Deleted {
                uid: TenantUid::new(1),
            },
        )]);
        assert!(plan(&d, &present(vec![("a", 1, true)])).is_empty());
    }

    /// Another uid under a present name: the present one is kept and the new one waits.
    #[test]
    fn plan_never_replaces_a_tenant_with_another_of_the_same_name() {
        let d = desired(vec![("a", Want::Running(spec("a", TenantUid::new(2))))]);
        assert!(matches!(
            plan(&d, &present(vec![("a", 1, false)])).as_slice(),
            [Action::Keep(..)]
        ));
        assert_eq!(
            plan(&d, &present(vec![])),
            vec![Action::Start(spec("a", TenantUid::new(2)))]
        );
    }
}
