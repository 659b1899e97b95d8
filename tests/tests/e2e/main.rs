//! End-to-end tests of the walking skeleton: real scheduler, agent and dormantctl processes, a
//! real PostgreSQL per tenant, real cgroups. They need root (tenant users, cgroups).

// This whole crate is tests: a failed unwrap is a failed test, and there is no non-test module.
#![allow(clippy::tests_outside_test_module, clippy::unwrap_used)]

mod t100_raft;
mod t10_create_and_connect;
mod t110_placement;
mod t11_dev_session;
mod t120_liveness;
mod t125_dead_node;
mod t130_agent_contract;
mod t140_upgrade_in_place;
mod t141_scheduler_upgrade;
mod t150_crash_matrix;
mod t160_mutual_tls;
mod t170_raft_recovery;
mod t180_metrics;
mod t190_systemd;
mod t20_cgroup_limits;
mod t30_restarts;
mod t35_lifecycle;
mod t36_sweep;
mod t37_hibernate;
mod t38_ports_outlive_the_agent;
mod t39_client_budget;
mod t40_pending_until_room;
mod t41_engine_log_bounded;
mod t50_bad_input;
mod t55_isolation;
mod t56_hostile_tenant;
mod t57_tenant_tls;
mod t60_limits;
mod t70_cgroup_driver;
mod t80_engines;
mod t90_storage;
