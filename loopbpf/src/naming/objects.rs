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
//! that sees loopbpf's filesystem (a distribution's libc and its `/usr/lib/debug` file). Any
//! other file with a link is named from its ELF symbols only (no DWARF).

use std::{
    cell::RefCell,
    collections::{HashMap, HashSet},
    fs::File,
    os::fd::AsRawFd,
    path::PathBuf,
    rc::Rc,
    sync::atomic::{AtomicU64, Ordering},
};

use blazesym::symbolize::{
    Symbolizer as Blazesym,
    evict::{Elf as EvictElf, Evict},
};

use object::{Object, read::ReadCache};

use super::frame::VDSO;
use crate::target::{
    files::{MAX_OBJECT, MAX_OBJECT_COPY, Refused, sealed_copy},
    maps::MapsEntry,
    proc::Process,
};

/// Whether DWARF is consulted for the file and line of native frames. Measured on node 20's
/// 100 MB binary (DWARF for libuv and a few more): the first lookup, which parses the ELF symbols,
/// takes about 8 ms in release (300 ms in debug) with or without it, so lines are worth having.
/// A library with a large separate debug file costs more once (libc with libc6-dbg: 50 ms).
pub(super) const NATIVE_LINE_INFO: bool = true;

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

/// The executable objects the targets have mapped, each opened once, and closed when the last
/// symbolizer that mapped it is dropped.
#[derive(Default)]
pub(super) struct Objects {
    pub(super) list: Vec<MappedObject>,
    /// By device, inode and path: the same path in two containers may be two files.
    by_file: HashMap<(String, u64, String), usize>,
    /// Entries of `list` closed, to be used again.
    free: Vec<usize>,
}

#[derive(Default)]
pub(super) struct MappedObject {
    /// Basename, as frames show it.
    pub(super) module: String,
    /// Paths handed to blazesym, best first.
    pub(super) sources: Vec<PathBuf>,
    /// Whether blazesym may read DWARF of it: it links no other file.
    pub(super) debug_syms: bool,
    /// Keeps the object reachable through `/proc/self/fd` after the target exits.
    _file: Option<File>,
    /// Symbolizers that mapped it.
    users: HashSet<u64>,
    key: (String, u64, String),
}

/// What a region of a snapshot maps.
pub(super) enum Mapping {
    /// An executable file mapping: index into [`Objects::list`].
    Object(usize),
    Vdso,
    /// No path, or `[anon:...]`: V8's code space and heap.
    Anonymous,
    /// Anything else (`[stack]`, `[heap]`, data-only file mappings): never code. Its module name.
    Other(Rc<str>),
}

impl Objects {
    /// Closes the objects that only `user` mapped, and what blazesym read of them: in fleet
    /// mode, an upgraded service's old binary must not stay open (its disk space, its symbols
    /// in memory) once its last process is gone.
    pub(super) fn release(&mut self, user: u64, blazesym: &mut Blazesym) {
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
        let key = (line.dev.clone(), line.inode, path.to_owned());
        if let Some(&object) = self.by_file.get(&key) {
            self.list[object].users.insert(user);
            return Mapping::Object(object);
        }
        let (file, trusts_links) = open_mapped_file(process, line).unzip();
        let debug_syms = NATIVE_LINE_INFO
            && match &file {
                Some(_) if trusts_links == Some(true) => true,
                Some(file) if links_no_file(file) => true,
                Some(_) => {
                    DEBUG_LINKS_NOT_FOLLOWED.fetch_add(1, Ordering::Relaxed);
                    note!(
                        "{path} of pid {}: its debug link is not followed (the target could plant the file it names); its frames are named without file and line",
                        process.pid()
                    );
                    false
                }
                None => false,
            };
        let sources = file
            .iter()
            .map(|file| PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd())))
            .collect();
        let object = MappedObject {
            module: module.to_owned(),
            sources,
            debug_syms,
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
fn links_no_file(file: &File) -> bool {
    const LINKS: [&str; 3] = [".gnu_debuglink", ".gnu_debugaltlink", ".debug_sup"];
    let cache = ReadCache::new(file);
    object::File::parse(&cache)
        .is_ok_and(|elf| LINKS.iter().all(|name| elf.section_by_name(name).is_none()))
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
}
