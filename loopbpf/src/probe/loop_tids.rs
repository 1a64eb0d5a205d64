//! The `loop_tids` bitmap (see `LOOPBPF_LOOP_TID_WORDS` in loopbpf.h): a bit per thread id,
//! set for every tid the `threads` map may hold, which lets the `sched_switch` program skip
//! the hash lookup for the host's other threads. The probes set and clear bits from any CPU;
//! userspace does it in place, with atomic operations on the map mapped into its memory, so
//! that no bit of a word shared with the probes is lost. A bit is set before an entry is made
//! and cleared before it is deleted: a stale bit costs one lookup, a missing one would lose a
//! loop thread's switches.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;

use crate::abi::LOOP_TID_WORDS;

/// The bitmap, mapped; unmapped on drop.
pub struct LoopTids {
    words: NonNull<AtomicU64>,
    /// The map itself: its mapping stays valid without the fd, but the map is kept with it.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory, only ever accessed through atomics.
unsafe impl Send for LoopTids {}

impl LoopTids {
    const BYTES: usize = LOOP_TID_WORDS as usize * size_of::<u64>();

    /// Maps the `loop_tids` array (created `BPF_F_MMAPABLE`) read-write.
    pub fn new(map: MapData) -> io::Result<Self> {
        // SAFETY: a new shared mapping of the map's fd, of exactly the array's size (a
        // multiple of the page size); the kernel checks the fd, the flags and the size.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                Self::BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let words =
            NonNull::new(address.cast::<AtomicU64>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { words, _map: map })
    }

    /// The word that holds `tid`'s bit, and that bit; `None` past the bitmap (the probes look
    /// such a tid up always).
    fn word(&self, tid: u32) -> Option<(&AtomicU64, u64)> {
        let index = tid / 64;
        if index >= LOOP_TID_WORDS {
            return None;
        }
        // SAFETY: index is within the mapping, which lives as long as self; u64 words are
        // 8-aligned in a page-aligned mapping, and every access to them is atomic.
        let word = unsafe { self.words.add(index as usize).as_ref() };
        Some((word, 1 << (tid % 64)))
    }

    /// Before the `threads` map gets an entry for `tid`.
    pub fn mark(&self, tid: u32) {
        if let Some((word, bit)) = self.word(tid) {
            word.fetch_or(bit, Ordering::SeqCst);
        }
    }

    /// Before the `threads` map's entry for `tid` is deleted.
    pub fn unmark(&self, tid: u32) {
        if let Some((word, bit)) = self.word(tid) {
            word.fetch_and(!bit, Ordering::SeqCst);
        }
    }
}

impl Drop for LoopTids {
    fn drop(&mut self) {
        // SAFETY: the mapping made in new, of that size, unmapped once; no reference into it
        // outlives self.
        unsafe {
            libc::munmap(self.words.as_ptr().cast(), Self::BYTES);
        }
    }
}
