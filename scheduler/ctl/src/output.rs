//! How `dormantctl` prints: aligned tables, or JSON with stable field names.

use std::time::{SystemTime, UNIX_EPOCH};

use dormant_common::{Bytes, MilliCpu};
use dormant_proto::v1 as pb;
use serde_json::{json, Value};

pub fn resources_json(r: Option<&pb::Resources>) -> Value {
    let r = r.cloned().unwrap_or_default();
    json!({
        "cpu": MilliCpu(r.milli_cpu).cores(),
        "memory_bytes": r.memory_bytes,
        "storage_bytes": r.storage_bytes,
    })
}

fn none_if_empty(s: &str) -> Value {
    if s.is_empty() {
        Value::Null
    } else {
        Value::String(s.to_string())
    }
}

/// A count or time where 0 means "never" (no activity yet, no wake yet).
fn none_if_zero(v: u64) -> Value {
    if v == 0 {
        Value::Null
    } else {
        json!(v)
    }
}

pub fn tenant_json(t: &pb::Tenant) -> Value {
    let usage = t.usage.as_ref().map(|u| {
        json!({
            "cpu_usage_usec": u.cpu_usage_usec,
            "memory_bytes": u.memory_bytes,
            "storage_used_bytes": u.storage_used_bytes,
            "pids": u.pids,
            "restarts": u.restarts,
            "oom_kills": u.oom_kills,
            "cpu_throttled_usec": u.cpu_throttled_usec,
            "cpu_nr_throttled": u.cpu_nr_throttled,
            "pressure": u.pressure_reported.then(|| json!({
                "cpu_some_usec": u.cpu_pressure_some_usec,
                "memory_some_usec": u.memory_pressure_some_usec,
                "memory_full_usec": u.memory_pressure_full_usec,
                "io_some_usec": u.io_pressure_some_usec,
                "io_full_usec": u.io_pressure_full_usec,
            })),
            "open_connections": u.open_connections,
            "connections_total": u.connections_total,
            "bytes_in": u.bytes_in,
            "bytes_out": u.bytes_out,
            "last_activity_unix_ms": none_if_zero(u.last_activity_unix_ms),
            "hibernations": u.hibernations,
            "wakes": u.wakes,
            "last_wake_usec": none_if_zero(u.last_wake_usec),
        })
    });
    let connections: Vec<Value> = t
        .connections
        .iter()
        .map(|c| json!({"peer": c.peer, "opened_unix_ms": c.opened_unix_ms}))
        .collect();
    json!({
        "name": t.name,
        "uid": t.uid,
        "engine": t.engine,
        "state": t.state,
        "node": none_if_empty(&t.node),
        "endpoint": none_if_empty(&t.endpoint),
        "reason": none_if_empty(&t.reason),
        "constraints": t.constraints,
        "resources": resources_json(t.resources.as_ref()),
        "usage": usage,
        "resize_pending": none_if_empty(&t.resize_pending),
        "restart_generation": t.restart_generation,
        "idle_after": none_if_empty(&t.idle_after),
        "hibernate": none_if_empty(&t.hibernate),
        "hibernate_generation": t.hibernate_generation,
        "wake_generation": t.wake_generation,
        "connections": connections,
    })
}

pub fn credentials_json(c: &pb::Credentials) -> Value {
    json!({ "user": c.user, "password": c.password, "uri": none_if_empty(&c.uri) })
}

pub fn node_json(n: &pb::Node) -> Value {
    json!({
        "id": n.id,
        "address": n.address,
        "status": n.status,
        "cordoned": n.cordoned,
        "capacity": resources_json(n.capacity.as_ref()),
        "allocated": resources_json(n.allocated.as_ref()),
        "engines": n.engines,
        "engine_access": n.engine_access.iter().map(|a| json!({
            "engine": a.engine,
            "user": a.user,
            "uri_scheme": a.uri_scheme,
            "uri_path": a.uri_path,
        })).collect::<Vec<_>>(),
        "cgroup_driver": n.cgroup_driver,
        "tenants": n.tenants,
        "labels": n.labels,
        "removing": n.removing,
        "used": n.used.map(|u| json!({
            "cpu": MilliCpu(u.cpu_usage_milli).cores(),
            "memory_bytes": u.memory_used_bytes,
            "storage_bytes": u.storage_used_bytes,
        })),
    })
}

/// `cluster_id` is `None` until the cluster's first leader has chosen it.
pub fn cluster_json(c: &pb::ClusterStatusResponse, cluster_id: Option<&str>) -> Value {
    let members: Vec<Value> = c
        .members
        .iter()
        .map(|m| json!({"id": m.id, "address": m.address, "role": m.role, "lag": m.lag}))
        .collect();
    json!({
        "cluster_id": cluster_id,
        "this_id": c.this_id,
        "leader_id": if c.leader_id == 0 { Value::Null } else { json!(c.leader_id) },
        "term": c.term,
        "commit_index": c.commit_index,
        "applied_index": c.applied_index,
        "last_log_index": c.last_log_index,
        "snapshot_index": c.snapshot_index,
        "purged_index": c.purged_index,
        "leader_address": none_if_empty(&c.leader_address),
        "members": members,
    })
}

/// Renders rows under a header with columns padded to their widest cell.
/// Cells are escaped (`escape_control`): some carry text from tenants (a failure's reason).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .map(|c| dormant_common::text::escape_control(c))
                .collect()
        })
        .collect();
    let rows = rows.as_slice();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

fn res_cells(r: Option<&pb::Resources>) -> [String; 3] {
    let r = r.cloned().unwrap_or_default();
    [
        MilliCpu(r.milli_cpu).to_string(),
        Bytes(r.memory_bytes).human(),
        Bytes(r.storage_bytes).human(),
    ]
}

pub fn tenants_table(tenants: &[pb::Tenant]) -> String {
    let rows: Vec<Vec<String>> = tenants
        .iter()
        .map(|t| {
            let [cpu, mem, sto] = res_cells(t.resources.as_ref());
            vec![
                t.name.clone(),
                t.engine.clone(),
                t.state.clone(),
                dash(&t.node),
                dash(&t.endpoint),
                cpu,
                mem,
                sto,
                dash(&t.reason),
            ]
        })
        .collect();
    table(
        &[
            "NAME", "ENGINE", "STATE", "NODE", "ENDPOINT", "CPU", "MEMORY", "STORAGE", "REASON",
        ],
        &rows,
    )
}

fn seconds(usec: u64) -> String {
    format!("{:.1}s", usec as f64 / 1e6)
}

/// A short duration such as a wake: "850µs", "43.2ms", "1.5s".
fn short_duration(usec: u64) -> String {
    if usec < 1_000 {
        format!("{usec}µs")
    } else if usec < 1_000_000 {
        format!("{:.1}ms", usec as f64 / 1e3)
    } else {
        seconds(usec)
    }
}

/// A span of time to the second, in its two largest units: "3s", "1m 2s", "2h 5m", "3d 4h".
fn span(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// The tenant's hibernation policy as one line: "stop after 10m without connections".
fn hibernation_policy(t: &pb::Tenant) -> Option<String> {
    // Empty from a scheduler older than hibernation.
    if t.idle_after.is_empty() {
        return None;
    }
    let mode = if t.hibernate.is_empty() {
        "stop"
    } else {
        &t.hibernate
    };
    Some(if t.idle_after == "never" {
        format!("{mode}, only when asked (idle_after never)")
    } else {
        format!("{mode} after {} without connections", t.idle_after)
    })
}

/// Key-value rows under a heading, keys padded to the widest.
fn section(title: &str, rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("\n\n{title}");
    for (k, v) in rows {
        out.push_str(&format!("\n  {k:<width$}  {v}"));
    }
    out
}

/// `tenant get`: the table row, then what the tenant uses (from its node's last heartbeat).
pub fn tenant_detail(t: &pb::Tenant) -> String {
    tenant_detail_at(t, now_unix_ms())
}

/// [`tenant_detail`] with ages counted to `now_unix_ms`.
pub fn tenant_detail_at(t: &pb::Tenant, now_unix_ms: u64) -> String {
    let mut out = tenants_table(std::slice::from_ref(t));
    if !t.constraints.is_empty() {
        out.push_str(&format!("\nconstraints: {}", t.constraints.join(", ")));
    }
    if let Some(policy) = hibernation_policy(t) {
        out.push_str(&format!("\nhibernation: {policy}"));
    }
    if t.restart_generation > 0 {
        out.push_str(&format!(
            "\nrestart generation: {} (raised by each `tenant restart`)",
            t.restart_generation
        ));
    }
    if t.hibernate_generation > 0 {
        out.push_str(&format!(
            "\nhibernate generation: {} (raised by each `tenant hibernate`)",
            t.hibernate_generation
        ));
    }
    if t.wake_generation > 0 {
        out.push_str(&format!(
            "\nwake generation: {} (raised by each `tenant wake`)",
            t.wake_generation
        ));
    }
    if !t.resize_pending.is_empty() {
        out.push_str(&format!("\nresize pending: {}", t.resize_pending));
    }
    let Some(u) = t.usage.as_ref() else {
        return out;
    };
    let r = t.resources.unwrap_or_default();
    let mut rows = vec![
        (
            "cpu",
            format!(
                "{} used, throttled {} in {} periods",
                seconds(u.cpu_usage_usec),
                seconds(u.cpu_throttled_usec),
                u.cpu_nr_throttled
            ),
        ),
        (
            "memory",
            format!(
                "{} of {}",
                Bytes(u.memory_bytes).human(),
                Bytes(r.memory_bytes).human()
            ),
        ),
        (
            "storage",
            format!(
                "{} of {}",
                Bytes(u.storage_used_bytes).human(),
                Bytes(r.storage_bytes).human()
            ),
        ),
        ("pids", u.pids.to_string()),
        ("restarts", u.restarts.to_string()),
        ("oom kills", u.oom_kills.to_string()),
    ];
    if u.pressure_reported {
        rows.push((
            "stalled",
            format!(
                "cpu {}, memory {} (all tasks {}), io {} (all tasks {})",
                seconds(u.cpu_pressure_some_usec),
                seconds(u.memory_pressure_some_usec),
                seconds(u.memory_pressure_full_usec),
                seconds(u.io_pressure_some_usec),
                seconds(u.io_pressure_full_usec)
            ),
        ));
    }
    out.push_str("\n\nUSAGE");
    for (k, v) in rows {
        out.push_str(&format!("\n  {k:<10} {v}"));
    }
    out.push_str(&section(
        "HIBERNATION",
        &[
            ("hibernations", u.hibernations.to_string()),
            ("wakes", u.wakes.to_string()),
            (
                "last wake",
                if u.last_wake_usec == 0 {
                    "-".to_string()
                } else {
                    short_duration(u.last_wake_usec)
                },
            ),
        ],
    ));
    let ago = |unix_ms: u64| format!("{} ago", span(now_unix_ms.saturating_sub(unix_ms)));
    out.push_str(&section(
        "CONNECTIONS",
        &[
            ("open", u.open_connections.to_string()),
            ("total", u.connections_total.to_string()),
            ("bytes in", Bytes(u.bytes_in).human()),
            ("bytes out", Bytes(u.bytes_out).human()),
            (
                "last activity",
                if u.last_activity_unix_ms == 0 {
                    "never".to_string()
                } else {
                    ago(u.last_activity_unix_ms)
                },
            ),
        ],
    ));
    // The clients' own addresses (the engine sees every client as the proxy), below the counts.
    let width = t
        .connections
        .iter()
        .map(|c| c.peer.len())
        .max()
        .unwrap_or(0);
    for c in &t.connections {
        let open_for = span(now_unix_ms.saturating_sub(c.opened_unix_ms));
        out.push_str(&format!("\n    {:<width$}  open for {open_for}", c.peer));
    }
    let listed = u64::try_from(t.connections.len()).unwrap_or(u64::MAX);
    if u.open_connections > listed && listed > 0 {
        out.push_str(&format!(
            "\n    ... and {} more not listed",
            u.open_connections - listed
        ));
    }
    out
}

pub fn nodes_table(nodes: &[pb::Node]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let [c_cpu, c_mem, c_sto] = res_cells(n.capacity.as_ref());
            let [a_cpu, a_mem, a_sto] = res_cells(n.allocated.as_ref());
            vec![
                n.id.clone(),
                n.address.clone(),
                n.status.clone(),
                format!("{a_cpu}/{c_cpu}"),
                format!("{a_mem}/{c_mem}"),
                format!("{a_sto}/{c_sto}"),
                n.tenants.to_string(),
                n.engines.join(","),
                dash(&n.cgroup_driver),
            ]
        })
        .collect();
    table(
        &[
            "ID", "ADDRESS", "STATUS", "CPU", "MEMORY", "STORAGE", "TENANTS", "ENGINES", "CGROUP",
        ],
        &rows,
    )
}

pub fn cluster_table(c: &pb::ClusterStatusResponse, cluster_id: Option<&str>) -> String {
    let leader = if c.leader_id == 0 {
        "none".to_string()
    } else {
        c.leader_id.to_string()
    };
    let head = format!(
        "leader: {leader}  term: {}  commit: {}  applied: {}  snapshot: {}  purged: {}  \
         (answered by {})",
        c.term, c.commit_index, c.applied_index, c.snapshot_index, c.purged_index, c.this_id
    );
    let rows: Vec<Vec<String>> = c
        .members
        .iter()
        .map(|m| {
            vec![
                m.id.to_string(),
                m.address.clone(),
                m.role.clone(),
                m.lag.to_string(),
            ]
        })
        .collect();
    format!(
        "cluster: {}\n{head}\n{}",
        cluster_id.unwrap_or("(identity not chosen yet)"),
        table(&["ID", "ADDRESS", "ROLE", "LAG"], &rows)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_json_has_the_documented_fields() {
        let t = pb::Tenant {
            name: "acme".into(),
            engine: "postgres".into(),
            state: "running".into(),
            node: "n1".into(),
            endpoint: "127.0.0.1:20000".into(),
            resources: Some(pb::Resources {
                milli_cpu: 500,
                memory_bytes: 512 << 20,
                storage_bytes: 1 << 30,
            }),
            ..Default::default()
        };
        let v = tenant_json(&t);
        assert_eq!(v["resources"]["cpu"], json!(0.5));
        assert_eq!(v["resources"]["memory_bytes"], json!(512u64 << 20));
        assert_eq!(v["endpoint"], json!("127.0.0.1:20000"));
        assert_eq!(v["reason"], Value::Null);
    }

    #[test]
    fn tenant_detail_shows_usage() {
        let t = pb::Tenant {
            name: "acme".into(),
            engine: "postgres".into(),
            state: "running".into(),
            resources: Some(pb::Resources {
                milli_cpu: 500,
                memory_bytes: 512 << 20,
                storage_bytes: 1 << 30,
            }),
            usage: Some(pb::TenantUsage {
                cpu_usage_usec: 2_500_000,
                memory_bytes: 64 << 20,
                storage_used_bytes: 100 << 20,
                pids: 7,
                restarts: 1,
                oom_kills: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let out = tenant_detail(&t);
        for expected in [
            "cpu        2.5s used",
            "memory     64MiB of 512MiB",
            "storage    100MiB of 1GiB",
            "pids       7",
            "restarts   1",
            "oom kills  2",
        ] {
            assert!(out.contains(expected), "{expected:?} not in:\n{out}");
        }
        assert!(!out.contains("stalled"), "no pressure on v1: {out}");
    }

    #[test]
    fn tenant_get_shows_a_pending_resize_and_the_restart_generation() {
        let mut t = pb::Tenant {
            name: "acme".into(),
            state: "running".into(),
            ..Default::default()
        };
        let plain = tenant_detail(&t);
        assert!(!plain.contains("resize pending"), "{plain}");
        assert!(!plain.contains("restart generation"), "{plain}");
        assert_eq!(tenant_json(&t)["resize_pending"], Value::Null);
        t.resize_pending = "storage 2GiB: resize2fs needs CAP_SYS_RESOURCE".into();
        t.restart_generation = 3;
        let out = tenant_detail(&t);
        assert!(
            out.contains("\nresize pending: storage 2GiB: resize2fs needs CAP_SYS_RESOURCE"),
            "{out}"
        );
        assert!(out.contains("\nrestart generation: 3"), "{out}");
        let v = tenant_json(&t);
        assert_eq!(
            v["resize_pending"],
            "storage 2GiB: resize2fs needs CAP_SYS_RESOURCE"
        );
        assert_eq!(v["restart_generation"], 3);
    }

    #[test]
    fn cluster_status_names_the_cluster() {
        let s = pb::ClusterStatusResponse {
            leader_id: 1,
            this_id: 1,
            ..Default::default()
        };
        assert!(cluster_table(&s, Some("3a7f")).starts_with("cluster: 3a7f\nleader: 1"));
        assert!(cluster_table(&s, None).starts_with("cluster: (identity not chosen yet)"));
        assert_eq!(cluster_json(&s, Some("3a7f"))["cluster_id"], "3a7f");
        assert_eq!(cluster_json(&s, None)["cluster_id"], Value::Null);
    }

    #[test]
    fn table_pads_columns() {
        let out = table(&["A", "BB"], &[vec!["long".into(), "x".into()]]);
        assert_eq!(out, "A     BB\nlong  x");
    }

    fn hibernating_tenant() -> pb::Tenant {
        pb::Tenant {
            name: "acme".into(),
            engine: "postgres".into(),
            state: "hibernated".into(),
            idle_after: "10m".into(),
            hibernate: "freeze".into(),
            hibernate_generation: 2,
            wake_generation: 1,
            usage: Some(pb::TenantUsage {
                open_connections: 2,
                connections_total: 15,
                bytes_in: 3 << 20,
                bytes_out: 1536,
                last_activity_unix_ms: NOW - 12_000,
                hibernations: 3,
                wakes: 2,
                last_wake_usec: 43_200,
                ..Default::default()
            }),
            connections: vec![
                pb::Connection {
                    peer: "10.0.0.7:51234".into(),
                    opened_unix_ms: NOW - 3_000,
                },
                pb::Connection {
                    peer: "[2001:db8::1]:40022".into(),
                    opened_unix_ms: NOW - 62_500,
                },
            ],
            ..Default::default()
        }
    }

    const NOW: u64 = 1_700_000_000_000;

    #[test]
    fn tenant_get_shows_hibernation_and_connections() {
        let t = hibernating_tenant();
        let out = tenant_detail_at(&t, NOW);
        assert!(out.contains("hibernated"), "{out}");
        for expected in [
            "\nhibernation: freeze after 10m without connections",
            "\nhibernate generation: 2",
            "\nwake generation: 1",
            "\nHIBERNATION\n  hibernations  3\n  wakes         2\n  last wake     43.2ms",
            "\nCONNECTIONS\n  open           2\n  total          15",
            "\n  bytes in       3MiB\n  bytes out      1.50KiB",
            "\n  last activity  12s ago",
            "\n    10.0.0.7:51234       open for 3s",
            "\n    [2001:db8::1]:40022  open for 1m 2s",
        ] {
            assert!(out.contains(expected), "{expected:?} not in:\n{out}");
        }
        assert!(!out.contains("more not listed"), "{out}");
    }

    #[test]
    fn tenant_get_says_never_and_counts_connections_not_listed() {
        let mut t = hibernating_tenant();
        t.idle_after = "never".into();
        t.hibernate = "stop".into();
        t.connections.truncate(1);
        let u = t.usage.as_mut().unwrap();
        u.open_connections = 150;
        u.last_activity_unix_ms = 0;
        u.wakes = 0;
        u.last_wake_usec = 0;
        let out = tenant_detail_at(&t, NOW);
        for expected in [
            "\nhibernation: stop, only when asked (idle_after never)",
            "\n  last wake     -",
            "\n  last activity  never",
            "\n    ... and 149 more not listed",
        ] {
            assert!(out.contains(expected), "{expected:?} not in:\n{out}");
        }
        // A scheduler older than hibernation sends no policy: no line, rather than a wrong one.
        let old = pb::Tenant {
            name: "acme".into(),
            state: "running".into(),
            ..Default::default()
        };
        assert!(!tenant_detail_at(&old, NOW).contains("hibernation"));
    }

    #[test]
    fn tenant_json_has_the_hibernation_and_connection_fields() {
        let v = tenant_json(&hibernating_tenant());
        assert_eq!(v["state"], "hibernated");
        assert_eq!(v["idle_after"], "10m");
        assert_eq!(v["hibernate"], "freeze");
        assert_eq!(v["hibernate_generation"], 2);
        assert_eq!(v["wake_generation"], 1);
        assert_eq!(
            v["connections"][0],
            json!({"peer": "10.0.0.7:51234", "opened_unix_ms": NOW - 3_000})
        );
        assert_eq!(v["connections"].as_array().unwrap().len(), 2);
        let u = &v["usage"];
        for (field, want) in [
            ("open_connections", json!(2)),
            ("connections_total", json!(15)),
            ("bytes_in", json!(3u64 << 20)),
            ("bytes_out", json!(1536)),
            ("last_activity_unix_ms", json!(NOW - 12_000)),
            ("hibernations", json!(3)),
            ("wakes", json!(2)),
            ("last_wake_usec", json!(43_200)),
        ] {
            assert_eq!(u[field], want, "{field}");
        }
        let quiet = pb::Tenant {
            usage: Some(pb::TenantUsage::default()),
            ..Default::default()
        };
        let v = tenant_json(&quiet);
        assert_eq!(v["connections"], json!([]));
        assert_eq!(v["idle_after"], Value::Null);
        assert_eq!(v["usage"]["last_activity_unix_ms"], Value::Null);
        assert_eq!(v["usage"]["last_wake_usec"], Value::Null);
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(short_duration(850), "850µs");
        assert_eq!(short_duration(43_200), "43.2ms");
        assert_eq!(short_duration(1_500_000), "1.5s");
        assert_eq!(span(999), "0s");
        assert_eq!(span(62_500), "1m 2s");
        assert_eq!(span(2 * 3_600_000 + 5 * 60_000), "2h 5m");
        assert_eq!(span(3 * 86_400_000 + 4 * 3_600_000), "3d 4h");
    }
}
