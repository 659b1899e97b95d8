//! The system calls behind the spawn plan, as a trait (as youki does): `LinuxSys` makes them,
//! `RecordingSys` (tests only) writes them down, so `execute` is unit-tested without root.
//! `execute` runs in the forked child before exec: it may not allocate or take locks, and with
//! `LinuxSys` it does neither (every string was prepared by the plan).

use std::ffi::CStr;
use std::io;
use std::os::fd::RawFd;

use super::plan::Step;

pub trait Sys {
    fn setsid(&mut self) -> io::Result<()>;
    fn write_fd(&mut self, fd: RawFd, bytes: &[u8]) -> io::Result<()>;
    fn unshare(&mut self, flags: libc::c_int) -> io::Result<()>;
    /// `Some(child)` in the parent, `None` in the child.
    fn fork(&mut self) -> io::Result<Option<libc::pid_t>>;
    /// Ends the calling process at once (no destructors, no atexit).
    fn exit_now(&mut self, code: libc::c_int) -> !;
    fn mount(
        &mut self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> io::Result<()>;
    fn mkdir(&mut self, path: &CStr, mode: libc::mode_t) -> io::Result<()>;
    /// Creates an empty file (for a bind to cover); an existing one is fine.
    fn create_file(&mut self, path: &CStr) -> io::Result<()>;
    fn symlink(&mut self, target: &CStr, link: &CStr) -> io::Result<()>;
    /// `chdir(new_root)`, `pivot_root(".", ".")`, `umount2(".", MNT_DETACH)`, `chdir("/")`.
    fn pivot_root(&mut self, new_root: &CStr) -> io::Result<()>;
    fn chdir(&mut self, path: &CStr) -> io::Result<()>;
    fn umask(&mut self, mode: libc::mode_t);
    fn seccomp(&mut self, filter: &[seccompiler::sock_filter]) -> io::Result<()>;
    fn sethostname(&mut self, name: &CStr) -> io::Result<()>;
    fn loopback_up(&mut self) -> io::Result<()>;
    fn setrlimit(
        &mut self,
        resource: libc::__rlimit_resource_t,
        soft: u64,
        hard: u64,
    ) -> io::Result<()>;
    fn no_new_privs(&mut self) -> io::Result<()>;
    fn setgroups_empty(&mut self) -> io::Result<()>;
    fn setresgid(&mut self, gid: libc::gid_t) -> io::Result<()>;
    fn setresuid(&mut self, uid: libc::uid_t) -> io::Result<()>;
}

/// Records on the report pipe: a tag byte and a native-endian i32.
pub const REPORT_PID: u8 = b'P';
pub const REPORT_FAILED_STEP: u8 = b'E';

fn record(tag: u8, value: i32) -> [u8; 5] {
    let v = value.to_ne_bytes();
    [tag, v[0], v[1], v[2], v[3]]
}

/// Runs the steps in order. On failure, the failing step's index goes to `report_fd` (so the
/// agent can name it) and the error is returned for std to pass to the parent as the spawn error.
pub fn execute(steps: &[Step], sys: &mut impl Sys, report_fd: RawFd) -> io::Result<()> {
    for (index, step) in steps.iter().enumerate() {
        if let Err(e) = run_step(step, sys) {
            let index = i32::try_from(index).unwrap_or(i32::MAX);
            let _ = sys.write_fd(report_fd, &record(REPORT_FAILED_STEP, index));
            return Err(e);
        }
    }
    Ok(())
}

fn run_step(step: &Step, sys: &mut impl Sys) -> io::Result<()> {
    const ROOT: &CStr = c"/";
    const PROC: &CStr = c"proc";
    const TMPFS: &CStr = c"tmpfs";
    const MQUEUE: &CStr = c"mqueue";
    const PSEUDO: libc::c_ulong = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    match step {
        Step::NewSession => sys.setsid(),
        Step::JoinCgroup(fd) => sys.write_fd(*fd, b"0"),
        Step::Unshare(flags) => sys.unshare(*flags),
        Step::ForkIntoPidNamespace { report_fd } => match sys.fork()? {
            // The intermediate process: tell the agent who the engine is, then leave. The agent is
            // a child subreaper, so the engine becomes its child.
            Some(engine) => {
                let _ = sys.write_fd(*report_fd, &record(REPORT_PID, engine));
                sys.exit_now(0)
            }
            None => Ok(()),
        },
        Step::MakeMountsSlave => sys.mount(None, ROOT, None, libc::MS_REC | libc::MS_SLAVE, None),
        Step::SetUmask(mode) => {
            sys.umask(*mode);
            Ok(())
        }
        Step::MountProc { target } => sys.mount(Some(PROC), target, Some(PROC), PSEUDO, None),
        Step::MountMqueue { target } => sys.mount(Some(MQUEUE), target, Some(MQUEUE), PSEUDO, None),
        Step::MountTmpfs { target, options } => {
            sys.mount(Some(TMPFS), target, Some(TMPFS), PSEUDO, Some(options))
        }
        Step::MakeDir { path, mode } => sys.mkdir(path, *mode),
        Step::MakeFile { path } => sys.create_file(path),
        Step::Symlink { target, link } => sys.symlink(target, link),
        Step::Bind {
            source,
            target,
            access,
        } => {
            sys.mount(Some(source), target, None, libc::MS_BIND, None)?;
            // Flags other than MS_BIND take effect only on a remount of the bind.
            sys.mount(None, target, None, access.remount_flags(), None)
        }
        Step::PivotRoot { new_root } => sys.pivot_root(new_root),
        // A bind remount sets the mount's flags to exactly these: keep nosuid,nodev,noexec.
        Step::RemountReadOnly { target } => sys.mount(
            None,
            target,
            None,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | PSEUDO,
            None,
        ),
        Step::Chdir(path) => sys.chdir(path),
        Step::SetHostname(name) => sys.sethostname(name),
        Step::LoopbackUp => sys.loopback_up(),
        Step::SetRlimit {
            resource,
            soft,
            hard,
        } => sys.setrlimit(*resource, *soft, *hard),
        Step::NoNewPrivs => sys.no_new_privs(),
        Step::DropSupplementaryGroups => sys.setgroups_empty(),
        Step::SetGid(gid) => sys.setresgid(*gid),
        Step::SetUid(uid) => sys.setresuid(*uid),
        Step::Seccomp(filter) => sys.seccomp(filter),
    }
}

/// The real system calls.
pub struct LinuxSys;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `check` for `syscall(2)`, which returns a long.
fn check_long(rc: libc::c_long) -> io::Result<()> {
    if rc == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn ptr_or_null(s: Option<&CStr>) -> *const libc::c_char {
    s.map_or(std::ptr::null(), CStr::as_ptr)
}

#[allow(unsafe_code)]
impl Sys for LinuxSys {
    fn setsid(&mut self) -> io::Result<()> {
        // SAFETY: no arguments.
        check(unsafe { libc::setsid() })
    }

    fn write_fd(&mut self, fd: RawFd, bytes: &[u8]) -> io::Result<()> {
        // SAFETY: the buffer is valid for its length; a bad fd is reported as EBADF.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if usize::try_from(n).ok() == Some(bytes.len()) {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn unshare(&mut self, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: plain flags.
        check(unsafe { libc::unshare(flags) })
    }

    fn fork(&mut self) -> io::Result<Option<libc::pid_t>> {
        // SAFETY: we are the single thread of a freshly forked child, so forking again cannot
        // leave another thread's lock held in the new process.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => Ok(None),
            pid => Ok(Some(pid)),
        }
    }

    fn exit_now(&mut self, code: libc::c_int) -> ! {
        // SAFETY: _exit ends the process without running any user-space code.
        unsafe { libc::_exit(code) }
    }

    fn mount(
        &mut self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> io::Result<()> {
        // SAFETY: every pointer is a NUL-terminated string that outlives the call, or null where
        // mount(2) allows it.
        check(unsafe {
            libc::mount(
                ptr_or_null(source),
                target.as_ptr(),
                ptr_or_null(fstype),
                flags,
                ptr_or_null(data).cast(),
            )
        })
    }

    fn mkdir(&mut self, path: &CStr, mode: libc::mode_t) -> io::Result<()> {
        // SAFETY: a NUL-terminated path.
        check(unsafe { libc::mkdir(path.as_ptr(), mode) })
    }

    fn create_file(&mut self, path: &CStr) -> io::Result<()> {
        // SAFETY: a NUL-terminated path; the descriptor is ours and closed at once.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                0o644,
            )
        };
        check(fd)?;
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        Ok(())
    }

    fn symlink(&mut self, target: &CStr, link: &CStr) -> io::Result<()> {
        // SAFETY: NUL-terminated paths.
        check(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) })
    }

    fn pivot_root(&mut self, new_root: &CStr) -> io::Result<()> {
        const DOT: &CStr = c".";
        const ROOT: &CStr = c"/";
        // SAFETY: NUL-terminated paths. pivot_root(".", ".") stacks the old root under the new
        // one at the same place (as runc does); detaching it leaves no way back.
        unsafe {
            check(libc::chdir(new_root.as_ptr()))?;
            check_long(libc::syscall(
                libc::SYS_pivot_root,
                DOT.as_ptr(),
                DOT.as_ptr(),
            ))?;
            check(libc::umount2(DOT.as_ptr(), libc::MNT_DETACH))?;
            check(libc::chdir(ROOT.as_ptr()))
        }
    }

    fn chdir(&mut self, path: &CStr) -> io::Result<()> {
        // SAFETY: a NUL-terminated path.
        check(unsafe { libc::chdir(path.as_ptr()) })
    }

    fn umask(&mut self, mode: libc::mode_t) {
        // SAFETY: plain mode bits; umask cannot fail.
        unsafe { libc::umask(mode) };
    }

    fn seccomp(&mut self, filter: &[seccompiler::sock_filter]) -> io::Result<()> {
        let len = libc::c_ushort::try_from(filter.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let prog = libc::sock_fprog {
            len,
            // seccompiler's sock_filter has libc's layout (repr(C), same fields).
            filter: filter.as_ptr().cast_mut().cast(),
        };
        // SAFETY: prog points at `filter`, valid for the call; no_new_privs is set before.
        check_long(unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                &raw const prog,
            )
        })
    }

    fn sethostname(&mut self, name: &CStr) -> io::Result<()> {
        let bytes = name.to_bytes();
        // SAFETY: pointer and length describe the name's bytes.
        check(unsafe { libc::sethostname(bytes.as_ptr().cast(), bytes.len()) })
    }

    fn loopback_up(&mut self) -> io::Result<()> {
        // SAFETY: a datagram socket only to carry the interface ioctls; closed before returning.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq we own; the union member
        // used is ifru_flags, which these requests define.
        let result = unsafe {
            if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr) < 0 {
                Err(io::Error::last_os_error())
            } else {
                // IFF_UP is 1: it fits the short the kernel's ifreq carries.
                #[allow(clippy::cast_possible_truncation)]
                let up = libc::IFF_UP as libc::c_short;
                ifr.ifr_ifru.ifru_flags |= up;
                if libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr) < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
        };
        // SAFETY: our own socket.
        unsafe { libc::close(sock) };
        result
    }

    fn setrlimit(
        &mut self,
        resource: libc::__rlimit_resource_t,
        soft: u64,
        hard: u64,
    ) -> io::Result<()> {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        // SAFETY: a valid rlimit for the call's duration.
        check(unsafe { libc::setrlimit(resource, &limit) })
    }

    fn no_new_privs(&mut self) -> io::Result<()> {
        // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes plain integer arguments.
        check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
    }

    fn setgroups_empty(&mut self) -> io::Result<()> {
        // SAFETY: an empty list: size 0 and a null pointer.
        check(unsafe { libc::setgroups(0, std::ptr::null()) })
    }

    fn setresgid(&mut self, gid: libc::gid_t) -> io::Result<()> {
        // SAFETY: plain ids.
        check(unsafe { libc::setresgid(gid, gid, gid) })
    }

    fn setresuid(&mut self, uid: libc::uid_t) -> io::Result<()> {
        // SAFETY: plain ids.
        check(unsafe { libc::setresuid(uid, uid, uid) })
    }
}

/// A fake `Sys` for unit tests: records each call, fails the call numbered `fail_at` with
/// `EPERM`, and takes the child's side of every fork.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct RecordingSys {
    pub calls: Vec<String>,
    pub fail_at: Option<usize>,
}

#[cfg(test)]
impl RecordingSys {
    fn call(&mut self, what: String) -> io::Result<()> {
        self.calls.push(what);
        if self.fail_at == Some(self.calls.len() - 1) {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
impl Sys for RecordingSys {
    fn setsid(&mut self) -> io::Result<()> {
        self.call("setsid".into())
    }
    fn write_fd(&mut self, fd: RawFd, bytes: &[u8]) -> io::Result<()> {
        self.call(format!("write({fd}, {bytes:?})"))
    }
    fn unshare(&mut self, flags: libc::c_int) -> io::Result<()> {
        self.call(format!("unshare({flags:#x})"))
    }
    fn fork(&mut self) -> io::Result<Option<libc::pid_t>> {
        self.call("fork".into()).map(|()| None)
    }
    fn exit_now(&mut self, code: libc::c_int) -> ! {
        panic!("exit_now({code}) in a test: the fake always takes the child's side")
    }
    fn mount(
        &mut self,
        source: Option<&CStr>,
        target: &CStr,
        fstype: Option<&CStr>,
        flags: libc::c_ulong,
        data: Option<&CStr>,
    ) -> io::Result<()> {
        self.call(format!(
            "mount({source:?}, {target:?}, {fstype:?}, {flags:#x}, {data:?})"
        ))
    }
    fn mkdir(&mut self, path: &CStr, mode: libc::mode_t) -> io::Result<()> {
        self.call(format!("mkdir({path:?}, {mode:o})"))
    }
    fn create_file(&mut self, path: &CStr) -> io::Result<()> {
        self.call(format!("create({path:?})"))
    }
    fn symlink(&mut self, target: &CStr, link: &CStr) -> io::Result<()> {
        self.call(format!("symlink({target:?}, {link:?})"))
    }
    fn pivot_root(&mut self, new_root: &CStr) -> io::Result<()> {
        self.call(format!("pivot_root({new_root:?})"))
    }
    fn chdir(&mut self, path: &CStr) -> io::Result<()> {
        self.call(format!("chdir({path:?})"))
    }
    fn umask(&mut self, mode: libc::mode_t) {
        let _ = self.call(format!("umask({mode:o})"));
    }
    fn seccomp(&mut self, filter: &[seccompiler::sock_filter]) -> io::Result<()> {
        self.call(format!("seccomp({} instructions)", filter.len()))
    }
    fn sethostname(&mut self, name: &CStr) -> io::Result<()> {
        self.call(format!("sethostname({name:?})"))
    }
    fn loopback_up(&mut self) -> io::Result<()> {
        self.call("loopback_up".into())
    }
    fn setrlimit(
        &mut self,
        resource: libc::__rlimit_resource_t,
        soft: u64,
        hard: u64,
    ) -> io::Result<()> {
        self.call(format!("setrlimit({resource}, {soft}, {hard})"))
    }
    fn no_new_privs(&mut self) -> io::Result<()> {
        self.call("no_new_privs".into())
    }
    fn setgroups_empty(&mut self) -> io::Result<()> {
        self.call("setgroups([])".into())
    }
    fn setresgid(&mut self, gid: libc::gid_t) -> io::Result<()> {
        self.call(format!("setresgid({gid})"))
    }
    fn setresuid(&mut self, uid: libc::uid_t) -> io::Result<()> {
        self.call(format!("setresuid({uid})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spawn::plan::{isolated, Isolation};
    use crate::spawn::root::HostRoot;
    use std::path::Path;

    fn steps() -> Vec<Step> {
        isolated(
            &[7],
            9,
            &Isolation {
                hostname: "acme",
                root: Path::new("/t/root"),
                host: &HostRoot::default(),
                volume: Path::new("/t/data"),
                run: Path::new("/r/200001"),
                uid: 200_001,
                gid: 200_002,
                passwd: Path::new("/t/passwd"),
                group: Path::new("/t/group"),
                tmp_bytes: 1 << 20,
                max_open_files: 1024,
                seccomp: &[vec![seccompiler::sock_filter {
                    code: 6,
                    jt: 0,
                    jf: 0,
                    k: 0x7fff_0000,
                }]],
            },
        )
        .unwrap()
    }

    #[test]
    fn execute_makes_the_calls_of_the_plan_in_order() {
        let mut sys = RecordingSys::default();
        execute(&steps(), &mut sys, 9).unwrap();
        let calls = sys.calls.join("\n");
        let expected = [
            "setsid",
            "write(7, [48])",
            "unshare(",
            "fork",
            "mount(None, \"/\", None, 0x84000, None)",
            "umask(0)",
            "mount(Some(\"tmpfs\"), \"/t/root/\", Some(\"tmpfs\"), 0xe, Some(\"size=1048576,mode=0755\"))",
            "mount(Some(\"/usr\"), \"/t/root/usr\", None, 0x1000, None)",
            "mount(Some(\"/t/passwd\"), \"/t/root/etc/passwd\", None, 0x1000, None)",
            "mount(Some(\"/t/data\"), \"/t/root/srv\", None, 0x1000, None)",
            "mount(Some(\"tmpfs\"), \"/t/root/tmp\", Some(\"tmpfs\"), 0xe, Some(\"size=1048576,mode=1777\"))",
            "mount(Some(\"/r/200001\"), \"/t/root/run/engine\", None, 0x1000, None)",
            "mount(Some(\"/dev/null\"), \"/t/root/dev/null\", None, 0x1000, None)",
            "mount(Some(\"mqueue\"), \"/t/root/dev/mqueue\", Some(\"mqueue\"), 0xe, None)",
            "mount(Some(\"proc\"), \"/t/root/proc\", Some(\"proc\"), 0xe, None)",
            "pivot_root(\"/t/root\")",
            "mount(None, \"/\", None, 0x102f, None)",
            "chdir(\"/srv\")",
            "umask(77)",
            "sethostname(\"acme\")",
            "loopback_up",
            "no_new_privs",
            "setgroups([])",
            "setresgid(200002)",
            "setresuid(200001)",
            "seccomp(1 instructions)",
        ];
        let mut at = 0;
        for e in expected {
            let found = calls[at..]
                .find(e)
                .unwrap_or_else(|| panic!("{e:?} missing or out of order in:\n{calls}"));
            at += found + e.len();
        }
        assert_eq!(
            sys.calls.last().map(String::as_str),
            Some("seccomp(1 instructions)")
        );
    }

    #[test]
    fn a_failing_step_stops_the_plan_and_reports_its_index() {
        let steps = steps();
        let proc_step = steps
            .iter()
            .position(|s| matches!(s, Step::MountProc { .. }))
            .unwrap();
        // Steps make one call or more (a bind two): find the call that mounts /proc.
        let mut dry = RecordingSys::default();
        execute(&steps, &mut dry, 9).unwrap();
        let proc_call = dry
            .calls
            .iter()
            .position(|c| c.starts_with("mount(Some(\"proc\")"))
            .unwrap();
        let mut sys = RecordingSys {
            fail_at: Some(proc_call),
            ..Default::default()
        };
        let err = execute(&steps, &mut sys, 9).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
        let index = i32::try_from(proc_step).unwrap().to_ne_bytes();
        let report = format!(
            "write(9, {:?})",
            [REPORT_FAILED_STEP, index[0], index[1], index[2], index[3]]
        );
        assert_eq!(sys.calls.last(), Some(&report));
        assert!(
            !sys.calls.iter().any(|c| c.starts_with("setresuid")),
            "the identity was dropped after a failed step"
        );
    }
}
