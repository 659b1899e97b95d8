//! Unit tests of `apply` and the index.

use dormant_common::hibernation::{HibernateMode, IdleAfter};
use dormant_common::{NodeName, NodeStatus, Resources, TenantName, TenantState};

use super::test_utils::*;
use super::*;

/// Node `a` (2 CPU, 4 GiB, 100 GiB) with tenant `t` (uid 2) placed on it.
fn node_a_with_tenant_t() -> ClusterState {
    let mut st = ClusterState::default();
    st.apply(1, Command::RegisterNode(node("a", res(2000, 4096, 100))))
        .unwrap();
    create(&mut st, 2, "t", Some("a")).unwrap();
    st
}

fn create(state: &mut ClusterState, index: u64, name: &str, node: Option<&str>) -> ApplyResult {
    state.apply(
        index,
        Command::CreateTenant {
            spec: spec(name, res(500, 512, 1)),
            password: "pw".into(),
            node: node.map(|n| NodeName::parse(n).unwrap()),
            pending_reason: node.is_none().then(|| "no ready node".to_string()),
            overcommit: 1.0,
        },
    )
}

#[test]
fn create_on_node_gets_lowest_free_port_and_starting_state() {
    let mut st = ClusterState::default();
    st.apply(1, Command::RegisterNode(node("a", res(2000, 4096, 100))))
        .unwrap();
    let Outcome::Tenant(t1) = create(&mut st, 2, "t1", Some("a")).unwrap() else {
        panic!()
    };
    let Outcome::Tenant(t2) = create(&mut st, 3, "t2", Some("a")).unwrap() else {
        panic!()
    };
    assert_eq!((t1.port, t2.port), (Some(20000), Some(20001)));
    assert_eq!(t1.state, TenantState::Starting);
    assert_eq!(t1.uid, TenantUid::new(2));
    assert_eq!(st.allocated(&t1.node.unwrap()), res(1000, 1024, 2));
}

#[test]
fn duplicate_name_is_refused_and_changes_nothing() {
    let mut st = ClusterState::default();
    create(&mut st, 1, "t1", None).unwrap();
    let before = st.clone();
    assert_eq!(
        create(&mut st, 2, "t1", None),
        Err(ApplyError::TenantExists("t1".into()))
    );
    assert_eq!(st, before);
}

#[test]
fn stale_create_placement_leaves_tenant_pending_with_reason() {
    let mut st = ClusterState::default();
    st.apply(1, Command::RegisterNode(node("a", res(500, 4096, 100))))
        .unwrap();
    create(&mut st, 2, "t1", Some("a")).unwrap();
    let Outcome::Tenant(t2) = create(&mut st, 3, "t2", Some("a")).unwrap() else {
        panic!()
    };
    assert_eq!(t2.state, TenantState::Pending);
    assert!(t2.reason.unwrap().contains("CPU"));
}

#[test]
fn stale_assignment_is_refused_never_applied() {
    let mut st = ClusterState::default();
    create(&mut st, 1, "t1", None).unwrap();
    st.apply(2, Command::RegisterNode(node("a", res(100, 4096, 100))))
        .unwrap();
    let before = st.clone();
    let err = st
        .apply(
            3,
            Command::AssignTenant {
                name: TenantName::parse("t1").unwrap(),
                uid: TenantUid::new(1),
                node: NodeName::parse("a").unwrap(),
                overcommit: 1.0,
            },
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::StalePlacement { .. }), "{err}");
    assert_eq!(st, before);
}

#[test]
fn delete_of_pending_removes_at_once_and_of_placed_waits_for_the_node() {
    let mut st = ClusterState::default();
    create(&mut st, 1, "p", None).unwrap();
    let name = |n: &str| TenantName::parse(n).unwrap();
    assert_eq!(
        st.apply(2, Command::DeleteTenant { name: name("p") }),
        Ok(Outcome::Removed)
    );
    st.apply(3, Command::RegisterNode(node("a", res(2000, 4096, 100))))
        .unwrap();
    create(&mut st, 4, "t", Some("a")).unwrap();
    let Outcome::Tenant(t) = st
        .apply(5, Command::DeleteTenant { name: name("t") })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!((t.state, t.deleted_at), (TenantState::Deleting, Some(5)));
    // A late "running" report does not undo the delete.
    st.apply(
        6,
        Command::ObserveTenant {
            node: NodeName::parse("a").unwrap(),
            name: name("t"),
            uid: TenantUid::new(4),
            state: TenantState::Running,
            reason: None,
        },
    )
    .unwrap();
    assert_eq!(st.tenants[&name("t")].state, TenantState::Deleting);
    assert_eq!(
        st.apply(
            7,
            Command::RemoveTenant {
                name: name("t"),
                uid: TenantUid::new(4)
            }
        ),
        Ok(Outcome::Removed)
    );
    assert!(st.tenants.is_empty());
}

#[test]
fn reports_about_an_older_tenant_of_the_same_name_are_refused() {
    let mut st = ClusterState::default();
    create(&mut st, 1, "t", None).unwrap();
    let err = st
        .apply(
            2,
            Command::RemoveTenant {
                name: TenantName::parse("t").unwrap(),
                uid: TenantUid::new(99),
            },
        )
        .unwrap_err();
    assert_eq!(err, ApplyError::TenantNotFound("t".into()));
    assert_eq!(st.tenants.len(), 1);
}

#[test]
fn a_down_node_loses_its_tenants_and_its_return_restores_them() {
    let mut st = node_a_with_tenant_t();
    let name = TenantName::parse("t").unwrap();
    let a = NodeName::parse("a").unwrap();
    st.apply(
        3,
        Command::ObserveTenant {
            node: a.clone(),
            name: name.clone(),
            uid: TenantUid::new(2),
            state: TenantState::Running,
            reason: None,
        },
    )
    .unwrap();
    let down = Command::SetNodeStatus {
        node: a.clone(),
        status: NodeStatus::Down,
        decided_in_term: None,
    };
    st.apply(4, down.clone()).unwrap();
    assert_eq!(st.nodes[&a].status, NodeStatus::Down);
    assert_eq!(st.tenants[&name].state, TenantState::Lost);
    // Down twice changes nothing, and does not forget the state to restore.
    assert_eq!(st.apply(5, down), Ok(Outcome::Nothing));
    // Nothing new lands on a down node, but the tenant keeps its place.
    assert_eq!(st.tenants[&name].node.as_ref(), Some(&a));
    st.apply(
        6,
        Command::SetNodeStatus {
            node: a.clone(),
            status: NodeStatus::Ready,
            decided_in_term: None,
        },
    )
    .unwrap();
    assert_eq!(st.tenants[&name].state, TenantState::Running);
    assert_eq!(st.tenants[&name].lost_from, None);
}

#[test]
fn re_registration_keeps_the_cordon_and_brings_lost_tenants_back() {
    let mut st = node_a_with_tenant_t();
    let a = NodeName::parse("a").unwrap();
    st.apply(
        3,
        Command::SetNodeCordon {
            node: a.clone(),
            cordoned: true,
        },
    )
    .unwrap();
    st.apply(
        4,
        Command::SetNodeStatus {
            node: a.clone(),
            status: NodeStatus::Down,
            decided_in_term: None,
        },
    )
    .unwrap();
    st.apply(5, Command::RegisterNode(node("a", res(2000, 4096, 100))))
        .unwrap();
    assert!(st.nodes[&a].cordoned);
    assert_eq!(st.nodes[&a].status, NodeStatus::Ready);
    let t = &st.tenants[&TenantName::parse("t").unwrap()];
    assert_eq!(t.state, TenantState::Starting);
    let err = create(&mut st, 6, "u", Some("a")).unwrap();
    let Outcome::Tenant(u) = err else { panic!() };
    assert_eq!(u.state, TenantState::Pending);
    assert_eq!(u.reason.as_deref(), Some("a: cordoned"));
}

#[test]
fn node_views_agree_with_per_node_accounting() {
    let mut st = ClusterState::default();
    let mut small = node("a", res(8000, 8192, 100));
    small.port_range = (20000, 20001);
    st.apply(1, Command::RegisterNode(small)).unwrap();
    st.apply(2, Command::RegisterNode(node("b", res(8000, 8192, 100))))
        .unwrap();
    create(&mut st, 3, "t1", Some("a")).unwrap();
    create(&mut st, 4, "t2", Some("b")).unwrap();
    let views = st.node_views();
    assert_eq!(
        views[0].allocated,
        st.allocated(&NodeName::parse("a").unwrap())
    );
    assert!(views[0].has_free_port);
    create(&mut st, 5, "t3", Some("a")).unwrap();
    let views = st.node_views();
    assert_eq!(views[0].allocated, res(1000, 1024, 2));
    assert!(!views[0].has_free_port, "both ports of a are taken");
    assert!(views[1].has_free_port);
    assert_eq!(views[1].allocated, res(500, 512, 1));
}

#[test]
fn the_index_survives_a_snapshot_round_trip() {
    let mut st = ClusterState::default();
    st.apply(1, Command::RegisterNode(node("a", res(8000, 8192, 100))))
        .unwrap();
    create(&mut st, 2, "t1", Some("a")).unwrap();
    create(&mut st, 3, "t2", Some("a")).unwrap();
    let json = serde_json::to_string(&st).unwrap();
    assert!(
        !json.contains("by_node"),
        "the index is derived, never stored"
    );
    // Read back from what this version writes, and from JSON as older versions wrote it.
    for bytes in [crate::codec::encode(&st).unwrap(), json.into_bytes()] {
        let back: ClusterState = crate::codec::decode(&bytes).unwrap();
        assert_eq!(back, st);
        assert_eq!(
            back.allocated(&NodeName::parse("a").unwrap()),
            res(1000, 1024, 2)
        );
    }
}

#[test]
fn commands_round_trip_through_the_stored_format_optional_fields_included() {
    let a = NodeName::parse("a").unwrap();
    let commands = [
        Command::RegisterNode(node("a", res(8000, 8192, 100))),
        Command::SetNodeStatus {
            node: a.clone(),
            status: NodeStatus::Down,
            decided_in_term: None,
        },
        Command::SetNodeStatus {
            node: a.clone(),
            status: NodeStatus::Ready,
            decided_in_term: Some(4),
        },
        Command::ForgetTombstone {
            node: a,
            name: tname("t"),
            uid: TenantUid::new(2),
        },
    ];
    for command in commands {
        let bytes = crate::codec::encode(&command).unwrap();
        let back: Command = crate::codec::decode(&bytes).unwrap();
        assert_eq!(format!("{back:?}"), format!("{command:?}"));
    }
}

#[test]
fn freed_ports_are_given_again_lowest_first() {
    let mut st = ClusterState::default();
    st.apply(1, Command::RegisterNode(node("a", res(8000, 8192, 100))))
        .unwrap();
    for (i, name) in ["t1", "t2", "t3"].iter().enumerate() {
        create(&mut st, 2 + i as u64, name, Some("a")).unwrap();
    }
    let t2 = TenantName::parse("t2").unwrap();
    st.apply(
        10,
        Command::RemoveTenant {
            name: t2,
            uid: TenantUid::new(3),
        },
    )
    .unwrap();
    let Outcome::Tenant(t4) = create(&mut st, 11, "t4", Some("a")).unwrap() else {
        panic!()
    };
    assert_eq!(t4.port, Some(20001));
    let Outcome::Tenant(t5) = create(&mut st, 12, "t5", Some("a")).unwrap() else {
        panic!()
    };
    assert_eq!(t5.port, Some(20003));
}

#[test]
fn a_node_with_every_port_taken_is_full_even_after_its_range_moved() {
    let mut st = ClusterState::default();
    let mut a = node("a", res(8000, 8192, 100));
    a.port_range = (20000, 20001);
    st.apply(1, Command::RegisterNode(a.clone())).unwrap();
    create(&mut st, 2, "t1", Some("a")).unwrap();
    assert!(st.node_views()[0].has_free_port);
    create(&mut st, 3, "t2", Some("a")).unwrap();
    assert!(!st.node_views()[0].has_free_port);
    // The agent came back with a range that keeps one of the used ports.
    a.port_range = (20001, 20002);
    st.apply(4, Command::RegisterNode(a)).unwrap();
    assert!(st.node_views()[0].has_free_port);
    let Outcome::Tenant(t3) = create(&mut st, 5, "t3", Some("a")).unwrap() else {
        panic!()
    };
    assert_eq!(t3.port, Some(20002));
    assert!(!st.node_views()[0].has_free_port);
}

#[test]
fn the_first_cluster_id_applied_is_kept_and_survives_a_snapshot() {
    let mut st = ClusterState::default();
    assert_eq!(st.cluster_id, None);
    st.apply(1, Command::SetClusterId("3a".into())).unwrap();
    // A second leader's proposal (it had not applied the first yet) changes nothing.
    assert_eq!(
        st.apply(2, Command::SetClusterId("9f".into())),
        Ok(Outcome::Nothing)
    );
    assert_eq!(st.cluster_id.as_deref(), Some("3a"));
    let back: ClusterState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
    assert_eq!(back.cluster_id.as_deref(), Some("3a"));
}

#[test]
fn a_snapshot_written_before_identities_and_restarts_loads() {
    let st = node_a_with_tenant_t();
    let mut json = serde_json::to_value(&st).unwrap();
    json.as_object_mut().unwrap().remove("cluster_id");
    json["tenants"]["t"]
        .as_object_mut()
        .unwrap()
        .remove("restart_generation");
    let back: ClusterState = serde_json::from_value(json).unwrap();
    assert_eq!(back.cluster_id, None);
    assert_eq!(back, st);
}

#[test]
fn a_snapshot_written_before_hibernation_loads_with_the_default_policy() {
    let st = node_a_with_tenant_t();
    let mut json = serde_json::to_value(&st).unwrap();
    let tenant = json["tenants"]["t"].as_object_mut().unwrap();
    for field in [
        "idle_after",
        "hibernate",
        "hibernate_generation",
        "wake_generation",
    ] {
        assert!(tenant.remove(field).is_some(), "{field} is stored");
    }
    let back: ClusterState = serde_json::from_value(json).unwrap();
    assert_eq!(back, st);
    let t = &back.tenants[&TenantName::parse("t").unwrap()];
    assert_eq!(t.idle_after.to_string(), "10m");
    assert_eq!(t.hibernate, HibernateMode::Stop);
    assert_eq!((t.hibernate_generation, t.wake_generation), (0, 0));
    // And a create logged then, without the spec's policy, gives the defaults too.
    let json = r#"{"name":"u","engine":"postgres","resources":{"cpu":500,"memory":536870912,"storage":1073741824}}"#;
    let old: TenantSpec = serde_json::from_str(json).unwrap();
    assert_eq!(old, spec("u", res(500, 512, 1)));
}

#[test]
fn restart_raises_the_generation_of_a_placed_tenant_and_refuses_the_others() {
    let mut st = node_a_with_tenant_t();
    let name = |n: &str| TenantName::parse(n).unwrap();
    let restart = |n: &str, uid| Command::RestartTenant { name: name(n), uid };
    for (index, want) in [(3, 1), (4, 2)] {
        let Outcome::Tenant(t) = st.apply(index, restart("t", TenantUid::new(2))).unwrap() else {
            panic!()
        };
        assert_eq!(t.restart_generation, want);
    }
    // Another tenant of the same name (an older uid) is not this one.
    assert_eq!(
        st.apply(5, restart("t", TenantUid::new(99))),
        Err(ApplyError::TenantNotFound("t".into()))
    );
    create(&mut st, 6, "p", None).unwrap();
    let before = st.clone();
    let err = st.apply(7, restart("p", TenantUid::new(6))).unwrap_err();
    assert_eq!(
        err,
        ApplyError::NotPlaced {
            tenant: "p".into(),
            action: EngineAction::Restart
        }
    );
    assert_eq!(
        err.to_string(),
        "name: tenant \"p\" is pending: it runs on no node yet, so there is no engine to restart"
    );
    assert!(
        err.to_string().starts_with("name: tenant \"p\" is pending"),
        "{err}"
    );
    assert_eq!(st, before);
    st.apply(8, Command::DeleteTenant { name: name("t") })
        .unwrap();
    let before = st.clone();
    assert_eq!(
        st.apply(9, restart("t", TenantUid::new(2))),
        Err(ApplyError::Deleting("t".into()))
    );
    assert_eq!(st, before);
}

#[test]
fn hibernate_and_wake_raise_their_own_generations_like_restart_and_refuse_the_same_tenants() {
    let mut st = node_a_with_tenant_t();
    let name = |n: &str| TenantName::parse(n).unwrap();
    let hibernate = |n: &str, uid| Command::HibernateTenant { name: name(n), uid };
    let wake = |n: &str, uid| Command::WakeTenant { name: name(n), uid };
    let generations = |t: &TenantRecord| {
        (
            t.restart_generation,
            t.hibernate_generation,
            t.wake_generation,
        )
    };
    let Outcome::Tenant(t) = st.apply(3, hibernate("t", TenantUid::new(2))).unwrap() else {
        panic!()
    };
    assert_eq!(generations(&t), (0, 1, 0));
    for (index, want) in [(4, 1), (5, 2)] {
        let Outcome::Tenant(t) = st.apply(index, wake("t", TenantUid::new(2))).unwrap() else {
            panic!()
        };
        assert_eq!(generations(&t), (0, 1, want));
    }
    // The state is the agent's to report: asking changes only the generation.
    assert_eq!(st.tenants[&name("t")].state, TenantState::Starting);
    // Another tenant of the same name (an older uid) is not this one.
    for command in [
        hibernate("t", TenantUid::new(99)),
        wake("t", TenantUid::new(99)),
    ] {
        assert_eq!(
            st.apply(6, command),
            Err(ApplyError::TenantNotFound("t".into()))
        );
    }
    create(&mut st, 7, "p", None).unwrap();
    let before = st.clone();
    for (command, action) in [
        (hibernate("p", TenantUid::new(7)), EngineAction::Hibernate),
        (wake("p", TenantUid::new(7)), EngineAction::Wake),
    ] {
        let err = st.apply(8, command).unwrap_err();
        assert_eq!(
            err,
            ApplyError::NotPlaced {
                tenant: "p".into(),
                action
            }
        );
        assert!(
            err.to_string()
                .ends_with(&format!("so there is no engine to {action}")),
            "{err}"
        );
    }
    assert_eq!(st, before);
    st.apply(9, Command::DeleteTenant { name: name("t") })
        .unwrap();
    let before = st.clone();
    for command in [
        hibernate("t", TenantUid::new(2)),
        wake("t", TenantUid::new(2)),
    ] {
        assert_eq!(st.apply(10, command), Err(ApplyError::Deleting("t".into())));
    }
    assert_eq!(st, before);
}

#[test]
fn a_tenant_is_created_and_updated_with_its_hibernation_policy() {
    let mut st = node_a_with_tenant_t();
    let t = TenantName::parse("t").unwrap();
    assert_eq!(st.tenants[&t].idle_after, IdleAfter::default());
    assert_eq!(st.tenants[&t].hibernate, HibernateMode::Stop);
    let mut sleepy = spec("sleepy", res(500, 512, 1));
    sleepy.idle_after = IdleAfter::After(std::time::Duration::from_secs(30));
    sleepy.hibernate = HibernateMode::Freeze;
    let Outcome::Tenant(created) = st
        .apply(
            3,
            Command::CreateTenant {
                spec: sleepy,
                password: "pw".into(),
                node: Some(NodeName::parse("a").unwrap()),
                pending_reason: None,
                overcommit: 1.0,
            },
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(created.idle_after.to_string(), "30s");
    assert_eq!(created.hibernate, HibernateMode::Freeze);
    let update = |idle_after, hibernate| Command::UpdateTenant {
        name: t.clone(),
        uid: TenantUid::new(2),
        resources: res(500, 512, 1),
        overcommit: 1.0,
        idle_after,
        hibernate,
    };
    let Outcome::Tenant(u) = st.apply(4, update(Some(IdleAfter::Never), None)).unwrap() else {
        panic!()
    };
    assert_eq!(
        (u.idle_after, u.hibernate),
        (IdleAfter::Never, HibernateMode::Stop)
    );
    let Outcome::Tenant(u) = st
        .apply(5, update(None, Some(HibernateMode::Freeze)))
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(
        (u.idle_after, u.hibernate),
        (IdleAfter::Never, HibernateMode::Freeze),
        "None leaves a field unchanged"
    );
    assert_eq!(u.resources, res(500, 512, 1));
}

#[test]
fn a_policy_update_needs_no_room_on_a_node_that_shrank() {
    let mut st = node_a_with_tenant_t();
    // The agent came back smaller than what its tenant reserves.
    st.apply(3, Command::RegisterNode(node("a", res(100, 4096, 100))))
        .unwrap();
    let Outcome::Tenant(t) = st
        .apply(
            4,
            Command::UpdateTenant {
                name: TenantName::parse("t").unwrap(),
                uid: TenantUid::new(2),
                resources: res(500, 512, 1),
                overcommit: 1.0,
                idle_after: Some(IdleAfter::Never),
                hibernate: None,
            },
        )
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(t.idle_after, IdleAfter::Never);
}

#[test]
fn an_update_logged_before_hibernation_existed_leaves_the_policy_alone() {
    let json = r#"{"UpdateTenant":{"name":"t","uid":2,"resources":{"cpu":500,"memory":536870912,"storage":1073741824},"overcommit":1.0}}"#;
    let command: Command = serde_json::from_str(json).unwrap();
    let Command::UpdateTenant {
        idle_after,
        hibernate,
        ..
    } = command
    else {
        panic!("{command:?}")
    };
    assert_eq!((idle_after, hibernate), (None, None));
}

#[test]
fn a_tenant_hibernates_wakes_and_fails_and_a_lost_one_comes_back_as_it_was() {
    let mut st = node_a_with_tenant_t();
    let name = TenantName::parse("t").unwrap();
    let a = NodeName::parse("a").unwrap();
    let allocated = st.allocated(&a);
    let mut index = 2;
    let mut observe = |st: &mut ClusterState, state| {
        index += 1;
        st.apply(
            index,
            Command::ObserveTenant {
                node: a.clone(),
                name: name.clone(),
                uid: TenantUid::new(2),
                state,
                reason: None,
            },
        )
        .unwrap()
    };
    for state in [
        TenantState::Running,
        TenantState::Hibernated,
        TenantState::Waking,
        TenantState::Running,
        TenantState::Hibernated,
        TenantState::Failed,
        TenantState::Hibernated,
        TenantState::Waking,
        TenantState::Failed,
        TenantState::Starting,
        TenantState::Running,
        TenantState::Hibernated,
    ] {
        let Outcome::Tenant(t) = observe(&mut st, state) else {
            panic!()
        };
        assert_eq!(t.state, state);
        // Hibernated, the tenant keeps its reservation and its port.
        assert_eq!(st.allocated(&a), allocated, "{state}");
        assert_eq!(t.port, Some(20000));
    }
    st.apply(
        100,
        Command::SetNodeStatus {
            node: a.clone(),
            status: NodeStatus::Down,
            decided_in_term: None,
        },
    )
    .unwrap();
    assert_eq!(st.tenants[&name].state, TenantState::Lost);
    assert_eq!(st.tenants[&name].lost_from, Some(TenantState::Hibernated));
    st.apply(
        101,
        Command::SetNodeStatus {
            node: a.clone(),
            status: NodeStatus::Ready,
            decided_in_term: None,
        },
    )
    .unwrap();
    assert_eq!(st.tenants[&name].state, TenantState::Hibernated);
    assert_eq!(st.allocated(&a), allocated);
}

#[test]
fn the_reportable_states_are_listed_in_the_refusal() {
    assert_eq!(
        agent_reported_states_list(),
        "starting, running, hibernated, waking or failed"
    );
    let err = ApplyError::NotReportable {
        tenant: "t".into(),
        state: TenantState::Lost,
    };
    assert_eq!(
        err.to_string(),
        "state: tenant \"t\" reported lost; an agent reports only starting, running, \
         hibernated, waking or failed"
    );
}

#[test]
fn an_agent_reports_only_its_states_and_only_for_its_own_tenants() {
    let mut st = node_a_with_tenant_t();
    st.apply(3, Command::RegisterNode(node("b", res(2000, 4096, 100))))
        .unwrap();
    let observe = |node: &str, uid, state| Command::ObserveTenant {
        node: NodeName::parse(node).unwrap(),
        name: TenantName::parse("t").unwrap(),
        uid,
        state,
        reason: None,
    };
    st.apply(4, observe("a", TenantUid::new(2), TenantState::Running))
        .unwrap();
    let before = st.clone();
    for state in [
        TenantState::Pending,
        TenantState::Lost,
        // Deleting is the agent's own word only for a tenant it was told to delete.
        TenantState::Deleting,
    ] {
        let err = st
            .apply(5, observe("a", TenantUid::new(2), state))
            .unwrap_err();
        assert_eq!(
            err,
            ApplyError::NotReportable {
                tenant: "t".into(),
                state
            }
        );
        assert!(err.to_string().starts_with("state: "), "{err}");
        assert_eq!(st, before, "{state} changed the state");
    }
    // Node b speaking for a's tenant, or a for another tenant of the name, changes nothing.
    assert_eq!(
        st.apply(6, observe("b", TenantUid::new(2), TenantState::Failed)),
        Ok(Outcome::Nothing)
    );
    assert!(st
        .apply(7, observe("a", TenantUid::new(99), TenantState::Failed))
        .is_err());
    assert_eq!(st, before);
    for state in AGENT_REPORTED_STATES {
        let Outcome::Tenant(t) = st.apply(8, observe("a", TenantUid::new(2), state)).unwrap()
        else {
            panic!()
        };
        assert_eq!(t.state, state);
    }
}

#[test]
fn a_tenant_on_a_cordoned_node_can_still_grow_where_there_is_room() {
    let mut st = node_a_with_tenant_t();
    let a = NodeName::parse("a").unwrap();
    st.apply(
        3,
        Command::SetNodeCordon {
            node: a,
            cordoned: true,
        },
    )
    .unwrap();
    let name = TenantName::parse("t").unwrap();
    let grow = |cpu| Command::UpdateTenant {
        name: name.clone(),
        uid: TenantUid::new(2),
        resources: res(cpu, 512, 1),
        overcommit: 1.0,
        idle_after: None,
        hibernate: None,
    };
    let Outcome::Tenant(t) = st.apply(4, grow(1500)).unwrap() else {
        panic!()
    };
    assert_eq!(t.resources.cpu.0, 1500);
    let err = st.apply(5, grow(2500)).unwrap_err();
    assert!(matches!(err, ApplyError::DoesNotFit { .. }), "{err}");
    assert!(
        err.to_string().contains("a: 2 CPU free, 2.5 asked"),
        "{err}"
    );
}

fn tname(n: &str) -> TenantName {
    TenantName::parse(n).unwrap()
}

fn down(st: &mut ClusterState, index: u64, node: &str) {
    st.apply(
        index,
        Command::SetNodeStatus {
            node: NodeName::parse(node).unwrap(),
            status: NodeStatus::Down,
            decided_in_term: None,
        },
    )
    .unwrap();
}

#[test]
fn a_forced_delete_frees_the_name_and_reservation_and_leaves_a_tombstone_holding_the_port() {
    let mut st = node_a_with_tenant_t();
    let a = NodeName::parse("a").unwrap();
    let port = st.tenants[&tname("t")].port.unwrap();
    // Refused while the node is ready: a plain delete does it there.
    let err = st
        .apply(
            3,
            Command::ForceDeleteTenant {
                name: tname("t"),
                uid: TenantUid::new(2),
            },
        )
        .unwrap_err();
    assert!(matches!(err, ApplyError::ForceOnReadyNode { .. }), "{err}");
    down(&mut st, 4, "a");
    // Another uid under the name is not this tenant.
    assert!(matches!(
        st.apply(
            5,
            Command::ForceDeleteTenant {
                name: tname("t"),
                uid: TenantUid::new(9)
            }
        ),
        Err(ApplyError::TenantNotFound(_))
    ));
    st.apply(
        6,
        Command::ForceDeleteTenant {
            name: tname("t"),
            uid: TenantUid::new(2),
        },
    )
    .unwrap();
    assert!(!st.tenants.contains_key(&tname("t")));
    assert_eq!(st.allocated(&a), Resources::default());
    assert_eq!(
        st.tombstones[&a][&tname("t")],
        Tombstone {
            uid: TenantUid::new(2),
            port: Some(port),
            deleted_at: 6
        }
    );
    // The name is free at once; the port stays taken on `a` until its agent confirms.
    st.apply(
        7,
        Command::SetNodeStatus {
            node: a.clone(),
            status: NodeStatus::Ready,
            decided_in_term: None,
        },
    )
    .unwrap();
    // The name is free: a tenant of it may be created, but not placed on `a` while `a` has
    // the earlier one to remove (one tombstone per name and node).
    let Outcome::Tenant(again) = create(&mut st, 8, "t", Some("a")).unwrap() else {
        panic!()
    };
    assert_eq!(again.state, TenantState::Pending);
    assert!(
        again
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("still removing an earlier tenant"),
        "{again:?}"
    );
    let Outcome::Tenant(other) = create(&mut st, 9, "u", Some("a")).unwrap() else {
        panic!()
    };
    assert_ne!(other.port, Some(port));
    // A snapshot keeps the tombstone, and the index rebuilt from it holds the port.
    let restored: ClusterState = crate::codec::decode(&crate::codec::encode(&st).unwrap()).unwrap();
    assert_eq!(restored, st);
    st.apply(
        10,
        Command::ForgetTombstone {
            node: a.clone(),
            name: tname("t"),
            uid: TenantUid::new(2),
        },
    )
    .unwrap();
    assert!(st.tombstones.is_empty());
    assert!(!st.by_node[&a].ports.contains(&port));
    // Now the waiting `t` may go to `a`.
    st.apply(
        11,
        Command::AssignTenant {
            name: tname("t"),
            uid: TenantUid::new(8),
            node: a.clone(),
            overcommit: 1.0,
        },
    )
    .unwrap();
    assert_eq!(st.tenants[&tname("t")].node.as_ref(), Some(&a));
}

#[test]
fn a_node_is_removed_only_when_down_and_empty_unless_forced() {
    let mut st = node_a_with_tenant_t();
    let a = NodeName::parse("a").unwrap();
    let remove = |force| Command::RemoveNode {
        node: a.clone(),
        force,
    };
    assert!(matches!(
        st.apply(3, remove(false)),
        Err(ApplyError::NodeReady(_))
    ));
    down(&mut st, 4, "a");
    let err = st.apply(5, remove(false)).unwrap_err();
    assert!(err.to_string().contains("holds tenants (t)"), "{err}");
    assert_eq!(
        st.apply(6, remove(true)),
        Ok(Outcome::NodeRemoved(vec![tname("t")]))
    );
    assert!(st.nodes.is_empty() && st.tenants.is_empty());
    assert!(st.tombstones[&a].contains_key(&tname("t")));
    // The node registering again finds its port taken by the tombstone.
    st.apply(7, Command::RegisterNode(node("a", res(2000, 4096, 100))))
        .unwrap();
    let Outcome::Tenant(next) = create(&mut st, 8, "u", Some("a")).unwrap() else {
        panic!()
    };
    assert_eq!(next.port, Some(20001));
    // Removing an empty node that is down needs no force.
    let mut st = ClusterState::default();
    st.apply(1, Command::RegisterNode(node("a", res(2000, 4096, 100))))
        .unwrap();
    down(&mut st, 2, "a");
    assert_eq!(st.apply(3, remove(false)), Ok(Outcome::NodeRemoved(vec![])));
}
