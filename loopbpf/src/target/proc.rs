//! What `/proc` says of a process: one handle, [`Process`], through which every `/proc/PID` file
//! is read, each read bounded in bytes and each text parsed by a total parser (what does not
//! parse is `None`, never a panic). The target writes its own comm, paths and memory: nothing
//! here trusts them.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Read},
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use super::{
    files::{Refused, Writer, open_in_root, open_magic_link},
    maps::{MAX_MAPS_BYTES, MapsEntry, parse_maps},
    memory::Memory,
};

/// Largest `stat`, `statm` or `comm` read: a few hundred bytes each (`comm` at most 16).
const MAX_SMALL_FILE: usize = 4 << 10;
/// Largest `status` or `cgroup` read (cgroup v1 lists one path per hierarchy).
const MAX_TEXT_FILE: usize = 256 << 10;
/// Largest environment read: the kernel caps it near a quarter of the stack limit.
const MAX_ENVIRON: usize = 4 << 20;
/// Threads of one process looked at.
const MAX_TASKS: usize = 1 << 16;

/// One process's `/proc` directory.
#[derive(Debug, Clone)]
pub struct Process {
    pid: u32,
    dir: PathBuf,
}

impl Process {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            dir: PathBuf::from(format!("/proc/{pid}")),
        }
    }

    /// loopbpf itself.
    pub fn myself() -> Self {
        Self {
            pid: std::process::id(),
            dir: PathBuf::from("/proc/self"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn exists(&self) -> bool {
        self.dir.exists()
    }

    /// At most `max` bytes of `/proc/PID/NAME`.
    fn read(&self, name: &str, max: usize) -> io::Result<Vec<u8>> {
        read_bounded(&self.dir.join(name), max)
    }

    fn read_text(&self, name: &str, max: usize) -> Option<String> {
        let bytes = self.read(name, max).ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The memory map, in map order (whole lines only, at most [`MAX_MAPS_BYTES`]). A zombie's
    /// is empty.
    pub fn maps(&self) -> io::Result<Vec<MapsEntry>> {
        let bytes = self.read("maps", MAX_MAPS_BYTES)?;
        let whole = bytes
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(&[][..], |newline| &bytes[..=newline]);
        Ok(parse_maps(&String::from_utf8_lossy(whole)))
    }

    pub fn stat(&self) -> Option<Stat> {
        Stat::parse(&self.read_text("stat", MAX_SMALL_FILE)?)
    }

    pub fn status(&self) -> Option<Status> {
        Some(Status::parse(&self.read_text("status", MAX_TEXT_FILE)?))
    }

    /// Resident memory now, in bytes.
    pub fn rss(&self) -> Option<u64> {
        let pages = rss_pages(&self.read_text("statm", MAX_SMALL_FILE)?)?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        pages.checked_mul(u64::try_from(page).ok()?)
    }

    /// Pages mapped now, all mappings together (`statm`'s first field): any `mmap` or `munmap`
    /// changes it, so an unchanged count says the mappings' files are most likely the same
    /// without reading and parsing the whole memory map.
    pub fn mapped_pages(&self) -> Option<u64> {
        mapped_pages(&self.read_text("statm", MAX_SMALL_FILE)?)
    }

    /// The command name; one that is not UTF-8 is shown lossily.
    pub fn comm(&self) -> Option<String> {
        let comm = self.read_text("comm", MAX_SMALL_FILE)?;
        Some(comm.strip_suffix('\n').unwrap_or(&comm).to_owned())
    }

    /// The `/proc/PID/cgroup` text, for [`super::container::Placement`] to parse.
    pub fn cgroup(&self) -> Option<String> {
        self.read_text("cgroup", MAX_TEXT_FILE)
    }

    /// The value of environment variable `name` (lossily), from the environment the process
    /// started with.
    pub fn environ_var(&self, name: &str) -> Option<String> {
        let environ = self.read("environ", MAX_ENVIRON).ok()?;
        environ_var(&environ, name)
    }

    /// The executable, as the process's own mount namespace names it.
    pub fn exe(&self) -> Option<PathBuf> {
        fs::read_link(self.dir.join("exe")).ok()
    }

    /// The process's root directory: its container's filesystem.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// `path` as the process sees it, opened from here.
    pub fn in_root(&self, path: &Path) -> PathBuf {
        self.root().join(path.strip_prefix("/").unwrap_or(path))
    }

    /// `/proc/PID/map_files/START-END`: the very file a mapping maps, even when it was replaced
    /// or deleted since, or lives in another mount namespace.
    pub fn map_file(&self, entry: &MapsEntry) -> PathBuf {
        self.dir.join(format!(
            "map_files/{:x}-{:x}",
            entry.range.start, entry.range.end
        ))
    }

    /// A path that names the file a mapping maps (for probes and messages, not to read it
    /// from: [`Self::open_mapped`] does that): [`Self::map_file`] where that link can be read,
    /// else the path in the process's root.
    pub fn mapped_file(&self, entry: &MapsEntry) -> PathBuf {
        let link = self.map_file(entry);
        if fs::read_link(&link).is_ok() {
            return link;
        }
        self.in_root(Path::new(entry.file_path()))
    }

    /// Opens `path` as the process sees it: resolved inside its root only (see
    /// [`open_in_root`]), a regular file of at most `max` bytes. No fallback to a path in
    /// loopbpf's own filesystem.
    pub fn open_file(&self, path: &Path, max: u64) -> Result<File, Refused> {
        let root = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(self.root())
            .map_err(Refused::Io)?;
        let shown = format!("{} of pid {}", path.display(), self.pid);
        open_in_root(&root, path, max, &shown)
    }

    /// Opens the file a mapping maps, at most `max` bytes: through `map_files` (the very file,
    /// even deleted or replaced since), else by its path in the process's root when that is
    /// still the same file.
    pub fn open_mapped(&self, entry: &MapsEntry, max: u64) -> Result<File, Refused> {
        let shown = format!("{} of pid {}", entry.file_path(), self.pid);
        match open_magic_link(&self.map_file(entry), max, &shown) {
            Err(Refused::Io(_)) => {}
            opened => return opened,
        }
        let file = self.open_file(Path::new(entry.file_path()), max)?;
        if file.metadata().map_err(Refused::Io)?.ino() != entry.inode {
            return Err(Refused::Io(io::ErrorKind::NotFound.into()));
        }
        Ok(file)
    }

    /// Opens the running executable through `/proc/PID/exe`, at most `max` bytes.
    pub fn open_exe(&self, max: u64) -> Result<File, Refused> {
        let shown = format!("the executable of pid {}", self.pid);
        open_magic_link(&self.dir.join("exe"), max, &shown)
    }

    /// Which files the process can change under loopbpf (see [`Writer`]).
    pub fn writer(&self) -> Option<Writer> {
        let uids = self.status()?.uids?;
        let mount_ns = |dir: &Path| fs::read_link(dir.join("ns/mnt")).ok();
        let same_mount_ns =
            mount_ns(&self.dir).is_some_and(|ns| Some(ns) == mount_ns(Path::new("/proc/self")));
        Some(Writer {
            uids,
            same_mount_ns,
        })
    }

    /// The thread ids, at most [`MAX_TASKS`] of them.
    pub fn tasks(&self) -> Vec<u32> {
        let Ok(tasks) = fs::read_dir(self.dir.join("task")) else {
            return Vec::new();
        };
        tasks
            .filter_map(|task| task.ok()?.file_name().to_str()?.parse().ok())
            .take(MAX_TASKS)
            .collect()
    }

    /// Whether thread `tid` of this process still exists.
    pub fn has_task(&self, tid: u32) -> bool {
        self.dir.join("task").join(tid.to_string()).exists()
    }

    /// Its working directory, as a path loopbpf can open (through `/proc`), if it can be read.
    pub fn cwd(&self) -> Option<PathBuf> {
        let cwd = self.dir.join("cwd");
        fs::read_link(&cwd).ok().map(|_| cwd)
    }

    /// The system call thread `tid` is blocked in; `None` when it runs or is in none.
    pub fn task_syscall(&self, tid: u32) -> Option<TaskSyscall> {
        TaskSyscall::parse(&self.read_text(&format!("task/{tid}/syscall"), MAX_SMALL_FILE)?)
    }

    /// The process's memory, kept open for reads at any address.
    pub fn memory(&self) -> io::Result<Memory> {
        File::open(self.dir.join("mem")).map(Memory::new)
    }
}

/// When a process started (clock ticks since boot): with the pid, it names one process even
/// after the pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    Process::new(pid).stat().map(|stat| stat.start_time)
}

/// A process's resident memory now, in bytes.
pub fn rss_of(pid: u32) -> Option<u64> {
    Process::new(pid).rss()
}

/// At most `max` bytes of a file.
fn read_bounded(path: &Path, max: usize) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?
        .take(u64::try_from(max).unwrap_or(u64::MAX))
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// What is used of `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// Fields 14 and 15, user and system time: CPU time in clock ticks.
    pub cpu_ticks: u64,
    /// Field 22, clock ticks after boot.
    pub start_time: u64,
}

impl Stat {
    pub(super) fn parse(text: &str) -> Option<Self> {
        // The command name may hold spaces and parentheses: fields count from its last `)`.
        let after_comm = &text[text.rfind(')')? + 1..];
        let field =
            |n: usize| -> Option<u64> { after_comm.split_whitespace().nth(n)?.parse().ok() };
        Some(Self {
            cpu_ticks: field(11)?.checked_add(field(12)?)?,
            start_time: field(19)?,
        })
    }
}

/// What is used of `/proc/PID/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Status {
    /// The pid as the process's own (innermost) pid namespace numbers it: `NSpid`'s last.
    pub ns_pid: Option<u32>,
    /// Effective capabilities, `CapEff`.
    pub cap_eff: Option<u64>,
    /// Real, effective, saved and filesystem uids, `Uid`.
    pub uids: Option<[u32; 4]>,
}

impl Status {
    pub(super) fn parse(text: &str) -> Self {
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
        };
        Self {
            ns_pid: field("NSpid").and_then(|pids| pids.split_whitespace().last()?.parse().ok()),
            cap_eff: field("CapEff").and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok()),
            uids: field("Uid").and_then(|uids| {
                let uids: Vec<u32> = uids
                    .split_whitespace()
                    .map_while(|u| u.parse().ok())
                    .collect();
                uids.try_into().ok()
            }),
        }
    }
}

/// Resident pages: `/proc/PID/statm`'s second field.
pub(super) fn mapped_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().next()?.parse().ok()
}

pub(super) fn rss_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// `NAME=value` of a NUL-separated environment; `None` when unset or empty.
pub(super) fn environ_var(environ: &[u8], name: &str) -> Option<String> {
    environ
        .split(|&b| b == 0)
        .find_map(|var| var.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
        .filter(|value| !value.is_empty())
        .map(|value| String::from_utf8_lossy(value).into_owned())
}

/// A thread blocked in a system call, from `/proc/PID/task/TID/syscall`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskSyscall {
    pub number: u64,
    pub args: [u64; 6],
    /// The user stack pointer.
    pub sp: u64,
}

impl TaskSyscall {
    /// `NR ARG1..ARG6 SP PC` (hex but NR); `None` for `running`, `-1 SP PC` (blocked but not
    /// in a system call) and anything cut short.
    pub(super) fn parse(text: &str) -> Option<Self> {
        let mut fields = text.split_whitespace();
        let number = fields.next()?.parse().ok()?;
        let mut hex = || {
            let field = fields.next()?;
            u64::from_str_radix(field.strip_prefix("0x").unwrap_or(field), 16).ok()
        };
        let mut args = [0; 6];
        for arg in &mut args {
            *arg = hex()?;
        }
        Some(Self {
            number,
            args,
            sp: hex()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_counts_fields_after_the_last_parenthesis() {
        let fields = "S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 123456 20 21";
        let stat = |comm: &str| Stat::parse(&format!("4242 ({comm}) {fields}"));
        assert_eq!(stat("node").map(|s| s.start_time), Some(123_456));
        assert_eq!(stat("node").map(|s| s.cpu_ticks), Some(11 + 12));
        assert_eq!(stat("a) b (c").map(|s| s.start_time), Some(123_456));
        assert_eq!(
            stat(") 1 2 3 4 5 6 7 8 9").map(|s| s.start_time),
            Some(123_456)
        );
        assert_eq!(stat("").map(|s| s.start_time), Some(123_456));
        for hostile in [
            "",
            "4242 (node",
            "4242 (node) S 1 2",
            "4242 (node) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 x",
            "4242 (node) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 99999999999999999999999",
            "4242 (node) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 -5",
            ")",
        ] {
            assert_eq!(Stat::parse(hostile), None, "{hostile:?}");
        }
    }

    #[test]
    fn status_fields() {
        let status = "Name:\tnode\nUid:\t1000\t1001\t1002\t1003\nNSpid:\t4242\t7\n\
                      CapEff:\t000001ffffffffff\nNSpidX:\t1\n";
        assert_eq!(
            Status::parse(status),
            Status {
                ns_pid: Some(7),
                cap_eff: Some(0x1ff_ffff_ffff),
                uids: Some([1000, 1001, 1002, 1003]),
            }
        );
        assert_eq!(Status::parse("Uid:\t1\t2\t3\n").uids, None);
        assert_eq!(Status::parse("NSpid:\t42\n").ns_pid, Some(42));
        for hostile in [
            "",
            "NSpid:\nCapEff:\n",
            "NSpid:\t99999999999\nCapEff:\t1ffffffffffffffffff\n",
            "NSpid:\t-1\nCapEff:\tzz\n",
            "NSpid",
            "Name:\tNSpid:\t5\n",
        ] {
            assert_eq!(Status::parse(hostile), Status::default(), "{hostile:?}");
        }
    }

    #[test]
    fn statm_and_environ() {
        assert_eq!(rss_pages("1000 250 30 1 0 100 0\n"), Some(250));
        assert_eq!(rss_pages("1000"), None);
        assert_eq!(rss_pages("1000 -1"), None);
        assert_eq!(rss_pages("1 99999999999999999999999"), None);
        assert_eq!(mapped_pages("1000 250 30 1 0 100 0\n"), Some(1000));
        assert_eq!(mapped_pages(""), None);
        assert_eq!(mapped_pages("-1 2"), None);
        let environ = b"PATH=/bin\0HOSTNAMEX=no\0HOSTNAME=web-7f\xff\0HOSTNAME=second\0";
        assert_eq!(
            environ_var(environ, "HOSTNAME").as_deref(),
            Some("web-7f\u{fffd}")
        );
        assert_eq!(environ_var(b"HOSTNAME=\0", "HOSTNAME"), None);
        assert_eq!(environ_var(b"HOSTNAME", "HOSTNAME"), None);
        assert_eq!(environ_var(b"", "HOSTNAME"), None);
    }

    #[test]
    fn syscall_lines() {
        let line = "232 0x5 0x7ffd8a1c 0x400 0xffffffffffffffff 0x0 0x8 0x7ffd8a00 0x7f12345678\n";
        assert_eq!(
            TaskSyscall::parse(line),
            Some(TaskSyscall {
                number: 232,
                args: [5, 0x7ffd_8a1c, 0x400, u64::MAX, 0, 8],
                sp: 0x7ffd_8a00,
            })
        );
        for hostile in [
            "",
            "running\n",
            "-1 0x7ffd8a00 0x7f12345678\n",
            "232 0x5 0x7ffd8a1c",
            "232 0x5 0x1 0x2 0x3 0x4 0x5",
            "232 0x5 0x1 0x2 0x3 0x4 0x5 0xzz 0x1",
            "232 0x5 0x1 0x2 0x3 0x4 0x5 0x10000000000000000 0x1",
            "99999999999999999999999 0x5 0x1 0x2 0x3 0x4 0x5 0x6 0x1",
        ] {
            assert_eq!(TaskSyscall::parse(hostile), None, "{hostile:?}");
        }
    }

    #[test]
    fn this_process_reads() {
        let me = Process::new(std::process::id());
        assert!(me.exists());
        assert!(me.stat().is_some_and(|s| s.start_time > 0));
        assert!(me.rss().is_some_and(|rss| rss > 0));
        assert!(
            me.comm()
                .is_some_and(|comm| !comm.is_empty() && !comm.ends_with('\n'))
        );
        assert!(me.status().and_then(|s| s.ns_pid).is_some());
        assert!(me.tasks().contains(&std::process::id()));
        let maps = me.maps().unwrap();
        assert!(maps.iter().any(|m| m.path == "[stack]"), "{maps:?}");
        let memory = me.memory().unwrap();
        let memory: &dyn crate::target::memory::ReadMemory = &memory;
        let value = 0x1234_5678_9abc_def0_u64;
        assert_eq!(memory.word(&raw const value as u64), Some(value));
        let gone = Process::new(u32::MAX);
        assert!(!gone.exists() && gone.stat().is_none() && gone.maps().is_err());
        assert!(gone.tasks().is_empty() && gone.comm().is_none());
    }
}
