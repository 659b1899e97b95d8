//! Each tenant's storage as a hard limit: a sparse ext4 image the size of the tenant's storage,
//! attached to a loop device and mounted (`nodev,nosuid,noexec`) as the tenant's data directory.
//! A write past the size gets ENOSPC in that tenant only, and the host's disk gives up only the
//! blocks actually written. Used bytes come from `statvfs`; growing is online (`resize2fs`).
//!
//! The loop device and ext4 tools (`losetup`, `mkfs.ext4`, `resize2fs` from util-linux and
//! e2fsprogs) are run as commands: they are the reference implementations every operator knows,
//! and their messages go into our errors as they are.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume {path}: {what}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("volume {path}: {program} failed: {message}")]
    Tool {
        program: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("volume {path}: the image is missing but the tenant was initialised; refusing to start on an empty volume")]
    ImageLost { path: PathBuf },
    #[error("volume {path}: shrinking from {from} to {to} bytes is not supported")]
    Shrink { path: PathBuf, from: u64, to: u64 },
}

/// One tenant's volume: the image file and where it is mounted.
#[derive(Debug, Clone)]
pub struct Volume {
    pub image: PathBuf,
    pub mountpoint: PathBuf,
}

/// What `statvfs` says of a mounted volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeUsage {
    pub used_bytes: u64,
    pub size_bytes: u64,
}

fn run(program: &'static str, args: &[&str], path: &Path) -> Result<String, VolumeError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| VolumeError::Tool {
            program,
            path: path.to_path_buf(),
            message: format!("cannot run it: {e} (install util-linux and e2fsprogs)"),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(VolumeError::Tool {
            program,
            path: path.to_path_buf(),
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Whether `path` (canonical: the agent canonicalises its state directory) is a mount point in
/// this mount namespace.
pub fn is_mount_point(path: &Path) -> std::io::Result<bool> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    let target = path.display().to_string();
    // Field 5 is the mount point (spaces escaped as \040; our paths have none).
    Ok(mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str())))
}

impl Volume {
    pub fn new(image: PathBuf, mountpoint: PathBuf) -> Self {
        Self { image, mountpoint }
    }

    fn io(&self, what: &'static str) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
        move |source| VolumeError::Io {
            what,
            path: self.image.clone(),
            source,
        }
    }

    /// Creates (if missing), attaches and mounts the volume; does nothing that is already done.
    /// `initialised` says whether the tenant's data was ever written: then a missing image is an
    /// error, never silently replaced by an empty one. A new image has `size_bytes`; an existing
    /// one keeps its size (growing is `grow_to_at_least`, which may fail without failing this).
    pub fn ensure_mounted(&self, size_bytes: u64, initialised: bool) -> Result<(), VolumeError> {
        if self.is_mounted()? {
            return Ok(());
        }
        if self.image.exists() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.image, std::fs::Permissions::from_mode(0o600))
                .map_err(self.io("chmod image"))?;
        } else {
            if initialised {
                return Err(VolumeError::ImageLost {
                    path: self.image.clone(),
                });
            }
            self.create_image(size_bytes)?;
            crate::crash_point!("create.after_image");
        }
        std::fs::create_dir_all(&self.mountpoint).map_err(self.io("create mountpoint"))?;
        // The directory under the mount: root's and closed, for any namespace that sees it bare.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&self.mountpoint, std::fs::Permissions::from_mode(0o700))
                .map_err(self.io("chmod mountpoint"))?;
        }
        let device = match self.attached_device()? {
            Some(device) => device,
            None => {
                let device = run(
                    "losetup",
                    &["--find", "--show", &self.image.display().to_string()],
                    &self.image,
                )?;
                crate::crash_point!("create.after_attach");
                device
            }
        };
        mount(
            Some(Path::new(&device)),
            &self.mountpoint,
            Some("ext4"),
            MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .map_err(|e| self.io("mount")(e.into()))?;
        crate::crash_point!("create.after_mount");
        Ok(())
    }

    /// `grow`, but an image already larger is left as it is.
    pub fn grow_to_at_least(&self, size_bytes: u64) -> Result<(), VolumeError> {
        let current = std::fs::metadata(&self.image)
            .map_err(self.io("stat image"))?
            .len();
        self.grow(size_bytes.max(current))
    }

    /// A sparse file of `size_bytes` with ext4 on it; no blocks reserved for root (the tenant
    /// gets all of its size).
    fn create_image(&self, size_bytes: u64) -> Result<(), VolumeError> {
        let partial = self.image.with_extension("img.partial");
        // Root's alone: the raw image holds every byte of the tenant's data.
        let file = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&partial)
            .map_err(self.io("create image"))?;
        file.set_len(size_bytes).map_err(self.io("size image"))?;
        drop(file);
        run(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-m",
                "0",
                "-E",
                "lazy_itable_init=1,lazy_journal_init=1",
                &partial.display().to_string(),
            ],
            &self.image,
        )?;
        // Only a complete image gets the final name: a crash mid-mkfs leaves no half volume.
        std::fs::rename(&partial, &self.image).map_err(self.io("rename image"))
    }

    /// The loop device already backed by this image, if any.
    fn attached_device(&self) -> Result<Option<String>, VolumeError> {
        Ok(self.attached_devices()?.into_iter().next())
    }

    /// Every loop device backed by this image.
    fn attached_devices(&self) -> Result<Vec<String>, VolumeError> {
        if !self.image.exists() {
            return Ok(Vec::new());
        }
        let out = run(
            "losetup",
            &["--associated", &self.image.display().to_string()],
            &self.image,
        )?;
        // "/dev/loop3: []: (/path/volume.img)"
        Ok(out
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(dev, _)| dev.to_string())
            .collect())
    }

    pub fn is_mounted(&self) -> Result<bool, VolumeError> {
        is_mount_point(&self.mountpoint).map_err(self.io("read mountinfo"))
    }

    /// Whether the volume's own filesystem is at the mount point: its device differs from the
    /// parent directory's. Two stats, for the heartbeat path, instead of reading all of
    /// /proc/self/mountinfo once per tenant.
    fn is_mounted_cheap(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        match (
            dev(&self.mountpoint),
            self.mountpoint.parent().and_then(dev),
        ) {
            (Some(own), Some(parent)) => own != parent,
            _ => false,
        }
    }

    pub fn usage(&self) -> Option<VolumeUsage> {
        if !self.is_mounted_cheap() {
            return None;
        }
        let s = nix::sys::statvfs::statvfs(&self.mountpoint).ok()?;
        let size = s.blocks() * s.fragment_size();
        let free = s.blocks_free() * s.fragment_size();
        Some(VolumeUsage {
            used_bytes: size.saturating_sub(free),
            size_bytes: size,
        })
    }

    /// Grows the image and the filesystem while mounted. Shrinking is refused. Safe to repeat:
    /// each part is done only if it is not done yet, so a failed attempt is finished by the next.
    pub fn grow(&self, size_bytes: u64) -> Result<(), VolumeError> {
        let current = std::fs::metadata(&self.image)
            .map_err(self.io("stat image"))?
            .len();
        if size_bytes < current {
            return Err(VolumeError::Shrink {
                path: self.image.clone(),
                from: current,
                to: size_bytes,
            });
        }
        if size_bytes > current {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&self.image)
                .map_err(self.io("open image"))?;
            file.set_len(size_bytes).map_err(self.io("grow image"))?;
            crate::crash_point!("resize.after_image_grow");
        }
        let Some(device) = self.attached_device()? else {
            return Ok(());
        };
        if self.filesystem_bytes(&device)? >= size_bytes {
            return Ok(());
        }
        run("losetup", &["--set-capacity", &device], &self.image)?;
        // Tests make the online grow fail on any host (it fails for real without
        // CAP_SYS_RESOURCE); compiled out unless the `failpoints` feature is on.
        fail::fail_point!("volume.resize2fs", |_| Err(VolumeError::Tool {
            program: "resize2fs",
            path: self.image.clone(),
            message: "failed (injected by the volume.resize2fs failpoint)".into(),
        }));
        run("resize2fs", &[&device], &self.image).map_err(|e| match e {
            VolumeError::Tool { message, .. } if message.contains("Permission denied") => {
                VolumeError::Tool {
                    program: "resize2fs",
                    path: self.image.clone(),
                    message: format!(
                        "{message} (growing a mounted ext4 needs CAP_SYS_RESOURCE, which this \
                         agent does not have; the volume keeps its size until it does)"
                    ),
                }
            }
            other => other,
        })?;
        Ok(())
    }

    /// The size the ext4 superblock gives (block count times block size).
    fn filesystem_bytes(&self, device: &str) -> Result<u64, VolumeError> {
        let out = run("dumpe2fs", &["-h", device], &self.image)?;
        let field = |name: &str| -> Option<u64> {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse().ok())
        };
        match (field("Block count:"), field("Block size:")) {
            (Some(count), Some(size)) => Ok(count * size),
            _ => Err(VolumeError::Tool {
                program: "dumpe2fs",
                path: self.image.clone(),
                message: "no block count or block size in its output".into(),
            }),
        }
    }

    /// Unmounts; the loop device and the image stay.
    pub fn unmount(&self) -> Result<(), VolumeError> {
        if self.is_mounted()? {
            match umount2(&self.mountpoint, MntFlags::empty()) {
                Ok(()) => {}
                // Something still holds a file open (a process outside the tenant's cgroup, an
                // operator's shell): detach now, the kernel frees it when the last user goes.
                Err(nix::errno::Errno::EBUSY) => umount2(&self.mountpoint, MntFlags::MNT_DETACH)
                    .map_err(|e| self.io("unmount")(e.into()))?,
                Err(e) => return Err(self.io("unmount")(e.into())),
            }
        }
        Ok(())
    }

    /// Detaches every loop device backed by the image (a crash between two attaches can leave
    /// two); the image stays.
    pub fn detach(&self) -> Result<(), VolumeError> {
        for device in self.attached_devices()? {
            run("losetup", &["--detach", &device], &self.image)?;
        }
        // A device still in use (its filesystem held by a namespace or a process that outlived
        // the unmount) is only marked to detach itself when its last user goes: that is as done
        // as the agent can make it, and waiting for the user could take forever. The image can
        // go now; the kernel keeps the blocks until then, and the sweep at start finds a device
        // left on a deleted image.
        for device in self.attached_devices()? {
            let name = device.trim_start_matches("/dev/");
            let autoclear = std::fs::read_to_string(format!("/sys/block/{name}/loop/autoclear"))
                .is_ok_and(|v| v.trim() == "1");
            if !autoclear {
                return Err(VolumeError::Tool {
                    program: "losetup",
                    path: self.image.clone(),
                    message: format!("{device} is still attached after --detach"),
                });
            }
            tracing::warn!(device, image = %self.image.display(), "loop device still in use after the unmount; it detaches itself when its last user goes");
        }
        Ok(())
    }
}
