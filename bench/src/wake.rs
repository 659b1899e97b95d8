//! `dormant-bench wake`: what a client of a hibernated tenant waits, next to starting the same
//! engine bare. Per engine and mode, N times: hibernate the tenant and wait until the agent has
//! finished (reported `hibernated`, the cgroup empty or frozen), then time one fresh connection
//! from `connect()` to the first answer. For stop mode, each iteration also starts the bare
//! engine with the tenant's settings and times spawn → first answer over its Unix socket.

use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio::time::Instant;

use crate::engines::{pg_select1, redis_ping, Bare, RedisAnswer, ATTEMPT_TIMEOUT};
use crate::host::{load_average, Host, HostArgs, TenantSpec};
use crate::procs::Guard;
use crate::report::Report;
use crate::stats::{ms, Latency};

/// Goals from the hibernation issue: a stop-mode wake within 1.5× (p50) and 3× (p99) of a bare
/// start, a freeze-mode wake under 10 ms (p50).
const GOAL_P50_RATIO: f64 = 1.5;
const GOAL_P99_RATIO: f64 = 3.0;
const GOAL_FREEZE_P50: Duration = Duration::from_millis(10);

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub host: HostArgs,
    /// Wakes per engine and mode, and bare starts per engine (at least 50, so p99 is a sample
    /// and not the maximum of a handful).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(50..))]
    pub iterations: u32,
    /// Each tenant's CPU (`--cpu` of `tenant create`).
    #[arg(long, default_value = "1")]
    pub cpu: String,
    /// Each tenant's memory in MiB; the bare engines get the settings the agent derives from it
    /// (PostgreSQL's shared_buffers and max_connections, Redis's maxmemory).
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u64,
    /// Skip the Redis tenant and bare Redis.
    #[arg(long)]
    pub skip_redis: bool,
    /// Skip the freeze-mode PostgreSQL tenant.
    #[arg(long)]
    pub skip_freeze: bool,
}

/// The engine a measurement talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Postgres,
    Redis,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
        }
    }

    fn question(self) -> &'static str {
        match self {
            Self::Postgres => "SELECT 1",
            Self::Redis => "AUTH+PING",
        }
    }
}

/// How a tenant's client reaches it: its endpoint, as a user of the tenant would.
struct TenantClient {
    engine: Engine,
    endpoint: String,
    pg: Option<tokio_postgres::Config>,
    password: String,
}

impl TenantClient {
    async fn of(host: &Host, name: &str, engine: Engine) -> anyhow::Result<Self> {
        let view = host.tenant(name).await?;
        let endpoint = view
            .endpoint
            .with_context(|| format!("tenant {name} has no endpoint"))?;
        let creds = host.credentials(name).await?;
        let pg = match engine {
            Engine::Postgres => {
                let (h, p) = endpoint
                    .rsplit_once(':')
                    .with_context(|| format!("endpoint {endpoint:?} is not host:port"))?;
                let mut cfg = tokio_postgres::Config::new();
                cfg.host(h)
                    .port(p.parse().context("endpoint port")?)
                    .user(&creds.user)
                    .password(&creds.password)
                    .dbname("postgres");
                Some(cfg)
            }
            Engine::Redis => None,
        };
        Ok(Self {
            engine,
            endpoint,
            pg,
            password: creds.password,
        })
    }

    /// One fresh connection, `connect()` to the first answer. A Redis that answers `-LOADING`
    /// (the agent forwarded before it had read its data) is asked again on a fresh connection
    /// every millisecond, as the bare one is, until it answers `PONG`; the second value counts
    /// those `-LOADING` answers.
    async fn timed(&self) -> anyhow::Result<(Duration, u32)> {
        let t0 = Instant::now();
        let answered = async {
            let Some(cfg) = &self.pg else {
                let mut loading = 0;
                loop {
                    let s = tokio::net::TcpStream::connect(&self.endpoint)
                        .await
                        .context("connect")?;
                    s.set_nodelay(true)?;
                    match redis_ping(s, &self.password).await? {
                        RedisAnswer::Pong => return Ok(loading),
                        RedisAnswer::Loading => loading += 1,
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            pg_select1(cfg).await.map(|()| 0)
        };
        let loading = tokio::time::timeout(ATTEMPT_TIMEOUT, answered)
            .await
            .with_context(|| format!("no answer within {ATTEMPT_TIMEOUT:?}"))?
            .with_context(|| format!("{} through {}", self.engine.question(), self.endpoint))?;
        Ok((t0.elapsed(), loading))
    }
}

/// One engine and mode's figures.
#[derive(Debug, Default)]
struct Series {
    /// Client-side: connect() → answer, the tenant hibernated before each.
    wake: Vec<Duration>,
    /// The agent's own `tenant woke took_ms` (wake begun → engine ready).
    agent: Vec<Duration>,
    /// connect() → answer with the tenant running: what any connection costs.
    warm: Vec<Duration>,
    /// spawn → answer of the bare engine.
    bare: Vec<Duration>,
    /// connect() → answer with the bare engine running, on its Unix socket.
    bare_running: Vec<Duration>,
    /// Wakes whose first answer was Redis's `-LOADING` instead of the reply, and how many such
    /// answers in all.
    wakes_loading: u32,
    loading_answers: u32,
    /// `usage.wakes` and `usage.last_wake_usec` as `tenant get` shows them at the end.
    reported_wakes: u64,
    reported_last_wake: Option<Duration>,
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let mut report = Report::new("wake");
    report.param("iterations", args.iterations);
    report.param("cpu", args.cpu.clone());
    report.param("memory_mib", args.memory_mib);
    report.param("heartbeat_ms", args.host.heartbeat_ms);
    report.param("keep", args.host.keep);
    report.param("load_average_at_start", load_average());
    let mut guard = Guard::new(args.host.work_dir.clone(), args.host.keep)?;
    report.param("work_dir", guard.dir().display().to_string());
    report.param("bin_dir", args.host.bin_dir()?.display().to_string());
    let host = Host::start(&mut guard, &args.host).await?;
    let memory = format!("{}MiB", args.memory_mib);
    let memory_bytes = args.memory_mib << 20;
    let n = args.iterations;

    let pg_bare = Bare::postgres(&guard.dir().join("bare-postgres"), memory_bytes)?;
    let pg = measure(
        &mut guard,
        &host,
        &TenantSpec {
            name: "wake-pg",
            engine: "postgres",
            cpu: &args.cpu,
            memory: &memory,
            storage: "1GiB",
            hibernate: "stop",
        },
        Engine::Postgres,
        Some(&pg_bare),
        n,
    )
    .await?;
    stop_mode_section(
        &mut report,
        "postgres_stop",
        "PostgreSQL, --hibernate stop",
        Engine::Postgres,
        &pg,
    );

    if !args.skip_redis {
        let redis_bare = Bare::redis(&guard.dir().join("bare-redis"), memory_bytes)?;
        let redis = measure(
            &mut guard,
            &host,
            &TenantSpec {
                name: "wake-redis",
                engine: "redis",
                cpu: &args.cpu,
                memory: &memory,
                storage: "256MiB",
                hibernate: "stop",
            },
            Engine::Redis,
            Some(&redis_bare),
            n,
        )
        .await?;
        stop_mode_section(
            &mut report,
            "redis_stop",
            "Redis, --hibernate stop",
            Engine::Redis,
            &redis,
        );
    }

    if !args.skip_freeze {
        let frozen = measure(
            &mut guard,
            &host,
            &TenantSpec {
                name: "wake-frozen",
                engine: "postgres",
                cpu: &args.cpu,
                memory: &memory,
                storage: "1GiB",
                hibernate: "freeze",
            },
            Engine::Postgres,
            None,
            n,
        )
        .await?;
        report.section(
            "postgres_freeze",
            "PostgreSQL, --hibernate freeze (ms: p50 / p99 / max)",
        );
        row_latency(
            &mut report,
            "wake: connect → SELECT 1",
            "wake",
            &frozen.wake,
        );
        row_latency(
            &mut report,
            "agent: woke took_ms",
            "agent_took",
            &frozen.agent,
        );
        row_latency(
            &mut report,
            "running: connect → SELECT 1",
            "running",
            &frozen.warm,
        );
        let p50 = Latency::of(&frozen.wake).p50;
        report.row(
            "goal p50 < 10 ms",
            "goal_p50_met",
            if p50 < GOAL_FREEZE_P50 {
                "met"
            } else {
                "NOT met"
            },
            p50 < GOAL_FREEZE_P50,
        );
        reported_row(&mut report, &frozen);
    }
    guard.check_running()?;
    report.section("host", "host");
    report.row(
        "load average at the end",
        "load_average_at_end",
        load_average(),
        load_average(),
    );
    Ok(report)
}

/// Creates the tenant, then N times: hibernate, (bare start), wake; then reads the agent's figures
/// and deletes the tenant.
async fn measure(
    guard: &mut Guard,
    host: &Host,
    spec: &TenantSpec<'_>,
    engine: Engine,
    bare: Option<&Bare>,
    n: u32,
) -> anyhow::Result<Series> {
    let freeze = spec.hibernate == "freeze";
    host.create_tenant(spec).await?;
    let client = TenantClient::of(host, spec.name, engine).await?;
    // The engine answering once before the first hibernation: a first wake must not also pay for
    // anything the create left unfinished.
    client.timed().await?;
    let mut s = Series::default();
    eprintln!(
        "{}: {n} × (hibernate, {}wake)",
        spec.name,
        if bare.is_some() { "bare start, " } else { "" }
    );
    for i in 0..n {
        host.hibernate(guard, spec.name, freeze).await?;
        // With the tenant hibernated, nothing of it competes with the bare engine's start, and
        // the bare engine is stopped again before the wake.
        if let Some(bare) = bare {
            let (start, running) = bare.timed_start().await.context("bare start")?;
            s.bare.push(start);
            s.bare_running.push(running);
        }
        let (took, loading) = client
            .timed()
            .await
            .with_context(|| format!("wake {} of {}", i + 1, spec.name))?;
        s.wake.push(took);
        if loading > 0 {
            s.wakes_loading += 1;
            s.loading_answers += loading;
        }
        let (took, _) = client
            .timed()
            .await
            .context("connect to the running tenant")?;
        s.warm.push(took);
        if (i + 1) % 10 == 0 {
            eprintln!(
                "  {}/{n}: last wake {}",
                i + 1,
                ms(*s.wake.last().unwrap_or(&Duration::ZERO))
            );
        }
    }
    // The agent reports its counters with heartbeats; the last wake is in one soon.
    let t = host
        .wait_tenant(guard, spec.name, "reporting its wakes", |t| {
            t.wakes >= u64::from(n)
        })
        .await?;
    s.reported_wakes = t.wakes;
    s.reported_last_wake = t.last_wake_usec.map(Duration::from_micros);
    s.agent = host.logged_wakes(spec.name);
    // The node has room for few tenants of a whole CPU; the next series needs this one's.
    host.delete_tenant(spec.name).await?;
    Ok(s)
}

fn row_latency(report: &mut Report, label: &str, key: &str, samples: &[Duration]) {
    let l = Latency::of(samples);
    report.row(label, key, l.text(), l.json());
}

fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        0.0
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

fn stop_mode_section(report: &mut Report, key: &str, title: &str, engine: Engine, s: &Series) {
    report.section(key, &format!("{title} (ms: p50 / p99 / max)"));
    let q = engine.question();
    row_latency(report, &format!("wake: connect → {q}"), "wake", &s.wake);
    row_latency(report, "agent: woke took_ms", "agent_took", &s.agent);
    row_latency(
        report,
        &format!("bare {}: spawn → {q}", engine.name()),
        "bare",
        &s.bare,
    );
    row_latency(
        report,
        &format!("running: connect → {q}"),
        "running",
        &s.warm,
    );
    row_latency(
        report,
        &format!("bare running: connect → {q}"),
        "bare_running",
        &s.bare_running,
    );
    let (w, b) = (Latency::of(&s.wake), Latency::of(&s.bare));
    let (r50, r99) = (ratio(w.p50, b.p50), ratio(w.p99, b.p99));
    let verdict = |r: f64, goal: f64| if r <= goal { "met" } else { "NOT met" };
    report.row(
        "wake / bare p50",
        "ratio_p50",
        format!(
            "{r50:.2}× (goal ≤ {GOAL_P50_RATIO}×: {})",
            verdict(r50, GOAL_P50_RATIO)
        ),
        json!(r50),
    );
    report.row(
        "wake / bare p99",
        "ratio_p99",
        format!(
            "{r99:.2}× (goal ≤ {GOAL_P99_RATIO}×: {})",
            verdict(r99, GOAL_P99_RATIO)
        ),
        json!(r99),
    );
    if engine == Engine::Redis {
        report.row(
            "wakes answered -LOADING first",
            "wakes_loading",
            format!(
                "{} of {} ({} -LOADING answers in all; timed until PONG)",
                s.wakes_loading,
                s.wake.len(),
                s.loading_answers
            ),
            json!({"wakes": s.wakes_loading, "answers": s.loading_answers}),
        );
    }
    reported_row(report, s);
}

fn reported_row(report: &mut Report, s: &Series) {
    report.row(
        "tenant get: wakes, last_wake",
        "reported",
        format!(
            "{}, {}",
            s.reported_wakes,
            s.reported_last_wake.map(ms).unwrap_or_else(|| "-".into())
        ),
        json!({
            "wakes": s.reported_wakes,
            "last_wake_usec": s.reported_last_wake.and_then(|d| u64::try_from(d.as_micros()).ok()),
        }),
    );
}
