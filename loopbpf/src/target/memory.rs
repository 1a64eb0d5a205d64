//! A process's memory, read through `/proc/PID/mem`: opened once and kept open, each read a
//! `pread` of a bounded length at an address the caller got from the target (so any address:
//! one that is not mapped is a failed read, not an error).
//!
//! [`ReadMemory`] is what the readers of a target's memory use: a live process's [`Memory`], a
//! budgeted one ([`super::budget::BudgetedMemory`]) or, in tests, made-up (hostile) memory.

use std::{fs::File, os::unix::fs::FileExt};

/// Longest single read: the V8 reader's largest (a script source of 32 Mi two-byte units).
pub const MAX_READ: usize = 64 << 20;

/// Memory that can be read at any address: a failed read is `false`, never an error.
pub trait ReadMemory {
    /// Fills `buf` from `addr`; false when not all of it can be read (or it is over
    /// [`MAX_READ`]).
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;

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

/// A target's memory. Bound to the process it was opened for, even after its pid is reused.
pub struct Memory {
    file: File,
}

impl Memory {
    pub(super) fn new(file: File) -> Self {
        Self { file }
    }
}

impl ReadMemory for Memory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        buf.len() <= MAX_READ && self.file.read_exact_at(buf, addr).is_ok()
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
}
