//! The built-in Redis engine: no TCP port, a Unix socket in the tenant's run directory, a password
//! for the `default` user, memory capped below the cgroup limit so Redis refuses writes
//! (`noeviction`) before the kernel OOM-kills it, and an append-only file for durability.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::{EngineTemplate, Readiness};

/// `redis-server` on the PATH directories Debian and most distributions use.
pub fn find_server() -> Option<PathBuf> {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

pub fn template(server: &Path) -> EngineTemplate {
    let s = |v: &str| v.to_string();
    EngineTemplate {
        name: "redis".into(),
        init_files: Vec::new(),
        init: Vec::new(),
        // Written before every start: the password never appears on a command line.
        files: vec![(
            s("{data}/redis.conf"),
            s("port 0\n\
               unixsocket {run}/redis.sock\n\
               unixsocketperm 700\n\
               dir {data}\n\
               requirepass {password}\n\
               maxmemory {memory_bytes_three_quarters}\n\
               maxmemory-policy noeviction\n\
               appendonly yes\n\
               appendfsync everysec\n\
               save \"\"\n\
               daemonize no\n\
               logfile \"\"\n"),
        )],
        start: vec![server.display().to_string(), s("{data}/redis.conf")],
        // SIGTERM: Redis flushes the append-only file and exits.
        stop_signal: Signal::SIGTERM,
        stop_timeout: Duration::from_secs(30),
        socket: s("{run}/redis.sock"),
        readiness: Readiness::SocketAccepts,
    }
}
