//! A long-lived `psql` connection: statements go in on its stdin, answers come back line by line.
//! For tests that need one connection to stay open across an event (a freeze, an agent restart).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

pub struct PsqlSession {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl PsqlSession {
    pub fn connect(uri: &str) -> Self {
        let mut child = Command::new("psql")
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=0", uri])
            .env("PGCONNECT_TIMEOUT", crate::wait::client_connect_timeout())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start psql");
        let stdin = child.stdin.take().expect("psql stdin");
        let stdout = child.stdout.take().expect("psql stdout");
        let stderr = child.stderr.take().expect("psql stderr");
        let (tx, lines) = channel();
        let tx_err = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx_err.send(format!("stderr: {line}")).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            stdin,
            lines,
        }
    }

    /// Runs one statement that returns one line, and returns that line (or a `stderr: ` line).
    /// `timeout` is stretched by the time scale, as the waits are (in the VM a first query on a
    /// new connection took longer than 10 s while other tests ran initdb).
    pub fn query(&mut self, sql: &str, timeout: Duration) -> Result<String, String> {
        let timeout = timeout * crate::wait::time_scale();
        writeln!(self.stdin, "{sql}").map_err(|e| format!("write to psql: {e}"))?;
        self.stdin
            .flush()
            .map_err(|e| format!("flush to psql: {e}"))?;
        match self.lines.recv_timeout(timeout) {
            Ok(line) if line.starts_with("stderr: ") => Err(line),
            Ok(line) => Ok(line),
            Err(e) => Err(format!("no answer within {timeout:?}: {e}")),
        }
    }

    /// The backend's PID, to show the same connection answered before and after.
    pub fn backend_pid(&mut self) -> i32 {
        self.query("SELECT pg_backend_pid();", Duration::from_secs(10))
            .expect("pg_backend_pid")
            .trim()
            .parse()
            .expect("a PID")
    }
}

impl Drop for PsqlSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
