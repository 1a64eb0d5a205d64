//! Symbolization: addresses of stack samples -> named frames, done while the target is alive and
//! from a snapshot of its memory map, so that a process that exits right after a block still gets
//! names.
//!
//! Native code is named by blazesym from the ELF objects the target had mapped. Each object is
//! opened once, through `/proc/PID/root` (so paths inside a container resolve) and kept open, so
//! its symbols stay reachable after the target exits, even from a container or a deleted file.
//! JIT code is named from the perf map node writes with `--perf-basic-prof`, also kept open and
//! read as it grows. Kernel frames are named from `/proc/kallsyms`.

use std::{
    cell::{OnceCell, RefCell},
    collections::{BTreeMap, HashMap, HashSet},
    fs::{self, File},
    io::{Read, Seek, SeekFrom},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
    rc::Rc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use blazesym::{
    MaybeDefault, Pid,
    symbolize::{
        Input, Sym, Symbolized, Symbolizer as Blazesym,
        evict::{Elf as EvictElf, Evict},
        source::{Elf, Kernel, Process as BlazesymProcess, Source},
    },
};

use super::frame::{Frame, FrameKind, KERNEL_MODULE, UNKNOWN, VDSO};
use crate::target::{maps::MapsEntry, proc::Process, start_time};

/// Whether DWARF is consulted for the file and line of native frames. Measured on node 20's
/// 100 MB binary (DWARF for libuv and a few more): the first lookup, which parses the ELF symbols,
/// takes about 8 ms in release (300 ms in debug) with or without it, so lines are worth having.
/// A library with a large separate debug file costs more once (libc with libc6-dbg: 50 ms).
const NATIVE_LINE_INFO: bool = true;

/// A lookup that falls outside the snapshot re-reads `/proc/PID/maps` at most this often: new
/// JIT pages and `dlopen`ed addons appear between the caller's once-a-second refreshes.
const MIN_MAPS_REREAD_INTERVAL: Duration = Duration::from_millis(100);

/// A missing perf map is looked for again at most this often.
const MIN_PERF_MAP_OPEN_INTERVAL: Duration = Duration::from_secs(1);

/// Clock ticks per second in `/proc/PID/stat`: `USER_HZ`, 100 on x86-64 and arm64.
const USER_HZ: u64 = 100;

fn frame_from_sym(sym: Sym<'_>, module: &str, kind: FrameKind) -> Frame {
    let (file, line) = sym.code_info.map_or((None, None), |info| {
        (Some(info.to_path().display().to_string()), info.line)
    });
    let name = if sym.name.is_empty() {
        UNKNOWN.to_owned()
    } else {
        sym.name.into_owned()
    };
    Frame {
        name,
        module: module.to_owned(),
        file,
        line,
        column: None,
        original: None,
        kind,
    }
}

/// Names the frames of one process (user space) and of the kernel.
pub struct Symbolizer {
    process: Process,
    /// This symbolizer among those sharing `native`: the objects it maps are kept for it.
    user: u64,
    /// Start time of the target in clock ticks after boot: tells the target from a later
    /// process that reuses its PID. `None` once the target is known to be gone.
    start_ticks: Option<u64>,
    native: SharedObjects,
    maps: Vec<Region>,
    maps_read_at: Instant,
    perf_map: PerfMap,
    /// Named frames of file-backed and vDSO addresses, by lookup address.
    native_cache: HashMap<u64, Frame>,
    kernel_cache: HashMap<u64, Frame>,
    kernel_source: Source<'static>,
    /// Start and size of this process's own vDSO, which is the target's too (same kernel).
    own_vdso: OnceCell<Option<(u64, u64)>>,
}

/// The object files symbolizers have opened and what blazesym parsed of them, shared by the
/// symbolizers of one session: processes that run the same binary (fleet mode watches many)
/// parse its symbols and line tables once, not once each.
#[derive(Clone)]
pub struct SharedObjects(Rc<RefCell<NativeObjects>>);

struct NativeObjects {
    blazesym: Blazesym,
    objects: Objects,
    /// The next symbolizer's `user`.
    next_user: u64,
}

impl SharedObjects {
    pub fn new() -> Self {
        Self(Rc::new(RefCell::new(NativeObjects {
            blazesym: Blazesym::builder()
                // Objects are opened once and kept; never reparse a path that changed on disk.
                .enable_auto_reload(false)
                .enable_code_info(NATIVE_LINE_INFO)
                // Only so that file and line are the named function's (the call site of what
                // was inlined into it), not those of the innermost inlined callee.
                .enable_inlined_fns(NATIVE_LINE_INFO)
                .enable_demangling(true)
                .build(),
            objects: Objects::default(),
            next_user: 0,
        })))
    }
}

impl Symbolizer {
    /// Symbolizer for process `pid`; reads /proc/PID/maps now.
    #[cfg(test)]
    #[must_use]
    pub fn new(pid: u32) -> Self {
        Self::sharing(pid, &SharedObjects::new())
    }

    /// Symbolizer for process `pid` that shares parsed objects with others; reads
    /// /proc/PID/maps now.
    #[must_use]
    pub fn sharing(pid: u32, native: &SharedObjects) -> Self {
        let start_ticks = start_time(pid);
        let kernel_source = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            kaslr_offset: None,
            debug_syms: false,
            ..Kernel::default()
        });
        let user = {
            let mut native = native.0.borrow_mut();
            native.next_user += 1;
            native.next_user
        };
        let process = Process::new(pid);
        let mut symbolizer = Self {
            perf_map: PerfMap::new(process.clone(), start_ticks),
            process,
            user,
            start_ticks,
            native: native.clone(),
            maps: Vec::new(),
            maps_read_at: Instant::now(),
            native_cache: HashMap::new(),
            kernel_cache: HashMap::new(),
            kernel_source,
            own_vdso: OnceCell::new(),
        };
        symbolizer.refresh();
        symbolizer
    }

    /// Re-reads /proc/PID/maps if the process is still alive (called every second by the
    /// caller); keeps the old snapshot when the process is gone.
    pub fn refresh(&mut self) {
        self.reread_maps();
        self.perf_map.sync(true);
    }

    /// Names user-space frames. `addrs` are leaf first as captured by
    /// `bpf_get_stack(BPF_F_USER_STACK)`: `addrs[0]` is the sampled instruction pointer, the rest
    /// are return addresses (looked up at `addr - 1` so a call that ends a function resolves to
    /// the caller). Consecutive JS frames that cannot be named collapse into one `[JS]` frame.
    ///
    /// A return address that points at no code is an unwinding guess gone wrong (a frameless V8
    /// builtin as the leaf: the word at its stack pointer is not its return address). When code
    /// follows it (the walk found the frame-pointer chain again) it is dropped; at the end of the
    /// stack one `[unknown]` shows where the walk got lost.
    ///
    /// `js` are the frames V8's heap named, leaf first, by the address their code ran at; they
    /// take the place of the address's own name (`[JS]`, the interpreter's trampoline).
    pub fn user(&mut self, addrs: &[u64], js: &[(u64, &Frame)]) -> Vec<Frame> {
        self.perf_map.synced_this_call = false;
        let mut frames: Vec<Frame> = Vec::with_capacity(addrs.len());
        let mut lost = None;
        let mut js = js;
        for (depth, &addr) in addrs.iter().enumerate() {
            let named_js = js.iter().position(|&(pc, _)| pc == addr).map(|i| {
                let frame = js[i].1.clone();
                js = &js[i + 1..];
                frame
            });
            let (frame, is_code) = self.user_frame(lookup_address(depth, addr));
            if depth > 0 && !is_code && named_js.is_none() {
                lost.get_or_insert(frame);
                continue;
            }
            lost = None;
            match named_js {
                // JIT code in pages mapped since the last look at the maps is still V8's.
                Some(js_frame) if runs_as_js(&frame) || !is_code => {
                    frames.push(js_frame);
                    continue;
                }
                // A leaf that is not the function's own code runs on its behalf without a
                // frame of its own (a builtin it called): it stays, the function is its caller.
                Some(js_frame) if depth == 0 => {
                    frames.push(frame);
                    frames.push(js_frame);
                    continue;
                }
                // Deeper, a frame of other code (a builtin with a frame like a JS one): its
                // own name.
                _ => {}
            }
            if frame.is_unnamed_js() && frames.last().is_some_and(Frame::is_unnamed_js) {
                continue;
            }
            frames.push(frame);
        }
        frames.extend(lost);
        frames
    }

    /// Names kernel frames (leaf first, from `bpf_get_stack` without `BPF_F_USER_STACK`), via
    /// /proc/kallsyms. Return addresses are looked up at `addr - 1`, as in [`Self::user`].
    pub fn kernel(&mut self, addrs: &[u64]) -> Vec<Frame> {
        addrs
            .iter()
            .enumerate()
            .map(|(depth, &addr)| self.kernel_frame(lookup_address(depth, addr)))
            .collect()
    }

    fn kernel_frame(&mut self, addr: u64) -> Frame {
        if let Some(frame) = self.kernel_cache.get(&addr) {
            return frame.clone();
        }
        let frame = match self
            .native
            .0
            .borrow()
            .blazesym
            .symbolize_single(&self.kernel_source, Input::AbsAddr(addr))
        {
            Ok(Symbolized::Sym(sym)) => frame_from_sym(sym, KERNEL_MODULE, FrameKind::Kernel),
            Ok(Symbolized::Unknown(_)) | Err(_) => Frame::unknown(KERNEL_MODULE, FrameKind::Kernel),
        };
        self.kernel_cache.insert(addr, frame.clone());
        frame
    }

    /// The frame at `addr`, and whether `addr` points at code at all.
    fn user_frame(&mut self, addr: u64) -> (Frame, bool) {
        if let Some(frame) = self.native_cache.get(&addr) {
            return (frame.clone(), true);
        }
        let mut place = self.place(addr);
        if matches!(place, Place::Outside | Place::AnonymousData) && self.reread_maps_if_stale() {
            place = self.place(addr);
        }
        match place {
            Place::Object {
                object,
                file_offset,
            } => (self.object_frame(object, file_offset, addr), true),
            Place::Vdso { offset, size } => (self.vdso_frame(addr, offset, size), true),
            Place::AnonymousCode => (self.js_frame(addr).unwrap_or_else(Frame::unnamed_js), true),
            Place::AnonymousData | Place::Outside => match self.js_frame(addr) {
                Some(frame) => (frame, true),
                None => (Frame::unknown(UNKNOWN, FrameKind::Native), false),
            },
            Place::Other { module, executable } => {
                (Frame::unknown(&module, FrameKind::Native), executable)
            }
        }
    }

    /// Where `addr` falls in the snapshot.
    fn place(&self, addr: u64) -> Place {
        let index = self.maps.partition_point(|region| region.start <= addr);
        let Some(region) = index.checked_sub(1).map(|i| &self.maps[i]) else {
            return Place::Outside;
        };
        if addr >= region.end {
            return Place::Outside;
        }
        match &region.mapping {
            Mapping::Object(object) => Place::Object {
                object: *object,
                file_offset: (addr - region.start).saturating_add(region.offset),
            },
            Mapping::Vdso => Place::Vdso {
                offset: addr - region.start,
                size: region.end - region.start,
            },
            Mapping::Anonymous if region.executable => Place::AnonymousCode,
            Mapping::Anonymous => Place::AnonymousData,
            Mapping::Other(module) => Place::Other {
                module: Rc::clone(module),
                executable: region.executable,
            },
        }
    }

    fn object_frame(&mut self, object: usize, file_offset: u64, addr: u64) -> Frame {
        let native = Rc::clone(&self.native.0);
        let native = native.borrow();
        let object = &native.objects.list[object];
        let (module, sources) = (object.module.clone(), object.sources.clone());
        for path in &sources {
            let mut elf = Elf::new(path);
            elf.debug_syms = NATIVE_LINE_INFO;
            match native
                .blazesym
                .symbolize_single(&Source::Elf(elf), Input::FileOffset(file_offset))
            {
                Ok(Symbolized::Sym(sym)) => {
                    let frame = frame_from_sym(sym, &module, FrameKind::Native);
                    self.native_cache.insert(addr, frame.clone());
                    return frame;
                }
                Ok(Symbolized::Unknown(_)) => break,
                // This path cannot be opened or is no ELF file: try the next one.
                Err(_) => {}
            }
        }
        // Not an ELF symbol: JIT code in a file-backed mapping (a memfd) may still be in the
        // perf map. That answer can change as the perf map grows, so it is not cached.
        if let Some(frame) = self.js_frame(addr) {
            return frame;
        }
        let frame = Frame::unknown(&module, FrameKind::Native);
        self.native_cache.insert(addr, frame.clone());
        frame
    }

    /// The vDSO is the same image in every 64-bit process: name the address in our own copy.
    fn vdso_frame(&mut self, addr: u64, offset: u64, size: u64) -> Frame {
        let own_vdso = *self.own_vdso.get_or_init(find_own_vdso);
        let mut frame = Frame {
            name: VDSO.to_owned(),
            ..Frame::unknown(VDSO, FrameKind::Native)
        };
        if let Some((own_start, own_size)) = own_vdso
            && own_size == size
        {
            let mut process = BlazesymProcess::new(Pid::Slf);
            process.debug_syms = false;
            process.perf_map = false;
            process.map_files = false;
            let source = Source::Process(process);
            if let Ok(Symbolized::Sym(sym)) = self
                .native
                .0
                .borrow()
                .blazesym
                .symbolize_single(&source, Input::AbsAddr(own_start + offset))
            {
                frame = frame_from_sym(sym, VDSO, FrameKind::Native);
            }
        }
        self.native_cache.insert(addr, frame.clone());
        frame
    }

    fn js_frame(&mut self, addr: u64) -> Option<Frame> {
        if !self.perf_map.synced_this_call {
            self.perf_map.sync(false);
        }
        self.perf_map.lookup(addr).cloned()
    }

    fn reread_maps_if_stale(&mut self) -> bool {
        self.maps_read_at.elapsed() >= MIN_MAPS_REREAD_INTERVAL && self.reread_maps()
    }

    /// Replaces the snapshot with the current maps of the target; false if the target is gone.
    fn reread_maps(&mut self) -> bool {
        self.maps_read_at = Instant::now();
        if self.start_ticks.is_none() || start_time(self.process.pid()) != self.start_ticks {
            // Gone, or its PID now belongs to another process: keep the last snapshot.
            self.start_ticks = None;
            return false;
        }
        let Ok(maps) = self.process.maps() else {
            return false;
        };
        // A zombie has an empty map: keep the snapshot of the living process.
        if maps.is_empty() {
            return false;
        }
        self.apply_maps(&maps);
        true
    }

    fn apply_maps(&mut self, maps: &[MapsEntry]) {
        let native = Rc::clone(&self.native.0);
        let objects = &mut native.borrow_mut().objects;
        let mut regions: Vec<Region> = maps
            .iter()
            .map(|line| Region {
                start: line.range.start,
                end: line.range.end,
                offset: line.offset,
                executable: line.perms.execute,
                mapping: objects.mapping(&self.process, self.user, line),
            })
            .collect();
        regions.sort_by_key(|region| region.start);
        // Cached names are by address: they stay right as long as the same objects stay at the
        // same places.
        if file_layout(&regions) != file_layout(&self.maps) {
            self.native_cache.clear();
        }
        self.maps = regions;
    }
}

/// Whether code at this frame is a JS function's own: its JIT code, or the interpreter running
/// its bytecode (the entry trampoline and the bytecode handlers, in node's text).
fn runs_as_js(frame: &Frame) -> bool {
    frame.kind == FrameKind::Js
        || frame.name.starts_with("Builtins_Interpreter")
        || frame.name.starts_with("Builtins_Baseline")
        || (frame.name.starts_with("Builtins_") && frame.name.ends_with("Handler"))
}

/// The address to look up for the frame at `depth`: return addresses point after their call.
fn lookup_address(depth: usize, addr: u64) -> u64 {
    if depth == 0 {
        addr
    } else {
        addr.saturating_sub(1)
    }
}

/// What an address falls into.
enum Place {
    Object {
        object: usize,
        file_offset: u64,
    },
    Vdso {
        offset: u64,
        size: u64,
    },
    AnonymousCode,
    AnonymousData,
    /// A named region that is no object file of code: `[stack]`, `[heap]`, `[vsyscall]`, data.
    Other {
        module: Rc<str>,
        executable: bool,
    },
    Outside,
}

struct Region {
    start: u64,
    end: u64,
    offset: u64,
    executable: bool,
    mapping: Mapping,
}

enum Mapping {
    /// An executable file mapping: index into [`Objects::list`].
    Object(usize),
    Vdso,
    /// No path, or `[anon:...]`: V8's code space and heap.
    Anonymous,
    /// Anything else (`[stack]`, `[heap]`, data-only file mappings): never code. Its module name.
    Other(Rc<str>),
}

fn file_layout(regions: &[Region]) -> Vec<(u64, u64, u64, usize)> {
    regions
        .iter()
        .filter_map(|region| match region.mapping {
            Mapping::Object(object) => Some((region.start, region.end, region.offset, object)),
            _ => None,
        })
        .collect()
}

/// The executable objects the targets have mapped, each opened once, and closed when the last
/// symbolizer that mapped it is dropped.
#[derive(Default)]
struct Objects {
    list: Vec<MappedObject>,
    /// By device, inode and path: the same path in two containers may be two files.
    by_file: HashMap<(String, u64, String), usize>,
    /// Entries of `list` closed, to be used again.
    free: Vec<usize>,
}

#[derive(Default)]
struct MappedObject {
    /// Basename, as frames show it.
    module: String,
    /// Paths handed to blazesym, best first.
    sources: Vec<PathBuf>,
    /// Keeps the object reachable through `/proc/self/fd` after the target exits.
    _file: Option<File>,
    /// Symbolizers that mapped it.
    users: HashSet<u64>,
    key: (String, u64, String),
}

impl Drop for Symbolizer {
    fn drop(&mut self) {
        let mut native = self.native.0.borrow_mut();
        let NativeObjects {
            blazesym, objects, ..
        } = &mut *native;
        objects.release(self.user, blazesym);
    }
}

impl Objects {
    /// Closes the objects that only `user` mapped, and what blazesym read of them: in fleet
    /// mode, an upgraded service's old binary must not stay open (its disk space, its symbols
    /// in memory) once its last process is gone.
    fn release(&mut self, user: u64, blazesym: &mut Blazesym) {
        for (index, object) in self.list.iter_mut().enumerate() {
            if !object.users.remove(&user) || !object.users.is_empty() {
                continue;
            }
            // Evicted before the file closes: its `/proc/self/fd` path names the next file
            // opened under that descriptor.
            for path in &object.sources {
                let _ = blazesym.evict(&Evict::Elf(EvictElf::new(path)));
            }
            self.by_file.remove(&object.key);
            *object = MappedObject::default();
            self.free.push(index);
        }
    }

    /// What `line` of `process`'s maps maps, for symbolizer `user`: an executable file is
    /// opened now unless it is open already.
    fn mapping(&mut self, process: &Process, user: u64, line: &MapsEntry) -> Mapping {
        let path = line.file_path();
        if path.is_empty() || path.starts_with("[anon") {
            return Mapping::Anonymous;
        }
        if path == VDSO {
            return Mapping::Vdso;
        }
        if !path.starts_with('/') {
            return Mapping::Other(path.into());
        }
        let module = path.rsplit('/').next().unwrap_or(path);
        if !line.perms.execute {
            return Mapping::Other(module.into());
        }
        let key = (line.dev.clone(), line.inode, path.to_owned());
        if let Some(&object) = self.by_file.get(&key) {
            self.list[object].users.insert(user);
            return Mapping::Object(object);
        }
        let file = open_mapped_file(process, line);
        let mut sources = Vec::new();
        if let Some(file) = &file {
            sources.push(PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())));
        } else {
            sources.push(process.in_root(Path::new(path)));
        }
        sources.push(PathBuf::from(path));
        let object = MappedObject {
            module: module.to_owned(),
            sources,
            _file: file,
            users: HashSet::from([user]),
            key: key.clone(),
        };
        let index = if let Some(index) = self.free.pop() {
            self.list[index] = object;
            index
        } else {
            self.list.push(object);
            self.list.len() - 1
        };
        self.by_file.insert(key, index);
        Mapping::Object(index)
    }
}

/// Opens the file behind a mapping: by its path as the target sees it, or, when that is now a
/// different file (deleted or replaced since), through `map_files`.
fn open_mapped_file(process: &Process, line: &MapsEntry) -> Option<File> {
    let by_path = File::open(process.in_root(Path::new(line.file_path())))
        .ok()
        .filter(|file| file.metadata().is_ok_and(|meta| meta.ino() == line.inode));
    by_path.or_else(|| File::open(process.map_file(line)).ok())
}

/// Start and size of this process's vDSO.
fn find_own_vdso() -> Option<(u64, u64)> {
    let maps = Process::myself().maps().ok()?;
    maps.into_iter()
        .find(|line| line.path == VDSO)
        .map(|line| (line.range.start, line.range.end - line.range.start))
}

/// Clock ticks after boot (a process's start time) as wall-clock time.
fn ticks_to_system_time(ticks: u64) -> Option<SystemTime> {
    // Not the target's: the host's boot time.
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let boot_secs: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let since_boot = Duration::from_millis(ticks.checked_mul(1000)? / USER_HZ);
    UNIX_EPOCH.checked_add(Duration::from_secs(boot_secs) + since_boot)
}

/// The name of the target's perf map: node names it after the PID it sees itself as (inside a
/// container, its namespace PID).
fn perf_map_name(process: &Process) -> String {
    let ns_pid = process
        .status()
        .and_then(|status| status.ns_pid)
        .unwrap_or(process.pid());
    format!("perf-{ns_pid}.map")
}

/// The perf map of the target (`START SIZE NAME` lines, hex without `0x`), read as it grows.
struct PerfMap {
    process: Process,
    start_ticks: Option<u64>,
    /// The file in the target's own `/tmp`, reachable while it lives.
    in_target: PathBuf,
    /// The same file seen from here: used only once the target is gone.
    on_host: PathBuf,
    /// When the target started: an older file is left over from an earlier process with its PID.
    started_at: Option<SystemTime>,
    /// Kept open: it stays readable after the target exits, wherever it lives.
    file: Option<File>,
    last_open_attempt: Option<Instant>,
    /// Bytes of the file consumed so far (whole lines only).
    read_len: u64,
    /// Non-overlapping code ranges: start -> (end, index into `frames`). A later entry replaces
    /// whatever it overlaps, since V8 reuses the space of collected code.
    ranges: BTreeMap<u64, (u64, usize)>,
    /// One frame per distinct entry name: recompiled functions repeat theirs.
    frames: Vec<Frame>,
    frame_ids: HashMap<Box<str>, usize>,
    synced_this_call: bool,
}

impl PerfMap {
    fn new(process: Process, start_ticks: Option<u64>) -> Self {
        let name = perf_map_name(&process);
        Self {
            in_target: process.in_root(&Path::new("/tmp").join(name)),
            on_host: PathBuf::from(format!("/tmp/perf-{}.map", process.pid())),
            process,
            start_ticks,
            started_at: start_ticks.and_then(ticks_to_system_time),
            file: None,
            last_open_attempt: None,
            read_len: 0,
            ranges: BTreeMap::new(),
            frames: Vec::new(),
            frame_ids: HashMap::new(),
            synced_this_call: false,
        }
    }

    /// Reads what was appended since the last call; `open_now` looks for a missing file even if
    /// it was looked for less than a second ago.
    fn sync(&mut self, open_now: bool) {
        self.synced_this_call = true;
        if self.file.is_none() {
            let due = self
                .last_open_attempt
                .is_none_or(|at| at.elapsed() >= MIN_PERF_MAP_OPEN_INTERVAL);
            if !open_now && !due {
                return;
            }
            self.last_open_attempt = Some(Instant::now());
            self.file = self.open();
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let Ok(len) = file.metadata().map(|meta| meta.len()) else {
            return;
        };
        if len < self.read_len {
            // Rewritten from the start: forget what it said.
            self.read_len = 0;
            self.ranges.clear();
            self.frames.clear();
            self.frame_ids.clear();
        }
        if len == self.read_len {
            return;
        }
        let mut appended = Vec::new();
        if file.seek(SeekFrom::Start(self.read_len)).is_err()
            || file.read_to_end(&mut appended).is_err()
        {
            return;
        }
        let Some(last_newline) = appended.iter().rposition(|&byte| byte == b'\n') else {
            return;
        };
        let complete = &appended[..=last_newline];
        self.read_len += complete.len() as u64;
        for line in String::from_utf8_lossy(complete).lines() {
            if let Some((start, end, name)) = parse_perf_map_line(line) {
                let frame = self.frame_id(name);
                self.insert(start, end, frame);
            }
        }
    }

    fn frame_id(&mut self, name: &str) -> usize {
        if let Some(&id) = self.frame_ids.get(name) {
            return id;
        }
        self.frames.push(js_frame_from_perf_map(name));
        self.frame_ids.insert(name.into(), self.frames.len() - 1);
        self.frames.len() - 1
    }

    fn open(&self) -> Option<File> {
        let file = match File::open(&self.in_target) {
            Ok(file) => file,
            // While the target lives, its own /tmp is the only right place.
            Err(_) if !self.target_alive() => File::open(&self.on_host).ok()?,
            Err(_) => return None,
        };
        let modified = file.metadata().and_then(|meta| meta.modified()).ok();
        let stale = match (modified, self.started_at) {
            (Some(modified), Some(started_at)) => modified + Duration::from_secs(2) < started_at,
            _ => false,
        };
        (!stale).then_some(file)
    }

    fn target_alive(&self) -> bool {
        self.start_ticks.is_some() && start_time(self.process.pid()) == self.start_ticks
    }

    fn insert(&mut self, start: u64, end: u64, frame: usize) {
        // An older range that starts before this one keeps its parts outside [start, end).
        if let Some((&old_start, &(old_end, old_frame))) = self.ranges.range(..start).next_back()
            && old_end > start
        {
            self.ranges.insert(old_start, (start, old_frame));
            if old_end > end {
                self.ranges.insert(end, (old_end, old_frame));
            }
        }
        let inside: Vec<u64> = self
            .ranges
            .range(start..end)
            .map(|(&old_start, _)| old_start)
            .collect();
        for old_start in inside {
            if let Some((old_end, old_frame)) = self.ranges.remove(&old_start)
                && old_end > end
            {
                self.ranges.insert(end, (old_end, old_frame));
            }
        }
        self.ranges.insert(start, (end, frame));
    }

    fn lookup(&self, addr: u64) -> Option<&Frame> {
        let (_, &(end, frame)) = self.ranges.range(..=addr).next_back()?;
        (addr < end).then(|| &self.frames[frame])
    }
}

/// `START SIZE NAME` -> (start, end, name); `None` for a malformed or empty entry.
fn parse_perf_map_line(line: &str) -> Option<(u64, u64, &str)> {
    let mut fields = line.splitn(3, ' ');
    let start = u64::from_str_radix(fields.next()?, 16).ok()?;
    let size = u64::from_str_radix(fields.next()?, 16).ok()?;
    let name = fields.next()?.trim_end();
    let end = start.checked_add(size)?;
    (size > 0).then_some((start, end, name))
}

/// Turns a V8 perf map name into a frame: `JS:*fib /app.js:3:13` is `fib` at `/app.js` line 3.
fn js_frame_from_perf_map(entry: &str) -> Frame {
    let Some((kind, rest)) = entry.split_once(':') else {
        return Frame::js(entry.to_owned(), None, None);
    };
    if !matches!(kind, "JS" | "LazyCompile" | "Function" | "Script" | "Eval") {
        // Builtin:, BytecodeHandler:, Stub:, RegExp:, ...: the whole entry is the name.
        return Frame::js(entry.to_owned(), None, None);
    }
    // The tier: ~ interpreted, ^ baseline, + Maglev, * optimized.
    let rest = rest.strip_prefix(['~', '^', '+', '*']).unwrap_or(rest);
    let (name, script) = split_name_and_script(rest);
    let name = if name.is_empty() { "<anonymous>" } else { name };
    let (file, line) = script.map_or((None, None), parse_script_location);
    Frame::js(name.to_owned(), file, line)
}

/// Splits `NAME SCRIPT:LINE:COL`, where the name may be empty or hold spaces (`get x`).
fn split_name_and_script(text: &str) -> (&str, Option<&str>) {
    const SCRIPT_STARTS: [&str; 4] = ["/", "file:", "node:", "."];
    // `[eval]:1:1`, `[eval]-wrapper:6:14`, `[worker eval]:1:1`, but not `[Symbol.iterator] ...`,
    // the name of a computed method.
    let is_bracketed_script = |script: &str| {
        script.starts_with('[')
            && script
                .split_once(']')
                .is_some_and(|(_, after)| after.starts_with([':', '-']))
    };
    let mut last_located = None;
    for (space, _) in text.match_indices(' ') {
        let script = &text[space + 1..];
        if SCRIPT_STARTS.iter().any(|start| script.starts_with(start))
            || is_bracketed_script(script)
        {
            return (&text[..space], Some(script));
        }
        if has_line_suffix(script) {
            last_located = Some(space);
        }
    }
    match last_located {
        Some(space) => (&text[..space], Some(&text[space + 1..])),
        None => (text, None),
    }
}

fn has_line_suffix(script: &str) -> bool {
    script.rsplit_once(':').is_some_and(|(_, number)| {
        !number.is_empty() && number.bytes().all(|byte| byte.is_ascii_digit())
    })
}

/// `file:///x.js:1:1` -> (`/x.js`, 1).
fn parse_script_location(script: &str) -> (Option<String>, Option<u32>) {
    let mut path = script;
    let mut numbers = Vec::new();
    while numbers.len() < 2
        && let Some((rest, number)) = path.rsplit_once(':')
        && let Ok(number) = number.parse::<u32>()
    {
        numbers.push(number);
        path = rest;
    }
    // Trailing numbers were popped last first: the line is the first of `:LINE:COL` (or `:LINE`).
    let line = numbers.last().copied();
    let path = path.strip_prefix("file://").unwrap_or(path);
    ((!path.is_empty()).then(|| path.to_owned()), line)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::{
        process::{Child, Command, Stdio},
        sync::atomic::{AtomicU32, Ordering},
    };

    use crate::target::maps::parse_maps;

    /// A node process killed when the test ends, pass or fail.
    struct Node {
        child: Child,
        /// Its working directory: `--perf-basic-prof` also writes an `isolate-*-v8.log` there.
        dir: PathBuf,
    }

    impl Node {
        fn spawn(args: &[&str]) -> Self {
            static SPAWNED: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "loopbpf-symbolize-test-{}-{}",
                std::process::id(),
                SPAWNED.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            let child = Command::new("node")
                .args(args)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("node must be installed to run the symbolize tests");
            let node = Self { child, dir };
            let exe_is_node = || {
                fs::read_link(format!("/proc/{}/exe", node.pid()))
                    .is_ok_and(|exe| exe.file_name().is_some_and(|name| name == "node"))
            };
            wait_for("node to exec", exe_is_node);
            node
        }

        fn pid(&self) -> u32 {
            self.child.id()
        }

        fn exe(&self) -> PathBuf {
            fs::read_link(format!("/proc/{}/exe", self.pid())).expect("node is running")
        }

        fn kill(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    impl Drop for Node {
        fn drop(&mut self) {
            self.kill();
            let _ = fs::remove_dir_all(&self.dir);
            let _ = fs::remove_file(format!("/tmp/perf-{}.map", self.pid()));
        }
    }

    fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !condition() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where `symbol` of the ELF file `path` is mapped in process `pid`.
    fn runtime_address(pid: u32, path: &Path, symbol: &str) -> u64 {
        use object::{Object, ObjectSection, ObjectSymbol};

        let data = fs::read(path).expect("readable ELF file");
        let elf = object::File::parse(&*data).expect("an ELF file");
        let sym = elf
            .symbols()
            .find(|sym| sym.name() == Ok(symbol))
            .unwrap_or_else(|| panic!("{} has no symbol `{symbol}`", path.display()));
        let section = elf
            .section_by_index(sym.section_index().expect("a defined symbol"))
            .unwrap();
        let (section_offset, _) = section.file_range().expect("a section with file data");
        let file_offset = sym.address() - section.address() + section_offset;
        let maps = Process::new(pid).maps().unwrap();
        maps.iter()
            .find(|line| {
                Path::new(&line.path) == path
                    && line.offset <= file_offset
                    && file_offset < line.offset + (line.range.end - line.range.start)
            })
            .map_or_else(
                || panic!("`{symbol}` is not mapped in process {pid}"),
                |line| line.range.start + file_offset - line.offset,
            )
    }

    fn vdso_range(pid: u32) -> (u64, u64) {
        let maps = Process::new(pid).maps().unwrap();
        let vdso = maps.into_iter().find(|line| line.path == VDSO);
        let vdso = vdso.expect("a process has a vDSO");
        (vdso.range.start, vdso.range.end)
    }

    /// Offset of `name` in the vDSO, from this process's copy of it.
    fn vdso_symbol_offset(name: &str) -> u64 {
        use object::{Object, ObjectSymbol};

        let (start, end) = vdso_range(std::process::id());
        let memory = Process::myself().memory().unwrap();
        let image = memory
            .bytes(start, usize::try_from(end - start).unwrap())
            .unwrap();
        let elf = object::File::parse(&*image).expect("the vDSO is an ELF image");
        let symbol = elf.dynamic_symbols().find(|sym| sym.name() == Ok(name));
        symbol
            .unwrap_or_else(|| panic!("the vDSO has no `{name}`"))
            .address()
    }

    #[inline(never)]
    fn symbolize_test_marker() -> u64 {
        std::hint::black_box(42)
    }

    #[test]
    fn names_a_function_of_this_test_binary() {
        let addr = symbolize_test_marker as fn() -> u64 as usize as u64;
        let mut symbolizer = Symbolizer::new(std::process::id());
        let frames = symbolizer.user(&[addr + 1, addr + 2], &[]);
        assert_eq!(frames.len(), 2);
        for frame in &frames {
            assert!(frame.name.contains("symbolize_test_marker"), "{frame:?}");
            assert_eq!(frame.kind, FrameKind::Native);
            assert!(frame.module.starts_with("loopbpf"), "{frame:?}");
        }
        let file = frames[0].file.as_deref().unwrap_or_default();
        assert!(
            file.ends_with("symbolize.rs"),
            "line info from DWARF: {:?}",
            frames[0]
        );
        assert!(frames[0].line.is_some(), "{:?}", frames[0]);
    }

    #[test]
    fn objects_are_closed_with_the_last_symbolizer_that_mapped_them() {
        let addr = symbolize_test_marker as fn() -> u64 as usize as u64;
        let shared = SharedObjects::new();
        let open_objects = || {
            let native = shared.0.borrow();
            let open = native.objects.list.iter().filter(|o| !o.users.is_empty());
            (open.count(), native.objects.by_file.len())
        };
        let mut first = Symbolizer::sharing(std::process::id(), &shared);
        let second = Symbolizer::sharing(std::process::id(), &shared);
        let (open, by_file) = open_objects();
        assert!(
            open > 0 && open == by_file,
            "{open} objects, {by_file} by file"
        );
        drop(second);
        assert_eq!(open_objects(), (open, by_file), "the first still maps them");
        drop(first);
        assert_eq!(open_objects(), (0, 0));
        // A later symbolizer opens them again, in the freed entries, and names as well.
        first = Symbolizer::sharing(std::process::id(), &shared);
        assert_eq!(shared.0.borrow().objects.list.len(), open);
        let frames = first.user(&[addr + 1], &[]);
        assert!(
            frames[0].name.contains("symbolize_test_marker"),
            "{frames:?}"
        );
    }

    #[test]
    fn names_uv_run_in_node_also_after_node_exits() {
        let mut node = Node::spawn(&["-e", "setTimeout(() => {}, 30000)"]);
        let exe = node.exe();
        let node_start = runtime_address(node.pid(), &exe, "_ZN4node5StartEiPPc");
        let uv_run = runtime_address(node.pid(), &exe, "uv_run");
        let uv_loop_init = runtime_address(node.pid(), &exe, "uv_loop_init");

        let timed = |symbolizer: &mut Symbolizer, addr| {
            let started = Instant::now();
            let frames = symbolizer.user(&[addr], &[]);
            (frames, started.elapsed())
        };
        let started = Instant::now();
        let mut symbolizer = Symbolizer::new(node.pid());
        let snapshot = started.elapsed();
        // node::Start has no DWARF: the first lookup parses node's 100 MB of ELF symbols.
        let (start_frames, first) = timed(&mut symbolizer, node_start);
        let (uv_frames, next) = timed(&mut symbolizer, uv_run);
        let (cached_frames, cached) = timed(&mut symbolizer, uv_run);
        eprintln!(
            "symbolize node ({} build, line info {NATIVE_LINE_INFO}): maps snapshot {snapshot:?}, \
             first lookup {first:?}, next uncached {next:?}, cached {cached:?}",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        );
        assert_eq!(
            start_frames[0].name, "node::Start(int, char**)",
            "{start_frames:?}"
        );
        assert_eq!(uv_frames, cached_frames);
        assert_eq!(uv_frames[0].name, "uv_run", "{uv_frames:?}");
        for frame in [&start_frames[0], &uv_frames[0]] {
            assert_eq!(frame.module, "node", "{frame:?}");
            assert_eq!(frame.kind, FrameKind::Native);
        }

        let vdso_start = vdso_range(node.pid()).0;
        let frames = symbolizer.user(&[vdso_start + vdso_symbol_offset("clock_gettime")], &[]);
        assert!(frames[0].name.contains("clock_gettime"), "{frames:?}");
        assert_eq!(frames[0].module, "[vdso]");

        // The target is gone: its snapshot and the opened binary still name new addresses.
        node.kill();
        symbolizer.refresh();
        let frames = symbolizer.user(&[0, uv_loop_init + 1], &[]);
        assert_eq!(frames[1].name, "uv_loop_init", "{frames:?}");
        assert_eq!(frames[1].module, "node");
    }

    #[test]
    fn names_a_jit_compiled_js_function_from_the_perf_map() {
        const SCRIPT: &str = "function hotLoopForTest(){let x=0;for(let i=0;i<1e8;i++)x+=i;return x} \
                              for(let i=0;i<20;i++) hotLoopForTest(); setTimeout(()=>{},3000)";
        let mut node = Node::spawn(&["--perf-basic-prof", "-e", SCRIPT]);
        let perf_map = PathBuf::from(format!("/tmp/perf-{}.map", node.pid()));
        // Snapshot taken early, as a profiler attaches: the entry is read after it was taken.
        let mut symbolizer = Symbolizer::new(node.pid());
        let entry_of_hot_loop = || {
            let text = fs::read_to_string(&perf_map).unwrap_or_default();
            // Only whole lines: node may be halfway through writing the last one.
            let whole = &text[..text.rfind('\n').map_or(0, |newline| newline + 1)];
            whole
                .lines()
                .rfind(|line| line.contains("hotLoopForTest"))
                .map(str::to_owned)
        };
        wait_for("hotLoopForTest in the perf map", || {
            entry_of_hot_loop().is_some()
        });
        let entry = entry_of_hot_loop().unwrap();
        eprintln!("perf map entry: {entry}");
        let (start, _, _) = parse_perf_map_line(&entry).expect("a well-formed perf map line");

        symbolizer.refresh();
        let frames = symbolizer.user(&[start + 1], &[]);
        assert_eq!(frames.len(), 1);
        let frame = &frames[0];
        assert_eq!(frame.name, "hotLoopForTest", "{frame:?}");
        assert_eq!(frame.kind, FrameKind::Js);
        assert_eq!(frame.module, "[JIT]");
        assert!(
            frame
                .file
                .as_deref()
                .is_some_and(|file| file.ends_with("[eval]")),
            "{frame:?}"
        );
        assert_eq!(frame.line, Some(1));

        node.kill();
        assert_eq!(
            symbolizer.user(&[0, start + 2], &[])[1],
            *frame,
            "named after the exit too"
        );
    }

    #[test]
    fn names_a_kernel_function_from_kallsyms() {
        let kallsyms = fs::read_to_string("/proc/kallsyms").unwrap();
        let addr = kallsyms
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                let addr = fields.next()?;
                (fields.next()? == "T" && fields.next()? == "schedule" && fields.next().is_none())
                    .then(|| u64::from_str_radix(addr, 16).ok())?
            })
            .expect("/proc/kallsyms lists schedule");
        assert_ne!(
            addr, 0,
            "kernel addresses are hidden: run the tests as root"
        );

        let mut symbolizer = Symbolizer::new(std::process::id());
        let frames = symbolizer.kernel(&[addr, addr + 1]);
        for frame in &frames {
            assert_eq!(frame.name, "schedule", "{frame:?}");
            assert_eq!(frame.kind, FrameKind::Kernel);
            assert_eq!(frame.module, "[kernel]");
        }
    }

    #[test]
    fn unnamed_js_frames_collapse_into_one() {
        let mut symbolizer = Symbolizer::new(std::process::id());
        // Below mmap_min_addr: nothing real is ever mapped there, nor in a perf map of ours.
        let own_maps = fs::read_to_string("/proc/self/maps").unwrap();
        symbolizer.apply_maps(&parse_maps(&format!(
            "{own_maps}1000-2000 rwxp 00000000 00:00 0 \n\
             2000-3000 r-xp 00000000 00:00 0                          [anon:v8 code]\n\
             3000-4000 rw-p 00000000 00:00 0 \n"
        )));
        symbolizer.start_ticks = None; // keep these maps
        let native = symbolize_test_marker as fn() -> u64 as usize as u64;
        let frames = symbolizer.user(&[0x1100, 0x1f00, 0x2100, native + 1, 0x2200, 0x3100], &[]);
        let names: Vec<&str> = frames.iter().map(|frame| frame.name.as_str()).collect();
        assert_eq!(names.len(), 4, "{frames:?}");
        assert_eq!(frames[0], Frame::unnamed_js());
        assert!(names[1].contains("symbolize_test_marker"), "{frames:?}");
        assert_eq!(frames[2], Frame::unnamed_js());
        assert_eq!(
            frames[3],
            Frame::unknown(UNKNOWN, FrameKind::Native),
            "heap is not code"
        );
    }

    #[test]
    fn a_return_address_into_no_code_is_dropped_when_code_follows() {
        let mut symbolizer = Symbolizer::new(std::process::id());
        let own_maps = fs::read_to_string("/proc/self/maps").unwrap();
        symbolizer.apply_maps(&parse_maps(&format!(
            "{own_maps}1000-2000 r-xp 00000000 00:00 0 \n\
             3000-4000 rw-p 00000000 00:00 0                          [stack]\n"
        )));
        // Addresses outside every map make it re-read the real ones: keep these.
        symbolizer.start_ticks = None;
        let native = symbolize_test_marker as fn() -> u64 as usize as u64;
        // A frameless leaf: framehop took a word at its stack pointer (a number, a stack address)
        // for the return address, then found the frame-pointer chain again.
        let frames = symbolizer.user(&[native, 0x5f, 0x3100, 0x1100, native + 1, 0x20, 0x30], &[]);
        let names: Vec<&str> = frames.iter().map(|frame| frame.name.as_str()).collect();
        assert_eq!(names.len(), 4, "{frames:?}");
        assert!(names[0].contains("symbolize_test_marker"), "{frames:?}");
        assert_eq!(frames[1], Frame::unnamed_js());
        assert!(names[2].contains("symbolize_test_marker"), "{frames:?}");
        assert_eq!(
            frames[3],
            Frame::unknown(UNKNOWN, FrameKind::Native),
            "lost at the end"
        );
    }

    #[test]
    fn garbage_addresses_never_panic() {
        for pid in [std::process::id(), 0, u32::MAX] {
            let mut symbolizer = Symbolizer::new(pid);
            assert!(symbolizer.user(&[], &[]).is_empty());
            assert!(symbolizer.kernel(&[]).is_empty());
            let garbage = [
                0,
                1,
                u64::MAX,
                u64::MAX - 1,
                0x7fff_ffff_ffff,
                0xffff_8000_0000_0000,
            ];
            let frames = symbolizer.user(&garbage, &[]);
            assert!(!frames.is_empty() && frames.len() <= garbage.len());
            assert_eq!(frames[0], Frame::unknown(UNKNOWN, FrameKind::Native));
            assert_eq!(symbolizer.kernel(&garbage).len(), garbage.len());
            symbolizer.refresh();
        }
    }

    #[test]
    fn perf_map_names_follow_v8() {
        let cases = [
            (
                "JS:*fib /abs/path/app.js:3:13",
                "fib",
                Some("/abs/path/app.js"),
                Some(3),
            ),
            ("JS:~main file:///x.js:1:1", "main", Some("/x.js"), Some(1)),
            (
                "LazyCompile:*foo /p.js:10:20",
                "foo",
                Some("/p.js"),
                Some(10),
            ),
            (
                "Function:^bar node:internal/util:598:30",
                "bar",
                Some("node:internal/util"),
                Some(598),
            ),
            ("JS:+maglevd /m.js:7:1", "maglevd", Some("/m.js"), Some(7)),
            ("JS:~ [eval]:1:1", "<anonymous>", Some("[eval]"), Some(1)),
            (
                "Script:~ /srv/app.js:1:1",
                "<anonymous>",
                Some("/srv/app.js"),
                Some(1),
            ),
            (
                "JS:^get size /a dir/b.js:4:2",
                "get size",
                Some("/a dir/b.js"),
                Some(4),
            ),
            (
                "JS:~run evalmachine.<anonymous>:2:5",
                "run",
                Some("evalmachine.<anonymous>"),
                Some(2),
            ),
            (
                "JS:~ [worker eval]:1:1",
                "<anonymous>",
                Some("[worker eval]"),
                Some(1),
            ),
            (
                "JS:~ [eval]-wrapper:6:14",
                "<anonymous>",
                Some("[eval]-wrapper"),
                Some(6),
            ),
            (
                "JS:~get [Symbol.toStringTag] node:internal/url:9:2",
                "get [Symbol.toStringTag]",
                Some("node:internal/url"),
                Some(9),
            ),
            ("JS:*noScript", "noScript", None, None),
            ("Builtin:JsonStringify", "Builtin:JsonStringify", None, None),
            ("BytecodeHandler:Star0", "BytecodeHandler:Star0", None, None),
            ("Stub:CEntry", "Stub:CEntry", None, None),
        ];
        for (entry, name, file, line) in cases {
            let frame = js_frame_from_perf_map(entry);
            assert_eq!(frame.name, name, "{entry}");
            assert_eq!(frame.file.as_deref(), file, "{entry}");
            assert_eq!(frame.line, line, "{entry}");
            assert_eq!(
                (frame.kind, frame.module.as_str()),
                (FrameKind::Js, "[JIT]"),
                "{entry}"
            );
        }
        assert_eq!(
            parse_perf_map_line("7f00 10 JS:*f /a.js:1:1"),
            Some((0x7f00, 0x7f10, "JS:*f /a.js:1:1"))
        );
        assert_eq!(parse_perf_map_line("7f00 0 JS:*f"), None);
        assert_eq!(parse_perf_map_line("ffffffffffffffff 10 x"), None);
        assert_eq!(parse_perf_map_line("zz 10 x"), None);
    }

    #[test]
    fn later_perf_map_entries_replace_what_they_overlap() {
        let mut perf_map = PerfMap::new(Process::new(0), None);
        let mut add = |start: u64, end: u64, name: &str| {
            let frame = perf_map.frame_id(name);
            perf_map.insert(start, end, frame);
        };
        add(0x100, 0x200, "old");
        add(0x140, 0x160, "inner");
        add(0x1f0, 0x300, "tail");
        add(0x80, 0x110, "head");
        add(0x400, 0x410, "old");
        let name_at = |addr| perf_map.lookup(addr).map(|frame| frame.name.as_str());
        assert_eq!(name_at(0x7f), None);
        assert_eq!(name_at(0x80), Some("head"));
        assert_eq!(name_at(0x110), Some("old"));
        assert_eq!(name_at(0x150), Some("inner"));
        assert_eq!(name_at(0x160), Some("old"));
        assert_eq!(name_at(0x1f0), Some("tail"));
        assert_eq!(name_at(0x2ff), Some("tail"));
        assert_eq!(name_at(0x300), None);
        assert_eq!(name_at(0x405), Some("old"));
        assert_eq!(perf_map.frames.len(), 4, "a repeated name shares its frame");
    }
}
