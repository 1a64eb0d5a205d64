//! The object files symbolizers name native frames from: each opened once (through the target's
//! root, so paths inside a container resolve) and kept open, so that its symbols stay reachable
//! after the target exits, even from a container or a deleted file; closed with the last
//! symbolizer that maps it. Shared by the symbolizers of a session with the blazesym instance
//! that parsed them.
//!
//! blazesym is handed only `/proc/self/fd/N` of a file opened safely here (see
//! [`crate::target::files`]), never a path it would resolve itself, and it maps that file:
//! a file the target can truncate is first copied into a sealed memfd, so that its truncation
//! cannot kill loopbpf with SIGBUS. Debug links (`.gnu_debuglink`, `.gnu_debugaltlink`,
//! `.debug_sup`) name files blazesym looks for in loopbpf's own filesystem, opened without
//! our checks: they are followed only for root's files the target cannot change, of a target
//! that sees loopbpf's filesystem. Any other file with a link is named from its ELF symbols
//! only (no DWARF).
//!
//! A trusted object whose separate debug file is installed by its build ID under
//! `/usr/lib/debug/.build-id` (a distribution's libc with libc6-dbg, a stripped libuv with
//! libuv1-dbgsym) is named from that debug file's ELF symbol table only, never its DWARF, and
//! from the object's own symbols where the debug file has none: its frames get the full
//! symbol table's names (`_int_malloc`, `__GI___libc_malloc`) but no file and line. libc's
//! DWARF cost far more than its lines are worth to a user, who cannot change libc: with it, a
//! fleet of 50 node processes held 10 MB of decompressed DWARF and the 4 MB debug file
//! mapped, and naming every 37th byte of libc's code took 156 ms and 47 MB of heap, against
//! 18 ms and 4.5 MB from the symbol table (blazesym 0.2.7), which named every address DWARF
//! did. An object with DWARF inside itself (node's binary: libuv's lines) keeps it. The debug
//! file's own program headers give no file offsets (`objcopy --only-keep-debug` empties its
//! segments), so the object's file offsets are turned into link-time addresses from the
//! object's own segments first.
//!
//! Named frames are cached here by object and file offset, for every process that maps the
//! object: a fleet of processes of one binary asks blazesym once per address of the binary,
//! not once per process. What blazesym parsed of an object (its symbol index, its DWARF, the
//! file mapped in) is dropped when no lookup has needed it for [`PARSED_IDLE`], and parsed
//! again if one does.

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    fs::File,
    hash::Hash,
    os::fd::AsRawFd,
    path::PathBuf,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer as Blazesym,
    evict::{Elf as EvictElf, Evict},
    source::{Elf, Source},
};

use object::{Object, read::ReadCache};

use super::{
    frame::{Frame, FrameKind, VDSO},
    kernel::KernelSymbols,
    symbolize::frame_from_sym,
};
use crate::target::{
    files::{MAX_OBJECT, MAX_OBJECT_COPY, Refused, Segment, sealed_copy, segments},
    maps::{Device, MapsEntry},
    proc::Process,
};

/// Whether DWARF is consulted for the file and line of native frames, of objects that carry it
/// themselves (a separate debug file is read for its symbols only: see the module doc).
/// Measured on node 20's 100 MB binary (DWARF for libuv and a few more): the first lookup,
/// which parses the ELF symbols, takes about 8 ms in release (300 ms in debug) with or without
/// it, so lines are worth having. libc's DWARF from libc6-dbg cost 50 ms once and 10 MB kept.
pub(super) const NATIVE_LINE_INFO: bool = true;

/// What blazesym parsed of an object (and the kernel's symbols) is dropped when no lookup has
/// needed it for this long. Parsing again costs about 8 ms for node's symbols and under 20 ms
/// for libc's debug symbols (libc6-dbg); the named frames are cached, so a fleet whose stacks
/// repeat stops asking within a minute or so, and a new address at most every this often costs
/// 0.2% of a core at worst.
pub(super) const PARSED_IDLE: Duration = Duration::from_secs(30);

/// Idle parsed objects are looked for at most this often.
const EVICT_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Named frames cached, of objects and of the kernel each: a hostile target with endless
/// distinct addresses costs lookups again, never memory. About 300 bytes each.
pub(super) const MAX_CACHED_FRAMES: usize = 16_384;

/// The key of a vDSO frame in [`NativeObjects::frames`]: no object has it.
pub(super) const VDSO_OBJECT: u64 = 0;

/// The object files symbolizers have opened and what blazesym parsed of them, shared by the
/// symbolizers of one session: processes that run the same binary (fleet mode watches many)
/// parse its symbols and line tables once, not once each.
#[derive(Clone)]
pub struct SharedObjects(pub(super) Rc<RefCell<NativeObjects>>);

pub(super) struct NativeObjects {
    pub(super) blazesym: Blazesym,
    pub(super) objects: Objects,
    /// The next symbolizer's `user`.
    pub(super) next_user: u64,
    /// Named frames by object ([`MappedObject::id`], or [`VDSO_OBJECT`]) and file offset.
    pub(super) frames: HashMap<(u64, u64), Frame>,
    pub(super) kernel: KernelSymbols,
    /// When idle parsed objects were last looked for.
    evict_checked_at: Instant,
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
            frames: HashMap::new(),
            kernel: KernelSymbols::default(),
            evict_checked_at: Instant::now(),
        })))
    }

    /// Drops what blazesym parsed of objects (and of the kernel) that no lookup has needed for
    /// [`PARSED_IDLE`]; looks at most every [`EVICT_CHECK_EVERY`].
    pub(super) fn evict_idle(&self) {
        let mut native = self.0.borrow_mut();
        if native.evict_checked_at.elapsed() < EVICT_CHECK_EVERY {
            return;
        }
        native.evict_checked_at = Instant::now();
        native.evict_idle_for(PARSED_IDLE);
    }
}

impl NativeObjects {
    /// Drops what blazesym parsed of objects (and of the kernel) that no lookup has needed
    /// for `idle`.
    pub(super) fn evict_idle_for(&mut self, idle: Duration) {
        let NativeObjects {
            blazesym,
            objects,
            kernel,
            ..
        } = self;
        let mut evicted = kernel.evict_idle(idle);
        for object in &mut objects.list {
            if object.asked_at.is_some_and(|at| at.elapsed() >= idle) {
                object.evict(blazesym);
                evicted = true;
            }
        }
        if evicted {
            crate::target::freed_much();
        }
    }

    /// The frame at `file_offset` of object `index` (an index into [`Objects::list`]); `None`
    /// when no symbol covers it. Asks blazesym only for an offset not named before.
    pub(super) fn object_frame(&mut self, index: usize, file_offset: u64) -> Option<Frame> {
        let object = &mut self.objects.list[index];
        if let Some(frame) = self.frames.get(&(object.id, file_offset)) {
            return Some(frame.clone());
        }
        object.asked_at = Some(Instant::now());
        for source in &object.sources {
            let input = match &source.segments {
                None => Input::FileOffset(file_offset),
                Some(segments) => match virt_offset(segments, file_offset) {
                    Some(offset) => Input::VirtOffset(offset),
                    None => continue,
                },
            };
            let mut elf = Elf::new(&source.path);
            elf.debug_syms = source.debug_syms;
            match self.blazesym.symbolize_single(&Source::Elf(elf), input) {
                Ok(Symbolized::Sym(sym)) => {
                    let frame = frame_from_sym(sym, &object.module, FrameKind::Native);
                    remember(&mut self.frames, (object.id, file_offset), frame.clone());
                    return Some(frame);
                }
                // Not in this source's symbols (or it cannot be opened, or is no ELF file):
                // the next one may know it.
                Ok(Symbolized::Unknown(_)) | Err(_) => {}
            }
        }
        None
    }

    /// Caches `frame` as the frame at `file_offset` of object `index` (or of the vDSO).
    pub(super) fn remember_frame(&mut self, index: Option<usize>, file_offset: u64, frame: Frame) {
        let id = index.map_or(VDSO_OBJECT, |index| self.objects.list[index].id);
        remember(&mut self.frames, (id, file_offset), frame);
    }

    /// The cached frame of the vDSO at `offset`.
    pub(super) fn vdso_frame(&self, offset: u64) -> Option<Frame> {
        self.frames.get(&(VDSO_OBJECT, offset)).cloned()
    }

    /// Closes the objects that only `user` mapped: see [`Objects::release`].
    pub(super) fn release(&mut self, user: u64) {
        let closed = self.objects.release(user, &mut self.blazesym);
        if !closed.is_empty() {
            self.frames.retain(|(id, _), _| !closed.contains(id));
        }
    }
}

/// Inserts into a cache of at most [`MAX_CACHED_FRAMES`]: a full one starts over.
pub(super) fn remember<K: Eq + Hash>(cache: &mut HashMap<K, Frame>, key: K, frame: Frame) {
    if cache.len() >= MAX_CACHED_FRAMES {
        cache.clear();
        cache.shrink_to_fit();
    }
    cache.insert(key, frame);
}

/// The executable objects the targets have mapped, each opened once, and closed when the last
/// symbolizer that mapped it is dropped.
#[derive(Default)]
pub(super) struct Objects {
    pub(super) list: Vec<MappedObject>,
    /// By device, inode and path: the same path in two containers may be two files.
    by_file: HashMap<(Device, u64), usize>,
    /// Entries of `list` closed, to be used again.
    free: Vec<usize>,
    /// The last [`MappedObject::id`] given.
    last_id: u64,
}

#[derive(Default)]
pub(super) struct MappedObject {
    /// Never given to another object, unlike its index in [`Objects::list`]: keys its frames.
    pub(super) id: u64,
    /// Basename, as frames show it.
    pub(super) module: Arc<str>,
    /// Where blazesym names it from, best first: its separate debug file, then the file itself.
    pub(super) sources: Vec<SymbolSource>,
    /// Keep the object and its debug file reachable through `/proc/self/fd` after the target
    /// exits.
    _files: Vec<File>,
    /// Symbolizers that mapped it.
    users: HashSet<u64>,
    key: (Device, u64),
    /// When blazesym was last asked about it; `None` when nothing parsed of it is held.
    asked_at: Option<Instant>,
}

/// A file blazesym names an object's frames from.
pub(super) struct SymbolSource {
    /// `/proc/self/fd/N`.
    pub(super) path: PathBuf,
    /// Whether blazesym may read its DWARF (and follow its debug links).
    pub(super) debug_syms: bool,
    /// For a separate debug file: the object's own loadable segments, which turn the object's
    /// file offsets into the link-time addresses the debug file's symbols have (its own program
    /// headers give no such file offsets: `objcopy --only-keep-debug` empties its segments).
    pub(super) segments: Option<Vec<Segment>>,
}

/// The link-time address at `file_offset` of an object with these loadable segments.
fn virt_offset(segments: &[Segment], file_offset: u64) -> Option<u64> {
    segments
        .iter()
        .find(|(offset, size, _)| (*offset..offset.saturating_add(*size)).contains(&file_offset))
        .map(|(offset, _, address)| address.wrapping_add(file_offset - offset))
}

impl MappedObject {
    /// Drops what blazesym parsed of it.
    fn evict(&mut self, blazesym: &mut Blazesym) {
        for source in &self.sources {
            let _ = blazesym.evict(&Evict::Elf(EvictElf::new(&source.path)));
        }
        self.asked_at = None;
    }
}

/// What a region of a snapshot maps.
pub(super) enum Mapping {
    /// An executable file mapping: index into [`Objects::list`].
    Object(usize),
    Vdso,
    /// No path, or `[anon:...]`: V8's code space and heap.
    Anonymous,
    /// Anything else (`[stack]`, `[heap]`, data-only file mappings): never code. Its module name.
    Other(Arc<str>),
}

impl Objects {
    /// Closes the objects that only `user` mapped, and what blazesym read of them: in fleet
    /// mode, an upgraded service's old binary must not stay open (its disk space, its symbols
    /// in memory) once its last process is gone. Returns the ids of those closed.
    fn release(&mut self, user: u64, blazesym: &mut Blazesym) -> Vec<u64> {
        let mut closed = Vec::new();
        for (index, object) in self.list.iter_mut().enumerate() {
            if !object.users.remove(&user) || !object.users.is_empty() {
                continue;
            }
            // Evicted before the file closes: its `/proc/self/fd` path names the next file
            // opened under that descriptor.
            object.evict(blazesym);
            closed.push(object.id);
            self.by_file.remove(&object.key);
            *object = MappedObject::default();
            self.free.push(index);
        }
        closed
    }

    /// What `line` of `process`'s maps maps, for symbolizer `user`: an executable file is
    /// opened now unless it is open already.
    pub(super) fn mapping(&mut self, process: &Process, user: u64, line: &MapsEntry) -> Mapping {
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
        // An inode is not reused while the object holds its file open, so a later file with
        // this key is this file. (An object whose file could not be opened holds nothing and
        // names nothing: a later file on its inode stays unnamed until its users are gone.)
        let key = (line.dev, line.inode);
        if let Some(&object) = self.by_file.get(&key) {
            self.list[object].users.insert(user);
            return Mapping::Object(object);
        }
        let (sources, files) = match open_mapped_file(process, line) {
            Some((file, trusts_links)) => symbol_sources(process, path, file, trusts_links),
            None => (Vec::new(), Vec::new()),
        };
        self.last_id += 1;
        let object = MappedObject {
            id: self.last_id,
            module: module.into(),
            sources,
            _files: files,
            users: HashSet::from([user]),
            key,
            asked_at: None,
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

/// Where the frames of `file` (mapped at `path` in `process`) are named from, and the files
/// to keep open for that: for a file whose debug links loopbpf follows (`trusts_links`) and
/// that has no DWARF of its own, the symbol table of its separate debug file when one is
/// installed by its build ID, without the debug file's DWARF (see the module doc), then the
/// file itself (without DWARF when it links a debug file); else the file itself, with DWARF
/// when it links no other file or its links are trusted.
fn symbol_sources(
    process: &Process,
    path: &str,
    file: File,
    trusts_links: bool,
) -> (Vec<SymbolSource>, Vec<File>) {
    let fd_path = |file: &File| PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let (debug_file, links_no_file) = {
        let cache = ReadCache::new(&file);
        match object::File::parse(&cache) {
            Ok(elf) => {
                // An object with DWARF of its own (node's: libuv's lines) keeps its lines.
                let own_dwarf = elf.section_by_name(".debug_info").is_some();
                let debug_file = if trusts_links && !own_dwarf {
                    crate::discover::debug_file(&elf).map(|debug| (debug, segments(&elf)))
                } else {
                    None
                };
                (debug_file, links_no_file(&elf))
            }
            Err(_) => (None, false),
        }
    };
    let debug_syms = NATIVE_LINE_INFO
        && if links_no_file || (trusts_links && debug_file.is_none()) {
            true
        } else {
            if !trusts_links {
                DEBUG_LINKS_NOT_FOLLOWED.fetch_add(1, Ordering::Relaxed);
                note!(
                    "{path} of pid {}: its debug link is not followed (the target could plant the file it names); its frames are named without file and line",
                    process.pid()
                );
            }
            false
        };
    let mut sources = Vec::with_capacity(2);
    let mut files = Vec::with_capacity(2);
    if let Some((debug, segments)) = debug_file {
        sources.push(SymbolSource {
            path: fd_path(&debug),
            debug_syms: false,
            segments: Some(segments),
        });
        files.push(debug);
    }
    sources.push(SymbolSource {
        path: fd_path(&file),
        debug_syms,
        segments: None,
    });
    files.push(file);
    (sources, files)
}

/// Opens the file behind a mapping for blazesym to map: the file itself when the target cannot
/// change it, else a sealed copy of it (at most [`MAX_OBJECT_COPY`] bytes; a larger one is not
/// named, with a warning). With it, whether its debug links may be followed.
fn open_mapped_file(process: &Process, line: &MapsEntry) -> Option<(File, bool)> {
    let file = process.open_mapped(line, MAX_OBJECT).ok()?;
    let meta = file.metadata().ok()?;
    // Unknown (the target is gone, or its status unreadable): assume it can.
    if let Some(writer) = process.writer()
        && !writer.can_write(&meta)
    {
        // Where blazesym looks for the debug file: next to the path this descriptor resolves to.
        let trusts_links = writer.trusts_links(&meta)
            && std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
                .is_ok_and(|path| path.is_absolute() && writer.trusts_link_dirs(&path));
        return Some((file, trusts_links));
    }
    if meta.len() > MAX_OBJECT_COPY {
        let too_large = Refused::TooLarge {
            len: meta.len(),
            max: MAX_OBJECT_COPY,
        };
        warning!(
            "{} of pid {} not named: the target can change it and it is {too_large}",
            line.file_path(),
            process.pid()
        );
        return None;
    }
    Some((sealed_copy(&file, MAX_OBJECT_COPY).ok()?, false))
}

/// Objects whose debug links were not followed because the target could plant what they name.
static DEBUG_LINKS_NOT_FOLLOWED: AtomicU64 = AtomicU64::new(0);

/// How many objects were named without their debug files (file and line) for that reason.
pub fn debug_links_not_followed() -> u64 {
    DEBUG_LINKS_NOT_FOLLOWED.load(Ordering::Relaxed)
}

/// Whether an ELF file names no other file for blazesym to read debug information from.
fn links_no_file<'data, R: object::ReadRef<'data>>(elf: &object::File<'data, R>) -> bool {
    const LINKS: [&str; 3] = [".gnu_debuglink", ".gnu_debugaltlink", ".debug_sup"];
    LINKS.iter().all(|name| elf.section_by_name(name).is_none())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::naming::symbolize::Symbolizer;

    #[inline(never)]
    fn objects_test_marker() -> u64 {
        std::hint::black_box(43)
    }

    #[test]
    fn objects_are_closed_with_the_last_symbolizer_that_mapped_them() {
        let addr = objects_test_marker as fn() -> u64 as usize as u64;
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
        assert!(frames[0].name.contains("objects_test_marker"), "{frames:?}");
    }

    #[test]
    fn a_frame_is_named_once_for_every_process_and_the_same_after_its_object_is_evicted() {
        let addr = objects_test_marker as fn() -> u64 as usize as u64;
        let shared = SharedObjects::new();
        let parsed = || {
            let native = shared.0.borrow();
            let asked = native.objects.list.iter().filter(|o| o.asked_at.is_some());
            (asked.count(), native.frames.len())
        };
        let mut first = Symbolizer::sharing(std::process::id(), &shared);
        let mut second = Symbolizer::sharing(std::process::id(), &shared);
        let named = first.user(&[addr + 1], &[]);
        assert!(named[0].name.contains("objects_test_marker"), "{named:?}");
        assert!(named[0].line.is_some(), "{named:?}");
        assert_eq!(parsed(), (1, 1), "one object asked, one frame named");
        assert_eq!(second.user(&[addr + 1], &[]), named);
        assert_eq!(parsed(), (1, 1), "named once for both");

        // Idle: what blazesym parsed is dropped; the named frame stays.
        shared.0.borrow_mut().evict_idle_for(Duration::ZERO);
        assert_eq!(parsed(), (0, 1));
        assert_eq!(second.user(&[addr + 1], &[]), named);
        assert_eq!(parsed(), (0, 1), "a cached frame asks nothing");
        // Parsed again: the same frame, file and line.
        shared.0.borrow_mut().frames.clear();
        assert_eq!(first.user(&[addr + 1], &[]), named);
        assert_eq!(parsed(), (1, 1));

        // A closed object's frames go with it.
        drop((first, second));
        assert_eq!(parsed(), (0, 0));
    }

    /// Where libc is mapped in this process, its file, and its debug file's symbols by name
    /// (versioned names under their plain name too).
    fn libc_and_its_debug_symbols() -> (u64, String, HashMap<String, (u64, u64)>) {
        let malloc_addr = libc::malloc as *const () as usize as u64;
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let libc_path = maps
            .lines()
            .find_map(|line| {
                let (range, rest) = line.split_once(' ')?;
                let (start, end) = range.split_once('-')?;
                let start = u64::from_str_radix(start, 16).ok()?;
                let end = u64::from_str_radix(end, 16).ok()?;
                let path = rest.split_whitespace().nth(4)?;
                (start..end).contains(&malloc_addr).then(|| path.to_owned())
            })
            .expect("malloc is in a mapped file");
        let data = std::fs::read(&libc_path).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let debug = crate::discover::debug_file(&elf).unwrap_or_else(|| {
            panic!("no debug file of {libc_path} under /usr/lib/debug/.build-id: install libc6-dbg (scripts/install-deps.sh does)")
        });
        let debug = std::fs::read(
            std::fs::read_link(format!("/proc/self/fd/{}", debug.as_raw_fd())).unwrap(),
        )
        .unwrap();
        let debug = object::File::parse(&*debug).unwrap();
        let mut symbols = HashMap::new();
        for sym in object::Object::symbols(&debug) {
            use object::ObjectSymbol;
            let Ok(name) = sym.name() else { continue };
            if sym.kind() != object::SymbolKind::Text || sym.size() == 0 {
                continue;
            }
            let plain = name.split('@').next().unwrap_or(name);
            symbols
                .entry(plain.to_owned())
                .or_insert((sym.address(), sym.size()));
        }
        let base = malloc_addr - symbols["malloc"].0;
        (base, libc_path, symbols)
    }

    #[test]
    fn libc_frames_are_named_from_its_debug_files_symbols_without_dwarf() {
        let (base, libc_path, symbols) = libc_and_its_debug_symbols();
        let shared = SharedObjects::new();
        let mut symbolizer = Symbolizer::sharing(std::process::id(), &shared);
        for function in [
            "malloc",
            "epoll_wait",
            "read",
            "pthread_cond_wait",
            "_int_malloc",
        ] {
            let &(start, size) = symbols
                .get(function)
                .unwrap_or_else(|| panic!("{function} is not in libc's debug symbols"));
            let addrs: Vec<u64> = [1, size / 2, size - 1]
                .iter()
                .map(|inside| base + start + inside)
                .collect();
            let frames = symbolizer.user(&addrs, &[]);
            let names: HashSet<&str> = frames.iter().map(|f| f.name.as_ref()).collect();
            assert_eq!(names.len(), 1, "{function}: one name, {frames:?}");
            let name = frames[0].name.as_ref();
            assert!(
                name.contains(function)
                    && !name.contains('@')
                    && name != super::super::frame::UNKNOWN,
                "{function} named {name}"
            );
            for frame in &frames {
                assert_eq!(&*frame.module, "libc.so.6", "{frame:?}");
                // No DWARF of libc was read: its frames carry no file and line.
                assert_eq!((&frame.file, frame.line), (&None, None), "{frame:?}");
            }
        }
        // Every function of libc is named, none with a symbol version (many of its symbols have
        // one: `pthread_cond_wait@@GLIBC_2.3.2`) or a file and line.
        for (function, (start, _)) in &symbols {
            // A leaf: looked up at the address itself, not the one before it.
            let frame = &symbolizer.user(&[base + start], &[])[0];
            assert!(
                &*frame.module == "libc.so.6"
                    && !frame.name.contains('@')
                    && &*frame.name != super::super::frame::UNKNOWN
                    && frame.line.is_none(),
                "{function} at {start:#x}: {frame:?}"
            );
        }
        assert!(symbols.len() > 1000, "{} functions", symbols.len());
        // Named from the debug file first, libc itself only as a fallback, neither with DWARF.
        let native = shared.0.borrow();
        let libc = native
            .objects
            .list
            .iter()
            .find(|o| libc_path.ends_with(&format!("/{}", o.module)))
            .expect("libc is open");
        assert_eq!(libc.sources.len(), 2);
        assert!(libc.sources.iter().all(|source| !source.debug_syms));
        assert!(libc.sources[0].segments.is_some());
    }

    #[test]
    fn file_offsets_become_link_time_addresses_by_the_objects_segments() {
        // A non-PIE executable's text (file offset 0x1000 at 0x401000) and data.
        let segments = [
            (0, 0x800, 0x400_000),
            (0x1000, 0x500, 0x401_000),
            (0x2000, 0x100, 0x403_000),
        ];
        assert_eq!(virt_offset(&segments, 0x1010), Some(0x401_010));
        assert_eq!(virt_offset(&segments, 0x2000), Some(0x403_000));
        assert_eq!(virt_offset(&segments, 0x0fff), None, "between segments");
        assert_eq!(virt_offset(&segments, 0x1500), None, "past the text's end");
        assert_eq!(
            virt_offset(&[(u64::MAX - 1, 0x10, 0)], u64::MAX - 1),
            Some(0)
        );
    }

    #[test]
    fn a_full_frame_cache_starts_over() {
        let mut cache = HashMap::new();
        for key in 0..MAX_CACHED_FRAMES {
            remember(&mut cache, key, Frame::unnamed_js());
        }
        assert_eq!(cache.len(), MAX_CACHED_FRAMES);
        remember(&mut cache, MAX_CACHED_FRAMES, Frame::unnamed_js());
        assert_eq!(cache.len(), 1);
        assert!(cache.contains_key(&MAX_CACHED_FRAMES));
    }
}
