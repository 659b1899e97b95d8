//! The supervisor's seam to the host. `Runtime` names each host-side step of a tenant's life
//! (prepare, initialise, adopt, spawn, wait until ready, stop, resize, remove) so that the
//! supervisor's decisions are tested without root against a fake; `HostRuntime` does the steps for
//! real: directories, uid, cgroup, volume, the engine's processes, the proxy.
//!
//! Every step is idempotent and safe to repeat after a crash at any point inside it: each writes
//! what it is about to do (the record) before doing it, finds what is already done and does the
//! rest. Blocking work (fsync, fork, `losetup`, `mount`, `resize2fs`, unlinking large images) runs
//! on tokio's blocking threads, never on the workers that carry heartbeats and the proxy.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dormant_common::{Resources, TenantName};
use nix::unistd::{Gid, Uid};
use tokio::sync::watch;
use tracing::{info, warn};

use super::record::{self, TenantAssignment, TenantRecord};
use super::{io_err, log_tail, TenantError};
use crate::cgroup::{Limits, TenantCgroup};
use crate::crash_point;
use crate::engine::{postgres, EngineTemplate, Readiness, TenantContext};
use crate::engine_log;
use crate::host::{Host, TenantPaths};
use crate::process::{Exit, Watched};
use crate::proxy::{self, ProxyError, ProxyHandle};
use crate::spawn::{self, Isolation, SpawnRequest};
use crate::tenant_fs;

/// An engine process the supervisor watches.
pub trait EngineProcess: Send + Sync + 'static {
    fn pid(&self) -> i32;
    /// Resolves once the process has exited.
    fn exited(&self) -> impl Future<Output = Exit> + Send;
}

impl EngineProcess for Watched {
    fn pid(&self) -> i32 {
        Watched::pid(self)
    }

    fn exited(&self) -> impl Future<Output = Exit> + Send {
        Watched::exited(self)
    }
}

/// The host-side steps of one tenant's life, as the supervisor asks for them.
pub trait Runtime: Send + 'static {
    type Engine: EngineProcess;

    /// Record, directories, uid, cgroup with the record's limits, volume mounted, endpoint open.
    /// Idempotent; once begun it runs to its end (it is never dropped half-way).
    fn prepare(
        &mut self,
        record: &TenantRecord,
    ) -> impl Future<Output = Result<(), TenantError>> + Send;

    /// Whether the engine's data was initialised (the marker is written last).
    fn is_initialized(&self) -> bool;

    /// Kills whatever is left in the tenant's cgroup (an init from before a crash included), then
    /// initialises the data from empty. Dropping the future leaves the init's processes in the
    /// cgroup: the next step, whatever it is, kills them first.
    fn initialize(
        &mut self,
        spec: &TenantAssignment,
    ) -> impl Future<Output = Result<(), TenantError>> + Send;

    /// The engine an earlier agent left running in the tenant's cgroup, if there is one.
    fn adopt(&mut self) -> Option<Self::Engine>;

    /// Kills whatever is left in the cgroup, then starts the engine.
    fn spawn_engine(
        &mut self,
        spec: &TenantAssignment,
    ) -> impl Future<Output = Result<Self::Engine, TenantError>> + Send;

    /// Resolves once the engine answers, or with the reason it exited first; no time limit (a
    /// PostgreSQL replaying a lot of WAL under a small CPU quota takes as long as it takes, and
    /// killing it would start the replay over). Readiness is proven afresh for a spawned engine:
    /// nothing the previous run left behind counts.
    fn wait_ready(
        &self,
        engine: &Self::Engine,
    ) -> impl Future<Output = Result<(), TenantError>> + Send;

    /// Stops a ready engine with its stop signal, then kills what is left of the cgroup after the
    /// engine's stop timeout.
    fn stop(&self, engine: &Self::Engine) -> impl Future<Output = ()> + Send;

    /// Freezes every process of the tenant (its memory stays); resolves once the kernel says
    /// they are frozen.
    fn freeze(&self) -> impl Future<Output = Result<(), TenantError>> + Send;

    /// Undoes `freeze`; resolves once the processes run again. Thawing a cgroup that is not
    /// frozen does nothing.
    fn thaw(&self) -> impl Future<Output = Result<(), TenantError>> + Send;

    /// Gives back the memory an empty cgroup is still charged for (a hibernated tenant's page
    /// cache); best effort.
    fn reclaim_memory(&self) -> impl Future<Output = ()> + Send;

    /// SIGKILLs every process of the tenant; returns how many there were.
    fn kill_all(&self) -> impl Future<Output = Result<usize, TenantError>> + Send;

    /// OOM kills so far (a counter of the cgroup's).
    fn oom_kills(&self) -> u64;

    fn write_record(
        &self,
        record: &TenantRecord,
    ) -> impl Future<Output = Result<(), TenantError>> + Send;

    /// New CPU and memory limits, in place (nothing to do before the cgroup exists: `prepare`
    /// creates it with the record's).
    fn apply_limits(
        &mut self,
        resources: &Resources,
    ) -> impl Future<Output = Result<(), TenantError>> + Send;

    /// Grows the mounted volume to at least `bytes` (nothing to do while it is not mounted:
    /// `prepare` mounts it and the supervisor grows it then).
    fn grow_storage(&self, bytes: u64) -> impl Future<Output = Result<(), TenantError>> + Send;

    /// Stops serving clients without cutting them: the listener stays open in the keeper and
    /// open connections are handed over to the next agent (an agent stopping gracefully).
    fn hand_over(&mut self) -> impl Future<Output = ()> + Send;

    /// Removes every trace of the tenant: endpoint, cgroup, volume (unmounted, detached,
    /// deleted), directories. The cgroup must be empty. Safe to repeat.
    fn remove(&mut self) -> impl Future<Output = Result<(), TenantError>> + Send;
}

/// The real steps, on this host.
#[derive(Debug)]
pub struct HostRuntime {
    host: Arc<Host>,
    name: TenantName,
    paths: TenantPaths,
    engine: Option<EngineTemplate>,
    engine_name: String,
    /// The tenant's own uid and gid on this host, known once `prepare` ran.
    identity: Option<(Uid, Gid)>,
    /// The resources the cgroup enforces (engine settings follow the memory).
    resources: Resources,
    password: String,
    port: u16,
    proxy: Option<ProxyHandle>,
    /// True while the engine answers; the proxy holds clients until then.
    ready: watch::Receiver<crate::proxy::Upstream>,
    /// The proxy's counters (the tenant's handle reads them, the supervisor watches them).
    stats: Arc<proxy::ProxyStats>,
    /// Processes this agent started (we are the subreaper): reaped if no `Watched` did.
    children: Arc<Mutex<BTreeSet<i32>>>,
    /// The engine's output pipe and the pump that logs it; opened by `prepare`.
    output: Option<EngineOutput>,
    /// An engine was adopted: its output pipe should come back from the keeper.
    adopted: bool,
}

/// The tenant's output pipe: the write end every process spawned gets as stdout and stderr
/// (kept by the agent too, so the pipe never ends between engines), and the pump reading it.
#[derive(Debug)]
struct EngineOutput {
    write: Arc<std::os::fd::OwnedFd>,
    _pump: engine_log::Pump,
}

/// How long to wait before looking at readiness again, `elapsed` into the wait. Clients may be
/// waiting (a wake, a restart): the first second of every start is polled every millisecond (a
/// PostgreSQL is ready in about 40 ms), then every 20 ms, so a long crash recovery costs little.
fn readiness_poll(elapsed: Duration) -> Duration {
    if elapsed < Duration::from_secs(1) {
        Duration::from_millis(1)
    } else {
        Duration::from_millis(20)
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    path: &std::path::Path,
    f: impl FnOnce() -> Result<T, TenantError> + Send + 'static,
) -> Result<T, TenantError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| io_err(what, path)(std::io::Error::other(e)))?
}

impl HostRuntime {
    pub fn new(
        host: Arc<Host>,
        spec: &TenantAssignment,
        ready: watch::Receiver<crate::proxy::Upstream>,
        stats: Arc<proxy::ProxyStats>,
    ) -> Self {
        Self {
            paths: host.paths(&spec.name, spec.uid),
            engine: host.engines.get(&spec.engine).cloned(),
            engine_name: spec.engine.clone(),
            name: spec.name.clone(),
            identity: None,
            resources: spec.resources,
            password: spec.password.clone(),
            port: spec.port,
            proxy: None,
            ready,
            stats,
            children: Arc::default(),
            output: None,
            adopted: false,
            host,
        }
    }

    /// The engine's output pipe taken back from the keeper (an engine that outlived the last
    /// agent writes to it), or a new one given to the keeper; and its pump started.
    async fn open_output(&mut self) -> Result<(), TenantError> {
        let host = self.host.clone();
        let name = self.name.to_string();
        let path = self.paths.log();
        let limits = self.host.engine_log;
        let log_err = |e: engine_log::EngineLogError| TenantError::Io {
            what: "engine log",
            path: self.paths.log(),
            source: std::io::Error::other(e),
        };
        let (pipe, log, recovered) = tokio::task::spawn_blocking(move || {
            let (pipe, recovered) = match host.endpoints.take_log_pipe(&name) {
                Some((read, write)) => (engine_log::LogPipe { read, write }, true),
                None => (engine_log::LogPipe::new()?, false),
            };
            // The keeper's copy outlives us; without it (no keeper) the engine's output is
            // lost while no agent runs, and `with_keeper` has said so.
            host.endpoints.keep_log_pipe(&name, &pipe.read, &pipe.write);
            let log = engine_log::RotatingLog::open(&path, limits.per_file())?;
            Ok((pipe, log, recovered))
        })
        .await
        .map_err(|e| io_err("engine log", &self.paths.log())(std::io::Error::other(e)))?
        .map_err(log_err)?;
        if recovered {
            info!("took back the engine's output pipe from the listener keeper");
        } else if self.adopted {
            warn!("the adopted engine's output pipe was not kept (no listener keeper held it): its output is lost until it restarts");
        }
        let engine_log::LogPipe { read, write } = pipe;
        let pump = engine_log::Pump::start(read, log, limits).map_err(log_err)?;
        self.output = Some(EngineOutput {
            write: Arc::new(write),
            _pump: pump,
        });
        Ok(())
    }

    /// What this tenant's clients may hold of the proxy.
    /// Taken when the endpoint opens (a resize applies at the next agent start, as PostgreSQL's
    /// `max_connections` does at the next engine start).
    fn budget(&self, engine: &EngineTemplate) -> proxy::Budget {
        match (self.host.max_clients_per_tenant, engine.max_clients) {
            (Some(max), _) | (None, Some(max)) => proxy::Budget::with_max_open(max),
            (None, None) => {
                proxy::Budget::for_engine(crate::engine::max_connections(self.resources.memory.0))
            }
        }
    }

    fn cgroup(&self) -> Box<dyn TenantCgroup> {
        self.host.cgroups.tenant(&self.name)
    }

    fn template(&self) -> Result<EngineTemplate, TenantError> {
        self.engine
            .clone()
            .ok_or_else(|| TenantError::UnknownEngine(self.engine_name.clone()))
    }

    fn limits(&self, resources: &Resources) -> Limits {
        Limits {
            milli_cpu: resources.cpu.0,
            memory_bytes: resources.memory.0,
            pids_max: self.host.pids_max,
        }
    }

    /// Placeholders as the agent sees the tenant's files (paths it reads and writes itself).
    fn context(&self) -> TenantContext {
        TenantContext::new(
            &self.paths.data,
            &self.paths.run,
            &self.password,
            self.resources.memory.0,
        )
    }

    /// Placeholders as the engine sees them, inside its root: the volume and the socket directory
    /// are at fixed paths whatever the host's layout (command lines, config contents).
    fn engine_context(&self) -> TenantContext {
        TenantContext::new(
            std::path::Path::new(spawn::TENANT_DATA_PATH),
            std::path::Path::new(spawn::TENANT_RUN_PATH),
            &self.password,
            self.resources.memory.0,
        )
    }

    fn identity(&self) -> Result<(Uid, Gid), TenantError> {
        self.identity.ok_or_else(|| TenantError::Io {
            what: "identity",
            path: self.paths.uid_file(),
            source: std::io::Error::other("the tenant was not prepared"),
        })
    }

    /// The socket directory as a tmpfs of the tenant's own (see `socket_dir`); only while
    /// nothing of the tenant runs.
    fn mount_socket_dir(&self) -> Result<(), TenantError> {
        let (uid, gid) = self.identity()?;
        crate::socket_dir::ensure_mounted(&self.paths.run, uid, gid)
            .map_err(io_err("mount", &self.paths.run))
    }

    fn output_pipe(&self) -> Result<Arc<std::os::fd::OwnedFd>, TenantError> {
        self.output
            .as_ref()
            .map(|o| o.write.clone())
            .ok_or_else(|| TenantError::Io {
                what: "engine output",
                path: self.paths.log(),
                source: std::io::Error::other("the tenant was not prepared"),
            })
    }

    /// What starting `argv` isolated takes (the tenant's cgroup, namespaces, uid), owned, so
    /// the fork can run on a blocking thread.
    fn spawn_job(&self, argv: Vec<String>) -> Result<SpawnJob, TenantError> {
        let (uid, gid) = self.identity()?;
        Ok(SpawnJob {
            argv,
            cwd: self.paths.data.clone(),
            root: self.paths.root(),
            run: self.paths.run.clone(),
            seccomp_allow: self
                .engine
                .as_ref()
                .map(|e| e.seccomp_allow.clone())
                .unwrap_or_default(),
            cgroup_procs: self.cgroup().procs_files(),
            output: self.output_pipe()?,
            hostname: self.name.to_string(),
            uid: uid.as_raw(),
            gid: gid.as_raw(),
            passwd: self.paths.passwd(),
            group: self.paths.group(),
            // A private /tmp in memory, counted against the tenant's own limit.
            tmp_bytes: (self.resources.memory.0 / 4).clamp(1 << 20, 256 << 20),
            children: self.children.clone(),
        })
    }

    /// Reaps the processes we started that have exited and that no `Watched` reaped (one dropped
    /// on a timeout or an error), so none stays a zombie of the agent.
    fn reap_children(&self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let mut children = self.children.lock().unwrap_or_else(PoisonError::into_inner);
        children.retain(|pid| {
            !matches!(
                waitpid(nix::unistd::Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_)
            )
        });
    }

    async fn run_init_commands(
        &self,
        engine: &EngineTemplate,
        ctx: &TenantContext,
    ) -> Result<(), TenantError> {
        for argv in &engine.init {
            let argv = ctx.fill_argv(argv);
            let job = self.spawn_job(argv.clone())?;
            let pid = blocking("spawn", &self.paths.log(), move || job.run()).await?;
            crash_point!("create.during_init");
            let exit = Watched::new(pid)?.exited().await;
            if exit != Exit::Code(0) {
                return Err(TenantError::Init {
                    program: argv.first().cloned().unwrap_or_default(),
                    exit,
                    log_tail: log_tail(&self.paths.log()),
                });
            }
        }
        Ok(())
    }
}

/// An isolated process to start, with everything owned.
struct SpawnJob {
    argv: Vec<String>,
    cwd: std::path::PathBuf,
    root: std::path::PathBuf,
    run: std::path::PathBuf,
    seccomp_allow: Vec<String>,
    cgroup_procs: Vec<std::path::PathBuf>,
    output: Arc<std::os::fd::OwnedFd>,
    hostname: String,
    uid: u32,
    gid: u32,
    passwd: std::path::PathBuf,
    group: std::path::PathBuf,
    tmp_bytes: u64,
    children: Arc<Mutex<BTreeSet<i32>>>,
}

impl SpawnJob {
    /// Forks and execs (blocking: the child's set-up is waited for); returns the PID.
    fn run(&self) -> Result<i32, TenantError> {
        // Read at every start: a package upgrade on the host shows in the next engine's root.
        let host = spawn::root::HostRoot::read(std::path::Path::new("/"));
        let seccomp =
            spawn::seccomp::filters(&self.seccomp_allow).map_err(spawn::SpawnError::from)?;
        let pid = spawn::spawn(&SpawnRequest {
            argv: &self.argv,
            cwd: &self.cwd,
            cgroup_procs: &self.cgroup_procs,
            output: std::os::fd::AsFd::as_fd(&*self.output),
            isolation: Isolation {
                hostname: &self.hostname,
                root: &self.root,
                host: &host,
                volume: &self.cwd,
                run: &self.run,
                seccomp: &seccomp,
                uid: self.uid,
                gid: self.gid,
                passwd: &self.passwd,
                group: &self.group,
                tmp_bytes: self.tmp_bytes,
                max_open_files: 65_536,
            },
        })?;
        self.children
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(pid);
        Ok(pid)
    }
}

/// The blocking part of `prepare`; returns the tenant's uid and gid.
fn prepare_host(
    host: &Host,
    paths: &TenantPaths,
    record: &TenantRecord,
    cgroup: &dyn TenantCgroup,
    limits: &Limits,
) -> Result<(Uid, Gid), TenantError> {
    use std::os::unix::fs::PermissionsExt;
    let p = paths;
    std::fs::create_dir_all(&p.dir).map_err(io_err("create", &p.dir))?;
    // Root's alone: the tenant reaches what it needs through its own root (bound as root).
    std::fs::set_permissions(&p.dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod", &p.dir))?;
    // The intent first: from here on, an agent started after a crash knows this tenant.
    record::write(p, record)?;
    crash_point!("create.after_record");
    let name = &record.spec.name;
    let (uid, gid) = host.tenant_identity(name, p)?;
    // The only users the tenant's namespace knows: root and itself.
    let passwd = format!(
        "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n{name}:x:{uid}:{gid}:dormant tenant:/tmp:/usr/sbin/nologin\n"
    );
    let group = format!("root:x:0:\n{name}:x:{gid}:\n");
    for (path, content) in [(p.passwd(), passwd), (p.group(), group)] {
        tenant_fs::write_atomic_if_changed(&path, content.as_bytes())
            .map_err(io_err("write", &path))?;
        // Read inside the tenant's namespace, by the tenant.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
            .map_err(io_err("chmod", &path))?;
    }
    let root = p.root();
    std::fs::create_dir_all(&root).map_err(io_err("create", &root))?;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err("chmod", &root))?;
    cgroup.create()?;
    cgroup.apply(limits)?;
    crash_point!("create.after_cgroup");
    // The tenant's storage limit: its data directory is its own filesystem of that size.
    p.volume().ensure_mounted(
        record.spec.resources.storage.0,
        p.initialized_marker().exists(),
    )?;
    for dir in [&p.data, &p.run] {
        std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        nix::unistd::chown(dir.as_path(), Some(uid), Some(gid))
            .map_err(|e| io_err("chown", dir)(e.into()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err("chmod", dir))?;
    }
    Ok((uid, gid))
}

/// Empties the data directory but for ext4's `lost+found` (a half-done init leaves junk).
fn empty_data_dir(data: &std::path::Path) -> Result<(), TenantError> {
    for entry in std::fs::read_dir(data).map_err(io_err("read", data))? {
        let path = entry.map_err(io_err("read", data))?.path();
        if path.file_name().is_some_and(|n| n == "lost+found") {
            continue;
        }
        tenant_fs::remove_tree(&path).map_err(io_err("remove", &path))?;
    }
    Ok(())
}

/// The blocking part of `remove`, in an order that a crash can interrupt anywhere.
fn remove_host(
    host: &Host,
    paths: &TenantPaths,
    cgroup: &dyn TenantCgroup,
) -> Result<(), TenantError> {
    cgroup.delete()?;
    crash_point!("delete.after_cgroup");
    let volume = paths.volume();
    volume.unmount()?;
    crash_point!("delete.after_unmount");
    volume.detach()?;
    crash_point!("delete.after_detach");
    // The directory leaves in one rename, so a crash inside the removal never leaves a half
    // directory that looks like a tenant (a record without its data, a marker without a volume).
    // The sweep at start empties the trash.
    if paths.dir.exists() {
        let trash = host.trash_dir();
        std::fs::create_dir_all(&trash).map_err(io_err("create", &trash))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Root's alone: tenants pass through `tenants`, and must not list who was deleted.
            std::fs::set_permissions(&trash, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod", &trash))?;
        }
        let target = trash.join(format!(
            "{}-{}",
            paths.dir.file_name().unwrap_or_default().to_string_lossy(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::rename(&paths.dir, &target).map_err(io_err("move to trash", &paths.dir))?;
        crash_point!("delete.after_trash");
        tenant_fs::remove_tree(&target).map_err(io_err("remove", &target))?;
    }
    crate::socket_dir::unmount(&paths.run).map_err(io_err("unmount", &paths.run))?;
    // The tenant wrote here (its socket directory, under an older agent): it may be arbitrarily
    // deep.
    tenant_fs::remove_tree(&paths.run).map_err(io_err("remove", &paths.run))
}

impl Runtime for HostRuntime {
    type Engine = Watched;

    async fn prepare(&mut self, record: &TenantRecord) -> Result<(), TenantError> {
        // Checked first: an unknown engine creates nothing.
        let engine = self.template()?;
        self.resources = record.spec.resources;
        let host = self.host.clone();
        let paths = self.paths.clone();
        let rec = record.clone();
        let cgroup = self.cgroup();
        let limits = self.limits(&record.spec.resources);
        let identity = blocking("prepare", &self.paths.dir, move || {
            prepare_host(&host, &paths, &rec, cgroup.as_ref(), &limits)
        })
        .await?;
        self.identity = Some(identity);
        if self.output.is_none() {
            self.open_output().await?;
        }
        if self.proxy.is_none() {
            let addr = std::net::SocketAddr::new(self.host.listen_host, self.port);
            // The port kept open across agent restarts, if it is there (see `endpoints`).
            let (host, name) = (self.host.clone(), self.name.to_string());
            let listener =
                tokio::task::spawn_blocking(move || host.endpoints.listener(&name, addr))
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r)
                    .and_then(tokio::net::TcpListener::from_std)
                    .map_err(|source| ProxyError { addr, source })?;
            let resumed = self
                .host
                .endpoints
                .take_handed_over(self.name.as_str())
                .into_iter()
                .map(|h| proxy::Parked {
                    client: h.client.into(),
                    engine: h.engine.map(Into::into),
                })
                .collect();
            let socket = self.context().fill_path(&engine.socket);
            let target = proxy::Target {
                socket,
                owner: identity.0,
                budget: self.budget(&engine),
                client_speaks_first: engine.client_speaks_first,
                tls: match &self.host.tenant_tls {
                    Some(tls) if engine.tls => Some(tls.with_alpn(&engine.alpn)),
                    _ => None,
                },
                plaintext_refusal: engine.plaintext_refusal.clone(),
            };
            self.proxy = Some(proxy::serve(
                listener,
                target,
                self.ready.clone(),
                self.stats.clone(),
                resumed,
            ));
        }
        Ok(())
    }

    fn is_initialized(&self) -> bool {
        self.paths.initialized_marker().exists()
    }

    async fn initialize(&mut self, _spec: &TenantAssignment) -> Result<(), TenantError> {
        let engine = self.template()?;
        // Never two inits at once: one left running by an agent that crashed mid-init is
        // killed before the data directory is emptied under it.
        let killed = self.kill_all().await?;
        if killed > 0 {
            warn!(
                processes = killed,
                "killed what an interrupted init left in the cgroup"
            );
        }
        let data = self.paths.data.clone();
        blocking("empty", &self.paths.data, move || empty_data_dir(&data)).await?;
        self.mount_socket_dir()?;
        let ctx = self.context();
        let engine_ctx = self.engine_context();
        let files: Vec<_> = engine
            .init_files
            .iter()
            .map(|(path, content)| (ctx.fill_path(path), engine_ctx.fill(content)))
            .collect();
        let (uid, gid) = self.identity()?;
        for (path, content) in &files {
            tenant_fs::write_private(path, content, uid, gid).map_err(io_err("write", path))?;
        }
        let result = self.run_init_commands(&engine, &engine_ctx).await;
        for (path, _) in &files {
            let _ = std::fs::remove_file(path);
        }
        result?;
        crash_point!("create.after_init");
        let marker = self.paths.initialized_marker();
        // Durable: a lost marker would make the next start wipe the data as half-initialised.
        let m = marker.clone();
        blocking("write", &marker, move || {
            tenant_fs::write_atomic(&m, b"").map_err(io_err("write", &m))
        })
        .await?;
        info!("data initialised");
        Ok(())
    }

    fn adopt(&mut self) -> Option<Watched> {
        let pid: i32 = tenant_fs::read_small(&self.paths.pid_file(), 64)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        if !self.cgroup().pids().ok()?.contains(&pid) {
            return None;
        }
        let watched = Watched::new(pid).ok()?;
        self.adopted = true;
        info!(pid, "adopted running engine");
        Some(watched)
    }

    async fn spawn_engine(&mut self, _spec: &TenantAssignment) -> Result<Watched, TenantError> {
        let engine = self.template()?;
        let killed = self.kill_all().await?;
        if killed > 0 {
            info!(
                processes = killed,
                "killed what was left in the cgroup before starting the engine"
            );
        }
        self.mount_socket_dir()?;
        let ctx = self.context();
        let engine_ctx = self.engine_context();
        let (uid, gid) = self.identity()?;
        let files: Vec<_> = engine
            .files
            .iter()
            .map(|(path, content)| (ctx.fill_path(path), engine_ctx.fill(content)))
            .collect();
        // Readiness is proven afresh: the previous run's pid file says `ready` too (it stays
        // behind when the engine is killed), and trusting it would send clients to an engine
        // still in crash recovery. Nothing of the tenant runs now, so nothing else writes it.
        let stale_readiness = match &engine.readiness {
            Readiness::PidFileStatus(path) => ctx
                .fill_path(path)
                .strip_prefix(&self.paths.data)
                .ok()
                .map(std::path::Path::to_path_buf),
            Readiness::SocketAccepts | Readiness::RedisPing => None,
        };
        let data = self.paths.data.clone();
        let pid_file = self.paths.pid_file();
        let job = self.spawn_job(engine_ctx.fill_argv(&engine.start))?;
        let pid = blocking("spawn", &self.paths.log(), move || {
            for (path, content) in &files {
                tenant_fs::write_private(path, content, uid, gid).map_err(io_err("write", path))?;
            }
            if let Some(rel) = stale_readiness {
                tenant_fs::remove_below(&data, &rel)
                    .map_err(io_err("remove the previous run's", &data.join(&rel)))?;
            }
            // The previous engine's pid must not be taken for this one's after a crash before
            // the new pid is written (it may belong to another process by then).
            match std::fs::remove_file(&pid_file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", &pid_file)(e)),
            }
            let pid = job.run()?;
            crash_point!("start.after_spawn");
            tenant_fs::write_atomic(&pid_file, pid.to_string().as_bytes())
                .map_err(io_err("write", &pid_file))?;
            Ok(pid)
        })
        .await?;
        let watched = Watched::new(pid)?;
        info!(pid = watched.pid(), engine = %engine.name, "engine started");
        Ok(watched)
    }

    async fn wait_ready(&self, watched: &Watched) -> Result<(), TenantError> {
        let engine = self.template()?;
        let ctx = self.context();
        let (uid, _) = self.identity()?;
        let began = tokio::time::Instant::now();
        loop {
            let ready = match &engine.readiness {
                Readiness::PidFileStatus(path) => {
                    // Off the async workers, and never through a link the tenant planted on the
                    // way (its code can run before the engine is ready).
                    let path = ctx.fill_path(path);
                    let bases = [self.paths.data.clone(), self.paths.run.clone()];
                    tokio::task::spawn_blocking(move || {
                        // A custom engine's file may be anywhere; under the tenant's own
                        // directories every step is checked.
                        match bases.iter().find(|b| path.starts_with(b)) {
                            Some(base) => tenant_fs::read_small_below(
                                base,
                                path.strip_prefix(base).unwrap_or(&path),
                                4096,
                            ),
                            None => tenant_fs::read_small(&path, 4096),
                        }
                    })
                    .await
                    .is_ok_and(|r| r.is_ok_and(|c| postgres::pid_file_says_ready(&c)))
                }
                Readiness::SocketAccepts => {
                    tenant_fs::connect_socket(&ctx.fill_path(&engine.socket), uid)
                        .await
                        .is_ok()
                }
                Readiness::RedisPing => {
                    match tenant_fs::connect_socket(&ctx.fill_path(&engine.socket), uid).await {
                        Ok(socket) => {
                            crate::engine::redis::answers_ping(socket, &self.password).await
                        }
                        Err(_) => false,
                    }
                }
            };
            if ready {
                return Ok(());
            }
            tokio::select! {
                exit = watched.exited() => {
                    return Err(TenantError::ExitedBeforeReady {
                        exit,
                        log_tail: log_tail(&self.paths.log()),
                    })
                }
                _ = tokio::time::sleep(readiness_poll(began.elapsed())) => {}
            }
        }
    }

    async fn stop(&self, watched: &Watched) {
        if let Some(t) = &self.engine {
            if watched.signal(t.stop_signal).is_ok()
                && tokio::time::timeout(t.stop_timeout, watched.exited())
                    .await
                    .is_ok()
            {
                info!(pid = watched.pid(), "engine stopped");
            }
        }
        if let Err(e) = self.kill_all().await {
            warn!(error = %e, "killing what is left of the engine");
        }
    }

    async fn freeze(&self) -> Result<(), TenantError> {
        let cgroup = self.cgroup();
        blocking("freeze", &self.paths.dir, move || Ok(cgroup.freeze()?)).await
    }

    async fn thaw(&self) -> Result<(), TenantError> {
        let cgroup = self.cgroup();
        blocking("thaw", &self.paths.dir, move || Ok(cgroup.thaw()?)).await
    }

    async fn reclaim_memory(&self) {
        let cgroup = self.cgroup();
        let reclaimed = blocking("reclaim", &self.paths.dir, move || {
            let before = cgroup.usage().map(|u| u.memory_bytes).unwrap_or(0);
            cgroup.reclaim_memory()?;
            let after = cgroup.usage().map(|u| u.memory_bytes).unwrap_or(0);
            Ok((before, after))
        })
        .await;
        match reclaimed {
            Ok((before, after)) => info!(
                before = %dormant_common::Bytes(before).human(),
                after = %dormant_common::Bytes(after).human(),
                "reclaimed the hibernated tenant's memory"
            ),
            Err(e) => warn!(error = %e, "reclaiming the hibernated tenant's memory"),
        }
    }

    async fn kill_all(&self) -> Result<usize, TenantError> {
        let cgroup = self.cgroup();
        let killed = blocking("kill", &self.paths.dir, move || {
            let pids = cgroup.pids()?;
            if !pids.is_empty() {
                cgroup.kill_all()?;
            }
            // Left thawed: whatever starts in it next (an init, an engine) must run, and a
            // hibernated tenant's cgroup may be frozen (v2's cgroup.kill does not thaw it).
            if cgroup.display_path().exists() {
                cgroup.thaw()?;
            }
            Ok(pids.len())
        })
        .await;
        self.reap_children();
        killed
    }

    fn oom_kills(&self) -> u64 {
        self.cgroup().usage().map(|u| u.oom_kills).unwrap_or(0)
    }

    async fn write_record(&self, record: &TenantRecord) -> Result<(), TenantError> {
        let paths = self.paths.clone();
        let record = record.clone();
        blocking("write", &self.paths.record(), move || {
            Ok(record::write(&paths, &record)?)
        })
        .await
    }

    async fn apply_limits(&mut self, resources: &Resources) -> Result<(), TenantError> {
        let cgroup = self.cgroup();
        let limits = self.limits(resources);
        blocking("resize", &self.paths.dir, move || {
            if cgroup.display_path().exists() {
                cgroup.apply(&limits)?;
            }
            Ok(())
        })
        .await?;
        self.resources = *resources;
        Ok(())
    }

    async fn grow_storage(&self, bytes: u64) -> Result<(), TenantError> {
        let volume = self.paths.volume();
        blocking("grow", &self.paths.dir, move || {
            if volume.is_mounted()? {
                volume.grow_to_at_least(bytes)?;
            }
            Ok(())
        })
        .await
    }

    async fn hand_over(&mut self) {
        let Some(proxy) = self.proxy.take() else {
            return;
        };
        let parked = proxy.hand_over().await;
        if parked.is_empty() {
            return;
        }
        let host = self.host.clone();
        let name = self.name.to_string();
        let count = parked.len();
        let handed = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsRawFd;
            parked
                .iter()
                .filter(|p| {
                    let mut fds = vec![p.client.as_raw_fd()];
                    fds.extend(p.engine.as_ref().map(AsRawFd::as_raw_fd));
                    host.endpoints.hand_over(&name, &fds)
                })
                .count()
        })
        .await
        .unwrap_or(0);
        info!(
            handed_over = handed,
            cut = count - handed,
            "client connections handed over to the next agent"
        );
    }

    async fn remove(&mut self) -> Result<(), TenantError> {
        self.proxy = None;
        // No more output to log; the keeper forgets its copy of the pipe below.
        self.output = None;
        let host = self.host.clone();
        let name = self.name.to_string();
        // The port closes for good (the keeper's copy too).
        let _ = tokio::task::spawn_blocking(move || host.endpoints.forget(&name)).await;
        let host = self.host.clone();
        let paths = self.paths.clone();
        let cgroup = self.cgroup();
        blocking("remove", &self.paths.dir, move || {
            remove_host(&host, &paths, cgroup.as_ref())
        })
        .await
    }
}
