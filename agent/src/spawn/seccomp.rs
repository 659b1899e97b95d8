//! The seccomp filter every tenant process runs under: a deny list on top of what the tenant's
//! uid, `no_new_privs` and its empty capability sets already forbid. It closes what an
//! unprivileged process may still do to reach beyond its tenant (new user namespaces, which give
//! a process every capability over a fresh namespace; the kernel keyring; BPF and perf events;
//! tracing and reading other processes' memory) and refuses the administrative calls outright,
//! so a kernel bug in one of them is not reachable from a tenant.
//!
//! Deny, not allow: an allow list must follow every engine's (and every shell command's, a
//! PostgreSQL superuser runs programs) system calls; a deny list of what no database needs stays
//! right as engines change. Denied calls fail with `EPERM`, as without the privilege; `clone3`
//! fails with `ENOSYS`, because its flags live in memory a filter cannot read, and libc then
//! falls back to `clone`, whose namespace flags the filter does read.
//!
//! On x86_64 a first filter refuses every x32 call (numbers with bit 30 set): the deny list
//! names x86_64 numbers, and an x32 number for the same call would pass it on a kernel with x32
//! enabled.
//!
//! A custom engine may allow calls of the list back (`seccomp_allow` in its template), by name.
//! Compiled with Firecracker's `seccompiler` before the fork; the child only installs it.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The calls refused to tenants, by the name `seccomp_allow` takes, with why.
pub const DENIED: &[(&str, libc::c_long, &str)] = &[
    ("unshare", libc::SYS_unshare, "new namespaces"),
    ("setns", libc::SYS_setns, "entering other namespaces"),
    ("mount", libc::SYS_mount, "mounts"),
    ("umount2", libc::SYS_umount2, "mounts"),
    ("pivot_root", libc::SYS_pivot_root, "mounts"),
    ("open_tree", libc::SYS_open_tree, "mounts"),
    ("move_mount", libc::SYS_move_mount, "mounts"),
    ("fsopen", libc::SYS_fsopen, "mounts"),
    ("fsconfig", libc::SYS_fsconfig, "mounts"),
    ("fsmount", libc::SYS_fsmount, "mounts"),
    ("fspick", libc::SYS_fspick, "mounts"),
    ("mount_setattr", libc::SYS_mount_setattr, "mounts"),
    ("keyctl", libc::SYS_keyctl, "the kernel keyring"),
    ("add_key", libc::SYS_add_key, "the kernel keyring"),
    ("request_key", libc::SYS_request_key, "the kernel keyring"),
    ("bpf", libc::SYS_bpf, "BPF programs and maps"),
    ("perf_event_open", libc::SYS_perf_event_open, "perf events"),
    ("ptrace", libc::SYS_ptrace, "tracing processes"),
    (
        "process_vm_readv",
        libc::SYS_process_vm_readv,
        "other processes' memory",
    ),
    (
        "process_vm_writev",
        libc::SYS_process_vm_writev,
        "other processes' memory",
    ),
    ("userfaultfd", libc::SYS_userfaultfd, "page-fault handling"),
    ("init_module", libc::SYS_init_module, "kernel modules"),
    ("finit_module", libc::SYS_finit_module, "kernel modules"),
    ("delete_module", libc::SYS_delete_module, "kernel modules"),
    ("kexec_load", libc::SYS_kexec_load, "booting a kernel"),
    (
        "kexec_file_load",
        libc::SYS_kexec_file_load,
        "booting a kernel",
    ),
    ("reboot", libc::SYS_reboot, "rebooting"),
    ("swapon", libc::SYS_swapon, "swap"),
    ("swapoff", libc::SYS_swapoff, "swap"),
    ("acct", libc::SYS_acct, "process accounting"),
    ("syslog", libc::SYS_syslog, "the kernel log"),
    ("quotactl", libc::SYS_quotactl, "disk quotas"),
    (
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        "opening files by handle, past mounts",
    ),
    (
        "fanotify_init",
        libc::SYS_fanotify_init,
        "filesystem-wide watches",
    ),
    #[cfg(target_arch = "x86_64")]
    ("iopl", libc::SYS_iopl, "I/O ports"),
    #[cfg(target_arch = "x86_64")]
    ("ioperm", libc::SYS_ioperm, "I/O ports"),
];

/// Namespace flags `clone` may not carry (the same reason as `unshare`).
const CLONE_NAMESPACES: [libc::c_int; 7] = [
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SeccompError {
    #[error("{name:?} is not a call the tenant filter denies (it denies: {known})")]
    UnknownCall { name: String, known: String },
    #[error("seccomp filter: {0}")]
    Compile(String),
}

/// Checks a template's `seccomp_allow` list: each name must be one of `DENIED` (or `clone`).
pub fn check_allowed(names: &[String]) -> Result<(), SeccompError> {
    for name in names {
        if name != "clone" && !DENIED.iter().any(|(n, _, _)| n == name) {
            let mut known: Vec<&str> = DENIED.iter().map(|(n, _, _)| *n).collect();
            known.push("clone");
            return Err(SeccompError::UnknownCall {
                name: name.clone(),
                known: known.join(", "),
            });
        }
    }
    Ok(())
}

fn compile_err(e: impl std::fmt::Display) -> SeccompError {
    SeccompError::Compile(e.to_string())
}

/// The filters for a tenant process, in the order to install them: the deny list (`EPERM`) and
/// `clone3` (`ENOSYS`). `allow` names calls of `DENIED` given back; `clone` in it lifts the
/// namespace-flag check (and `clone3`'s refusal).
pub fn filters(allow: &[String]) -> Result<Vec<BpfProgram>, SeccompError> {
    check_allowed(allow)?;
    let allowed = |name: &str| allow.iter().any(|a| a == name);
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(compile_err)?;
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = DENIED
        .iter()
        .filter(|(name, _, _)| !allowed(name))
        .map(|(_, nr, _)| (*nr, Vec::new()))
        .collect();
    let mut programs = Vec::new();
    if !allowed("clone") {
        // Any namespace flag in clone's flags (its first argument on every architecture we build).
        let rules = CLONE_NAMESPACES
            .iter()
            .map(|flag| {
                let flag = u64::from(flag.unsigned_abs());
                SeccompCondition::new(
                    0,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )
                .and_then(|c| SeccompRule::new(vec![c]))
                .map_err(compile_err)
            })
            .collect::<Result<Vec<_>, _>>()?;
        denied.insert(libc::SYS_clone, rules);
        let clone3 = SeccompFilter::new(
            BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS.unsigned_abs()),
            arch,
        )
        .map_err(compile_err)?;
        programs.push(BpfProgram::try_from(clone3).map_err(compile_err)?);
    }
    let deny = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM.unsigned_abs()),
        arch,
    )
    .map_err(compile_err)?;
    programs.insert(0, BpfProgram::try_from(deny).map_err(compile_err)?);
    #[cfg(target_arch = "x86_64")]
    programs.insert(0, no_x32());
    Ok(programs)
}

/// Refuses (`EPERM`) every call whose number has the x32 bit set; allows the rest to the next
/// filter. seccompiler checks the architecture but not this bit.
#[cfg(target_arch = "x86_64")]
fn no_x32() -> BpfProgram {
    use seccompiler::sock_filter;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    // BPF_LD | BPF_W | BPF_ABS, BPF_JMP | BPF_JGE | BPF_K, BPF_RET | BPF_K.
    const LOAD_WORD: u16 = 0x20;
    const JUMP_IF_AT_LEAST: u16 = 0x35;
    const RETURN: u16 = 0x06;
    let errno = libc::SECCOMP_RET_ERRNO | libc::EPERM.unsigned_abs();
    vec![
        // seccomp_data.nr is at offset 0.
        sock_filter {
            code: LOAD_WORD,
            jt: 0,
            jf: 0,
            k: 0,
        },
        sock_filter {
            code: JUMP_IF_AT_LEAST,
            jt: 0,
            jf: 1,
            k: X32_SYSCALL_BIT,
        },
        sock_filter {
            code: RETURN,
            jt: 0,
            jf: 0,
            k: errno,
        },
        sock_filter {
            code: RETURN,
            jt: 0,
            jf: 0,
            k: libc::SECCOMP_RET_ALLOW,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_filters_compile_and_deny_the_clone3_fallback_too() {
        let programs = filters(&[]).unwrap();
        // The x32 guard (x86_64), the deny list, clone3.
        assert_eq!(
            programs.len(),
            if cfg!(target_arch = "x86_64") { 3 } else { 2 }
        );
        assert!(programs.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn allowing_clone_drops_the_clone3_filter() {
        let programs = filters(&["clone".into(), "ptrace".into()]).unwrap();
        assert_eq!(
            programs.len(),
            if cfg!(target_arch = "x86_64") { 2 } else { 1 }
        );
    }

    #[test]
    fn an_unknown_name_is_refused_with_the_list() {
        let err = filters(&["execve".into()]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("is not a call"), "{text}");
        assert!(text.contains("\"execve\""), "{text}");
        assert!(text.contains("ptrace"), "{text}");
    }
}
