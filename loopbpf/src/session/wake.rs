//! What the select loop waits on besides its timers: the ring buffers, the target's exit (a
//! pidfd), the next record's naming deadline, the `--interval` timer when there is one.

use std::{
    future::pending,
    io,
    os::fd::{FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::{Interest, unix::AsyncFd},
    time::{Instant, Interval},
};

/// A ring buffer, watched for records to read.
pub(super) fn ring_fd(ring: RingBuf<MapData>, what: &str) -> Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: the RingBuf owns its fd and keeps it open for as long as the AsyncFd lives.
    unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .with_context(|| format!("watching the ring buffer of {what}"))
}

/// The next tick of an optional timer, or never.
pub(super) async fn tick(timer: &mut Option<Interval>) {
    match timer {
        Some(timer) => {
            timer.tick().await;
        }
        None => pending().await,
    }
}

/// Readable once process `pid` has exited.
pub(super) fn watch_exit(pid: u32) -> Result<AsyncFd<OwnedFd>> {
    // SAFETY: the pidfd owns its fd and keeps it open for as long as the AsyncFd lives.
    unsafe { AsyncFd::register_with_interest(pidfd(pid)?, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
        .context("watching the target process")
}

/// Waits until `due`, or forever.
pub(super) async fn until(due: Option<std::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(Instant::from_std(due)).await,
        None => pending().await,
    }
}

pub(super) fn pidfd(pid: u32) -> Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.cast_signed(), 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context(format!("pid {pid} is gone"));
    }
    // SAFETY: the kernel just gave us this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
