//! A process's memory, read through `/proc/PID/mem`: opened once and kept open, each read a
//! `pread` of a bounded length at an address the caller got from the target (so any address:
//! one that is not mapped is a failed read, not an error).
//!
//! The V8 reader reads words, a few dozen per sample, and most fall on a few pages (a function's
//! map, its `SharedFunctionInfo`, its code's header). A `pread` of the kernel costs about the same
//! for a page as for a word, so a small read takes its whole page into a snapshot, and the next
//! small reads of that page come from there. The snapshot lasts one sample (its naming calls
//! [`ReadMemory::forget_snapshot`]) and at most [`SNAPSHOT_AGE`]: what is checked again on each
//! use is checked against memory as it is now.
//!
//! [`ReadMemory`] is what the readers of a target's memory use: a live process's [`Memory`], a
//! budgeted one ([`super::budget::BudgetedMemory`]) or, in tests, made-up (hostile) memory.

use std::{
    cell::RefCell,
    fs::File,
    os::unix::fs::FileExt,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// Longest single read: the V8 reader's largest (a script source of 32 Mi two-byte units).
pub const MAX_READ: usize = 64 << 20;

/// Memory that can be read at any address: a failed read is `false`, never an error.
pub trait ReadMemory {
    /// Fills `buf` from `addr`; false when not all of it can be read (or it is over
    /// [`MAX_READ`]).
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

    /// Reads after this one see the target's memory as it is then, not as a snapshot of the
    /// pages taken before (see the module doc).
    fn forget_snapshot(&self) {}

    fn word(&self, addr: u64) -> Option<u64> {
        let mut buf = [0; 8];
        self.read(addr, &mut buf).then(|| u64::from_le_bytes(buf))
    }

    fn u16(&self, addr: u64) -> Option<u16> {
        let mut buf = [0; 2];
        self.read(addr, &mut buf).then(|| u16::from_le_bytes(buf))
    }

    fn u8(&self, addr: u64) -> Option<u8> {
        let mut buf = [0; 1];
        self.read(addr, &mut buf).then(|| buf[0])
    }

    fn i32(&self, addr: u64) -> Option<i32> {
        let mut buf = [0; 4];
        self.read(addr, &mut buf).then(|| i32::from_le_bytes(buf))
    }

    /// `len` bytes from `addr`; `None` past [`MAX_READ`], before anything is allocated.
    fn bytes(&self, addr: u64, len: usize) -> Option<Vec<u8>> {
        if len > MAX_READ {
            return None;
        }
        let mut buf = vec![0; len];
        self.read(addr, &mut buf).then_some(buf)
    }
}

/// How long a page read into the snapshot is used for at most.
pub const SNAPSHOT_AGE: Duration = Duration::from_millis(1);
/// Reads up to this long go through the snapshot.
const SNAPSHOT_READ: usize = 256;
const PAGE: usize = 4096;
/// Pages in the snapshot: a sample's names come from fewer; past them, reads go to the target.
const SNAPSHOT_PAGES: usize = 16;

/// A target's memory. Bound to the process it was opened for, even after its pid is reused.
pub struct Memory {
    file: File,
    /// Tells this memory's pages in the snapshot from another target's.
    id: u64,
}

impl Memory {
    pub(super) fn new(file: File) -> Self {
        static IDS: AtomicU64 = AtomicU64::new(1);
        Self {
            file,
            id: IDS.fetch_add(1, Ordering::Relaxed),
        }
    }

    fn read_direct(&self, addr: u64, buf: &mut [u8]) -> bool {
        buf.len() <= MAX_READ && self.file.read_exact_at(buf, addr).is_ok()
    }
}

impl ReadMemory for Memory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let page = addr & !(PAGE as u64 - 1);
        // Any address, the last page's too: no sum that could overflow.
        let within_page = addr - page + buf.len() as u64 <= PAGE as u64;
        if buf.len() > SNAPSHOT_READ || !within_page {
            return self.read_direct(addr, buf);
        }
        SNAPSHOT.with_borrow_mut(|snapshot| snapshot.read(self, page, addr, buf))
    }

    fn forget_snapshot(&self) {
        SNAPSHOT.with_borrow_mut(|snapshot| snapshot.pages_used = 0);
    }
}

thread_local! {
    /// One per naming thread, which names one sample at a time: 64 KiB, whatever the number
    /// of targets.
    static SNAPSHOT: RefCell<Snapshot> = const { RefCell::new(Snapshot::new()) };
}

/// Pages of one target's memory as they were read, for the reads of one sample.
struct Snapshot {
    owner: u64,
    taken_at: Option<Instant>,
    /// The page addresses of the first `pages_used` buffers.
    addrs: [u64; SNAPSHOT_PAGES],
    buffers: Vec<Box<[u8; PAGE]>>,
    pages_used: usize,
}

impl Snapshot {
    const fn new() -> Self {
        Self {
            owner: 0,
            taken_at: None,
            addrs: [0; SNAPSHOT_PAGES],
            buffers: Vec::new(),
            pages_used: 0,
        }
    }

    /// Reads `buf` (within the page at `page`) of `memory` from the snapshot, taking the page
    /// into it first if there is room.
    fn read(&mut self, memory: &Memory, page: u64, addr: u64, buf: &mut [u8]) -> bool {
        let now = Instant::now();
        if self.owner != memory.id
            || self
                .taken_at
                .is_none_or(|at| now.saturating_duration_since(at) > SNAPSHOT_AGE)
        {
            self.owner = memory.id;
            self.taken_at = Some(now);
            self.pages_used = 0;
        }
        #[expect(clippy::cast_possible_truncation, reason = "within one page")]
        let offset = (addr - page) as usize;
        let index = match self.addrs[..self.pages_used]
            .iter()
            .position(|&a| a == page)
        {
            Some(index) => index,
            None if self.pages_used < SNAPSHOT_PAGES => {
                let index = self.pages_used;
                if self.buffers.len() <= index {
                    self.buffers.push(Box::new([0; PAGE]));
                }
                // A page is mapped whole or not at all: if it cannot be read, neither can `buf`.
                if !memory.read_direct(page, &mut self.buffers[index][..]) {
                    return memory.read_direct(addr, buf);
                }
                self.addrs[index] = page;
                self.pages_used += 1;
                index
            }
            None => return memory.read_direct(addr, buf),
        };
        buf.copy_from_slice(&self.buffers[index][offset..offset + buf.len()]);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_refuses() {
        let memory = crate::target::proc::Process::myself().memory().unwrap();
        let data: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];
        let at = data.as_ptr() as u64;
        assert_eq!(memory.bytes(at, 8).as_deref(), Some(&data[..]));
        assert_eq!(memory.u8(at + 7), Some(8));
        assert_eq!(memory.u16(at), Some(0x0201));
        assert_eq!(memory.i32(at), Some(0x0403_0201));
        assert_eq!(memory.word(0), None, "the zero page is never mapped");
        assert_eq!(memory.word(u64::MAX - 3), None);
        assert_eq!(memory.bytes(at, MAX_READ + 1), None);
    }

    #[test]
    fn a_snapshot_lasts_one_sample_and_at_most_its_age() {
        let memory = crate::target::proc::Process::myself().memory().unwrap();
        let cell = Box::new(AtomicU64::new(1));
        let at = cell.as_ptr() as u64;
        let taken = Instant::now();
        assert_eq!(memory.word(at), Some(1));
        cell.store(2, Ordering::SeqCst);
        let seen = memory.word(at);
        // Only if this thread ran on: a slower test machine has let the snapshot age out.
        if taken.elapsed() < SNAPSHOT_AGE {
            assert_eq!(seen, Some(1), "read from the page as it was taken");
        }
        memory.forget_snapshot();
        assert_eq!(
            memory.word(at),
            Some(2),
            "the next sample reads the target again"
        );
        cell.store(3, Ordering::SeqCst);
        std::thread::sleep(SNAPSHOT_AGE * 2);
        assert_eq!(memory.word(at), Some(3), "an old snapshot is not used");
        // Another target's read does not come from this one's pages.
        let other = crate::target::proc::Process::myself().memory().unwrap();
        cell.store(4, Ordering::SeqCst);
        assert_eq!(other.word(at), Some(4));
        // A read across two pages, and one of an unmapped page, go to the target.
        let page = vec![7_u8; 2 * PAGE];
        let start = page.as_ptr() as u64;
        let across = (start & !(PAGE as u64 - 1)) + PAGE as u64 - 4;
        if across >= start && across + 8 <= start + 2 * PAGE as u64 {
            assert_eq!(memory.word(across), Some(u64::from_le_bytes([7; 8])));
        }
        assert_eq!(memory.word(8), None);
        assert_eq!(
            memory.word(u64::MAX - 4095),
            None,
            "the last page of the address space"
        );
        assert_eq!(memory.word(u64::MAX - 7), None);
    }
}
