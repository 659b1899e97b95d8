//! A scheduler cluster of several real `dormant-scheduler` processes on loopback, formed the way
//! an operator forms one: bootstrap the first, then `dormantctl cluster add-learner` and
//! `promote` for the others. Replicas can be killed (-9), paused (SIGSTOP) and restarted on
//! their own data directory. No agents: tests that need nodes use simulated ones. Each set has
//! its own CA (`tls`): replicas, `dormantctl` and simulated nodes use mutual TLS.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::cluster::{bin_dir, free_port, run_ctl, CtlOutput, TEST_ROOT};
use crate::process::ProcGuard;
use crate::tls::Security;
use crate::wait::wait_until;

#[derive(Debug)]
pub struct Replica {
    pub id: u64,
    pub addr: String,
    /// The `dormant-scheduler` it runs: this tree's, or an older one in upgrade tests.
    pub binary: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    pub proc: Option<ProcGuard>,
    paused: bool,
}

/// Field order matters for Drop: processes first, then the directory.
pub struct Replicas {
    pub replicas: Vec<Replica>,
    /// The set's CA and certificates: every replica, `dormantctl` and simulated node has one.
    pub security: Security,
    bins: PathBuf,
    /// The `dormant-scheduler` new replicas run.
    binary: PathBuf,
    flags: Vec<String>,
    /// Replicas whose data directory is a link to elsewhere (a small filesystem, say).
    data_links: Vec<(u64, PathBuf)>,
    dir: tempfile::TempDir,
}

impl Replicas {
    /// Starts `n` replicas: id 1 bootstraps, ids 2..=n join as learners and are promoted.
    /// `flags` go to every `dormant-scheduler`.
    pub fn start(n: u64, flags: &[&str]) -> Self {
        Self::start_with_data_dir(n, flags, &[])
    }

    /// `start`, with the data directory of each replica `id` in `links` a symbolic link to its
    /// path (which the caller owns, mounts and cleans up).
    pub fn start_with_data_dir(n: u64, flags: &[&str], links: &[(u64, &Path)]) -> Self {
        Self::start_inner(n, flags, links, None)
    }

    /// `start`, every replica running `binary` (an older build, say) instead of this tree's.
    pub fn start_with_binary(n: u64, flags: &[&str], binary: &Path) -> Self {
        Self::start_inner(n, flags, &[], Some(binary))
    }

    fn start_inner(n: u64, flags: &[&str], links: &[(u64, &Path)], binary: Option<&Path>) -> Self {
        std::fs::create_dir_all(TEST_ROOT).expect("create test root");
        let dir = tempfile::Builder::new()
            .prefix("dr-")
            .tempdir_in(TEST_ROOT)
            .expect("tempdir");
        let security = Security::tls_in(&dir.path().join("tls"));
        let mut set = Self {
            replicas: Vec::new(),
            security,
            binary: binary.map_or_else(|| bin_dir().join("dormant-scheduler"), Path::to_path_buf),
            bins: bin_dir(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
            data_links: links
                .iter()
                .map(|(id, path)| (*id, path.to_path_buf()))
                .collect(),
            dir,
        };
        set.spawn(1, true);
        wait_until(Duration::from_secs(30), "replica 1 to lead", || {
            let s = set.status(0)?;
            (s["leader_id"] == 1).then_some(())
        });
        for id in 2..=n {
            set.join(id);
        }
        set
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Starts a new replica process `id` (empty data dir) and waits until it answers.
    pub fn spawn(&mut self, id: u64, bootstrap: bool) -> usize {
        let addr = format!("127.0.0.1:{}", free_port());
        let data_dir = self.dir.path().join(format!("s{id}"));
        if let Some((_, target)) = self.data_links.iter().find(|(linked, _)| *linked == id) {
            std::os::unix::fs::symlink(target, &data_dir).expect("link the data directory");
        }
        let mut args = vec![
            "--id".to_string(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        if bootstrap {
            args.push("--bootstrap".into());
        }
        args.extend(self.security.replica_args(id));
        args.extend(self.flags.iter().cloned());
        self.replicas.push(Replica {
            id,
            addr,
            binary: self.binary.clone(),
            args,
            log: self.dir.path().join(format!("scheduler-{id}.log")),
            proc: None,
            paused: false,
        });
        let i = self.replicas.len() - 1;
        self.restart(i);
        i
    }

    /// `spawn`, then `cluster add-learner` and `cluster promote` through the other replicas.
    pub fn join(&mut self, id: u64) -> usize {
        let i = self.spawn(id, false);
        let addr = self.replicas[i].addr.clone();
        let add = self.ctl(&["cluster", "add-learner", &id.to_string(), &addr]);
        assert!(add.success, "add-learner {id}: {}", add.stderr);
        let promote = self.ctl(&["cluster", "promote", &id.to_string()]);
        assert!(promote.success, "promote {id}: {}", promote.stderr);
        i
    }

    /// (Re)starts replica `i` on its data directory and waits until it answers.
    pub fn restart(&mut self, i: usize) {
        let r = &mut self.replicas[i];
        r.proc = Some(ProcGuard::spawn(&r.binary, &r.args, &r.log));
        wait_until(Duration::from_secs(30), "the replica to answer", || {
            self.status(i).map(|_| ())
        });
    }

    /// kill -9.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].proc.take() {
            p.kill();
        }
        self.replicas[i].paused = false;
    }

    /// SIGSTOP: the process keeps its sockets but answers nothing.
    pub fn pause(&mut self, i: usize) {
        if let Some(p) = &self.replicas[i].proc {
            p.signal(Signal::SIGSTOP);
            self.replicas[i].paused = true;
        }
    }

    pub fn resume(&mut self, i: usize) {
        if let Some(p) = &self.replicas[i].proc {
            p.signal(Signal::SIGCONT);
            self.replicas[i].paused = false;
        }
    }

    /// How replica `i`'s process ended, if it has (it is then no longer counted as up).
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let status = self.replicas[i].proc.as_mut()?.try_wait()?;
        self.replicas[i].proc = None;
        Some(status)
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.replicas[i].proc.is_some() && !self.replicas[i].paused
    }

    pub fn index_of(&self, id: u64) -> usize {
        self.replicas
            .iter()
            .position(|r| r.id == id)
            .unwrap_or_else(|| panic!("no replica {id}"))
    }

    /// Every replica's address, comma-separated, as agents and dormantctl take them.
    pub fn urls(&self) -> String {
        self.replicas
            .iter()
            .map(|r| self.security.url(&r.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, i: usize) -> String {
        self.security.url(&self.replicas[i].addr)
    }

    /// `dormantctl` against all replicas (the first that answers is used).
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        run_ctl(&self.bins, &self.security, &self.urls(), args)
    }

    /// `dormantctl` against replica `i` only.
    pub fn ctl_at(&self, i: usize, args: &[&str]) -> CtlOutput {
        run_ctl(&self.bins, &self.security, &self.url(i), args)
    }

    /// Replica `i`'s own view (`cluster status --stale`), if it answers.
    pub fn status(&self, i: usize) -> Option<Value> {
        let out = self.ctl_at(i, &["cluster", "status", "--stale", "-o", "json"]);
        out.success.then(|| out.json())
    }

    /// Waits until a running replica leads, as it and another replica agree; returns its index.
    pub fn leader(&self) -> usize {
        wait_until(Duration::from_secs(30), "a leader", || {
            for i in (0..self.replicas.len()).filter(|i| self.is_up(*i)) {
                let s = self.status(i)?;
                if s["leader_id"] == self.replicas[i].id {
                    return Some(i);
                }
            }
            None
        })
    }

    /// The tenant names replica `i` has applied (a stale read of its own state).
    pub fn tenant_names(&self, i: usize) -> BTreeSet<String> {
        let out = self.ctl_at(i, &["tenant", "list", "--stale", "-o", "json"]);
        assert!(out.success, "tenant list at replica {i}: {}", out.stderr);
        out.json()
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|t| t["name"].as_str().map(str::to_string))
            .collect()
    }

    /// Waits until every running replica has applied everything the leader committed.
    pub fn wait_converged(&self) {
        let leader = self.leader();
        wait_until(
            Duration::from_secs(60),
            "every replica to apply the leader's log",
            || {
                let commit = self.status(leader)?["commit_index"].as_u64()?;
                let behind = (0..self.replicas.len())
                    .filter(|i| self.is_up(*i))
                    .any(|i| {
                        self.status(i)
                            .and_then(|s| s["applied_index"].as_u64())
                            .is_none_or(|applied| applied < commit)
                    });
                (!behind).then_some(())
            },
        );
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.replicas[i].log).unwrap_or_default()
    }
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for r in &mut self.replicas {
            if let Some(mut p) = r.proc.take() {
                // A stopped process dies of SIGKILL too; kill() also reaps it.
                p.kill();
            }
        }
        if std::thread::panicking() {
            for r in &self.replicas {
                let text = std::fs::read_to_string(&r.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("--- {} (last 30 lines)", r.log.display());
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}
