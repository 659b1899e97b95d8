//! One tenant on this host, as a task: prepare its directories, cgroup and data; open its port;
//! start (or adopt) its engine and supervise it, restarting with exponential backoff until too
//! many failures mark it `failed`; and on delete, stop everything and remove every trace.

use std::sync::Arc;
use std::time::Duration;

use dormant_common::{Resources, TenantName, TenantState};
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{info, instrument, warn};

use crate::cgroup::{CgroupError, Limits, TenantCgroup, Usage};
use crate::engine::{postgres, EngineTemplate, Readiness, TenantContext};
use crate::host::{Host, TenantPaths};
use crate::process::{Exit, WatchError, Watched};
use crate::proxy::{self, ProxyHandle};
use crate::spawn::{self, Isolation, SpawnError, SpawnRequest};
use crate::tenant_fs;

/// Failures in a row (without a minute of healthy running between them) before `failed`.
const MAX_FAILURES: u32 = 5;
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Running this long resets the failure count.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// What the scheduler wants this host to run, as the agent keeps it on disk (root-only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantSpec {
    pub name: TenantName,
    pub uid: u64,
    pub engine: String,
    pub resources: Resources,
    pub port: u16,
    pub password: String,
    /// Raised by `dormantctl tenant restart`; the engine restarts once for each new value.
    /// Records written before it existed read as 0.
    #[serde(default)]
    pub restart_generation: u64,
}

/// The tenant as the agent sees it, reported in heartbeats.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub state: TenantState,
    pub reason: Option<String>,
    pub restarts: u64,
    pub pid: Option<i32>,
    /// Deleted: nothing of the tenant is left on this host.
    pub gone: bool,
    /// A resize not finished yet (the storage grow), with the reason.
    pub resize_pending: Option<String>,
    /// The restart generation the engine runs at.
    pub restart_generation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TenantError {
    #[error("engine {0:?} is not configured on this node")]
    UnknownEngine(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Volume(#[from] crate::volume::VolumeError),
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error(transparent)]
    Host(#[from] crate::host::HostError),
    #[error(transparent)]
    Proxy(#[from] proxy::ProxyError),
    #[error("initialising data: {program} {exit}; last log lines: {log_tail}")]
    Init {
        program: String,
        exit: Exit,
        log_tail: String,
    },
    #[error("engine {exit} before it was ready; last log lines: {log_tail}")]
    ExitedBeforeReady { exit: Exit, log_tail: String },
    #[error("engine not ready after {0:?}")]
    ReadyTimeout(Duration),
}

#[derive(Debug)]
enum Request {
    Delete,
    Shutdown { stop_engine: bool },
}

/// The agent's handle on a tenant task.
#[derive(Debug)]
pub struct TenantHandle {
    pub spec: TenantSpec,
    pub status: watch::Receiver<Observed>,
    requests: mpsc::UnboundedSender<Request>,
    task: JoinHandle<()>,
    cgroup: Box<dyn TenantCgroup>,
    volume: crate::volume::Volume,
    paths: TenantPaths,
    pids_max: u64,
    resources: watch::Sender<Resources>,
    /// The last resize failure, logged once rather than on every reconcile.
    resize_error: Option<String>,
    deleting: bool,
}

impl TenantHandle {
    /// Starts the tenant's task; it adopts an engine already running in the tenant's cgroup.
    pub fn start(host: Arc<Host>, spec: TenantSpec) -> Self {
        let (status_tx, status) = watch::channel(Observed {
            state: TenantState::Starting,
            reason: None,
            restarts: 0,
            pid: None,
            gone: false,
            resize_pending: None,
            restart_generation: spec.restart_generation,
        });
        let (requests, rx) = mpsc::unbounded_channel();
        let cgroup = host.cgroups.tenant(&spec.name);
        let paths = host.paths(&spec.name, spec.uid);
        let volume = paths.volume();
        let (resources, resources_rx) = watch::channel(spec.resources);
        let pids_max = host.pids_max;
        let supervisor = Supervisor {
            paths: host.paths(&spec.name, spec.uid),
            cgroup: host.cgroups.tenant(&spec.name),
            engine: host.engines.get(&spec.engine).cloned(),
            identity: None,
            resources: resources_rx,
            children: Default::default(),
            host,
            spec: spec.clone(),
            status: status_tx,
            proxy: None,
            ready: watch::channel(false).0,
        };
        let task = tokio::spawn(supervisor.run(rx));
        Self {
            spec,
            status,
            requests,
            task,
            cgroup,
            volume,
            pids_max,
            paths,
            resources,
            resize_error: None,
            deleting: false,
        }
    }

    pub fn delete(&mut self) {
        if !self.deleting {
            self.deleting = true;
            let _ = self.requests.send(Request::Delete);
        }
    }

    pub fn is_deleting(&self) -> bool {
        self.deleting
    }

    /// True once a delete has removed everything, or the task has ended.
    pub fn is_finished(&self) -> bool {
        self.status.borrow().gone || self.task.is_finished()
    }

    pub fn observed(&self) -> Observed {
        self.status.borrow().clone()
    }

    pub fn usage(&self) -> Option<Usage> {
        self.cgroup.usage().ok()
    }

    /// Applies new resources while the engine runs: the volume grows online, the cgroup limits
    /// change in place, the record on disk follows. On failure nothing is recorded as applied,
    /// so the next reconcile tries again.
    pub fn resize(&mut self, resources: Resources) {
        match self.try_resize(resources) {
            Ok(()) => self.resize_error = None,
            Err(e) => {
                let message = e.to_string();
                if self.resize_error.as_ref() != Some(&message) {
                    warn!(tenant_id = %self.spec.name, error = %message, "resizing tenant; will retry");
                    self.resize_error = Some(message);
                }
            }
        }
    }

    fn try_resize(&mut self, resources: Resources) -> Result<(), TenantError> {
        let grow = resources.storage > self.spec.resources.storage;
        tokio::task::block_in_place(|| -> Result<(), TenantError> {
            if grow && self.volume.is_mounted()? {
                self.volume.grow(resources.storage.0)?;
            }
            // Not created yet: `prepare` applies the new limits when it creates it.
            if self.cgroup.display_path().exists() {
                self.cgroup.apply(&Limits {
                    milli_cpu: resources.cpu.0,
                    memory_bytes: resources.memory.0,
                    pids_max: self.pids_max,
                })?;
            }
            Ok(())
        })?;
        // The supervisor reads the new values before the record says so, never after.
        self.resources.send_replace(resources);
        self.spec.resources = resources;
        write_record(&self.paths, &self.spec)?;
        info!(tenant_id = %self.spec.name, cpu = %resources.cpu, memory = %resources.memory, storage = %resources.storage, "tenant resized");
        Ok(())
    }

    /// Bytes used on the tenant's volume (`None` while it is not mounted).
    pub fn volume_used_bytes(&self) -> Option<u64> {
        self.volume.usage().map(|u| u.used_bytes)
    }

    /// Ends the task without deleting anything; the engine keeps running unless `stop_engine`.
    pub async fn shutdown(self, stop_engine: bool) {
        let _ = self.requests.send(Request::Shutdown { stop_engine });
        let _ = self.task.await;
    }
}

struct Supervisor {
    host: Arc<Host>,
    spec: TenantSpec,
    paths: TenantPaths,
    cgroup: Box<dyn TenantCgroup>,
    engine: Option<EngineTemplate>,
    /// The tenant's own uid and gid on this host, known once `prepare` ran.
    identity: Option<(Uid, Gid)>,
    /// The resources in force; a resize while the engine runs changes them (see `TenantHandle`).
    resources: watch::Receiver<Resources>,
    /// Processes this supervisor started: our children (we are the subreaper) until reaped.
    children: std::sync::Mutex<std::collections::BTreeSet<i32>>,
    status: watch::Sender<Observed>,
    proxy: Option<ProxyHandle>,
    /// True while the engine answers; the proxy holds clients until then.
    ready: watch::Sender<bool>,
}

fn io_err<'a>(
    what: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(std::io::Error) -> TenantError + 'a {
    move |source| TenantError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

impl Supervisor {
    fn set(&self, state: TenantState, reason: Option<String>) {
        let mut changed = false;
        self.status.send_modify(|o| {
            if o.state != state {
                info!(tenant_id = %self.spec.name, from = %o.state, to = %state, reason = reason.as_deref().unwrap_or(""), "tenant state");
                changed = true;
            }
            o.state = state;
            o.reason = reason;
        });
        if changed {
            self.host.changed.notify_one();
        }
    }

    /// Placeholders as the agent sees the tenant's files (paths it reads and writes itself).
    fn context(&self) -> TenantContext {
        TenantContext::new(
            &self.paths.data,
            &self.paths.run,
            &self.spec.password,
            self.resources.borrow().memory.0,
        )
    }

    /// Placeholders as the engine sees them, inside its mount namespace: the volume is at the
    /// fixed path `TENANT_DATA_PATH` whatever the host's layout (command lines, config contents).
    fn engine_context(&self) -> TenantContext {
        TenantContext::new(
            std::path::Path::new(spawn::TENANT_DATA_PATH),
            &self.paths.run,
            &self.spec.password,
            self.resources.borrow().memory.0,
        )
    }

    #[instrument(skip_all, fields(tenant_id = %self.spec.name, uid = self.spec.uid))]
    async fn run(mut self, mut requests: mpsc::UnboundedReceiver<Request>) {
        let (request, engine) = self.supervise(&mut requests).await;
        match request {
            Request::Delete => {
                self.set(TenantState::Deleting, None);
                self.teardown(engine).await;
                info!("tenant deleted from this host");
                self.status.send_modify(|o| o.gone = true);
                self.host.changed.notify_one();
            }
            Request::Shutdown { stop_engine } => {
                if stop_engine {
                    self.stop_engine(engine).await;
                }
            }
        }
    }

    /// Keeps the engine running until a request arrives; returns it with the engine, if any.
    async fn supervise(
        &mut self,
        requests: &mut mpsc::UnboundedReceiver<Request>,
    ) -> (Request, Option<Watched>) {
        let mut failures = 0u32;
        let mut restarts = 0u64;
        let mut may_adopt = true;
        loop {
            let oom_before = self.cgroup.usage().map(|u| u.oom_kills).unwrap_or(0);
            let started = tokio::select! {
                r = self.start(may_adopt) => r,
                req = requests.recv() => return (req.unwrap_or(Request::Shutdown { stop_engine: false }), None),
            };
            may_adopt = false;
            let reason = match started {
                Ok(engine) => {
                    self.ready.send_replace(true);
                    self.status.send_modify(|o| o.pid = Some(engine.pid()));
                    self.set(TenantState::Running, None);
                    let since = Instant::now();
                    let exit = tokio::select! {
                        exit = engine.exited() => exit,
                        req = requests.recv() => {
                            return (req.unwrap_or(Request::Shutdown { stop_engine: false }), Some(engine));
                        }
                    };
                    self.ready.send_replace(false);
                    if since.elapsed() >= HEALTHY_AFTER {
                        failures = 0;
                    }
                    let oom_after = self.cgroup.usage().map(|u| u.oom_kills).unwrap_or(0);
                    if oom_after > oom_before {
                        format!(
                            "engine OOM-killed at its memory limit ({})",
                            self.resources.borrow().memory
                        )
                    } else {
                        format!("engine {exit}")
                    }
                }
                Err(e) => e.to_string(),
            };
            self.ready.send_replace(false);
            // Whatever is left of a failed engine goes before the next try.
            let cgroup = self.cgroup.display_path();
            if let Err(e) = self.kill_cgroup().await {
                warn!(cgroup = %cgroup.display(), error = %e, "cleaning up after the engine");
            }
            failures += 1;
            warn!(failures, reason = %reason, "engine failed");
            if failures >= MAX_FAILURES {
                self.set(
                    TenantState::Failed,
                    Some(format!("{reason} ({failures} failures in a row)")),
                );
                let req = requests.recv().await;
                return (
                    req.unwrap_or(Request::Shutdown { stop_engine: false }),
                    None,
                );
            }
            let backoff = BACKOFF_START
                .saturating_mul(1 << (failures - 1).min(16))
                .min(BACKOFF_MAX);
            self.set(
                TenantState::Starting,
                Some(format!("restarting after: {reason}")),
            );
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                req = requests.recv() => return (req.unwrap_or(Request::Shutdown { stop_engine: false }), None),
            }
            restarts += 1;
            self.status.send_modify(|o| {
                o.restarts = restarts;
                o.pid = None;
            });
        }
    }

    /// Prepares the tenant and brings its engine to ready (adopting a running one if allowed).
    async fn start(&mut self, may_adopt: bool) -> Result<Watched, TenantError> {
        let engine = self
            .engine
            .clone()
            .ok_or_else(|| TenantError::UnknownEngine(self.spec.engine.clone()))?;
        self.prepare(&engine).await?;
        let adopted = if may_adopt { self.adopt() } else { None };
        let watched = match adopted {
            Some(w) => {
                info!(pid = w.pid(), "adopted running engine");
                w
            }
            None => {
                self.kill_cgroup().await?;
                self.spawn_engine(&engine)?
            }
        };
        match self.wait_ready(&engine, &watched).await {
            Ok(()) => Ok(watched),
            Err(e) => Err(e),
        }
    }

    /// Directories, record, cgroup and limits, data initialised once, port open. Idempotent.
    async fn prepare(&mut self, engine: &EngineTemplate) -> Result<(), TenantError> {
        let p = &self.paths;
        std::fs::create_dir_all(&p.dir).map_err(io_err("create", &p.dir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            // Root's: other tenants may pass through (to nothing they can read), not list.
            std::fs::set_permissions(&p.dir, std::fs::Permissions::from_mode(0o711))
                .map_err(io_err("chmod", &p.dir))?;
        }
        let (uid, gid) = self.host.tenant_identity(&self.spec.name, p)?;
        self.identity = Some((uid, gid));
        // The only users the tenant's namespace knows: root and itself.
        let name = self.spec.name.as_str();
        let passwd = format!(
            "root:x:0:0:root:/nonexistent:/usr/sbin/nologin\n{name}:x:{uid}:{gid}:dormant tenant:/tmp:/usr/sbin/nologin\n"
        );
        let group = format!("root:x:0:\n{name}:x:{gid}:\n");
        for (path, content) in [(p.passwd(), passwd), (p.group(), group)] {
            tenant_fs::write_atomic(&path, content.as_bytes()).map_err(io_err("write", &path))?;
            // Read inside the tenant's namespace, by the tenant.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .map_err(io_err("chmod", &path))?;
        }
        // The tenant's storage limit: its data directory is its own filesystem of that size.
        let volume = p.volume();
        let size = self.resources.borrow().storage.0;
        let initialised = p.initialized_marker().exists();
        tokio::task::spawn_blocking(move || volume.ensure_mounted(size, initialised))
            .await
            .map_err(|e| io_err("mount volume", &p.data)(std::io::Error::other(e)))??;
        for dir in [&p.data, &p.run] {
            std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
            nix::unistd::chown(dir.as_path(), Some(uid), Some(gid))
                .map_err(|e| io_err("chown", dir)(e.into()))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_err("chmod", dir))?;
        }
        let mut spec = self.spec.clone();
        spec.resources = *self.resources.borrow();
        write_record(p, &spec)?;

        self.cgroup.create()?;
        self.cgroup.apply(&Limits {
            milli_cpu: self.resources.borrow().cpu.0,
            memory_bytes: self.resources.borrow().memory.0,
            pids_max: self.host.pids_max,
        })?;

        if !p.initialized_marker().exists() {
            self.initialize(engine).await?;
        }

        if self.proxy.is_none() {
            let addr = std::net::SocketAddr::new(self.host.listen_host, self.spec.port);
            let listener = proxy::bind(addr).await?;
            let socket = self.context().fill_path(&engine.socket);
            self.proxy = Some(proxy::serve(listener, socket, uid, self.ready.subscribe()));
        }
        Ok(())
    }

    /// Runs the engine's init commands on an empty data directory, as the tenant, in its cgroup.
    async fn initialize(&self, engine: &EngineTemplate) -> Result<(), TenantError> {
        let p = &self.paths;
        let ctx = self.context();
        // A half-done earlier attempt leaves junk; start from empty (ext4's lost+found stays).
        for entry in std::fs::read_dir(&p.data).map_err(io_err("read", &p.data))? {
            let path = entry.map_err(io_err("read", &p.data))?.path();
            if path.file_name().is_some_and(|n| n == "lost+found") {
                continue;
            }
            let removed = if path.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            removed.map_err(io_err("remove", &path))?;
        }
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
        let result = self.run_init_commands(engine, &engine_ctx).await;
        for (path, _) in &files {
            let _ = std::fs::remove_file(path);
        }
        result?;
        let marker = p.initialized_marker();
        // Durable: a lost marker would make the next start wipe the data as half-initialised.
        tenant_fs::write_atomic(&marker, b"").map_err(io_err("write", &marker))?;
        info!("data initialised");
        Ok(())
    }

    async fn run_init_commands(
        &self,
        engine: &EngineTemplate,
        ctx: &TenantContext,
    ) -> Result<(), TenantError> {
        for argv in &engine.init {
            let argv = ctx.fill_argv(argv);
            let pid = self.spawn(&argv)?;
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

    /// The engine process left running by an earlier agent, if it is still in our cgroup.
    fn adopt(&self) -> Option<Watched> {
        let pid: i32 = std::fs::read_to_string(self.paths.pid_file())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        if !self.cgroup.pids().ok()?.contains(&pid) {
            return None;
        }
        Watched::new(pid).ok()
    }

    fn identity(&self) -> Result<(Uid, Gid), TenantError> {
        self.identity.ok_or_else(|| TenantError::Io {
            what: "identity",
            path: self.paths.uid_file(),
            source: std::io::Error::other("the tenant was not prepared"),
        })
    }

    /// Starts `argv` isolated: the tenant's cgroup, namespaces, uid.
    fn spawn(&self, argv: &[String]) -> Result<i32, TenantError> {
        let (uid, gid) = self.identity()?;
        let (passwd, group) = (self.paths.passwd(), self.paths.group());
        let pid = spawn::spawn(&SpawnRequest {
            argv,
            cwd: &self.paths.data,
            cgroup_procs: &self.cgroup.procs_files(),
            log: &self.paths.log(),
            isolation: Isolation {
                hostname: self.spec.name.as_str(),
                volume: &self.paths.data,
                uid: uid.as_raw(),
                gid: gid.as_raw(),
                passwd: &passwd,
                group: &group,
                // A private /tmp in memory, counted against the tenant's own limit.
                tmp_bytes: (self.resources.borrow().memory.0 / 4).clamp(1 << 20, 256 << 20),
                max_open_files: 65_536,
            },
        })?;
        self.children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pid);
        Ok(pid)
    }

    fn spawn_engine(&self, engine: &EngineTemplate) -> Result<Watched, TenantError> {
        let ctx = self.context();
        let engine_ctx = self.engine_context();
        let (uid, gid) = self.identity()?;
        for (path, content) in &engine.files {
            let path = ctx.fill_path(path);
            tenant_fs::write_private(&path, &engine_ctx.fill(content), uid, gid)
                .map_err(io_err("write", &path))?;
        }
        let argv = engine_ctx.fill_argv(&engine.start);
        let watched = Watched::new(self.spawn(&argv)?)?;
        let pid_file = self.paths.pid_file();
        std::fs::write(&pid_file, watched.pid().to_string()).map_err(io_err("write", &pid_file))?;
        info!(pid = watched.pid(), engine = %engine.name, "engine started");
        Ok(watched)
    }

    async fn wait_ready(
        &self,
        engine: &EngineTemplate,
        watched: &Watched,
    ) -> Result<(), TenantError> {
        let ctx = self.context();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = match &engine.readiness {
                Readiness::PidFileStatus(path) => tenant_fs::read_small(&ctx.fill_path(path), 4096)
                    .map(|c| postgres::pid_file_says_ready(&c))
                    .unwrap_or(false),
                Readiness::SocketAccepts => {
                    let (uid, _) = self.identity()?;
                    tenant_fs::connect_socket(&ctx.fill_path(&engine.socket), uid)
                        .await
                        .is_ok()
                }
            };
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TenantError::ReadyTimeout(READY_TIMEOUT));
            }
            tokio::select! {
                exit = watched.exited() => {
                    return Err(TenantError::ExitedBeforeReady {
                        exit,
                        log_tail: log_tail(&self.paths.log()),
                    })
                }
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    async fn kill_cgroup(&self) -> Result<(), CgroupError> {
        if !self.cgroup.pids()?.is_empty() {
            let cgroup = self.host.cgroups.tenant(&self.spec.name);
            tokio::task::spawn_blocking(move || cgroup.kill_all())
                .await
                .unwrap_or_else(|e| {
                    Err(CgroupError::Io {
                        path: Default::default(),
                        source: std::io::Error::other(e),
                    })
                })?;
        }
        self.reap_children();
        Ok(())
    }

    /// Reaps the processes we started that have exited and that no `Watched` reaped (one dropped
    /// on a timeout or an error), so none stays a zombie of the agent.
    fn reap_children(&self) {
        use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
        let mut children = self
            .children
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        children.retain(|pid| {
            !matches!(
                waitpid(nix::unistd::Pid::from_raw(*pid), Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_)
            )
        });
    }

    /// Graceful stop with the engine's signal, then SIGKILL for whatever is left.
    async fn stop_engine(&self, engine: Option<Watched>) {
        let template = self.engine.as_ref();
        let engine = engine.or_else(|| self.adopt());
        if let (Some(w), Some(t)) = (&engine, template) {
            if w.signal(t.stop_signal).is_ok()
                && tokio::time::timeout(t.stop_timeout, w.exited())
                    .await
                    .is_ok()
            {
                info!(pid = w.pid(), "engine stopped");
            }
        }
        if let Err(e) = self.kill_cgroup().await {
            warn!(error = %e, "killing what is left of the engine");
        }
    }

    /// Removes everything the tenant had on this host, retrying until it is all gone.
    async fn teardown(&mut self, engine: Option<Watched>) {
        self.stop_engine(engine).await;
        self.proxy = None;
        let mut delay = Duration::from_millis(100);
        loop {
            match self.remove_everything() {
                Ok(()) => return,
                Err(e) => {
                    warn!(error = %e, "removing tenant; will retry");
                    self.set(TenantState::Deleting, Some(e.to_string()));
                    let _ = self.kill_cgroup().await;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    fn remove_everything(&self) -> Result<(), TenantError> {
        self.cgroup.delete()?;
        self.paths.volume().destroy()?;
        for dir in [&self.paths.run, &self.paths.dir] {
            match std::fs::remove_dir_all(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove", dir)(e)),
            }
        }
        Ok(())
    }
}

/// The tenant's record (root-only: it holds the password), read back by `load_records`.
fn write_record(paths: &TenantPaths, spec: &TenantSpec) -> Result<(), TenantError> {
    let record = serde_json::to_vec(spec)
        .map_err(|e| io_err("encode", &paths.dir)(std::io::Error::other(e)))?;
    let record_path = paths.record();
    tenant_fs::write_atomic(&record_path, &record).map_err(io_err("write", &record_path))
}

/// The last lines of the engine's log (from its last 4 KiB), for a failure's reason.
fn log_tail(path: &std::path::Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let mut content = String::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(4096)));
        let mut bytes = Vec::new();
        let _ = file.read_to_end(&mut bytes);
        content = String::from_utf8_lossy(&bytes).into_owned();
    }
    let lines: Vec<&str> = content.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Tenant records left on disk by an earlier agent run.
pub fn load_records(host: &Host) -> Vec<TenantSpec> {
    let Ok(entries) = std::fs::read_dir(host.tenants_dir()) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let bytes = std::fs::read(e.path().join("tenant.json")).ok()?;
            match serde_json::from_slice::<TenantSpec>(&bytes) {
                Ok(spec) => Some(spec),
                Err(err) => {
                    warn!(path = %e.path().display(), error = %err, "unreadable tenant record");
                    None
                }
            }
        })
        .collect()
}
