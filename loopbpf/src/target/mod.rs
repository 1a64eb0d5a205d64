//! Everything read from a target process: `/proc` ([`proc`], its memory map in [`maps`], its
//! memory in [`memory`]), its files ([`files`]) and where it runs ([`container`]). Every value
//! here comes from a process loopbpf does not trust: every read is bounded, every parser total,
//! and the work it drives is within the budgets of [`budget`].

pub mod budget;
pub mod container;
pub mod files;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod maps;
pub mod memory;
pub mod proc;

pub use proc::start_time;

use std::{
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::{SystemTime, UNIX_EPOCH},
};

/// Much of loopbpf's heap was freed (a file's symbols scanned, the files of exited processes
/// forgotten): [`give_back_freed_memory`] returns it to the system.
static FREED_MUCH: AtomicBool = AtomicBool::new(false);
/// When freed memory was last given back, in seconds since the epoch.
static GIVEN_BACK_AT: AtomicU64 = AtomicU64::new(0);
/// Freed memory is given back at most this often: each time walks the free heap.
const GIVE_BACK_EVERY_SECS: u64 = 10;

/// Says that much of the heap was just freed. What a target's files make loopbpf read is freed
/// again, but the allocator keeps the freed pages (a scan of a node binary's symbols peaks
/// at tens of MB), so that they would stay in loopbpf's resident memory for good.
pub fn freed_much() {
    FREED_MUCH.store(true, Ordering::Relaxed);
}

/// Gives the heap's free pages back to the system if much was freed since the last time, at
/// most every [`GIVE_BACK_EVERY_SECS`]; `now` skips that wait (the end of the first scan).
pub fn give_back_freed_memory(now: bool) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = GIVEN_BACK_AT.load(Ordering::Relaxed);
    if !now && secs.saturating_sub(last) < GIVE_BACK_EVERY_SECS {
        return;
    }
    if FREED_MUCH.swap(false, Ordering::Relaxed) {
        GIVEN_BACK_AT.store(secs, Ordering::Relaxed);
        // SAFETY: malloc_trim only returns free pages of the allocator's own arenas to the
        // system; it has no preconditions and touches no memory in use.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

/// Who a process is, as every output labels it.
#[derive(Debug, Clone, Default)]
pub struct ProcessLabels {
    pub comm: String,
    pub container: String,
    pub pod: String,
}
