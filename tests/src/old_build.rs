//! A binary (the agent, the scheduler) as an older commit of this repository built it, for
//! upgrade tests: the old binary writes the state, this tree's takes it over.
//!
//! The commit comes from the repository the tests were built in (found from
//! `CARGO_MANIFEST_DIR`). Its tree is exported with `git archive` into a directory under the cargo
//! target dir (nothing is written to the repository: no worktree to register, none to prune after
//! a crash) and built there with `cargo build -p <package> --locked`, `CARGO_TARGET_DIR` set
//! to `<target>/old-builds/target`, which every old commit shares, so dependencies are compiled
//! once. The binary is kept as `<target>/old-builds/<package>-<commit>`: a rerun builds
//! nothing. A lock file makes concurrent test processes wait for one build instead of racing on
//! the same directory, and a guard removes the exported tree, also when the build fails.
//!
//! A checkout without the commit (a shallow CI clone) cannot run the test: under `CI=true` that
//! fails the test with the fix; elsewhere the test is skipped, saying why.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use nix::fcntl::{Flock, FlockArg};

/// Removes a directory tree when dropped: the exported source, pass or fail.
struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `git -C dir ARGS`; its trimmed stdout, or why not.
fn git(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The repository's top directory and the full hash of `commit`, or why the commit cannot be had.
fn find_commit(commit: &str) -> Result<(PathBuf, String), String> {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let top = git(manifest_dir, &["rev-parse", "--show-toplevel"])
        .map_err(|e| format!("{} is not in a git checkout ({e})", manifest_dir.display()))?;
    let top = PathBuf::from(top);
    let hash = git(
        &top,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            &format!("{commit}^{{commit}}"),
        ],
    )
    .map_err(|_| {
        format!(
            "commit {commit} is not in the history of {} (a shallow clone?); \
             fetch it, e.g. `git fetch --unshallow` or `git fetch origin {commit}`",
            top.display()
        )
    })?;
    Ok((top, hash))
}

/// The binary of `package` (named as the package: `dormant-agent`, `dormant-scheduler`) built
/// from `commit` (built now if it is not yet), or `None` when the test must be skipped because
/// this checkout lacks the commit. Under `CI=true` a missing commit fails the test instead. A
/// failing build fails the test with the build's output.
pub fn build(test: &str, commit: &str, package: &str) -> Option<PathBuf> {
    let (repo, hash) = match find_commit(commit) {
        Ok(found) => found,
        Err(why) => {
            let ci = std::env::var("CI").as_deref() == Ok("true");
            skip_unless_ci(test, commit, package, &why, ci);
            return None;
        }
    };
    // Beside target/debug, where the binaries under test are.
    let bins = crate::cluster::bin_dir();
    let base = bins
        .parent()
        .expect("the target dir above target/<profile>")
        .join("old-builds");
    std::fs::create_dir_all(&base).expect("create the old-builds dir");
    let binary = base.join(format!("{package}-{hash}"));

    // One build at a time; the lock goes when this process does, however it ends.
    let lock = File::create(base.join("build.lock")).expect("create the build lock");
    let _lock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the old builds");
    if binary.exists() {
        eprintln!("{test}: reusing {}", binary.display());
        return Some(binary);
    }

    let started = Instant::now();
    let src = base.join(format!("src-{package}-{hash}"));
    // A run killed mid-build leaves its export; start from a clean one.
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).expect("create the source dir");
    let _src_guard = RemoveDirOnDrop(src.clone());
    export(&repo, &hash, &src);

    let log_path = base.join(format!("build-{package}-{hash}.log"));
    let log = File::create(&log_path).expect("create the build log");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "-p", package, "--bin", package, "--locked"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", base.join("target"))
        // Set for this test by cargo; the build below is of another tree.
        .env_remove("CARGO_BUILD_TARGET_DIR")
        .env_remove("CARGO_MANIFEST_DIR")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the log"))
        .stderr(log)
        .status()
        .unwrap_or_else(|e| panic!("run {}: {e}", Path::new(&cargo).display()));
    if !status.success() {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(60).collect();
        panic!(
            "building {package} at {commit} failed ({status}); the end of {}:\n{}",
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    // Under its final name only when complete: a half-copied binary is never reused.
    let partial = binary.with_extension("partial");
    std::fs::copy(base.join("target/debug").join(package), &partial)
        .expect("copy the built binary");
    std::fs::rename(&partial, &binary).expect("name the built binary");
    eprintln!(
        "{test}: built {package} at {commit} in {:.1?}",
        started.elapsed()
    );
    Some(binary)
}

/// A missing commit skips the test, saying why; under CI it fails it: CI must run every test.
fn skip_unless_ci(test: &str, commit: &str, package: &str, why: &str, ci: bool) {
    if ci {
        panic!("{test} needs {package} of commit {commit}, and CI=true forbids skipping: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// `git archive <hash> | tar -x -C <dest>`, from the top of the repository (from a subdirectory
/// git would export only that subdirectory).
fn export(repo: &Path, hash: &str, dest: &Path) {
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["archive", "--format=tar", hash])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run git archive");
    let tar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(dest)
        .stdin(archive.stdout.take().expect("git archive's stdout"))
        .status()
        .expect("run tar");
    let archived = archive.wait().expect("wait for git archive");
    assert!(
        archived.success() && tar.success(),
        "exporting {hash} from {} failed (git archive {archived}, tar {tar})",
        repo.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_commit_missing_from_the_history_is_named_with_the_fix() {
        let err = find_commit("0000000000000000000000000000000000000001").unwrap_err();
        assert!(err.contains("not in the history"), "{err}");
        assert!(err.contains("git fetch"), "{err}");
    }

    #[test]
    #[should_panic(expected = "CI=true forbids skipping")]
    fn a_missing_commit_fails_under_ci() {
        skip_unless_ci("t", "5b8ced2", "dormant-agent", "not in the history", true);
    }

    #[test]
    fn a_missing_commit_skips_elsewhere() {
        skip_unless_ci("t", "5b8ced2", "dormant-agent", "not in the history", false);
    }
}
