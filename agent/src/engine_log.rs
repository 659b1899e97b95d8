//! The engine's output: a pipe per tenant (never a file the tenant holds), read by the agent into
//! a bounded, rotated log on the host (`engine.log`, then `engine.log.1`, each at most half of
//! `engine_log_max`), at most `engine_log_rate` bytes a second (beyond it bytes are dropped,
//! counted, and the reading slows down so a flooder is held back by its own full pipe).
//!
//! The pipe outlives the agent: the listener keeper holds a copy of both ends (`endpoints`), and
//! the next agent takes them back with the engine it adopts; what the engine writes meanwhile
//! waits in the pipe (`PIPE_SIZE`). The pure parts (`TokenBucket`, `admit`, `Drops`,
//! `RotatingLog`) are tested without root or a runtime.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn, Instrument};

/// The pipe's capacity: what an engine may write while no agent reads (a restart).
pub const PIPE_SIZE: usize = 1 << 20;
/// One read. Small: every tenant has a pump.
const READ_CHUNK: usize = 64 << 10;
/// The pump reads what is in the pipe (at most `BATCH`), then pauses this long with the pipe
/// out of its epoll set: a flooder gets through at most about 64 MiB/s (the rest waits in its
/// full pipe, holding it back), and the agent is woken at most 100 times a second per tenant,
/// not once per line the engine writes (every write to a pipe wakes its epoll waiters).
const PAUSE: Duration = Duration::from_millis(10);
const BATCH: usize = 640 << 10;
/// The smallest `engine_log_max` the agent accepts.
pub const MIN_MAX_BYTES: u64 = 128 << 10;

#[derive(Debug, thiserror::Error)]
pub enum EngineLogError {
    #[error("engine log {path}: {what}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("engine output pipe: {what}: {source}")]
    Pipe {
        what: &'static str,
        source: std::io::Error,
    },
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> EngineLogError + 'a {
    move |source| EngineLogError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// How much of a tenant's output the host keeps, from the agent's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogLimits {
    /// `engine.log` and `engine.log.1` together at most this.
    pub max_bytes: u64,
    /// Bytes a second written at most (with a burst of twice that).
    pub rate: u64,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_bytes: 8 << 20,
            rate: 1 << 20,
        }
    }
}

impl LogLimits {
    /// Each file's cap.
    pub fn per_file(&self) -> u64 {
        (self.max_bytes / 2).max(1)
    }

    pub fn burst(&self) -> u64 {
        self.rate.saturating_mul(2).max(READ_CHUNK as u64)
    }
}

/// Bytes allowed a second, with a burst; time comes in as an argument.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    /// Nanoseconds' worth of a token not yet credited.
    carry_nanos: u128,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            carry_nanos: 0,
            last: now,
        }
    }

    /// Tokens available at `now`.
    pub fn available(&mut self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.last).as_nanos() + self.carry_nanos;
        self.last = now.max(self.last);
        let earned = elapsed * u128::from(self.rate) / 1_000_000_000;
        self.carry_nanos = if self.rate == 0 {
            0
        } else {
            elapsed - earned * 1_000_000_000 / u128::from(self.rate)
        };
        let earned = u64::try_from(earned).unwrap_or(u64::MAX);
        self.tokens = self.tokens.saturating_add(earned).min(self.burst);
        if self.tokens == self.burst {
            self.carry_nanos = 0;
        }
        self.tokens
    }

    pub fn spend(&mut self, n: u64) {
        self.tokens = self.tokens.saturating_sub(n);
    }
}

/// How much of `chunk` to keep with `allowance` bytes left: all of it if it fits, else up to its
/// last whole line within the allowance (no line is cut in two), else nothing.
pub fn admit(chunk: &[u8], allowance: u64) -> usize {
    let allowance = usize::try_from(allowance).unwrap_or(usize::MAX);
    if chunk.len() <= allowance {
        return chunk.len();
    }
    chunk[..allowance]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1)
}

/// What the bucket's `tokens` let through a read of `n` bytes: everything, but during a flood
/// (dropping, and the read filled the buffer) only once a whole read's worth has gathered, so a
/// flood is logged in a few large writes a second, not a line per read. A short read (the flood
/// is over) gets what there is: the lines after a flood are the interesting ones.
pub fn allowance(tokens: u64, dropping: bool, n: usize) -> u64 {
    if dropping && n >= READ_CHUNK && tokens < READ_CHUNK as u64 {
        0
    } else {
        tokens
    }
}

/// What changed in dropping: nothing, it began, or it ended after so many bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum DropEvent {
    None,
    Started,
    Ended { dropped: u64 },
}

/// Whether output is being dropped, and how much since it began. Dropping ends only after
/// `DROP_QUIET` without a dropped byte: a flood that the bucket lets a little of through now and
/// then is one episode, not one per read.
#[derive(Debug, Default, Clone)]
pub struct Drops {
    /// Dropped in the current episode, and when the last byte was.
    current: Option<(u64, Instant)>,
    total: u64,
}

/// How long without a dropped byte ends a dropping episode.
pub const DROP_QUIET: Duration = Duration::from_secs(1);

impl Drops {
    /// One read at `now`: `dropped` bytes of it not written.
    pub fn record(&mut self, dropped: usize, now: Instant) -> DropEvent {
        let dropped = dropped as u64;
        self.total += dropped;
        match (&mut self.current, dropped) {
            (None, 0) => DropEvent::None,
            (None, n) => {
                self.current = Some((n, now));
                DropEvent::Started
            }
            (Some((sum, last)), 0) => {
                if now.saturating_duration_since(*last) < DROP_QUIET {
                    return DropEvent::None;
                }
                let dropped = *sum;
                self.current = None;
                DropEvent::Ended { dropped }
            }
            (Some((sum, last)), n) => {
                *sum += n;
                *last = now;
                DropEvent::None
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn dropping(&self) -> bool {
        self.current.is_some()
    }
}

/// `engine.log` and `engine.log.1`, each at most `per_file` bytes: a write that would overflow
/// the current file renames it over the previous one and starts afresh.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    previous: PathBuf,
    per_file: u64,
    file: File,
    size: u64,
    ends_with_newline: bool,
}

/// `engine.log.1` beside `engine.log`.
pub fn previous_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".1");
    path.with_file_name(name)
}

fn open_append(path: &Path) -> Result<File, EngineLogError> {
    File::options()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("open", path))
}

/// Keeps the last `keep` bytes of `path` (a log written before the cap, or under a larger one).
fn trim_to_tail(path: &Path, keep: u64) -> Result<(), EngineLogError> {
    let mut file = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("open", path)(e)),
    };
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    if len <= keep {
        return Ok(());
    }
    file.seek(SeekFrom::Start(len - keep))
        .map_err(io_err("seek", path))?;
    let mut tail = Vec::new();
    file.take(keep)
        .read_to_end(&mut tail)
        .map_err(io_err("read", path))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".trim");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut out = File::options()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err("create", &tmp))?;
    out.write_all(&tail).map_err(io_err("write", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err("rename", path))
}

impl RotatingLog {
    /// Opens `path` for appending; logs from before the cap (or a smaller cap) are cut to it.
    pub fn open(path: &Path, per_file: u64) -> Result<Self, EngineLogError> {
        let per_file = per_file.max(1);
        let previous = previous_path(path);
        let file = open_append(path)?;
        let size = file.metadata().map_err(io_err("stat", path))?.len();
        let mut log = Self {
            path: path.to_path_buf(),
            previous,
            per_file,
            file,
            size,
            ends_with_newline: true,
        };
        if log.size > per_file {
            log.rotate()?;
        }
        trim_to_tail(&log.previous, per_file)?;
        Ok(log)
    }

    fn rotate(&mut self) -> Result<(), EngineLogError> {
        std::fs::rename(&self.path, &self.previous).map_err(io_err("rotate", &self.path))?;
        self.file = open_append(&self.path)?;
        self.size = self
            .file
            .metadata()
            .map_err(io_err("stat", &self.path))?
            .len();
        if self.size > 0 {
            // Someone put a file there between the rename and the open: start it afresh.
            self.file
                .set_len(0)
                .map_err(io_err("truncate", &self.path))?;
            self.size = 0;
        }
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), EngineLogError> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.file
            .write_all(bytes)
            .map_err(io_err("write", &self.path))?;
        self.size += bytes.len() as u64;
        self.ends_with_newline = bytes.last() == Some(&b'\n');
        Ok(())
    }

    /// Appends `bytes`, rotating (at a line's end where there is one) so that no file grows
    /// beyond its cap.
    pub fn write(&mut self, mut bytes: &[u8]) -> Result<(), EngineLogError> {
        while !bytes.is_empty() {
            let room =
                usize::try_from(self.per_file.saturating_sub(self.size)).unwrap_or(usize::MAX);
            if bytes.len() <= room {
                return self.append(bytes);
            }
            let cut = match bytes[..room].iter().rposition(|b| *b == b'\n') {
                Some(i) => i + 1,
                // A line longer than what is left: in a fresh file, as much as fits.
                None if self.size == 0 => room,
                None => 0,
            };
            self.append(&bytes[..cut])?;
            bytes = &bytes[cut..];
            self.rotate()?;
        }
        Ok(())
    }

    /// A line of the agent's own, on a line of its own.
    pub fn note(&mut self, text: &str) -> Result<(), EngineLogError> {
        let mut line = String::new();
        if !self.ends_with_newline {
            line.push('\n');
        }
        line.push_str("[dormant-agent] ");
        line.push_str(text);
        line.push('\n');
        self.write(line.as_bytes())
    }
}

/// A tenant's engine-output pipe: the engine gets `write` as its stdout and stderr; the agent
/// reads `read`.
#[derive(Debug)]
pub struct LogPipe {
    pub read: OwnedFd,
    pub write: OwnedFd,
}

impl LogPipe {
    /// A new pipe, both ends close-on-exec (the spawn dups the write end onto 1 and 2), as large
    /// as `PIPE_SIZE` if the kernel allows.
    pub fn new() -> Result<Self, EngineLogError> {
        let (read, write) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| EngineLogError::Pipe {
                what: "create",
                source: e.into(),
            })?;
        let size = i32::try_from(PIPE_SIZE).unwrap_or(i32::MAX);
        if let Err(e) = nix::fcntl::fcntl(&read, nix::fcntl::FcntlArg::F_SETPIPE_SZ(size)) {
            warn!(error = %e, size = PIPE_SIZE, "enlarging the engine's output pipe");
        }
        Ok(Self { read, write })
    }
}

/// The task reading a tenant's pipe into its log; stopped when dropped.
#[derive(Debug)]
#[must_use = "the pump stops when its handle is dropped"]
pub struct Pump {
    task: tokio::task::JoinHandle<()>,
    dropped: Arc<AtomicU64>,
}

impl Drop for Pump {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Pump {
    /// Starts reading `read` (the pipe's read end) into `log`. Call inside the tenant's span:
    /// the pump's events carry it.
    pub fn start(
        read: OwnedFd,
        log: RotatingLog,
        limits: LogLimits,
    ) -> Result<Self, EngineLogError> {
        nix::fcntl::fcntl(
            &read,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| EngineLogError::Pipe {
            what: "set non-blocking",
            source: e.into(),
        })?;
        let dropped = Arc::new(AtomicU64::new(0));
        let state = PumpState {
            log: Arc::new(Mutex::new(log)),
            limits,
            bucket: TokenBucket::new(limits.rate, limits.burst(), Instant::now()),
            drops: Drops::default(),
            write_failing: false,
            dropped_total: dropped.clone(),
        };
        let task = tokio::spawn(pump(File::from(read), state).instrument(tracing::Span::current()));
        Ok(Self { task, dropped })
    }

    /// Bytes of output dropped so far (over the rate, or a failed write).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Puts the pipe in the runtime's epoll set (taken out again by `AsyncFd::into_inner`).
#[allow(unsafe_code)]
fn register(read: File) -> std::io::Result<tokio::io::unix::AsyncFd<File>> {
    // SAFETY: the file moves into the AsyncFd, which owns it until dropped or taken back with
    // `into_inner` (which deregisters it first), so the registered descriptor stays open and
    // unchanged while registered.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(read, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(e.to_string()))
}

/// What the pump carries from one read to the next.
struct PumpState {
    log: Arc<Mutex<RotatingLog>>,
    limits: LogLimits,
    bucket: TokenBucket,
    drops: Drops,
    write_failing: bool,
    dropped_total: Arc<AtomicU64>,
}

impl PumpState {
    /// One read's bytes (none: a quiet second while dropping): written as far as the bucket
    /// allows, the rest dropped and counted.
    async fn take(&mut self, chunk: &[u8]) {
        let now = Instant::now();
        let tokens = allowance(
            self.bucket.available(now),
            self.drops.dropping(),
            chunk.len(),
        );
        let kept = admit(chunk, tokens);
        self.bucket.spend(kept as u64);
        let dropped = chunk.len() - kept;
        self.dropped_total
            .fetch_add(dropped as u64, Ordering::Relaxed);
        let event = self.drops.record(dropped, now);
        match event {
            DropEvent::None => {}
            DropEvent::Started => warn!(
                rate = self.limits.rate,
                "the engine writes more than engine_log_rate: dropping its output"
            ),
            DropEvent::Ended { dropped } => info!(
                dropped_bytes = dropped,
                "the engine's output is logged again"
            ),
        }
        if kept == 0 && !matches!(event, DropEvent::Ended { .. }) {
            return;
        }
        let bytes = chunk[..kept].to_vec();
        let log = self.log.clone();
        let written = tokio::task::spawn_blocking(move || {
            let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
            if let DropEvent::Ended { dropped } = event {
                log.note(&format!(
                    "{dropped} bytes of engine output dropped (over engine_log_rate)"
                ))?;
            }
            log.write(&bytes)
        })
        .await;
        match written {
            Ok(Ok(())) => self.write_failing = false,
            Ok(Err(e)) => {
                self.dropped_total.fetch_add(kept as u64, Ordering::Relaxed);
                if !self.write_failing {
                    warn!(error = %e, "writing the engine's log: its output is dropped");
                }
                self.write_failing = true;
            }
            Err(e) => warn!(error = %e, "writing the engine's log"),
        }
    }
}

async fn pump(mut read: File, mut state: PumpState) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let registered = match register(read) {
            Ok(registered) => registered,
            Err(e) => {
                warn!(error = %e, "watching the engine's output: it is no longer logged");
                return;
            }
        };
        // Until there is something to read; while dropping, a quiet second ends the episode.
        let ready = if state.drops.dropping() {
            tokio::time::timeout(DROP_QUIET, registered.readable())
                .await
                .ok()
        } else {
            Some(registered.readable().await)
        };
        match ready {
            None => state.take(&[]).await,
            Some(Ok(_guard)) => {}
            Some(Err(e)) => {
                warn!(error = %e, "watching the engine's output: it is no longer logged");
                return;
            }
        }
        let mut batch = 0;
        while batch < BATCH {
            match registered.get_ref().read(&mut buf) {
                // Every write end closed (the agent keeps one, so only if it was not recovered).
                Ok(0) => {
                    info!("engine output pipe closed");
                    return;
                }
                Ok(n) => {
                    batch += n;
                    state.take(&buf[..n]).await;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!(error = %e, "reading the engine's output: it is no longer logged");
                    return;
                }
            }
        }
        read = registered.into_inner();
        tokio::time::sleep(PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 2000, t0);
        assert_eq!(b.available(t0), 2000);
        b.spend(2000);
        assert_eq!(b.available(t0), 0);
        assert_eq!(b.available(t0 + Duration::from_millis(500)), 500);
        b.spend(500);
        // Fractions of a token are not lost between calls.
        for ms in 1..=10 {
            b.available(t0 + Duration::from_millis(500) + Duration::from_micros(100 * ms));
        }
        assert_eq!(b.available(t0 + Duration::from_millis(501)), 1);
        // Never more than the burst, however long it was quiet.
        assert_eq!(b.available(t0 + Duration::from_secs(3600)), 2000);
    }

    #[test]
    fn admit_keeps_whole_lines_only() {
        assert_eq!(admit(b"abc\ndef\n", 100), 8);
        assert_eq!(admit(b"abc\ndef\n", 6), 4);
        assert_eq!(admit(b"abcdef", 3), 0);
        assert_eq!(admit(b"abc", 0), 0);
        assert_eq!(admit(b"", 0), 0);
    }

    #[test]
    fn while_dropping_only_a_whole_read_is_let_through() {
        assert_eq!(allowance(100, false, READ_CHUNK), 100);
        assert_eq!(allowance(100, true, READ_CHUNK), 0);
        let chunk = READ_CHUNK as u64;
        assert_eq!(allowance(chunk, true, READ_CHUNK), chunk);
        // A short read: the flood is over, its lines get what there is.
        assert_eq!(allowance(100, true, 20), 100);
    }

    #[test]
    fn drops_report_start_once_and_end_with_the_count_after_a_quiet_second() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut d = Drops::default();
        assert_eq!(d.record(0, ms(0)), DropEvent::None);
        assert_eq!(d.record(100, ms(1)), DropEvent::Started);
        assert!(d.dropping());
        assert_eq!(d.record(200, ms(2)), DropEvent::None);
        // A read let through in the middle of the flood does not end it.
        assert_eq!(d.record(0, ms(500)), DropEvent::None);
        assert_eq!(d.record(50, ms(600)), DropEvent::None);
        assert_eq!(d.record(0, ms(1599)), DropEvent::None);
        assert_eq!(d.record(0, ms(1600)), DropEvent::Ended { dropped: 350 });
        assert!(!d.dropping());
        assert_eq!(d.record(0, ms(1601)), DropEvent::None);
        assert_eq!(d.total(), 350);
    }

    #[test]
    fn log_rotates_at_line_ends_and_never_exceeds_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        let mut log = RotatingLog::open(&path, 100).unwrap();
        for i in 0..1000 {
            log.write(format!("line {i:04}\n").as_bytes()).unwrap();
            let a = std::fs::metadata(&path).unwrap().len();
            let b = std::fs::metadata(previous_path(&path)).map_or(0, |m| m.len());
            assert!(a <= 100 && b <= 100, "{a} {b}");
        }
        assert!(read(&path).ends_with("line 0999\n"));
        let prev = read(&previous_path(&path));
        assert!(prev.starts_with("line ") && prev.ends_with('\n'), "{prev}");
        // Only the two files.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn long_lines_and_big_writes_are_split_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        let mut log = RotatingLog::open(&path, 64).unwrap();
        log.write(&[b'x'; 1000]).unwrap();
        log.write(b"tail\n").unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= 64);
        assert!(std::fs::metadata(previous_path(&path)).unwrap().len() <= 64);
        assert!(read(&path).ends_with("tail\n"));
    }

    #[test]
    fn an_uncapped_log_from_before_is_cut_to_the_cap_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        std::fs::write(&path, vec![b'a'; 10_000]).unwrap();
        std::fs::write(previous_path(&path), vec![b'b'; 10_000]).unwrap();
        let mut log = RotatingLog::open(&path, 1000).unwrap();
        assert_eq!(std::fs::metadata(previous_path(&path)).unwrap().len(), 1000);
        assert!(read(&previous_path(&path)).starts_with('a'));
        log.write(b"fresh\n").unwrap();
        assert_eq!(read(&path), "fresh\n");
    }

    #[test]
    fn notes_start_on_a_line_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        let mut log = RotatingLog::open(&path, 1000).unwrap();
        log.write(b"partial").unwrap();
        log.note("42 bytes dropped").unwrap();
        log.note("again").unwrap();
        assert_eq!(
            read(&path),
            "partial\n[dormant-agent] 42 bytes dropped\n[dormant-agent] again\n"
        );
    }

    /// A flood through a real pipe: the files stay within the cap and the drops are counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_through_the_pipe_stays_within_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("engine.log");
        let pipe = LogPipe::new().unwrap();
        let limits = LogLimits {
            max_bytes: 256 << 10,
            rate: 64 << 10,
        };
        let log = RotatingLog::open(&path, limits.per_file()).unwrap();
        let pump = Pump::start(pipe.read, log, limits).unwrap();
        let mut w = File::from(pipe.write);
        let writer = std::thread::spawn(move || {
            let line = [b"flood flood flood flood flood flood flood\n".as_slice(); 1000].concat();
            let until = Instant::now() + Duration::from_millis(1500);
            let mut sent = 0u64;
            while Instant::now() < until {
                w.write_all(&line).unwrap();
                sent += line.len() as u64;
            }
            // Once the pump has drained the flood and a quiet second has ended the drops.
            std::thread::sleep(Duration::from_millis(1500));
            w.write_all(b"the end\n").unwrap();
            sent
        });
        let sent = tokio::task::spawn_blocking(move || writer.join().unwrap())
            .await
            .unwrap();
        // The last line comes through once the bucket refills.
        let until = Instant::now() + Duration::from_secs(10);
        while !read(&path).contains("the end") && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let a = std::fs::metadata(&path).unwrap().len();
        let b = std::fs::metadata(previous_path(&path)).map_or(0, |m| m.len());
        assert!(a + b <= 256 << 10, "{a} + {b}");
        assert!(sent > 4 << 20, "the writer was held back too much: {sent}");
        assert!(pump.dropped() > 0);
        assert!(read(&path).contains("[dormant-agent]"), "{}", read(&path));
        assert!(read(&path).contains("the end"));
    }
}
