//! The engines without Dormant, and the clients the agent benchmarks time.
//!
//! A bare engine is started from the agent's own engine template (`dormant_agent::engine`), filled
//! for the same memory, so its command line, `shared_buffers`, `max_connections`, Redis config and
//! the password authentication are the ones a tenant gets. What it lacks is what Dormant adds: the
//! cgroup, namespaces, the loop-mounted volume, the readiness polling and the proxy. PostgreSQL
//! refuses to run as root, so both run as `nobody`.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use dormant_agent::engine::{postgres, redis, EngineTemplate, TenantContext};
use nix::unistd::{Gid, Uid, User};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::procs::{log_to, Transient};

/// How long one timed attempt (a wake, a bare start) may take before the run fails.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

/// How often a bare engine's socket is tried while it starts: as often as the agent polls a
/// waking tenant's readiness in its first second.
const RETRY: Duration = Duration::from_millis(1);

/// Connects, authenticates and runs `SELECT 1` over one fresh connection; fails unless the
/// answer is 1. The simple query protocol: one round trip, no prepare.
pub async fn pg_select1(cfg: &tokio_postgres::Config) -> anyhow::Result<()> {
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .context("connect")?;
    let conn = tokio::spawn(conn);
    let rows = client.simple_query("SELECT 1").await.context("SELECT 1")?;
    let one = rows.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
        _ => None,
    });
    drop(client);
    // The connection task ends with the client; it is not part of what is timed after this.
    let _ = conn.await;
    match one.as_deref() {
        Some("1") => Ok(()),
        other => bail!("SELECT 1 answered {other:?}"),
    }
}

/// How a Redis answered `AUTH` + `PING`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisAnswer {
    Pong,
    /// `-LOADING`: it accepts connections while it still reads its append-only file, and
    /// answers every command but `AUTH` with this until it is done.
    Loading,
}

/// `AUTH password` and `PING` in one write, then both replies: `+OK` and `+PONG`, or a
/// `-LOADING` one; anything else fails.
pub async fn redis_ping<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    password: &str,
) -> anyhow::Result<RedisAnswer> {
    let req = format!(
        "*2\r\n$4\r\nAUTH\r\n${}\r\n{password}\r\n*1\r\n$4\r\nPING\r\n",
        password.len()
    );
    s.write_all(req.as_bytes()).await.context("send")?;
    let mut got = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    // Both replies are simple strings or errors: one line each.
    while got.windows(2).filter(|w| w == b"\r\n").count() < 2 {
        let n = s.read(&mut buf).await.context("read")?;
        if n == 0 {
            bail!("closed after {:?}", String::from_utf8_lossy(&got));
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    let mut lines = text.split("\r\n");
    match (lines.next(), lines.next()) {
        (Some("+OK"), Some("+PONG")) => Ok(RedisAnswer::Pong),
        (a, b)
            if [a, b]
                .iter()
                .any(|l| l.is_some_and(|l| l.starts_with("-LOADING"))) =>
        {
            Ok(RedisAnswer::Loading)
        }
        _ => bail!("answered {text:?}"),
    }
}

/// A bare engine: its files, once, and one timed start after another.
#[derive(Debug)]
pub struct Bare {
    name: &'static str,
    template: EngineTemplate,
    ctx: TenantContext,
    dir: PathBuf,
    password: String,
    user: (Uid, Gid),
}

/// The user bare engines run as.
fn nobody() -> anyhow::Result<(Uid, Gid)> {
    let u = User::from_name("nobody")
        .context("look up user nobody")?
        .context("no user nobody on this host")?;
    Ok((u.uid, u.gid))
}

fn private_dir(path: &Path, (uid, gid): (Uid, Gid)) -> anyhow::Result<()> {
    std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod {}", path.display()))?;
    nix::unistd::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

fn private_file(path: &Path, content: &str, (uid, gid): (Uid, Gid)) -> anyhow::Result<()> {
    std::fs::write(path, content).with_context(|| format!("write {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    nix::unistd::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

impl Bare {
    /// A bare PostgreSQL in `dir`, initialised once with the agent's `initdb` arguments.
    pub fn postgres(dir: &Path, memory_bytes: u64) -> anyhow::Result<Self> {
        let bin = postgres::find_bin_dir(Path::new("/usr/lib/postgresql"))
            .context("no PostgreSQL under /usr/lib/postgresql/*/bin")?;
        let bare = Self::new("postgres", postgres::template(&bin), dir, memory_bytes)?;
        for (path, content) in &bare.template.init_files {
            private_file(
                &bare.ctx.fill_path(path),
                &bare.ctx.fill(content),
                bare.user,
            )?;
        }
        for argv in &bare.template.init {
            let argv = bare.ctx.fill_argv(argv);
            let log = dir.join("init.log");
            let status = log_to(&mut bare.command(&argv)?, &log)?
                .status()
                .with_context(|| format!("run {}", argv[0]))?;
            if !status.success() {
                bail!(
                    "{} failed ({status}):\n{}",
                    argv[0],
                    crate::procs::log_tail(&log, 20)
                );
            }
        }
        for (path, _) in &bare.template.init_files {
            let _ = std::fs::remove_file(bare.ctx.fill_path(path));
        }
        Ok(bare)
    }

    /// A bare Redis in `dir`.
    pub fn redis(dir: &Path, memory_bytes: u64) -> anyhow::Result<Self> {
        let server = redis::find_server().context("no redis-server installed")?;
        Self::new("redis", redis::template(&server), dir, memory_bytes)
    }

    fn new(
        name: &'static str,
        template: EngineTemplate,
        dir: &Path,
        memory_bytes: u64,
    ) -> anyhow::Result<Self> {
        let user = nobody()?;
        // Any password: the engine checks it as a tenant's engine does.
        let password = format!("bare-{:016x}", rand::random::<u64>());
        let (data, run) = (dir.join("data"), dir.join("run"));
        // `dir` itself only needs to be passable; data and socket are the engine user's.
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        private_dir(&data, user)?;
        private_dir(&run, user)?;
        let ctx = TenantContext::new(&data, &run, &password, memory_bytes);
        Ok(Self {
            name,
            template,
            ctx,
            dir: dir.to_path_buf(),
            password,
            user,
        })
    }

    fn command(&self, argv: &[String]) -> anyhow::Result<Command> {
        let (prog, args) = argv.split_first().context("empty command line")?;
        let mut cmd = Command::new(prog);
        cmd.args(args)
            .current_dir(&self.dir)
            .uid(self.user.0.as_raw())
            .gid(self.user.1.as_raw());
        Ok(cmd)
    }

    /// The engine's Unix socket.
    pub fn socket(&self) -> PathBuf {
        self.ctx.fill_path(&self.template.socket)
    }

    /// The `tokio_postgres` config for the bare PostgreSQL's socket.
    pub fn pg_config(&self) -> anyhow::Result<tokio_postgres::Config> {
        let socket = self.socket();
        let dir = socket.parent().context("socket has no directory")?;
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(dir)
            .port(5432)
            .user("postgres")
            .password(&self.password)
            .dbname("postgres");
        Ok(cfg)
    }

    /// Starts the engine and times spawn → first answer (`SELECT 1`, or `PING` after `AUTH`),
    /// retrying every millisecond, then stops it gracefully (as hibernation's stop does).
    /// Also returns one more fresh connection's time to the now running engine: what a
    /// connection costs without Dormant's proxy in between.
    pub async fn timed_start(&self) -> anyhow::Result<(Duration, Duration)> {
        for (path, content) in &self.template.files {
            private_file(
                &self.ctx.fill_path(path),
                &self.ctx.fill(content),
                self.user,
            )?;
        }
        let argv = self.ctx.fill_argv(&self.template.start);
        let log = self.dir.join(format!("{}.log", self.name));
        let mut cmd = self.command(&argv)?;
        let cmd = log_to(&mut cmd, &log)?;
        let pg = (self.name == "postgres")
            .then(|| self.pg_config())
            .transpose()?;
        let socket = self.socket();
        let ask = || async {
            match &pg {
                Some(cfg) => pg_select1(cfg).await,
                // Not answered until it has loaded its data, as a tenant's client sees it.
                None => match tokio::net::UnixStream::connect(&socket).await {
                    Ok(s) => match redis_ping(s, &self.password).await {
                        Ok(RedisAnswer::Pong) => Ok(()),
                        Ok(RedisAnswer::Loading) => Err(anyhow::anyhow!("-LOADING")),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e.into()),
                },
            }
        };
        let t0 = Instant::now();
        let mut child = Transient::spawn(self.name, cmd)?;
        let deadline = t0 + ATTEMPT_TIMEOUT;
        loop {
            let Err(error) = ask().await else { break };
            if let Err(e) = child.check_running() {
                bail!(
                    "{e:#}; last lines of {}:\n{}",
                    log.display(),
                    crate::procs::log_tail(&log, 20)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "bare {} did not answer within {ATTEMPT_TIMEOUT:?}: {error:#}",
                    self.name
                );
            }
            tokio::time::sleep(RETRY).await;
        }
        let took = t0.elapsed();
        let t1 = Instant::now();
        ask()
            .await
            .context("a second connection to the running engine")?;
        let running = t1.elapsed();
        child
            .stop(self.template.stop_signal, self.template.stop_timeout)
            .await?;
        Ok((took, running))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake Redis that answers `reply` to whatever it is sent.
    async fn answer(reply: &'static [u8]) -> anyhow::Result<RedisAnswer> {
        let (client, mut server) = tokio::io::duplex(1024);
        tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let _ = server.read(&mut buf).await;
            // In two pieces: a reply may arrive split.
            let (a, b) = reply.split_at(reply.len() / 2);
            let _ = server.write_all(a).await;
            let _ = server.write_all(b).await;
        });
        redis_ping(client, "pw").await
    }

    #[tokio::test]
    async fn redis_replies_are_told_apart() {
        assert_eq!(
            answer(b"+OK\r\n+PONG\r\n").await.ok(),
            Some(RedisAnswer::Pong)
        );
        assert_eq!(
            answer(b"+OK\r\n-LOADING Redis is loading the dataset in memory\r\n")
                .await
                .ok(),
            Some(RedisAnswer::Loading)
        );
        assert!(answer(b"-WRONGPASS invalid password\r\n+PONG\r\n")
            .await
            .is_err());
    }
}
