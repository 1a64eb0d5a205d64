//! The bundle directory, kept private: core dumps and heap snapshots hold the target's secrets.
//! It is created 0700 (an existing one must belong to loopbpf's user and be writable by no
//! one else), held open, and every file in it is opened relative to it, never through a
//! symlink: written under an unpredictable temporary name, 0600, then renamed into place.

use std::{
    io::Write as _,
    os::fd::{AsFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use rustix::{
    fs::{AtFlags, CWD, Mode, OFlags, fstat, mkdir, openat, renameat, unlinkat},
    io::Errno,
};

/// Files are opened only here, and never through a symlink.
const NEW_FILE: OFlags = OFlags::WRONLY
    .union(OFlags::CREATE)
    .union(OFlags::EXCL)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// The bundle directory, open.
#[derive(Debug)]
pub struct Bundle {
    dir: OwnedFd,
    /// Its path, for messages and for what runs in it (gcore).
    path: PathBuf,
}

impl Bundle {
    /// Creates the directory (0700), or opens an existing one that is safe to write into.
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create the bundle directory {shown}"))?;
        }
        let created = match mkdir(path, Mode::from_raw_mode(0o700)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => {
                return Err(std::io::Error::from(e))
                    .with_context(|| format!("cannot create the bundle directory {shown}"));
            }
        };
        let dir = openat(
            CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(std::io::Error::from)
        .with_context(|| {
            format!("cannot open the bundle directory {shown} (is it a directory?)")
        })?;
        let stat = fstat(&dir).map_err(std::io::Error::from)?;
        let me = rustix::process::geteuid().as_raw();
        if stat.st_uid != me {
            bail!(
                "--out {shown} belongs to uid {}, not to uid {me} that loopbpf runs as: give a directory that does not exist yet (loopbpf creates it, private)",
                stat.st_uid
            );
        }
        if stat.st_mode & 0o022 != 0 && !created {
            bail!(
                "--out {shown} is writable by other users (mode {:o}): give a directory that does not exist yet (loopbpf creates it, private), or chmod 700 it",
                stat.st_mode & 0o7777
            );
        }
        let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let bundle = Self { dir, path };
        // Writable now rather than after a minute of recording.
        let (probe, _) = bundle
            .temporary(".write-test")
            .with_context(|| format!("cannot write into {shown}"))?;
        let _ = unlinkat(&bundle.dir, &probe, AtFlags::empty());
        Ok(bundle)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces file `name` whole: a reader never sees half of it, and a symlink planted at
    /// `name` is replaced, not followed.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let (tmp, file) = self
            .temporary(name)
            .with_context(|| format!("cannot write {}", self.path.join(name).display()))?;
        let written = std::fs::File::from(file).write_all(bytes);
        let renamed = written.map_err(anyhow::Error::from).and_then(|()| {
            renameat(&self.dir, &tmp, &self.dir, name).map_err(|e| std::io::Error::from(e).into())
        });
        if renamed.is_err() {
            let _ = unlinkat(&self.dir, &tmp, AtFlags::empty());
        }
        renamed.with_context(|| format!("cannot write {}", self.path.join(name).display()))
    }

    /// A new, empty file `name` (0600), for a program to write into (gcore's log); whatever
    /// was at `name` is removed first.
    pub fn create(&self, name: &str) -> Result<std::fs::File> {
        self.remove(name);
        let file = openat(&self.dir, name, NEW_FILE, Mode::from_raw_mode(0o600))
            .map_err(std::io::Error::from)
            .with_context(|| format!("cannot create {}", self.path.join(name).display()))?;
        Ok(file.into())
    }

    /// Removes `name` if it is there (before a program creates it by path: gcore's core).
    pub fn remove(&self, name: &str) {
        let _ = unlinkat(&self.dir, name, AtFlags::empty());
    }

    /// A new file with an unpredictable name next to `name`, 0600, and that name.
    fn temporary(&self, name: &str) -> std::io::Result<(String, OwnedFd)> {
        loop {
            let mut random = [0u8; 8];
            rustix::rand::getrandom(&mut random, rustix::rand::GetRandomFlags::empty())?;
            let tmp = format!(".{name}.{:016x}.tmp", u64::from_ne_bytes(random));
            match openat(&self.dir, &tmp, NEW_FILE, Mode::from_raw_mode(0o600)) {
                Ok(file) => return Ok((tmp, file)),
                Err(Errno::EXIST) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl AsFd for Bundle {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("loopbpf-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn the_directory_and_its_files_are_private() {
        let dir = scratch("private");
        let bundle = Bundle::open(&dir).unwrap();
        bundle.write("report.json", b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("report.json")), 0o600);
        drop(bundle.create("gcore-1.log").unwrap());
        assert_eq!(mode(&dir.join("gcore-1.log")), 0o600);
        // Nothing but the files written is left behind.
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["gcore-1.log", "report.json"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_planted_symlink_is_replaced_not_followed() {
        let dir = scratch("symlink");
        let canary = scratch("canary");
        std::fs::write(&canary, b"canary").unwrap();
        std::fs::create_dir(&dir).unwrap();
        std::os::unix::fs::symlink(&canary, dir.join("report.json")).unwrap();
        std::os::unix::fs::symlink(&canary, dir.join("gcore-1.log")).unwrap();
        let bundle = Bundle::open(&dir).unwrap();
        bundle.write("report.json", b"report").unwrap();
        drop(bundle.create("gcore-1.log").unwrap());
        assert_eq!(std::fs::read(&canary).unwrap(), b"canary");
        assert_eq!(std::fs::read(dir.join("report.json")).unwrap(), b"report");
        assert!(
            !std::fs::symlink_metadata(dir.join("report.json"))
                .unwrap()
                .is_symlink()
        );
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::remove_file(canary).unwrap();
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = scratch("shared");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = Bundle::open(&dir).unwrap_err().to_string();
        assert!(error.contains("writable by other users"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
