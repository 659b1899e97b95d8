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

/// Redis' `maxclients` for every tenant (its default, 10,000, is more than one tenant may hold
/// of the agent).
const MAX_CLIENTS: u64 = 1000;

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
               maxclients 1000\n\
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
        readiness: Readiness::RedisPing,
        client_speaks_first: true,
        // Above Redis' own `maxclients`, so a client beyond it gets Redis' own error.
        max_clients: Some(MAX_CLIENTS + 24),
        seccomp_allow: Vec::new(),
        tls: true,
        alpn: Vec::new(),
        plaintext_refusal: b"-ERR this endpoint accepts TLS only: connect with --tls\r\n".to_vec(),
        // `requirepass` sets the password of Redis' `default` user.
        access: dormant_common::EngineAccess::defaults_for("redis"),
    }
}

/// Whether Redis answers on `socket`: `AUTH` then `PING` must get `+OK` and `+PONG` (a Redis
/// still loading its data answers `-LOADING` to the `PING`).
pub async fn answers_ping(socket: tokio::net::UnixStream, password: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = socket;
    let request = format!(
        "*2\r\n$4\r\nAUTH\r\n${}\r\n{password}\r\n*1\r\n$4\r\nPING\r\n",
        password.len()
    );
    if socket.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    let read = async {
        // Two replies, each a line.
        while answer.iter().filter(|b| **b == b'\n').count() < 2 && answer.len() < 4096 {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .is_err()
    {
        return false;
    }
    answer.starts_with(b"+OK\r\n+PONG\r\n")
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A fake Redis (named as one) that answers the AUTH and then `pong` for the PING.
    async fn fake_redis(pong: &'static [u8]) -> bool {
        let (client, mut server) = tokio::net::UnixStream::pair().unwrap();
        let serve = tokio::spawn(async move {
            let mut buf = vec![0u8; 256];
            let n = server.read(&mut buf).await.unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            server.write_all(b"+OK\r\n").await.unwrap();
            server.write_all(pong).await.unwrap();
            request
        });
        let ok = answers_ping(client, "pw").await;
        let request = serve.await.unwrap();
        assert!(request.contains("AUTH\r\n$2\r\npw\r\n"), "{request}");
        ok
    }

    #[tokio::test]
    async fn ready_only_once_it_answers_pong() {
        assert!(fake_redis(b"+PONG\r\n").await);
        assert!(!fake_redis(b"-LOADING Redis is loading the dataset in memory\r\n").await);
    }
}
