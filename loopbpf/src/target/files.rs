//! A target's files: the identity of a mapped file across mount namespaces, what was read of
//! each file (shared by every process that maps it), and the ELF facts read from them.

use std::{cell::RefCell, collections::HashMap, fs::File, path::Path, rc::Rc};

use object::{Object, read::ReadCache};

/// A file as `/proc/PID/maps` names it across mount namespaces: device and inode.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId {
    pub dev: String,
    pub inode: u64,
}

/// What was read of object files (unwind tables, V8 metadata), by file, shared by the stages of
/// every watched process: processes that map the same file (fleet mode watches many nodes of
/// one binary) have it read once.
pub struct FileCache<T>(Rc<RefCell<HashMap<FileId, Option<Rc<T>>>>>);

impl<T> FileCache<T> {
    pub fn new() -> Self {
        Self(Rc::default())
    }

    /// What was read of `file` (opened as `path`), reading it now if it was not yet. Nothing
    /// is remembered of a file that could not be opened: its process may have exited
    /// mid-read, and the next one that maps the file must still find what is in it.
    pub fn get_or_read(
        &self,
        file: &FileId,
        path: &Path,
        read: impl FnOnce() -> Option<T>,
    ) -> Option<Rc<T>> {
        if let Some(known) = self.0.borrow().get(file) {
            return known.clone();
        }
        let value = read().map(Rc::new);
        if value.is_some() || File::open(path).is_ok() {
            self.0.borrow_mut().insert(file.clone(), value.clone());
        }
        value
    }

    /// Forgets what no process uses any more (fleet mode: binaries of services upgraded or
    /// gone), and what could not be read.
    pub fn prune(&self) {
        self.0
            .borrow_mut()
            .retain(|_, value| value.as_ref().is_some_and(|v| Rc::strong_count(v) > 1));
    }
}

impl<T> Clone for FileCache<T> {
    fn clone(&self) -> Self {
        Self(Rc::clone(&self.0))
    }
}

/// Where a loadable segment of an ELF file is: (file offset, file size, link-time address).
pub type Segment = (u64, u64, u64);

/// The loadable segments of an ELF file.
pub fn segments<'data, R: object::ReadRef<'data>>(elf: &object::File<'data, R>) -> Vec<Segment> {
    use object::ObjectSegment;
    elf.segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset, size, s.address())
        })
        .collect()
}

/// How far a mapped object sits from its link-time addresses, from its segments: the mapping
/// at `start` holds the file from `offset` on.
pub fn bias_of(segments: &[Segment], start: u64, offset: u64) -> Option<u64> {
    let &(segment_offset, _, address) = segments
        .iter()
        .find(|(file_offset, size, _)| (*file_offset..file_offset + size).contains(&offset))?;
    Some(start.wrapping_sub(address + (offset - segment_offset)))
}

pub fn open_elf(path: &Path) -> Option<ReadCache<File>> {
    File::open(path).ok().map(ReadCache::new)
}
