//! Target discovery and preflight: which process, which file holds its libuv, and whether this
//! host and this user can attach at all. Every failure here is a message that says what to do.

use std::{
    collections::HashMap,
    ffi::OsStr,
    fs::{self, File},
    os::{fd::AsRawFd, unix::ffi::OsStrExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use object::{Object, ObjectSection, ObjectSymbol, read::ReadCache};

use crate::{
    abi::{
        SYS_EPOLL_PWAIT, SYS_EPOLL_PWAIT2, SYS_EPOLL_WAIT, UV_LOOP_BACKEND_FD_OFFSET,
        UV_LOOP_COUNT_OFFSET, UV_LOOP_INTERNAL_FIELDS_OFFSET,
    },
    target::{
        files::{FileId, MAX_OBJECT, Segment, bias_of, open_elf, segments},
        maps::first_mapping_per_file,
        memory::{Memory, ReadMemory},
        proc::Process,
    },
};
use thiserror::Error;

mod stripped;

pub(crate) use stripped::debug_file;
use stripped::{stripped_libuv_error, stripped_note};

/// The libuv function whose entry marks every loop iteration.
pub const POLL_SYMBOL: &str = "uv__io_poll";

/// `node::worker::Worker::Run()`: a `worker_threads` Worker runs its loop under it.
const WORKER_ENTRY_SYMBOL: &str = "_ZN4node6worker6Worker3RunEv";

/// libuv's default loop (`uv_default_loop()`), which node runs on its main thread.
const DEFAULT_LOOP_SYMBOL: &str = "default_loop_struct";

/// `v8::internal::Heap::CallGCPrologueCallbacks(GCType, GCCallbackFlags, ...)` and its
/// epilogue twin, by the start of their mangled names: the parameters after the flags changed
/// between V8 10 and 11 (Node 18 and 20), the names did not.
const GC_PROLOGUE_SYMBOL: &[u8] = b"_ZN2v88internal4Heap23CallGCPrologueCallbacksE";
const GC_EPILOGUE_SYMBOL: &[u8] = b"_ZN2v88internal4Heap23CallGCEpilogueCallbacksE";
/// V8 10's two-parameter form of the prologue call, which that version inlines on its GC paths
/// (the out-of-line copy only serves weak callbacks).
const GC_PROLOGUE_V8_10: &[u8] =
    b"_ZN2v88internal4Heap23CallGCPrologueCallbacksENS_6GCTypeENS_15GCCallbackFlagsE";
/// What V8 10 calls around every collection: `Heap::GarbageCollectionPrologue(...)` and
/// `Heap::GarbageCollectionEpilogue(GarbageCollector)`.
const GC_START_V8_10: &[u8] = b"_ZN2v88internal4Heap25GarbageCollectionPrologueE";
const GC_END_V8_10: &[u8] = b"_ZN2v88internal4Heap25GarbageCollectionEpilogueE";

/// Where the GC pause probes go in an object with V8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GcProbes {
    /// File offsets of the functions at the start and at the end of a pause.
    pub start: u64,
    pub end: u64,
    /// The end function's argument is V8 10's `GarbageCollector`, not a `GCType`.
    pub end_takes_collector: bool,
}

#[derive(Debug, Error)]
pub enum DiscoverError {
    #[error("no process with pid {0}: check the pid (`pgrep -a node` lists Node processes)")]
    NoSuchProcess(u32),
    #[error(
        "process {pid} ({comm}) is not a libuv program: no `{POLL_SYMBOL}` in {exe} or its mapped libraries{stripped}"
    )]
    NotLibuv {
        pid: u32,
        comm: String,
        exe: String,
        stripped: &'static str,
    },
    #[error("`{0}` is not a libuv program: no `{POLL_SYMBOL}` in it or in a libuv it links{1}")]
    CommandNotLibuv(String, &'static str),
    /// A libuv is there (its API is defined), its internal symbols are not.
    #[error(
        "{who} runs a libuv without symbols: {file} is stripped (it has libuv's API but no `{POLL_SYMBOL}`, which loopbpf probes); {advice}"
    )]
    StrippedLibuv {
        /// `process 1234 (comm)` or `` `command` ``.
        who: String,
        file: String,
        advice: &'static str,
    },
    #[error("command `{0}` not found: give a path or a program on PATH")]
    CommandNotFound(String),
    #[error(
        "loopbpf needs root, or the capabilities {missing} (run it with sudo, or grant CAP_BPF and CAP_PERFMON)"
    )]
    Privileges { missing: String },
    #[error(
        "tracefs is not mounted at /sys/kernel/tracing and mounting it failed ({0}): run `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    Tracefs(String),
    #[error(
        "this kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing): loopbpf needs a kernel built with CONFIG_DEBUG_INFO_BTF=y (5.8 or newer)"
    )]
    NoBtf,
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
}

/// A process to watch and the object file (executable or shared library) that holds its libuv.
#[derive(Debug, Clone)]
pub struct Target {
    pub pid: u32,
    pub comm: String,
    pub libuv: Libuv,
    /// Which file that is, host-wide: processes running the same file share one probe.
    pub libuv_file: FileId,
}

/// What the probes need from an object file with `uv__io_poll`, wherever it is mapped.
#[derive(Debug, Clone)]
struct LibuvFile {
    poll_addr: u64,
    poll_file_offset: u64,
    /// `uv_run`'s link address and file offset, when the object has it.
    run: Option<(u64, u64)>,
    counts_iterations: bool,
    worker_entry: Option<(u64, u64)>,
    gc_probes: Option<GcProbes>,
    default_loop: Option<u64>,
    /// To place `default_loop`.
    segments: Vec<Segment>,
}

/// Object files already read, by identity (with the [`crate::target::files::FileStamp`] of the file read, so that a
/// new file with a freed inode number is read anew), with or without libuv: scanning every
/// process of a host reads each distinct file once.
#[derive(Debug, Default)]
pub struct LibuvCache {
    files: HashMap<FileId, Scanned>,
}

/// What a file's symbols say about libuv.
#[derive(Debug)]
enum Scanned {
    Libuv(LibuvFile),
    /// libuv's API without its internal symbols: a stripped libuv.
    Stripped,
    Other,
}

impl LibuvCache {
    /// Forgets everything when it grows past what a host plausibly maps (files replaced by
    /// upgrades keep their old identities in it).
    fn bound(&mut self) {
        if self.files.len() > 8192 {
            self.files.clear();
        }
    }
}

/// The object file with `uv__io_poll`, and the link-time addresses the probes need from it.
#[derive(Debug, Clone)]
pub struct Libuv {
    /// The file, open: the one its symbols were read from (or one with the same identity and
    /// stamp). The probes attach through it ([`Libuv::attach_path`]), never through a path
    /// looked up again, which a process could point at another file meanwhile.
    pub file: Arc<File>,
    /// Its path as the target sees it, for messages.
    pub shown_as: PathBuf,
    pub poll_addr: u64,
    /// Where `uv__io_poll` starts in the file: the uprobe attaches there, so that the object
    /// is not searched for the symbol a second time.
    pub poll_file_offset: u64,
    /// `uv_run`'s link address and file offset: loops that start later are found there.
    pub run: Option<(u64, u64)>,
    /// libuv 1.45 or later (it has `uv_metrics_info`): it counts its loop iterations, and the
    /// probes read that count instead of probing `uv__io_poll` on every iteration.
    pub counts_iterations: bool,
    /// Address range of Node's worker entry function, when this object is a node binary.
    pub worker_entry: Option<(u64, u64)>,
    /// Where to time V8's GC pauses, when V8 is in this object too (a node binary).
    pub gc_probes: Option<GcProbes>,
    /// Where the target has libuv's default loop, when it runs and the symbol is there.
    pub default_loop_addr: Option<u64>,
    /// How far the running target has the object from its link-time addresses.
    pub bias: Option<u64>,
}

impl Libuv {
    /// Reads the object's symbols; `None` when it has no `uv__io_poll`. `mapped` is where a
    /// running target maps it: the start and file offset of its executable mapping.
    fn read(path: &Path, mapped: Option<(u64, u64)>) -> Option<Self> {
        let opened = File::open(path).ok()?;
        let read = LibuvFile::read(&opened)?;
        Some(Self::placed(&read, Arc::new(opened), path, mapped))
    }

    fn placed(
        file: &LibuvFile,
        opened: Arc<File>,
        path: &Path,
        mapped: Option<(u64, u64)>,
    ) -> Self {
        let bias = mapped.and_then(|(start, offset)| bias_of(&file.segments, start, offset));
        Self {
            file: opened,
            shown_as: path.to_path_buf(),
            poll_addr: file.poll_addr,
            poll_file_offset: file.poll_file_offset,
            run: file.run,
            counts_iterations: file.counts_iterations,
            worker_entry: file.worker_entry,
            gc_probes: file.gc_probes,
            default_loop_addr: file
                .default_loop
                .zip(bias)
                .map(|(addr, bias)| addr.wrapping_add(bias)),
            bias,
        }
    }

    /// The path the probes attach with: the open file, through loopbpf's own fd table, which
    /// the kernel resolves to that very inode.
    pub fn attach_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

impl LibuvFile {
    fn read(file: &File) -> Option<Self> {
        match Self::scan(file) {
            Scanned::Libuv(read) => Some(read),
            Scanned::Stripped | Scanned::Other => None,
        }
    }

    fn scan(file: &File) -> Scanned {
        let cache = ReadCache::new(file);
        let Ok(elf) = object::File::parse(&cache) else {
            return Scanned::Other;
        };
        let has_api = elf
            .dynamic_symbols()
            .any(|sym| sym.is_definition() && sym.name_bytes() == Ok(b"uv_run"));
        if let Some(read) = Self::read_elf(&elf, &elf) {
            return Scanned::Libuv(read);
        }
        if !has_api {
            return Scanned::Other;
        }
        // A stripped libuv: its symbols from its debug file, placed in the file itself.
        let debug = stripped::debug_file(&elf).map(ReadCache::new);
        let symbols = debug.as_ref().and_then(|d| object::File::parse(d).ok());
        match symbols.and_then(|symbols| Self::read_elf(&symbols, &elf)) {
            Some(read) => Scanned::Libuv(read),
            None => Scanned::Stripped,
        }
    }

    /// The probes' addresses from `symbols`' symbol table, and their file offsets in `layout`
    /// (the same file, or the stripped file whose debug file `symbols` is).
    fn read_elf<'sym, 'data, S: object::ReadRef<'sym>, R: object::ReadRef<'data>>(
        symbols: &object::File<'sym, S>,
        layout: &object::File<'data, R>,
    ) -> Option<Self> {
        let elf = symbols;
        let mut poll = None;
        let mut run = None;
        let mut counts_iterations = false;
        let mut worker_entry = None;
        let mut default_loop = None;
        let (mut gc_prologue, mut gc_epilogue) = (None, None);
        let (mut gc_start_v8_10, mut gc_end_v8_10, mut v8_10) = (None, None, false);
        for sym in elf.symbols().chain(elf.dynamic_symbols()) {
            match sym.name_bytes() {
                Ok(name) if name == POLL_SYMBOL.as_bytes() => poll = Some(sym),
                Ok(b"uv_run") if sym.size() > 0 => run = Some(sym),
                Ok(b"uv_metrics_info") => counts_iterations = true,
                // Not the compiler's partial copies (`.cold`, `.isra.0`, `.part.0`), which the
                // GC paths do not enter at their start.
                Ok(name) if name.contains(&b'.') => {}
                Ok(name) if name.starts_with(GC_PROLOGUE_SYMBOL) && sym.size() > 0 => {
                    v8_10 |= name == GC_PROLOGUE_V8_10;
                    gc_prologue = Some(sym);
                }
                Ok(name) if name.starts_with(GC_START_V8_10) && sym.size() > 0 => {
                    gc_start_v8_10 = Some(sym);
                }
                Ok(name) if name.starts_with(GC_END_V8_10) && sym.size() > 0 => {
                    gc_end_v8_10 = Some(sym);
                }
                Ok(name) if name.starts_with(GC_EPILOGUE_SYMBOL) && sym.size() > 0 => {
                    gc_epilogue = Some(sym);
                }
                Ok(name) if name == WORKER_ENTRY_SYMBOL.as_bytes() && sym.size() > 0 => {
                    worker_entry = Some((sym.address(), sym.address() + sym.size()));
                }
                Ok(name) if name == DEFAULT_LOOP_SYMBOL.as_bytes() => {
                    default_loop = Some(sym.address());
                }
                _ => {}
            }
        }
        // In the section that holds the address in the file (not `.tbss`, which has none).
        let file_offset = |address: u64| {
            layout
                .sections()
                .filter(|s| s.address() != 0)
                .filter(|s| (s.address()..s.address() + s.size()).contains(&address))
                .find_map(|s| Some(address - s.address() + s.file_range()?.0))
        };
        let poll = poll?;
        let (start, end) = if v8_10 {
            (gc_start_v8_10, gc_end_v8_10)
        } else {
            (gc_prologue, gc_epilogue)
        };
        let gc_probes = start
            .and_then(|s| file_offset(s.address()))
            .zip(end.and_then(|e| file_offset(e.address())))
            .map(|(start, end)| GcProbes {
                start,
                end,
                end_takes_collector: v8_10,
            });
        Some(Self {
            poll_addr: poll.address(),
            poll_file_offset: file_offset(poll.address())?,
            run: run.and_then(|sym| Some((sym.address(), file_offset(sym.address())?))),
            counts_iterations,
            worker_entry,
            gc_probes,
            default_loop,
            segments: segments(layout),
        })
    }
}

impl Target {
    /// The epoll fd of the main thread's loop (libuv's default loop), read from the target's
    /// memory; `None` when it cannot be read.
    pub fn main_loop_epfd(&self) -> Option<i32> {
        let addr = self.libuv.default_loop_addr?;
        let fd = (self
            .memory()?
            .word(addr.checked_add(UV_LOOP_BACKEND_FD_OFFSET)?)? as u32)
            .cast_signed();
        Some(fd).filter(|&fd| fd > 0)
    }

    /// Where libuv counts the iterations of the loop at `loop_addr`, and the count now: `None`
    /// before libuv 1.45, or when the loop is not initialised.
    pub fn loop_count(&self, loop_addr: u64) -> Option<(u64, u64)> {
        if !self.libuv.counts_iterations {
            return None;
        }
        let memory = self.memory()?;
        let fields = memory.word(loop_addr.checked_add(UV_LOOP_INTERNAL_FIELDS_OFFSET)?)?;
        let addr = fields
            .checked_add(UV_LOOP_COUNT_OFFSET)
            .filter(|_| fields != 0)?;
        Some((addr, memory.word(addr)?))
    }

    /// Names the loop of a thread asleep in its poll wait as we attach, from its stack: the
    /// `uv_loop_t*` that `uv_run` and `uv__io_poll` keep there (the word pointing at a loop whose
    /// epoll fd is the one the thread waits on, and whose internal fields are set), and
    /// whether a `worker_threads` Worker's entry function is among its callers. `None` when no
    /// such word is found: the `uv__io_poll` probe names it if it wakes while that is on.
    pub fn sleeping_loop(&self, idle: &IdleThread) -> Option<SleepingLoop> {
        // `uv_loop_t`'s handle_queue (next, prev), after `data` and `active_handles`.
        const UV_LOOP_HANDLE_QUEUE_OFFSET: u64 = 16;
        const STACK_SCAN: usize = 64 * 1024;
        let memory = self.memory()?;
        // Near the top of the stack a long read fails: halve until one fits.
        let mut stack = vec![0u8; STACK_SCAN];
        let mut len = STACK_SCAN;
        while len >= 4096 && !memory.read(idle.sp, &mut stack[..len]) {
            len /= 2;
        }
        if len < 4096 {
            return None;
        }
        let words: Vec<u64> = stack[..len]
            .chunks_exact(8)
            .map(|w| u64::from_ne_bytes(w.try_into().unwrap()))
            .collect();
        let worker_entry = self
            .libuv
            .worker_entry
            .zip(self.libuv.bias)
            .map(|((start, end), bias)| start.wrapping_add(bias)..end.wrapping_add(bias));
        let in_worker = match &worker_entry {
            Some(range) => words.iter().any(|w| range.contains(w)),
            None => true, // a libuv program without workers: any other loop is reported
        };
        let mut tried = std::collections::HashSet::new();
        let loop_addr = words
            .iter()
            .copied()
            .filter(|&w| w > 0x10000 && w % 8 == 0 && w < 0x8000_0000_0000)
            .filter(|&w| tried.insert(w))
            .take(4096)
            .find(|&w| {
                memory.i32(w + UV_LOOP_BACKEND_FD_OFFSET) == Some(idle.epfd)
                    && memory
                        .word(w + UV_LOOP_INTERNAL_FIELDS_OFFSET)
                        .is_some_and(|fields| fields > 0x10000)
                    // handle_queue, a circular list: its next node's prev is the queue.
                    && memory
                        .word(w + UV_LOOP_HANDLE_QUEUE_OFFSET)
                        .and_then(|next| memory.word(next.checked_add(8)?))
                        == Some(w + UV_LOOP_HANDLE_QUEUE_OFFSET)
            })?;
        Some(SleepingLoop {
            loop_addr,
            worker: in_worker,
        })
    }

    /// The target's memory, opened once for all the reads of one call.
    fn memory(&self) -> Option<Memory> {
        Process::new(self.pid).memory().ok()
    }
}

/// Finds the libuv of a running process.
pub fn target_for_pid(pid: u32) -> Result<Target, DiscoverError> {
    find_target(pid, &mut LibuvCache::default())
}

/// Finds the libuv of a running process, reading only files not in `cache` yet.
pub fn find_target(pid: u32, cache: &mut LibuvCache) -> Result<Target, DiscoverError> {
    let process = Process::new(pid);
    if !process.exists() {
        return Err(DiscoverError::NoSuchProcess(pid));
    }
    let comm = process.comm().ok_or(DiscoverError::NoSuchProcess(pid))?;
    let maps = process.maps().map_err(|error| DiscoverError::Read {
        path: format!("/proc/{pid}/maps"),
        error,
    })?;
    let exe = process.exe().unwrap_or_default();
    cache.bound();
    // A libuv with its API but not the symbols the probes need: named, if no other is found.
    let mut stripped_libuv: Option<String> = None;
    for mapping in first_mapping_per_file(&maps) {
        let path = process.mapped_file(mapping);
        // A file that could not be opened (its process exited mid-scan) is not known yet.
        let Ok(opened) = process.open_mapped(mapping, MAX_OBJECT) else {
            continue;
        };
        let Some(file) = mapping.file().stamped(&opened) else {
            continue;
        };
        if !cache.files.contains_key(&file) {
            cache.files.insert(file.clone(), LibuvFile::scan(&opened));
            crate::target::freed_much();
        }
        if stripped_libuv.is_none() && matches!(cache.files.get(&file), Some(Scanned::Stripped)) {
            stripped_libuv = Some(mapping.file_path().to_owned());
        }
        if let Some(Scanned::Libuv(read)) = cache.files.get(&file) {
            let mapped = Some((mapping.range.start, mapping.offset));
            let mut libuv = Libuv::placed(read, Arc::new(opened), &path, mapped);
            libuv.shown_as = PathBuf::from(mapping.file_path());
            return Ok(Target {
                pid,
                comm,
                libuv,
                libuv_file: file,
            });
        }
    }
    if let Some(file) = stripped_libuv {
        return Err(stripped_libuv_error(
            format!("process {pid} ({comm})"),
            file.clone(),
            Path::new(&file) == exe,
        ));
    }
    // The running executable itself, wherever it lives (`/proc/PID/exe`, never a path the
    // target could have replaced).
    let stripped = process.open_exe(MAX_OBJECT).ok().map_or("", stripped_note);
    Err(DiscoverError::NotLibuv {
        pid,
        comm,
        exe: exe.display().to_string(),
        stripped,
    })
}

/// Every process on the host that runs libuv (fleet mode), but loopbpf itself.
pub fn libuv_processes(cache: &mut LibuvCache) -> Vec<Target> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own = std::process::id();
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&pid| pid != own)
        .collect();
    pids.sort_unstable();
    let targets = pids
        .into_iter()
        .filter_map(|pid| find_target(pid, cache).ok())
        .collect();
    crate::target::give_back_freed_memory(true);
    targets
}

/// Finds the libuv a command will run with, before it starts.
pub fn libuv_for_command(program: &OsStr) -> Result<Libuv, DiscoverError> {
    let name = program.to_string_lossy().into_owned();
    let exe = find_in_path(program).ok_or_else(|| DiscoverError::CommandNotFound(name.clone()))?;
    let exe = fs::canonicalize(&exe).unwrap_or(exe);
    let candidates: Vec<PathBuf> = std::iter::once(exe.clone())
        .chain(needed_libuv(&exe))
        .collect();
    if let Some(libuv) = candidates.iter().find_map(|path| Libuv::read(path, None)) {
        return Ok(libuv);
    }
    let stripped = candidates.iter().find(|path| {
        File::open(path).is_ok_and(|file| matches!(LibuvFile::scan(&file), Scanned::Stripped))
    });
    if let Some(path) = stripped {
        return Err(stripped_libuv_error(
            format!("`{name}`"),
            path.display().to_string(),
            *path == exe,
        ));
    }
    let stripped = File::open(&exe).ok().map_or("", stripped_note);
    Err(DiscoverError::CommandNotLibuv(name, stripped))
}

/// Threads of `pid` sitting in an epoll wait right now, with the epoll fd: loops that are idle
/// as we attach. Their next poll exit starts a busy interval that must be timed from there.
pub fn threads_in_poll(pid: u32) -> Vec<IdleThread> {
    const EPOLL_WAIT_SYSCALLS: [u64; 3] = [SYS_EPOLL_WAIT, SYS_EPOLL_PWAIT, SYS_EPOLL_PWAIT2];
    let process = Process::new(pid);
    process
        .tasks()
        .into_iter()
        .filter_map(|tid| {
            let syscall = process.task_syscall(tid)?;
            if !EPOLL_WAIT_SYSCALLS.contains(&syscall.number) {
                return None;
            }
            // The timeout (epoll_pwait2: a pointer to it, NULL for "forever"): libuv counts a
            // wait idle unless its timeout is 0.
            let timeout = syscall.args[3];
            Some(IdleThread {
                tid,
                epfd: syscall.args[0] as i32,
                sp: syscall.sp,
                counts_idle: timeout as u32 != 0,
            })
        })
        .collect()
}

/// The loop of a thread asleep in its poll wait, found on its stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SleepingLoop {
    pub loop_addr: u64,
    /// A `worker_threads` Worker's loop (else a runtime-internal one, not reported).
    pub worker: bool,
}

/// A thread sitting in an epoll wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleThread {
    pub tid: u32,
    pub epfd: i32,
    /// Its user stack pointer.
    pub sp: u64,
    /// The wait has a non-zero timeout: libuv counts it as idle time.
    pub counts_idle: bool,
}

/// Checks that this user and this kernel can run loopbpf; mounts tracefs when it is missing.
pub fn preflight() -> Result<(), DiscoverError> {
    check_privileges()?;
    ensure_tracefs()?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(DiscoverError::NoBtf);
    }
    Ok(())
}

fn check_privileges() -> Result<(), DiscoverError> {
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let effective = effective_capabilities();
    let has = |cap: u32| effective & (1 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(DiscoverError::Privileges {
            missing: missing.join(" and "),
        })
    }
}

fn effective_capabilities() -> u64 {
    Process::myself()
        .status()
        .and_then(|status| status.cap_eff)
        .unwrap_or(0)
}

const TRACEFS: &str = "/sys/kernel/tracing";

fn ensure_tracefs() -> Result<(), DiscoverError> {
    const TRACEFS_MAGIC: i64 = 0x7472_6163;
    if fs_magic(TRACEFS) == Some(TRACEFS_MAGIC) {
        return Ok(());
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: both strings are NUL-terminated literals; no data argument.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(DiscoverError::Tracefs(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(())
}

fn fs_magic(path: &str) -> Option<i64> {
    let c_path = std::ffi::CString::new(path).ok()?;
    // SAFETY: statfs is plain old data, filled by the kernel on success.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is NUL-terminated and buf is a valid out pointer.
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &raw mut buf) };
    (rc == 0).then_some(buf.f_type)
}

const LIB_DIRS: [&str; 5] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/lib",
    "/usr/lib",
    "/lib",
];

/// Shared libuv libraries the executable links (`DT_NEEDED libuv*`), resolved in the usual
/// library directories.
fn needed_libuv(exe: &Path) -> Vec<PathBuf> {
    let Some(cache) = open_elf(exe) else {
        return Vec::new();
    };
    let Ok(elf) = object::read::elf::ElfFile64::<object::Endianness, _>::parse(&cache) else {
        return Vec::new();
    };
    needed_names(&elf)
        .into_iter()
        .filter(|name| name.starts_with("libuv"))
        .flat_map(|name| LIB_DIRS.iter().map(move |dir| Path::new(dir).join(&name)))
        .filter(|path| path.exists())
        .collect()
}

fn needed_names<'data, R: object::ReadRef<'data>>(
    elf: &object::read::elf::ElfFile64<'data, object::Endianness, R>,
) -> Vec<String> {
    use object::read::elf::{Dyn, SectionHeader};
    let endian = elf.endian();
    let data = elf.data();
    let sections = elf.elf_section_table();
    let mut names = Vec::new();
    for section in sections.iter() {
        let Ok(Some((entries, link))) = section.dynamic(endian, data) else {
            continue;
        };
        let Ok(strings) = sections.strings(endian, data, link) else {
            continue;
        };
        for entry in entries {
            if entry.tag32(endian).map(i64::from) == Some(object::elf::DT_NEEDED)
                && let Ok(name) = entry.string(endian, strings)
            {
                names.push(String::from_utf8_lossy(name).into_owned());
            }
        }
    }
    names
}

fn find_in_path(program: &OsStr) -> Option<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return path.is_file().then_some(path);
    }
    std::env::var_os("PATH")?
        .as_bytes()
        .split(|&b| b == b':')
        .map(|dir| Path::new(OsStr::from_bytes(dir)).join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_programs_on_path() {
        assert!(find_in_path(OsStr::new("sh")).is_some());
        assert!(find_in_path(OsStr::new("no-such-program-loopbpf")).is_none());
    }

    #[test]
    fn node_has_libuv_and_the_worker_entry() {
        let libuv = libuv_for_command(OsStr::new("node")).expect("node on PATH");
        assert_ne!(libuv.poll_addr, 0);
        let (start, end) = libuv.worker_entry.expect("node::worker::Worker::Run");
        assert!(start < end);
        let gc = libuv.gc_probes.expect("V8's GC callback calls");
        assert!(gc.start != gc.end && gc.start > 0 && gc.end > 0);
    }

    #[test]
    fn idle_threads_are_found_in_their_poll_wait() {
        let mut child = std::process::Command::new("node")
            .args(["-e", "setTimeout(() => {}, 5000)"])
            .spawn()
            .expect("node on PATH");
        let pid = child.id();
        let mut found = Vec::new();
        for _ in 0..100 {
            found = threads_in_poll(pid);
            if found.iter().any(|t| t.tid == pid) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found
                .iter()
                .any(|t| t.tid == pid && t.epfd > 0 && t.counts_idle),
            "{found:?}"
        );
    }

    #[test]
    fn the_attach_path_is_the_file_read_even_once_its_path_is_replaced() {
        let dir = std::env::temp_dir().join(format!("loopbpf-attach-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let node = find_in_path(OsStr::new("node")).expect("node on PATH");
        let copy = dir.join("node");
        fs::copy(fs::canonicalize(node).unwrap(), &copy).unwrap();
        let libuv = libuv_for_command(copy.as_os_str()).expect("node has libuv");
        // The path now names another file: the attach path still opens the node copy read.
        fs::remove_file(&copy).unwrap();
        fs::copy("/bin/sh", &copy).unwrap();
        let attach = libuv.attach_path();
        assert!(attach.starts_with("/proc/self/fd/"), "{}", attach.display());
        let reread = LibuvFile::read(&File::open(&attach).unwrap()).expect("still node");
        assert_eq!(reread.poll_file_offset, libuv.poll_file_offset);
        assert!(LibuvFile::read(&File::open(&copy).unwrap()).is_none());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_non_libuv_command_says_so() {
        let err = libuv_for_command(OsStr::new("sh")).unwrap_err();
        assert!(err.to_string().contains("is not a libuv program"), "{err}");
    }
}
