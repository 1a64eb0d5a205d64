//! A target's files: the identity of a mapped file across mount namespaces, what was read of
//! each file (shared by every process that maps it), and the ELF facts read from them.

use std::{cell::RefCell, collections::HashMap, fs::File, mem::size_of, path::Path, rc::Rc};

use object::{Object, read::ReadCache};

/// A file as `/proc/PID/maps` names it across mount namespaces: device and inode.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId {
    pub dev: String,
    pub inode: u64,
}

/// Bytes a [`FileCache`] keeps: room for the unwind tables of hundreds of distinct binaries
/// (node's own `.eh_frame` and its header are a few MiB).
pub const MAX_FILE_CACHE_BYTES: usize = 512 << 20;

/// What a value read of a file keeps, to bound a [`FileCache`] in bytes.
pub trait Weigh {
    fn heap_bytes(&self) -> usize;
}

/// What was read of object files (unwind tables, V8 metadata), by file, shared by the stages of
/// every watched process: processes that map the same file (fleet mode watches many nodes of
/// one binary) have it read once. Bounded in bytes: past [`MAX_FILE_CACHE_BYTES`], what no
/// process uses is dropped, and a file that still does not fit is not read (counted).
pub struct FileCache<T>(Rc<RefCell<Cached<T>>>);

struct Cached<T> {
    files: HashMap<FileId, Option<(Rc<T>, usize)>>,
    bytes: usize,
    max_bytes: usize,
    refused: u64,
}

impl<T: Weigh> FileCache<T> {
    pub fn new() -> Self {
        Self::with_max_bytes(MAX_FILE_CACHE_BYTES)
    }

    fn with_max_bytes(max_bytes: usize) -> Self {
        Self(Rc::new(RefCell::new(Cached {
            files: HashMap::new(),
            bytes: 0,
            max_bytes,
            refused: 0,
        })))
    }

    /// Files not kept (so not used) because the cache was full of files in use.
    #[cfg(test)]
    pub fn refused(&self) -> u64 {
        self.0.borrow().refused
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
        if let Some(known) = self.0.borrow().files.get(file) {
            return known.as_ref().map(|(value, _)| Rc::clone(value));
        }
        let Some(value) = read() else {
            if File::open(path).is_ok() {
                self.0.borrow_mut().files.insert(file.clone(), None);
            }
            return None;
        };
        let bytes = value.heap_bytes() + size_of::<T>() + 64;
        if self.0.borrow().bytes + bytes > self.0.borrow().max_bytes {
            self.prune();
        }
        let mut cached = self.0.borrow_mut();
        if cached.bytes + bytes > cached.max_bytes {
            cached.refused += 1;
            warning!(
                "{}: not used for naming: what was read of files in use is over {} MiB",
                path.display(),
                cached.max_bytes >> 20
            );
            return None;
        }
        cached.bytes += bytes;
        let value = Rc::new(value);
        cached
            .files
            .insert(file.clone(), Some((Rc::clone(&value), bytes)));
        Some(value)
    }

    /// Forgets what no process uses any more (fleet mode: binaries of services upgraded or
    /// gone), and what could not be read.
    pub fn prune(&self) {
        let mut cached = self.0.borrow_mut();
        let mut freed = 0;
        cached.files.retain(|_, value| match value {
            Some((v, _)) if Rc::strong_count(v) > 1 => true,
            Some((_, bytes)) => {
                freed += *bytes;
                false
            }
            None => false,
        });
        cached.bytes -= freed;
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

#[cfg(test)]
mod tests {
    use super::*;

    impl Weigh for Vec<u8> {
        fn heap_bytes(&self) -> usize {
            self.len()
        }
    }

    #[test]
    fn a_file_cache_stays_within_its_bytes() {
        let cache = FileCache::<Vec<u8>>::with_max_bytes(10_000);
        let id = |inode| FileId {
            dev: "08:01".into(),
            inode,
        };
        let here = Path::new("/proc/self/exe");
        let a = cache.get_or_read(&id(1), here, || Some(vec![0; 6000]));
        assert!(a.is_some());
        // In use, so kept: the next one does not fit and is not read into it.
        assert!(
            cache
                .get_or_read(&id(2), here, || Some(vec![0; 6000]))
                .is_none()
        );
        assert_eq!(cache.refused(), 1);
        // Once nobody uses the first, it makes room.
        drop(a);
        assert!(
            cache
                .get_or_read(&id(2), here, || Some(vec![0; 6000]))
                .is_some()
        );
        assert!(cache.0.borrow().bytes <= 10_000);
        assert!(!cache.0.borrow().files.contains_key(&id(1)));
    }
}
