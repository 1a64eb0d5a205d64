//! A target's files: the identity of a mapped file across mount namespaces, what was read of
//! each file (shared by every process that maps it), and the ELF facts read from them.
//!
//! A target's files are opened only through [`open_in_root`] or [`open_magic_link`]: inside
//! the target's own root, without blocking, regular files only, size-capped. A target may have
//! planted a FIFO, a device, a symlink to a host file or a sparse file of any size where
//! loopbpf looks.

use std::{
    cell::RefCell,
    collections::{BTreeSet, HashMap},
    ffi::CString,
    fmt,
    fs::{self, File, OpenOptions},
    io::{self, Read},
    mem::size_of,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{
            ffi::OsStrExt,
            fs::{FileTypeExt, MetadataExt, OpenOptionsExt},
        },
    },
    path::Path,
    rc::Rc,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::UNIX_EPOCH,
};

use object::{Object, read::ReadCache};

use super::maps::Device;

/// A file as `/proc/PID/maps` names it across mount namespaces: device and inode, and, once
/// the file was opened, its [`FileStamp`]: an inode number freed and given to a new file is
/// then another identity, and nothing read of the old file is taken for the new one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId {
    pub dev: Device,
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

    /// What was read of `file`, opening it (`open`) and reading it now if it was not yet: what
    /// is known of it is reused only if the file opened now has the stamp of the one read then.
    /// Nothing is remembered of a file that could not be opened: its process may have exited
    /// mid-read, and the next one that maps the file must still find what is in it.
    pub fn get_or_read(
        &self,
        file: &FileId,
        shown: &Path,
        open: impl FnOnce() -> Option<File>,
        read: impl FnOnce(File) -> Option<T>,
    ) -> Option<Rc<T>> {
        let opened = open()?;
        let Some(file) = file.stamped(&opened) else {
            return read(opened).map(Rc::new);
        };
        if let Some(known) = self.0.borrow().files.get(&file) {
            return known.as_ref().map(|(value, _)| Rc::clone(value));
        }
        let Some(value) = read(opened) else {
            self.0.borrow_mut().files.insert(file, None);
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
                shown.display(),
                cached.max_bytes >> 20
            );
            return None;
        }
        cached.bytes += bytes;
        let value = Rc::new(value);
        cached.files.insert(file, Some((Rc::clone(&value), bytes)));
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

/// Largest ELF object opened for a target (node's binary is about 100 MB, one with full debug
/// information a few hundred).
pub const MAX_OBJECT: u64 = 2 << 30;
/// Largest object copied out of the target's reach before blazesym maps it (see
/// [`sealed_copy`]): a node binary its own user installed (nvm) must fit.
pub const MAX_OBJECT_COPY: u64 = 512 << 20;

/// Why a target's file was not opened.
#[derive(Debug)]
pub enum Refused {
    /// Missing, unreadable, outside the target's root, or the target is gone.
    Io(io::Error),
    /// A FIFO, device, socket or directory: reading it could block or never end.
    NotRegular(&'static str),
    /// Larger than the cap for what it is.
    TooLarge { len: u64, max: u64 },
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(error) => write!(f, "{error}"),
            Self::NotRegular(kind) => write!(f, "not a regular file ({kind})"),
            Self::TooLarge { len, max } => {
                write!(f, "{} MiB, over the {} MiB cap", len >> 20, max >> 20)
            }
        }
    }
}

/// Files of targets refused for their size or kind, counted once per file.
static REFUSED_FILES: AtomicU64 = AtomicU64::new(0);
/// The files warned about already (device, inode): one warning per file.
static WARNED: Mutex<BTreeSet<(u64, u64)>> = Mutex::new(BTreeSet::new());
/// Files remembered in [`WARNED`]; past it every refusal warns again, but memory stays bounded.
const MAX_WARNED: usize = 4096;

/// How many files of targets were skipped for being too large or not regular files.
pub fn refused_files() -> u64 {
    REFUSED_FILES.load(Ordering::Relaxed)
}

/// Opens a file of a target for reading, never blocking and never following a link out of
/// `root` (the target's `/proc/PID/root`, opened `O_PATH`): an absolute symlink the target
/// planted resolves against its own root, `..` stops there, and `/proc` magic links are refused.
/// Only a regular file of at most `max` bytes is returned; `shown` names it in the one warning
/// a refused file gets.
pub fn open_in_root(root: &File, path: &Path, max: u64, shown: &str) -> Result<File, Refused> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Refused::Io(io::ErrorKind::InvalidInput.into()))?;
    // SAFETY: `open_how` is plain integers, for which zero is valid (and means "no mode").
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = OPEN_FLAGS.cast_unsigned().into();
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `root` is an open descriptor, `path` a NUL-terminated string and `how` a valid
    // `open_how` whose size is passed with it; the kernel writes nothing back.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &raw const how,
            size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(Refused::Io(io::Error::last_os_error()));
    }
    let fd = i32::try_from(fd).map_err(|_| Refused::Io(io::ErrorKind::InvalidData.into()))?;
    // SAFETY: the kernel just returned this descriptor, owned by nobody else.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    checked(file, max, shown)
}

/// Flags every target file is opened with: a FIFO or device opens without waiting for a peer,
/// and a terminal never becomes loopbpf's.
const OPEN_FLAGS: i32 = libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY;

/// Opens a path that names a target's file through a `/proc` magic link (`map_files`,
/// `exe`), with the same flags and checks as [`open_in_root`].
pub fn open_magic_link(link: &Path, max: u64, shown: &str) -> Result<File, Refused> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(link)
        .map_err(Refused::Io)?;
    checked(file, max, shown)
}

/// `file` if it is a regular file of at most `max` bytes; else one warning for it and `None`.
fn checked(file: File, max: u64, shown: &str) -> Result<File, Refused> {
    let meta = file.metadata().map_err(Refused::Io)?;
    let kind = meta.file_type();
    let refused = if kind.is_file() {
        if meta.len() <= max {
            return Ok(file);
        }
        Refused::TooLarge {
            len: meta.len(),
            max,
        }
    } else {
        Refused::NotRegular(if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a device"
        })
    };
    let mut warned = WARNED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let first = warned.len() >= MAX_WARNED || warned.insert((meta.dev(), meta.ino()));
    drop(warned);
    if first {
        REFUSED_FILES.fetch_add(1, Ordering::Relaxed);
        warning!("{shown} not read: {refused}");
    }
    Err(refused)
}

/// Who a target is, as far as which files it can change goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Writer {
    /// Its real, effective, saved and filesystem uids.
    pub uids: [u32; 4],
    /// It sees the filesystem loopbpf sees (not in a container).
    pub same_mount_ns: bool,
}

impl Writer {
    /// Whether the target can change (truncate) `meta`'s file: its owner, group- or
    /// other-writable, or the target is root in a container (its image is its own).
    pub fn can_write(&self, meta: &fs::Metadata) -> bool {
        // Root in loopbpf's own mount namespace can do anything to loopbpf anyway: its files
        // are not copied.
        if self.same_mount_ns && self.uids.contains(&0) {
            return false;
        }
        meta.mode() & 0o022 != 0 || self.uids.contains(&meta.uid()) || self.uids.contains(&0)
    }

    /// Whether the debug files `meta`'s file links to may be looked for in loopbpf's own
    /// filesystem (`/usr/lib/debug`, next to the file): the target sees that filesystem too, and
    /// the link was written by root in a file the target cannot change.
    pub fn trusts_links(&self, meta: &fs::Metadata) -> bool {
        self.same_mount_ns && meta.uid() == 0 && meta.mode() & 0o022 == 0 && !self.can_write(meta)
    }

    /// Whether the target can plant nothing where a debug link of the file at `path` (in
    /// loopbpf's filesystem) is looked for: in its directory and that directory's `.debug`,
    /// neither writable by the target, nor any directory above them that it could rename
    /// (writable and not sticky). Else a root-owned library in the target's own directory would
    /// have loopbpf open the target's FIFO (hanging its naming lane) or follow its symlink to a
    /// file only root may read.
    pub fn trusts_link_dirs(&self, path: &Path) -> bool {
        let Some(dir) = path.parent() else {
            return false;
        };
        let debug = dir.join(".debug");
        let planted = [dir, debug.as_path()]
            .into_iter()
            .any(|dir| match fs::metadata(dir) {
                Ok(meta) => self.can_write(&meta),
                Err(error) => error.kind() != io::ErrorKind::NotFound,
            });
        !planted
            && dir.ancestors().skip(1).all(|above| {
                fs::metadata(above)
                    .is_ok_and(|meta| meta.mode() & 0o1000 != 0 || !self.can_write(&meta))
            })
    }
}

/// A copy of `file` (at most `max` bytes) in a sealed memfd: no one can shrink, grow or write
/// it, so a mapping of it cannot fault with SIGBUS when the original is truncated.
pub fn sealed_copy(file: &File, max: u64) -> io::Result<File> {
    // SAFETY: the name is a NUL-terminated literal; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"loopbpf-object".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor, owned by nobody else.
    let mut copy = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    // Read, never mapped: a truncation while copying shortens the copy, nothing more.
    io::copy(&mut file.take(max), &mut copy)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on our own memfd takes an int of seals.
    if unsafe { libc::fcntl(copy.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn dir_fd(dir: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(dir)
            .unwrap()
    }

    #[test]
    fn target_files_open_inside_their_root_only_and_never_block() {
        let root = std::env::temp_dir().join(format!("loopbpf-root-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("tmp")).unwrap();
        fs::write(root.join("tmp/map"), "inside\n").unwrap();
        // Absolute and `..` links resolve against the root handed in, not loopbpf's.
        symlink("/tmp/map", root.join("abs")).unwrap();
        symlink("../../../../../tmp/map", root.join("up")).unwrap();
        symlink("/dev/zero", root.join("zero")).unwrap();
        let fifo = CString::new(root.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        File::create(root.join("sparse"))
            .unwrap()
            .set_len(64 << 30)
            .unwrap();
        let fd = dir_fd(&root);
        let read = |path: &str| {
            open_in_root(&fd, Path::new(path), 1 << 20, path)
                .map(|file| io::read_to_string(file).unwrap())
        };
        assert_eq!(read("/abs").unwrap(), "inside\n");
        assert_eq!(read("/up").unwrap(), "inside\n");
        assert!(
            matches!(read("/zero"), Err(Refused::Io(_))),
            "no /dev in it"
        );
        assert!(matches!(read("/fifo"), Err(Refused::NotRegular("a FIFO"))));
        assert!(matches!(
            read("/tmp"),
            Err(Refused::NotRegular("a directory"))
        ));
        let before = refused_files();
        assert!(matches!(read("/sparse"), Err(Refused::TooLarge { .. })));
        assert!(matches!(read("/sparse"), Err(Refused::TooLarge { .. })));
        assert_eq!(refused_files(), before + 1, "counted once per file");
        // A magic link (here /proc/self/root inside the real root) is refused.
        assert!(
            open_in_root(
                &dir_fd(Path::new("/")),
                Path::new("/proc/self/root/etc/hostname"),
                1 << 20,
                "x"
            )
            .is_err()
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_sealed_copy_outlives_the_truncation_of_its_original() {
        let path = std::env::temp_dir().join(format!("loopbpf-sealed-{}", std::process::id()));
        fs::write(&path, vec![7u8; 1 << 16]).unwrap();
        let copy = sealed_copy(&File::open(&path).unwrap(), 1 << 20).unwrap();
        File::create(&path).unwrap();
        assert_eq!(copy.metadata().unwrap().len(), 1 << 16);
        assert!(copy.set_len(0).is_err(), "sealed against shrinking");
        let capped = sealed_copy(&File::open("/proc/self/exe").unwrap(), 100).unwrap();
        assert_eq!(capped.metadata().unwrap().len(), 100);
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn targets_can_write_their_own_files_and_writable_ones() {
        let meta = fs::metadata("/proc/self/exe").unwrap();
        let owner = meta.uid();
        let other = owner.wrapping_add(1);
        let writer = |uid, same_mount_ns| Writer {
            uids: [uid; 4],
            same_mount_ns,
        };
        assert!(writer(owner, false).can_write(&meta));
        assert_eq!(
            writer(other, false).can_write(&meta),
            meta.mode() & 0o022 != 0 || other == 0
        );
        assert!(!writer(0, true).can_write(&meta), "host root is trusted");
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("loopbpf-files-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_file_with_the_same_inode_and_another_stamp_is_read_again() {
        let path = scratch("stamp");
        std::fs::write(&path, b"old").unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        let id = FileId {
            dev: Device { major: 0, minor: 0 },
            inode,
            stamp: None,
        };
        let cache = FileCache::new();
        let open = || File::open(&path).ok();
        let read = |mut file: File| {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes).ok()?;
            Some(bytes)
        };
        let first = cache.get_or_read(&id, &path, open, read);
        assert_eq!(first.as_deref().map(Vec::as_slice), Some(&b"old"[..]));
        // The same file, unchanged: what was read is reused.
        let again = cache.get_or_read(&id, &path, open, |_| panic!("read again"));
        assert!(Rc::ptr_eq(first.as_ref().unwrap(), again.as_ref().unwrap()));
        // Rewritten in place (same inode): another stamp, so read anew.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"new content").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        let new = cache.get_or_read(&id, &path, open, read);
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

    impl Weigh for Vec<u8> {
        fn heap_bytes(&self) -> usize {
            self.len()
        }
    }

    #[test]
    fn a_file_cache_stays_within_its_bytes() {
        let cache = FileCache::<Vec<u8>>::with_max_bytes(10_000);
        let id = |inode| FileId {
            dev: Device { major: 8, minor: 1 },
            inode,
            stamp: None,
        };
        let here = Path::new("/proc/self/exe");
        let open = || File::open(here).ok();
        let a = cache.get_or_read(&id(1), here, open, |_| Some(vec![0; 6000]));
        assert!(a.is_some());
        // In use, so kept: the next one does not fit and is not read into it.
        assert!(
            cache
                .get_or_read(&id(2), here, open, |_| Some(vec![0; 6000]))
                .is_none()
        );
        assert_eq!(cache.refused(), 1);
        // Once nobody uses the first, it makes room.
        drop(a);
        assert!(
            cache
                .get_or_read(&id(2), here, open, |_| Some(vec![0; 6000]))
                .is_some()
        );
        assert!(cache.0.borrow().bytes <= 10_000);
        assert!(cache.0.borrow().files.keys().all(|f| f.inode != 1));
    }
}
