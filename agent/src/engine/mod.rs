//! Engines as templates: how to initialise a tenant's data once, start the engine, stop it and
//! tell when it is ready, with `{placeholders}` filled per tenant. PostgreSQL is built in; more
//! engines (Redis, custom ones from the agent's config) are templates of the same shape.

pub mod custom;
pub mod postgres;
pub mod redis;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

/// How the agent knows the engine is ready for clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// A PostgreSQL-style pid file whose 8th line reads `ready` (what `pg_ctl` waits for).
    PidFileStatus(String),
    /// The Unix socket accepts a connection.
    SocketAccepts,
    /// Redis answers `PING` with `PONG` after `AUTH` with the tenant's password. (Its socket
    /// accepts, and answers `-LOADING`, while it still reads its data.)
    RedisPing,
}

#[derive(Debug, Clone)]
pub struct EngineTemplate {
    pub name: String,
    /// Files written (as the tenant's user, mode 0600) before `init` runs; removed after.
    pub init_files: Vec<(String, String)>,
    /// Runs once, when the tenant's data directory has never been initialised.
    pub init: Vec<Vec<String>>,
    /// Files written (as the tenant's user, mode 0600) before every start: configuration that
    /// holds secrets, which must never appear on a command line.
    pub files: Vec<(String, String)>,
    pub start: Vec<String>,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    /// The Unix socket the proxy connects to.
    pub socket: String,
    pub readiness: Readiness,
    /// Clients send the first byte (PostgreSQL, Redis); a server that speaks first (a MySQL-style
    /// greeting) is connected to as soon as a client is accepted.
    pub client_speaks_first: bool,
    /// Open client connections one tenant may hold through the proxy; `None`: from PostgreSQL's
    /// `max_connections` for the tenant's memory (see `proxy::Budget::for_engine`).
    pub max_clients: Option<u64>,
    /// Calls of the tenant seccomp filter's deny list this engine gets back (see
    /// `spawn::seccomp`); empty for the built-in engines.
    pub seccomp_allow: Vec<String>,
    /// What a plaintext client refused by a TLS-only node reads, in the engine's protocol.
    pub plaintext_refusal: Vec<u8>,
    /// Whether the proxy terminates TLS for this engine's clients (a custom engine's own
    /// protocol may not suit it: then its clients are served in the clear).
    pub tls: bool,
    /// ALPN protocol names offered in the TLS handshake (PostgreSQL's direct TLS needs one).
    pub alpn: Vec<Vec<u8>>,
    /// The admin user and URI of tenants' credentials, reported to the scheduler.
    pub access: dormant_common::EngineAccess,
}

/// PostgreSQL's `max_connections` for a tenant of this memory: in proportion, 20 to 500.
pub fn max_connections(memory_bytes: u64) -> u64 {
    ((memory_bytes >> 20) / 8).clamp(20, 500)
}

/// The values a template's placeholders take for one tenant.
#[derive(Debug, Clone)]
pub struct TenantContext {
    pub vars: BTreeMap<&'static str, String>,
}

impl TenantContext {
    pub fn new(data: &Path, run: &Path, password: &str, memory_bytes: u64) -> Self {
        let mib = memory_bytes >> 20;
        // PostgreSQL sizing that follows the tenant's memory: a quarter for shared buffers,
        // connections in proportion, so the smallest tier fits in 256 MiB.
        let shared_buffers_mb = (mib / 4).clamp(8, 8192);
        let max_connections = max_connections(memory_bytes);
        let vars = BTreeMap::from([
            ("data", data.display().to_string()),
            ("run", run.display().to_string()),
            ("password", password.to_string()),
            ("memory_bytes", memory_bytes.to_string()),
            (
                "memory_bytes_three_quarters",
                (memory_bytes / 4 * 3).to_string(),
            ),
            ("shared_buffers_mb", shared_buffers_mb.to_string()),
            ("max_connections", max_connections.to_string()),
        ]);
        Self { vars }
    }

    /// Replaces every `{name}` known to the context; unknown names are left as they are.
    pub fn fill(&self, template: &str) -> String {
        let mut out = template.to_string();
        for (k, v) in &self.vars {
            out = out.replace(&format!("{{{k}}}"), v);
        }
        out
    }

    pub fn fill_argv(&self, argv: &[String]) -> Vec<String> {
        argv.iter().map(|a| self.fill(a)).collect()
    }

    pub fn fill_path(&self, template: &str) -> PathBuf {
        PathBuf::from(self.fill(template))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_fills_placeholders_and_sizes_by_memory() {
        let ctx = TenantContext::new(Path::new("/d"), Path::new("/r"), "pw", 256 << 20);
        assert_eq!(ctx.fill("{data}/pgdata"), "/d/pgdata");
        assert_eq!(
            ctx.fill("shared_buffers={shared_buffers_mb}MB"),
            "shared_buffers=64MB"
        );
        assert_eq!(
            ctx.fill("max_connections={max_connections}"),
            "max_connections=32"
        );
        assert_eq!(ctx.fill("{unknown}"), "{unknown}");
    }
}
