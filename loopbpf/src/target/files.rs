//! A target's files: the identity of a mapped file across mount namespaces, what was read of
//! each file (shared by every process that maps it), and the ELF facts read from them.

use std::{
    cell::RefCell, collections::HashMap, fs::File, os::unix::fs::MetadataExt, path::Path, rc::Rc,
    time::UNIX_EPOCH,
};

use object::{Object, read::ReadCache};

/// A file as `/proc/PID/maps` names it across mount namespaces: device and inode, and, once
/// the file was opened, its [`FileStamp`]: an inode number freed and given to a new file is
/// then another identity, and nothing read of the old file is taken for the new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId {
    pub dev: String,
    pub inode: u64,
    /// `None` until the file is opened ([`FileId::stamped`]).
    pub stamp: Option<FileStamp>,
}

impl FileId {
    /// This id with the stamp of `file`, the file it names, opened.
    pub fn stamped(&self, file: &File) -> Option<Self> {
        Some(Self {
            stamp: Some(FileStamp::of(file)?),
            ..self.clone()
        })
    }
}

/// What tells a file apart from a later one with its inode number, from fstat of the open file:
/// its birth time (no process can set it; where the filesystem keeps none, the inode's change
/// time), its modification time and its size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileStamp {
    /// Nanoseconds since 1970 of the birth time, or of the change time (`born` false).
    pub born_ns: i128,
    pub born: bool,
    pub modified_ns: i128,
    pub size: u64,
}

impl FileStamp {
    pub fn of(file: &File) -> Option<Self> {
        let meta = file.metadata().ok()?;
        let ns = |sec: i64, nsec: i64| i128::from(sec) * 1_000_000_000 + i128::from(nsec);
        let birth = meta
            .created()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| i128::try_from(d.as_nanos()).unwrap_or(i128::MAX));
        Some(Self {
            born_ns: birth.unwrap_or_else(|| ns(meta.ctime(), meta.ctime_nsec())),
            born: birth.is_some(),
            modified_ns: ns(meta.mtime(), meta.mtime_nsec()),
            size: meta.size(),
        })
    }
}

/// What was read of object files (unwind tables, V8 metadata), by file, shared by the stages of
/// every watched process: processes that map the same file (fleet mode watches many nodes of
/// one binary) have it read once.
pub struct FileCache<T>(Rc<RefCell<HashMap<FileId, Option<Rc<T>>>>>);

impl<T> FileCache<T> {
    pub fn new() -> Self {
        Self(Rc::default())
    }

    /// What was read of `file` (opened as `path`), reading it now if it was not yet: what is
    /// known of it is reused only if the file opened now has the stamp of the one read then.
    /// Nothing is remembered of a file that could not be opened: its process may have exited
    /// mid-read, and the next one that maps the file must still find what is in it.
    pub fn get_or_read(
        &self,
        file: &FileId,
        path: &Path,
        read: impl FnOnce() -> Option<T>,
    ) -> Option<Rc<T>> {
        let Some(file) = File::open(path)
            .ok()
            .and_then(|opened| file.stamped(&opened))
        else {
            return read().map(Rc::new);
        };
        if let Some(known) = self.0.borrow().get(&file) {
            return known.clone();
        }
        let value = read().map(Rc::new);
        self.0.borrow_mut().insert(file, value.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("loopbpf-files-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_file_with_the_same_inode_and_another_stamp_is_read_again() {
        let path = scratch("stamp");
        std::fs::write(&path, b"old").unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        let id = FileId {
            dev: "00:00".into(),
            inode,
            stamp: None,
        };
        let cache = FileCache::new();
        let first = cache.get_or_read(&id, &path, || Some(std::fs::read(&path).unwrap()));
        assert_eq!(first.as_deref().map(Vec::as_slice), Some(&b"old"[..]));
        // The same file, unchanged: what was read is reused.
        let again = cache.get_or_read(&id, &path, || panic!("read again"));
        assert!(Rc::ptr_eq(first.as_ref().unwrap(), again.as_ref().unwrap()));
        // Rewritten in place (same inode): another stamp, so read anew.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"new content").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        let new = cache.get_or_read(&id, &path, || Some(std::fs::read(&path).unwrap()));
        assert_eq!(new.as_deref().map(Vec::as_slice), Some(&b"new content"[..]));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn stamps_tell_a_file_from_its_replacement() {
        let path = scratch("replaced");
        std::fs::write(&path, b"one").unwrap();
        let first = FileStamp::of(&File::open(&path).unwrap()).unwrap();
        assert_eq!(first, FileStamp::of(&File::open(&path).unwrap()).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"two").unwrap();
        let second = FileStamp::of(&File::open(&path).unwrap()).unwrap();
        assert_ne!(first, second);
        std::fs::remove_file(path).unwrap();
    }
}
