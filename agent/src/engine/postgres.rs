//! The built-in PostgreSQL engine: `initdb` with the tenant's password and scram-sha-256 for
//! every connection (the Unix socket included), then `postgres` listening on its Unix socket only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{EngineTemplate, Readiness};

/// Finds the newest `/usr/lib/postgresql/<version>/bin` that has `postgres` and `initdb`.
pub fn find_bin_dir(search_root: &Path) -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(search_root)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            (bin.join("postgres").exists() && bin.join("initdb").exists()).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

pub fn template(bin: &Path) -> EngineTemplate {
    let bin = bin.display().to_string();
    let s = |v: &str| v.to_string();
    EngineTemplate {
        name: "postgres".into(),
        init_files: vec![(s("{run}/initdb.pw"), s("{password}\n"))],
        init: vec![vec![
            format!("{bin}/initdb"),
            s("--pgdata={data}/pgdata"),
            s("--username=postgres"),
            s("--pwfile={run}/initdb.pw"),
            s("--auth-local=scram-sha-256"),
            s("--auth-host=scram-sha-256"),
            s("--encoding=UTF8"),
            s("--no-locale"),
            s("--wal-segsize=1"),
            s("--no-instructions"),
        ]],
        files: Vec::new(),
        start: vec![
            format!("{bin}/postgres"),
            s("-D"),
            s("{data}/pgdata"),
            s("-c"),
            s("listen_addresses="),
            s("-c"),
            s("unix_socket_directories={run}"),
            s("-c"),
            s("unix_socket_permissions=0700"),
            s("-c"),
            s("shared_buffers={shared_buffers_mb}MB"),
            s("-c"),
            s("max_connections={max_connections}"),
            s("-c"),
            s("password_encryption=scram-sha-256"),
        ],
        // SIGINT is PostgreSQL's "fast" shutdown: clients are disconnected, data is flushed.
        stop_signal: Signal::SIGINT,
        stop_timeout: Duration::from_secs(30),
        socket: s("{run}/.s.PGSQL.5432"),
        readiness: Readiness::PidFileStatus(s("{data}/pgdata/postmaster.pid")),
        client_speaks_first: true,
        max_clients: None,
        seccomp_allow: Vec::new(),
        tls: true,
        alpn: vec![crate::tenant_tls::POSTGRES_ALPN.to_vec()],
        plaintext_refusal: crate::tenant_tls::postgres_error(
            "this endpoint accepts TLS only: connect with sslmode=require or verify-full",
        ),
        // `--username=postgres` above and the database initdb creates: the defaults every
        // version assumes for postgres, so the agent, the scheduler and an older agent agree.
        access: dormant_common::EngineAccess::defaults_for("postgres"),
    }
}

/// Whether a PostgreSQL pid file says the server accepts connections.
pub fn pid_file_says_ready(content: &str) -> bool {
    content.lines().nth(7).map(str::trim) == Some("ready")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid_file_ready_is_the_eighth_line() {
        let starting = "123\n/d\n1700000000\n5432\n/r\n\n  1 2\nstarting\n";
        let ready = "123\n/d\n1700000000\n5432\n/r\n\n  1 2\nready   \n";
        assert!(!pid_file_says_ready(starting));
        assert!(pid_file_says_ready(ready));
        assert!(!pid_file_says_ready("123\n"));
    }

    #[test]
    fn finds_newest_version_with_binaries() {
        let dir = tempfile::tempdir().unwrap();
        for v in ["13", "15", "16"] {
            let bin = dir.path().join(v).join("bin");
            std::fs::create_dir_all(&bin).unwrap();
            if v != "16" {
                std::fs::write(bin.join("postgres"), "").unwrap();
                std::fs::write(bin.join("initdb"), "").unwrap();
            }
        }
        assert_eq!(find_bin_dir(dir.path()), Some(dir.path().join("15/bin")));
    }
}
