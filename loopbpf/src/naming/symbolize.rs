//! Symbolization: addresses of stack samples -> named frames, done while the target is alive and
//! from a snapshot of its memory map, so that a process that exits right after a block still gets
//! names.
//!
//! Native code is named by blazesym from the ELF objects the target had mapped ([`super::objects`]
//! opens and keeps them). JIT code is named from the perf map node writes with
//! `--perf-basic-prof` ([`super::perf_map`]). Kernel frames are named from `/proc/kallsyms`
//! ([`super::kernel`]). Named native and kernel frames are cached for every process (by object
//! and file offset, by kernel function): see [`super::objects`] and [`super::kernel`].

use std::{
    cell::OnceCell,
    rc::Rc,
    sync::Arc,
    time::{Duration, Instant},
};

use blazesym::{
    Pid,
    symbolize::{
        Input, Sym, Symbolized,
        source::{Process as BlazesymProcess, Source},
    },
};

use super::{
    frame::{Frame, FrameKind, UNKNOWN, VDSO, shared},
    objects::{Mapping, SharedObjects},
    perf_map::PerfMap,
};
use crate::target::{maps::MapsEntry, proc::Process, start_time};

/// A lookup that falls outside the snapshot re-reads `/proc/PID/maps` at most this often: new
/// JIT pages and `dlopen`ed addons appear between the caller's once-a-second refreshes.
const MIN_MAPS_REREAD_INTERVAL: Duration = Duration::from_millis(100);

pub(super) fn frame_from_sym(sym: Sym<'_>, module: &Arc<str>, kind: FrameKind) -> Frame {
    let (file, line) = sym.code_info.map_or((None, None), |info| {
        (Some(info.to_path().display().to_string().into()), info.line)
    });
    let name = if sym.name.is_empty() {
        shared!(UNKNOWN)
    } else if kind == FrameKind::Native {
        without_symbol_version(&sym.name).into()
    } else {
        sym.name.as_ref().into()
    };
    Frame {
        name,
        module: Arc::clone(module),
        file,
        line,
        column: None,
        original: None,
        kind,
    }
}

/// `name` without the symbol version an ELF symbol table may append (`@@GLIBC_2.34`,
/// `@GLIBC_2.2.5`, the vDSO's `@LINUX_2.6`): it names which version of an interface the
/// symbol defines, not the function. Compiler clones (`.part.0`, `.constprop.0`) keep their
/// suffix: they are code of their own, and perf shows them too.
fn without_symbol_version(name: &str) -> &str {
    match name.split_once('@') {
        Some((function, version))
            if !function.is_empty()
                && !version.trim_start_matches('@').is_empty()
                && version
                    .trim_start_matches('@')
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.') =>
        {
            function
        }
        _ => name,
    }
}

/// A JS frame V8's heap named, for [`Symbolizer::user`]: where its code ran, and whether it is
/// the outermost function of its physical frame (the ones before it there were inlined into it).
#[derive(Debug, Clone, Copy)]
pub struct NamedJs<'a> {
    pub pc: u64,
    pub ends_frame: bool,
    pub frame: &'a Frame,
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
    /// Start and size of this process's own vDSO, which is the target's too (same kernel).
    own_vdso: OnceCell<Option<(u64, u64)>>,
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
    #[cfg(test)]
    #[must_use]
    pub fn sharing(pid: u32, native: &SharedObjects) -> Self {
        let mut symbolizer = Self::unread(pid, native);
        symbolizer.refresh();
        symbolizer
    }

    /// Symbolizer for process `pid` that shares parsed objects with others and knows none of
    /// its mappings yet: its caller gives it the memory map ([`Symbolizer::take_maps`]).
    #[must_use]
    pub fn unread(pid: u32, native: &SharedObjects) -> Self {
        let start_ticks = start_time(pid);
        let user = {
            let mut native = native.0.borrow_mut();
            native.next_user += 1;
            native.next_user
        };
        let process = Process::new(pid);
        Self {
            perf_map: PerfMap::new(process.clone(), start_ticks),
            process,
            user,
            start_ticks,
            native: native.clone(),
            maps: Vec::new(),
            maps_read_at: Instant::now(),
            own_vdso: OnceCell::new(),
        }
    }

    /// Re-reads /proc/PID/maps if the process is still alive; keeps the old snapshot when the
    /// process is gone.
    #[cfg(test)]
    pub fn refresh(&mut self) {
        self.reread_maps();
        self.perf_map.sync(true);
    }

    /// Names from `maps`, the process's memory map its caller read just now, from now on;
    /// false (the old snapshot kept) when the process is gone or its pid is another's now.
    pub fn take_maps(&mut self, maps: &[MapsEntry]) -> bool {
        self.maps_read_at = Instant::now();
        // Checked after the read: a map read from a later process with the same pid is not
        // taken for the target's.
        if !self.still_the_target() || maps.is_empty() {
            return false;
        }
        self.apply_maps(maps);
        true
    }

    /// Reads what the perf map gained.
    pub fn sync_perf_map(&mut self) {
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
    /// take the place of the address's own name (`[JS]`, the interpreter's trampoline), one
    /// physical frame at each address.
    pub fn user(&mut self, addrs: &[u64], js: &[NamedJs<'_>]) -> Vec<Frame> {
        self.perf_map.synced_this_call = false;
        let mut frames: Vec<Frame> = Vec::with_capacity(addrs.len());
        let mut lost = None;
        let mut js = js;
        for (depth, &addr) in addrs.iter().enumerate() {
            // One frame, or an optimized frame with the functions inlined into it (leaf first).
            let named_js = js.iter().position(|j| j.pc == addr).map(|i| {
                let mut end = i;
                while end < js.len() && js[end].pc == addr {
                    end += 1;
                    if js[end - 1].ends_frame {
                        break;
                    }
                }
                let frames: Vec<Frame> = js[i..end].iter().map(|j| j.frame.clone()).collect();
                js = &js[end..];
                frames
            });
            let (frame, is_code) = self.user_frame(lookup_address(depth, addr));
            if depth > 0 && !is_code && named_js.is_none() {
                lost.get_or_insert(frame);
                continue;
            }
            lost = None;
            match named_js {
                // JIT code in pages mapped since the last look at the maps is still V8's.
                Some(js_frames) if runs_as_js(&frame) || !is_code => {
                    frames.extend(js_frames);
                    continue;
                }
                // A leaf that is not the function's own code runs on its behalf without a
                // frame of its own (a builtin it called): it stays, the function is its caller.
                Some(js_frames) if depth == 0 => {
                    frames.push(frame);
                    frames.extend(js_frames);
                    continue;
                }
                // A builtin called with a regexp that the interpreter runs: the regexp goes
                // right above the builtin, with what runs it leafward.
                Some(js_frames) if js_frames.first().is_some_and(Frame::is_js_regexp) => {
                    frames.extend(js_frames);
                    frames.push(frame);
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
        let mut frames: Vec<Frame> = addrs
            .iter()
            .enumerate()
            .map(|(depth, &addr)| self.kernel_frame(lookup_address(depth, addr)))
            .collect();
        // An off-CPU stack taken by the BTF sched_switch program starts in that program and
        // the kernel's call of it: loopbpf's own frames, not where the thread sleeps.
        let own = frames
            .iter()
            .take_while(|f| f.name.starts_with("bpf_prog_") || f.name.starts_with("bpf_trace_run"))
            .count();
        frames.drain(..own);
        frames
    }

    fn kernel_frame(&mut self, addr: u64) -> Frame {
        self.native.0.borrow_mut().kernel.frame(addr)
    }

    /// Drops what was parsed of objects and of the kernel that no lookup needed lately.
    pub fn evict_idle(&self) {
        self.native.evict_idle();
    }

    /// The frame at `addr`, and whether `addr` points at code at all.
    fn user_frame(&mut self, addr: u64) -> (Frame, bool) {
        let mut place = self.place(addr);
        if matches!(place, Place::Outside | Place::AnonymousData) && self.reread_maps_if_stale() {
            place = self.place(addr);
        }
        match place {
            Place::Object {
                object,
                file_offset,
            } => (self.object_frame(object, file_offset, addr), true),
            Place::Vdso { offset, size } => (self.vdso_frame(offset, size), true),
            Place::AnonymousCode => (self.js_frame(addr).unwrap_or_else(Frame::unnamed_js), true),
            Place::AnonymousData | Place::Outside => match self.js_frame(addr) {
                Some(frame) => (frame, true),
                None => (Frame::unknown(shared!(UNKNOWN), FrameKind::Native), false),
            },
            Place::Other { module, executable } => {
                (Frame::unknown(module, FrameKind::Native), executable)
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
                module: Arc::clone(module),
                executable: region.executable,
            },
        }
    }

    fn object_frame(&mut self, object: usize, file_offset: u64, addr: u64) -> Frame {
        let named = self.native.0.borrow_mut().object_frame(object, file_offset);
        if let Some(frame) = named {
            return frame;
        }
        // Not an ELF symbol: JIT code in a file-backed mapping (a memfd) may still be in the
        // perf map. That answer can change as the perf map grows, so it is not cached.
        if let Some(frame) = self.js_frame(addr) {
            return frame;
        }
        let mut native = self.native.0.borrow_mut();
        let module = Arc::clone(&native.objects.list[object].module);
        let frame = Frame::unknown(module, FrameKind::Native);
        native.remember_frame(Some(object), file_offset, frame.clone());
        frame
    }

    /// The vDSO is the same image in every 64-bit process: name the address in our own copy.
    fn vdso_frame(&mut self, offset: u64, size: u64) -> Frame {
        if let Some(frame) = self.native.0.borrow().vdso_frame(offset) {
            return frame;
        }
        let own_vdso = *self.own_vdso.get_or_init(find_own_vdso);
        let mut frame = Frame {
            name: shared!(VDSO),
            ..Frame::unknown(shared!(VDSO), FrameKind::Native)
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
                frame = frame_from_sym(sym, &shared!(VDSO), FrameKind::Native);
            }
        }
        let mut native = self.native.0.borrow_mut();
        native.remember_frame(None, offset, frame.clone());
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
        if !self.still_the_target() {
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

    /// Whether the target still runs under its pid; once it is gone (or its pid is another
    /// process's), the last snapshot is kept for good.
    fn still_the_target(&mut self) -> bool {
        if self.start_ticks.is_none() || start_time(self.process.pid()) != self.start_ticks {
            self.start_ticks = None;
            return false;
        }
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
        module: Arc<str>,
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

impl Drop for Symbolizer {
    fn drop(&mut self) {
        self.native.0.borrow_mut().release(self.user);
    }
}

/// Start and size of this process's vDSO.
fn find_own_vdso() -> Option<(u64, u64)> {
    let maps = Process::myself().maps().ok()?;
    maps.into_iter()
        .find(|line| line.path == VDSO)
        .map(|line| (line.range.start, line.range.end - line.range.start))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::{
        fs,
        path::{Path, PathBuf},
        process::{Child, Command, Stdio},
        sync::atomic::{AtomicU32, Ordering},
    };

    use crate::{naming::perf_map::parse_perf_map_line, target::maps::parse_maps};

    #[test]
    fn symbol_versions_are_not_part_of_a_name() {
        for (symbol, name) in [
            ("pthread_mutex_trylock@@GLIBC_2.34", "pthread_mutex_trylock"),
            ("memcpy@GLIBC_2.2.5", "memcpy"),
            ("__vdso_clock_gettime@@LINUX_2.6", "__vdso_clock_gettime"),
            ("__malloc_info.part.0", "__malloc_info.part.0"),
            ("_int_free.isra.0", "_int_free.isra.0"),
            ("uv__io_poll", "uv__io_poll"),
            ("odd@", "odd@"),
            ("@GLIBC_2.2.5", "@GLIBC_2.2.5"),
            ("std::terminate()@@GLIBCXX_3.4", "std::terminate()"),
            ("a@b c", "a@b c"),
        ] {
            assert_eq!(without_symbol_version(symbol), name, "{symbol}");
        }
    }

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
        use crate::target::memory::ReadMemory;
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
            "symbolize node ({} build, line info {}): maps snapshot {snapshot:?}, \
             first lookup {first:?}, next uncached {next:?}, cached {cached:?}",
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            crate::naming::objects::NATIVE_LINE_INFO,
        );
        assert_eq!(
            &*start_frames[0].name, "node::Start(int, char**)",
            "{start_frames:?}"
        );
        assert_eq!(uv_frames, cached_frames);
        assert_eq!(&*uv_frames[0].name, "uv_run", "{uv_frames:?}");
        for frame in [&start_frames[0], &uv_frames[0]] {
            assert_eq!(&*frame.module, "node", "{frame:?}");
            assert_eq!(frame.kind, FrameKind::Native);
        }

        let vdso_start = vdso_range(node.pid()).0;
        let frames = symbolizer.user(&[vdso_start + vdso_symbol_offset("clock_gettime")], &[]);
        assert!(frames[0].name.contains("clock_gettime"), "{frames:?}");
        assert_eq!(&*frames[0].module, "[vdso]");

        // The target is gone: its snapshot and the opened binary still name new addresses.
        node.kill();
        symbolizer.refresh();
        let frames = symbolizer.user(&[0, uv_loop_init + 1], &[]);
        assert_eq!(&*frames[1].name, "uv_loop_init", "{frames:?}");
        assert_eq!(&*frames[1].module, "node");
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
        assert_eq!(&*frame.name, "hotLoopForTest", "{frame:?}");
        assert_eq!(frame.kind, FrameKind::Js);
        assert_eq!(&*frame.module, "[JIT]");
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
            assert_eq!(&*frame.name, "schedule", "{frame:?}");
            assert_eq!(frame.kind, FrameKind::Kernel);
            assert_eq!(&*frame.module, "[kernel]");
        }
    }

    #[test]
    fn an_optimized_frame_shows_the_functions_inlined_into_it() {
        let mut symbolizer = with_v8_code();
        let (weigh, price_all, on_tick) = (at("weigh", 4), at("priceAll", 10), at("onTick", 17));
        // One physical frame at 0x2100 running `weigh` inlined into `priceAll`, called by an
        // interpreted `onTick` at 0x2200.
        let js = [
            named(0x2100, false, &weigh),
            named(0x2100, true, &price_all),
            named(0x2200, true, &on_tick),
        ];
        let frames = symbolizer.user(&[0x2100, 0x2200], &js);
        assert_eq!(frames, [weigh.clone(), price_all.clone(), on_tick.clone()]);
    }

    /// A symbolizer of this process with V8 code mapped at 0x2000-0x3000.
    fn with_v8_code() -> Symbolizer {
        let mut symbolizer = Symbolizer::new(std::process::id());
        let own_maps = fs::read_to_string("/proc/self/maps").unwrap();
        symbolizer.apply_maps(&parse_maps(&format!(
            "{own_maps}2000-3000 r-xp 00000000 00:00 0                          [anon:v8 code]\n"
        )));
        symbolizer.start_ticks = None; // keep these maps
        symbolizer
    }

    /// A named JS frame at `line`, column 1.
    fn at(name: &str, line: u32) -> Frame {
        Frame::js_at(name.to_owned(), None, Some((line, Some(1))))
    }

    fn named(pc: u64, ends_frame: bool, frame: &Frame) -> NamedJs<'_> {
        NamedJs {
            pc,
            ends_frame,
            frame,
        }
    }

    #[test]
    fn interpreted_frames_returning_to_one_trampoline_each_take_their_own_place() {
        let mut symbolizer = with_v8_code();
        let (leaf, inner, outer) = (at("leaf", 3), at("inner", 8), at("outer", 20));
        // `inner` and `outer` are interpreted: both return into the trampoline at 0x2200, with
        // a native frame (a function of this binary) between them. Each takes its own return
        // address's place.
        let js = [
            named(0x2100, true, &leaf),
            named(0x2200, true, &inner),
            named(0x2200, true, &outer),
        ];
        let native = Symbolizer::new as fn(u32) -> Symbolizer as usize as u64;
        let frames = symbolizer.user(&[0x2100, 0x2200, native + 1, 0x2200], &js);
        let names: Vec<&str> = frames.iter().map(|f| &*f.name).collect();
        assert_eq!(names.len(), 4, "{names:?}");
        assert_eq!((names[0], names[1], names[3]), ("leaf", "inner", "outer"));
        assert!(names[2].contains("Symbolizer"), "{names:?}");
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
        let names: Vec<&str> = frames.iter().map(|frame| frame.name.as_ref()).collect();
        assert_eq!(names.len(), 4, "{frames:?}");
        assert_eq!(frames[0], Frame::unnamed_js());
        assert!(names[1].contains("symbolize_test_marker"), "{frames:?}");
        assert_eq!(frames[2], Frame::unnamed_js());
        assert_eq!(
            frames[3],
            Frame::unknown(UNKNOWN.into(), FrameKind::Native),
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
        let names: Vec<&str> = frames.iter().map(|frame| frame.name.as_ref()).collect();
        assert_eq!(names.len(), 4, "{frames:?}");
        assert!(names[0].contains("symbolize_test_marker"), "{frames:?}");
        assert_eq!(frames[1], Frame::unnamed_js());
        assert!(names[2].contains("symbolize_test_marker"), "{frames:?}");
        assert_eq!(
            frames[3],
            Frame::unknown(UNKNOWN.into(), FrameKind::Native),
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
            assert_eq!(frames[0], Frame::unknown(UNKNOWN.into(), FrameKind::Native));
            assert_eq!(symbolizer.kernel(&garbage).len(), garbage.len());
            symbolizer.refresh();
        }
    }
}
