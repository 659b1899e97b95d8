//! `dormant-bench proxy`: what the agent's TCP proxy costs a PostgreSQL tenant, next to reaching
//! the engine's Unix socket directly and through two proxies people would otherwise put there
//! (haproxy in TCP mode, pgbouncer in session mode). pgbench's select-only load, variants run in
//! rounds with the order rotated per round, so drift and warm-up are spread over all of them.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;
use tokio::time::Instant;

use crate::host::{load_average, Credentials, Host, HostArgs, TenantSpec};
use crate::procs::{free_port, log_tail, log_to, Guard, Transient};
use crate::report::Report;
use crate::stats::{cores, cpu_time};

const TENANT: &str = "proxy-pg";

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub host: HostArgs,
    /// Rounds of all four variants; the report has each round and the median.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// pgbench -T of the throughput runs.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// pgbench -c of the throughput runs.
    #[arg(long, default_value_t = 8)]
    pub clients: u32,
    /// pgbench -j of the throughput runs.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// pgbench -T of the one-client latency runs.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub latency_duration: Duration,
    /// pgbench -i -s.
    #[arg(long, default_value_t = 10)]
    pub scale: u32,
    /// A select-only run directly to the socket before the rounds, so the first variant measured
    /// does not pay for cold caches.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// The tenant's CPU.
    #[arg(long, default_value = "1")]
    pub cpu: String,
    /// The tenant's memory.
    #[arg(long, default_value = "1GiB")]
    pub memory: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Direct,
    Dormant,
    DormantTls,
    Haproxy,
    Pgbouncer,
}

const VARIANTS: [Variant; 5] = [
    Variant::Direct,
    Variant::Dormant,
    Variant::DormantTls,
    Variant::Haproxy,
    Variant::Pgbouncer,
];

impl Variant {
    fn key(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Dormant => "dormant",
            Self::DormantTls => "dormant-tls",
            Self::Haproxy => "haproxy",
            Self::Pgbouncer => "pgbouncer",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct (Unix socket)",
            Self::Dormant => "Dormant's proxy",
            Self::DormantTls => "Dormant's proxy, TLS",
            Self::Haproxy => "haproxy (tcp mode)",
            Self::Pgbouncer => "pgbouncer (session)",
        }
    }
}

/// Where pgbench connects for a variant, and which process (if any) is in between.
#[derive(Debug, Clone)]
struct Target {
    /// `-h`: an address or the socket's directory.
    host: String,
    port: u16,
    proxy_pid: Option<u32>,
    /// libpq's sslmode (libpq's default, prefer, would take TLS wherever it is offered).
    sslmode: &'static str,
}

/// One pgbench run's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Run {
    tps: f64,
    latency_ms: f64,
    /// CPU of the process in between, in cores, over the run.
    proxy_cores: Option<f64>,
}

pub async fn run(args: Args) -> anyhow::Result<Report> {
    let mut report = Report::new("proxy");
    report.param("rounds", args.rounds);
    report.param(
        "throughput",
        format!(
            "pgbench -n -S -c {} -j {} -T {}",
            args.clients,
            args.threads,
            args.duration.as_secs()
        ),
    );
    report.param(
        "latency",
        format!(
            "pgbench -n -S -c 1 -j 1 -T {}",
            args.latency_duration.as_secs()
        ),
    );
    report.param("scale", args.scale);
    report.param(
        "tenant",
        format!("cpu {}, memory {}", args.cpu, args.memory),
    );
    report.param("heartbeat_ms", args.host.heartbeat_ms);
    report.param("keep", args.host.keep);
    report.param("load_average_at_start", load_average());
    let mut guard = Guard::new(args.host.work_dir.clone(), args.host.keep)?;
    report.param("work_dir", guard.dir().display().to_string());
    report.param("bin_dir", args.host.bin_dir()?.display().to_string());
    let pgbench = which("pgbench")?;
    let haproxy = which("haproxy")?;
    let pgbouncer = which("pgbouncer")?;

    let host = Host::start(&mut guard, &args.host).await?;
    let view = host
        .create_tenant(&TenantSpec {
            name: TENANT,
            engine: "postgres",
            cpu: &args.cpu,
            memory: &args.memory,
            storage: "4GiB",
            hibernate: "stop",
        })
        .await?;
    let creds = host.credentials(TENANT).await?;
    let endpoint = view.endpoint.context("the tenant has no endpoint")?;
    let (ep_host, ep_port) = endpoint
        .rsplit_once(':')
        .with_context(|| format!("endpoint {endpoint:?} is not host:port"))?;
    let run_dir = host.run_dir(view.uid);
    let socket = run_dir.join(".s.PGSQL.5432");
    if !socket.exists() {
        bail!("no engine socket at {}", socket.display());
    }
    let agent_pid = guard.pid(host.agent);

    let bench = Pgbench {
        bin: pgbench,
        creds: creds.clone(),
        log: guard.dir().join("pgbench.log"),
    };
    let direct = Target {
        host: run_dir.display().to_string(),
        port: 5432,
        proxy_pid: None,
        sslmode: "disable",
    };
    eprintln!("pgbench -i -s {}", args.scale);
    bench
        .run(&direct, &["-i", "-q", "-s", &args.scale.to_string()])
        .await?;

    let mut haproxy = start_haproxy(guard.dir(), &haproxy, &socket)?;
    let mut pgbouncer = start_pgbouncer(guard.dir(), &pgbouncer, &socket, &creds)?;
    let targets = [
        direct.clone(),
        Target {
            host: ep_host.to_string(),
            port: ep_port.parse().context("endpoint port")?,
            proxy_pid: Some(agent_pid),
            sslmode: "disable",
        },
        Target {
            host: ep_host.to_string(),
            port: ep_port.parse().context("endpoint port")?,
            proxy_pid: Some(agent_pid),
            sslmode: "require",
        },
        Target {
            host: "127.0.0.1".into(),
            port: haproxy.1,
            proxy_pid: haproxy.0.pid(),
            sslmode: "disable",
        },
        Target {
            host: "127.0.0.1".into(),
            port: pgbouncer.1,
            proxy_pid: pgbouncer.0.pid(),
            sslmode: "disable",
        },
    ];
    for t in &targets[2..] {
        wait_listening(t.port).await?;
    }

    eprintln!("warm-up: {:?} direct", args.warmup);
    let secs = |d: Duration| d.as_secs().max(1).to_string();
    bench
        .run(
            &direct,
            &[
                "-n",
                "-S",
                "-c",
                &args.clients.to_string(),
                "-j",
                &args.threads.to_string(),
                "-T",
                &secs(args.warmup),
            ],
        )
        .await?;

    let rounds = args.rounds.max(1) as usize;
    // runs[variant][round]
    let mut tput: Vec<Vec<Run>> = vec![Vec::new(); VARIANTS.len()];
    let mut lat: Vec<Vec<Run>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..rounds {
        for k in 0..VARIANTS.len() {
            // Rotated each round: no variant always runs first, or right after the same one.
            let v = (k + round) % VARIANTS.len();
            let t = &targets[v];
            eprintln!("round {}: {}", round + 1, VARIANTS[v].label());
            let throughput = bench
                .measured(
                    t,
                    &[
                        "-n",
                        "-S",
                        "-c",
                        &args.clients.to_string(),
                        "-j",
                        &args.threads.to_string(),
                        "-T",
                        &secs(args.duration),
                    ],
                )
                .await?;
            let latency = bench
                .measured(
                    t,
                    &[
                        "-n",
                        "-S",
                        "-c",
                        "1",
                        "-j",
                        "1",
                        "-T",
                        &secs(args.latency_duration),
                    ],
                )
                .await?;
            tput[v].push(throughput);
            lat[v].push(latency);
            guard.check_running()?;
            haproxy.0.check_running()?;
            pgbouncer.0.check_running()?;
        }
    }

    let direct_tps = median(tput[0].iter().map(|r| r.tps));
    let direct_lat = median(lat[0].iter().map(|r| r.latency_ms));
    report.section(
        "throughput",
        &format!(
            "throughput, pgbench -S -c {} -j {} (TPS per round; median; ratio to direct's median)",
            args.clients, args.threads
        ),
    );
    for (i, v) in VARIANTS.iter().enumerate() {
        let per_round: Vec<f64> = tput[i].iter().map(|r| r.tps).collect();
        let med = median(per_round.iter().copied());
        report.row(
            v.label(),
            v.key(),
            format!(
                "{}; median {med:.0}; {:.3}×",
                per_round.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(" / "),
                med / direct_tps
            ),
            json!({"tps_per_round": per_round, "tps_median": med, "ratio_to_direct": med / direct_tps}),
        );
    }
    report.section(
        "proxy_cpu",
        "CPU of the process in between during the throughput runs (cores, median)",
    );
    for (i, v) in VARIANTS.iter().enumerate().skip(1) {
        let c = median(tput[i].iter().filter_map(|r| r.proxy_cores));
        report.row(v.label(), v.key(), format!("{c:.2}"), json!(c));
    }
    report.section(
        "latency",
        "one client, pgbench -S -c 1 -j 1 (average latency per round; median; minus direct's median)",
    );
    for (i, v) in VARIANTS.iter().enumerate() {
        let per_round: Vec<f64> = lat[i].iter().map(|r| r.latency_ms * 1e3).collect();
        let med = median(per_round.iter().copied());
        report.row(
            v.label(),
            v.key(),
            format!(
                "{} µs; median {med:.1} µs; {:+.1} µs",
                per_round.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>().join(" / "),
                med - direct_lat * 1e3
            ),
            json!({"latency_us_per_round": per_round, "latency_us_median": med, "minus_direct_us": med - direct_lat * 1e3}),
        );
    }
    report.section("host", "host");
    report.row(
        "load average at the end",
        "load_average_at_end",
        load_average(),
        load_average(),
    );
    Ok(report)
}

/// pgbench as the tenant's user, with its password.
struct Pgbench {
    bin: PathBuf,
    creds: Credentials,
    log: PathBuf,
}

impl Pgbench {
    /// Runs pgbench against `t` with `args`; returns its output.
    async fn run(&self, t: &Target, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = tokio::process::Command::new(&self.bin);
        cmd.args(args)
            .args([
                "-h",
                &t.host,
                "-p",
                &t.port.to_string(),
                "-U",
                &self.creds.user,
                "postgres",
            ])
            .env("PGPASSWORD", &self.creds.password)
            .env("PGSSLMODE", t.sslmode)
            // An interrupted run must not leave a pgbench behind.
            .kill_on_drop(true);
        let out = cmd.output().await.context("run pgbench")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Every run's output, for a look afterwards with --keep.
        let mut all = std::fs::read_to_string(&self.log).unwrap_or_default();
        all.push_str(&format!(
            "$ pgbench {} -h {} -p {}\n{text}\n",
            args.join(" "),
            t.host,
            t.port
        ));
        std::fs::write(&self.log, all).with_context(|| format!("write {}", self.log.display()))?;
        if !out.status.success() {
            bail!(
                "pgbench {} against {}:{} failed ({}):\n{text}",
                args.join(" "),
                t.host,
                t.port,
                out.status
            );
        }
        Ok(text)
    }

    /// A measured run: TPS, average latency, and the CPU of the process in between.
    async fn measured(&self, t: &Target, args: &[&str]) -> anyhow::Result<Run> {
        let before = t.proxy_pid.map(cpu_time).transpose()?;
        let t0 = Instant::now();
        let text = self.run(t, args).await?;
        let wall = t0.elapsed();
        let proxy_cores = match (t.proxy_pid, before) {
            (Some(pid), Some(b)) => Some(cores(b, cpu_time(pid)?, wall)),
            _ => None,
        };
        let tps = field(&text, "tps = ")?;
        let latency_ms = field(&text, "latency average = ")?;
        Ok(Run {
            tps,
            latency_ms,
            proxy_cores,
        })
    }
}

/// The number after `prefix` in pgbench's output.
fn field(text: &str, prefix: &str) -> anyhow::Result<f64> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no {prefix:?} in pgbench's output:\n{text}"))
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn which(name: &str) -> anyhow::Result<PathBuf> {
    for dir in ["/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} is not installed (apt-get install -y haproxy pgbouncer postgresql-client)")
}

async fn wait_listening(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on 127.0.0.1:{port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// haproxy in TCP mode on a loopback port in front of the socket. As root, like the agent: the
/// socket is the tenant user's, mode 0700.
fn start_haproxy(work: &Path, bin: &Path, socket: &Path) -> anyhow::Result<(Transient, u16)> {
    let port = free_port()?;
    let cfg = work.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn 1000\n\
             defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n\
             listen pg\n    bind 127.0.0.1:{port}\n    server engine {}\n",
            socket.display()
        ),
    )
    .with_context(|| format!("write {}", cfg.display()))?;
    let log = work.join("haproxy.log");
    let mut cmd = Command::new(bin);
    // -db: in the foreground, so the PID we hold is haproxy's own.
    cmd.args(["-db", "-f"]).arg(&cfg);
    let child = Transient::spawn("haproxy", log_to(&mut cmd, &log)?)?;
    Ok((child, port))
}

/// pgbouncer in session mode on a loopback port in front of the socket. It refuses to run as
/// root, and only the socket's owner (or root) may connect to it (mode 0700), so it runs as the
/// tenant's uid, from a directory of that uid.
fn start_pgbouncer(
    work: &Path,
    bin: &Path,
    socket: &Path,
    creds: &Credentials,
) -> anyhow::Result<(Transient, u16)> {
    let md = std::fs::metadata(socket).with_context(|| format!("stat {}", socket.display()))?;
    let (uid, gid) = (md.uid(), md.gid());
    let dir = work.join("pgbouncer");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let port = free_port()?;
    let sock_dir = socket.parent().context("socket has no directory")?;
    // pgbouncer runs as the tenant's uid (it refuses root), and the agent keeps its state
    // directory root's alone: for this bench only, let others pass through `<state>` and
    // `<state>/run` to the tenant's own socket directory (still the tenant's, mode 0700).
    for passage in sock_dir.ancestors().skip(1).take(2) {
        std::fs::set_permissions(passage, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("chmod {}", passage.display()))?;
    }
    let users = dir.join("userlist.txt");
    std::fs::write(
        &users,
        format!("\"{}\" \"{}\"\n", creds.user, creds.password),
    )?;
    let cfg = dir.join("pgbouncer.ini");
    // Clients authenticate to pgbouncer with SCRAM as they would to the engine; pgbouncer logs
    // in to the engine with the same password (plain in its auth file, mode 0600).
    std::fs::write(
        &cfg,
        format!(
            "[databases]\npostgres = host={} port=5432 dbname=postgres\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n\
             auth_type = scram-sha-256\nauth_file = {}\npool_mode = session\n\
             max_client_conn = 200\ndefault_pool_size = 32\n\
             ignore_startup_parameters = extra_float_digits\n",
            sock_dir.display(),
            users.display()
        ),
    )?;
    for p in [&dir, &users, &cfg] {
        nix::unistd::chown(
            p.as_path(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .with_context(|| format!("chown {}", p.display()))?;
    }
    std::fs::set_permissions(&users, std::fs::Permissions::from_mode(0o600))?;
    let log = work.join("pgbouncer.log");
    let mut cmd = Command::new(bin);
    cmd.arg(&cfg).uid(uid).gid(gid);
    let child = Transient::spawn("pgbouncer", log_to(&mut cmd, &log)?)
        .with_context(|| format!("pgbouncer; log:\n{}", log_tail(&log, 20)))?;
    Ok((child, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pgbench_figures() {
        let out = "pgbench (15.18 (Debian 15.18-0+deb12u1))\n\
                   number of transactions actually processed: 312345\n\
                   latency average = 0.512 ms\n\
                   initial connection time = 12.345 ms\n\
                   tps = 15617.250000 (without initial connection time)\n";
        assert_eq!(field(out, "tps = ").ok(), Some(15617.25));
        assert_eq!(field(out, "latency average = ").ok(), Some(0.512));
        assert!(field("no figures", "tps = ").is_err());
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0, 2.0, 3.0].into_iter()), 2.5);
        assert_eq!(median(std::iter::empty()), 0.0);
    }
}
