//! Choosing the cgroup driver at start: `auto` looks at how the cgroup root is mounted; `v1` and
//! `v2` are checked against the host so a wrong choice stops the agent with a clear message
//! instead of leaving a half-configured host.

use std::path::Path;
use std::sync::Arc;

use super::{v1::V1Driver, v2::V2Driver, CgroupDriver, CgroupError};

/// What the operator asked for (`--cgroup-driver`, `cgroup_driver` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DriverChoice {
    #[default]
    Auto,
    V1,
    V2,
}

/// How the cgroup root is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// cgroup2 mounted at the root: every controller in one tree.
    Unified,
    /// v1 hierarchies under the root (a tmpfs); possibly with systemd's controller-less
    /// `unified` mount beside them (hybrid), which is still v1 for the controllers we need.
    Legacy { hybrid: bool },
}

/// Reads the layout from the filesystem type of `root` (and of `root/unified`).
pub fn detect(root: &Path) -> Result<Layout, CgroupError> {
    use nix::sys::statfs::{statfs, CGROUP2_SUPER_MAGIC};
    let fs = statfs(root).map_err(|e| CgroupError::Io {
        path: root.to_path_buf(),
        source: e.into(),
    })?;
    if fs.filesystem_type() == CGROUP2_SUPER_MAGIC {
        return Ok(Layout::Unified);
    }
    let hybrid = statfs(&root.join("unified"))
        .map(|u| u.filesystem_type() == CGROUP2_SUPER_MAGIC)
        .unwrap_or(false);
    Ok(Layout::Legacy { hybrid })
}

/// The driver to use, and why, for the log line an operator reads at start.
pub fn choose(choice: DriverChoice, layout: Layout) -> Result<(DriverChoice, String), CgroupError> {
    match (choice, layout) {
        (DriverChoice::Auto, Layout::Unified) => Ok((
            DriverChoice::V2,
            "auto: the cgroup root is a cgroup2 (unified) mount".into(),
        )),
        (DriverChoice::Auto, Layout::Legacy { hybrid: false }) => Ok((
            DriverChoice::V1,
            "auto: the cgroup root holds v1 hierarchies".into(),
        )),
        (DriverChoice::Auto, Layout::Legacy { hybrid: true }) => Ok((
            DriverChoice::V1,
            "auto: hybrid host (v1 hierarchies, cgroup2 only at unified/ without controllers)"
                .into(),
        )),
        (DriverChoice::V2, Layout::Legacy { .. }) => Err(CgroupError::Unavailable(
            "cgroup_driver v2 was asked for, but this host mounts cgroup v1 hierarchies at the \
             cgroup root; boot with systemd.unified_cgroup_hierarchy=1 (cgroup v2 only), or run \
             the agent with --cgroup-driver v1 or auto"
                .into(),
        )),
        (DriverChoice::V1, Layout::Unified) => Err(CgroupError::Unavailable(
            "cgroup_driver v1 was asked for, but this host mounts cgroup2 (unified) at the cgroup \
             root and has no v1 hierarchies; run the agent with --cgroup-driver v2 or auto"
                .into(),
        )),
        (asked, _) => Ok((asked, "as configured".into())),
    }
}

/// Detects, chooses and prepares the driver. Returns it with the reason for the choice.
pub fn open(
    choice: DriverChoice,
    root: &Path,
    parent: &Path,
) -> Result<(Arc<dyn CgroupDriver>, String), CgroupError> {
    let (chosen, reason) = choose(choice, detect(root)?)?;
    let driver: Arc<dyn CgroupDriver> = match chosen {
        DriverChoice::V2 => Arc::new(V2Driver::new(root, parent)?),
        _ => Arc::new(V1Driver::new(root, parent)?),
    };
    Ok((driver, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_follows_the_layout_and_explicit_choices_must_match_it() {
        let unified = Layout::Unified;
        let legacy = Layout::Legacy { hybrid: false };
        let hybrid = Layout::Legacy { hybrid: true };
        assert_eq!(
            choose(DriverChoice::Auto, unified).unwrap().0,
            DriverChoice::V2
        );
        assert_eq!(
            choose(DriverChoice::Auto, legacy).unwrap().0,
            DriverChoice::V1
        );
        let (chosen, why) = choose(DriverChoice::Auto, hybrid).unwrap();
        assert_eq!(chosen, DriverChoice::V1);
        assert!(why.contains("hybrid"), "{why}");
        assert_eq!(
            choose(DriverChoice::V2, unified).unwrap().0,
            DriverChoice::V2
        );
        assert_eq!(
            choose(DriverChoice::V1, hybrid).unwrap().0,
            DriverChoice::V1
        );

        let err = choose(DriverChoice::V2, legacy).unwrap_err().to_string();
        assert!(err.contains("v2 was asked for"), "{err}");
        assert!(err.contains("--cgroup-driver v1 or auto"), "{err}");
        let err = choose(DriverChoice::V1, unified).unwrap_err().to_string();
        assert!(err.contains("--cgroup-driver v2 or auto"), "{err}");
    }

    #[test]
    fn a_plain_directory_is_not_unified() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(detect(dir.path()).unwrap(), Layout::Legacy { .. }));
    }
}
