//! A process's memory, read through `/proc/PID/mem`: opened once and kept open, each read a
//! `pread` of a bounded length at an address the caller got from the target (so any address:
//! one that is not mapped is a failed read, not an error).
//!
//! [`ReadMemory`] is what the readers of a target's memory use: a live process's [`Memory`], a
//! budgeted one ([`super::budget::BudgetedMemory`]) or, in tests, made-up (hostile) memory.
//! [`Pages`] reads it a page at a time for the span of one sample's naming: each read is a
//! syscall, and the fields of one object, or of objects next to each other, share a page.

use std::{cell::RefCell, fs::File, os::unix::fs::FileExt};

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

    /// Drops whatever was kept of the memory: later reads see it as it is then.
    fn forget(&self) {}

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

/// The unit [`Pages`] reads and keeps (the kernel's page: what is readable is readable a page
/// at a time).
const PAGE: u64 = 4096;
/// Pages kept at most until [`ReadMemory::forget`]: past them, reads go to the source.
const MAX_PAGES: usize = 64;

/// A page's address and its bytes (`None`: not readable whole).
type KeptPage = (u64, Option<Box<[u8]>>);

/// Memory read a page at a time: a read within one page reads the whole page once, and later
/// reads in it are served from the copy until [`ReadMemory::forget`], so that what is read is
/// what the memory held at one moment (the caller forgets at every sample). A page that cannot
/// be read whole is not kept: reads in it go to the source, each as asked, so a read succeeds
/// or fails exactly as it would without the copy.
pub struct Pages {
    source: Box<dyn ReadMemory>,
    /// In the order first read.
    kept: RefCell<Vec<KeptPage>>,
}

impl Pages {
    pub fn new(source: Box<dyn ReadMemory>) -> Self {
        Self {
            source,
            kept: RefCell::new(Vec::new()),
        }
    }
}

impl ReadMemory for Pages {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let page = addr & !(PAGE - 1);
        let within = addr - page;
        let len = buf.len() as u64;
        if buf.is_empty() || within + len > PAGE {
            return self.source.read(addr, buf);
        }
        let mut kept = self.kept.borrow_mut();
        let index = match kept.iter().position(|(at, _)| *at == page) {
            Some(index) => index,
            None if kept.len() < MAX_PAGES => {
                let mut bytes = vec![0; PAGE as usize].into_boxed_slice();
                let readable = self.source.read(page, &mut bytes);
                kept.push((page, readable.then_some(bytes)));
                kept.len() - 1
            }
            None => return self.source.read(addr, buf),
        };
        match &kept[index].1 {
            Some(bytes) => {
                // In bounds: `within + len <= PAGE` above.
                let from = within as usize;
                buf.copy_from_slice(&bytes[from..from + buf.len()]);
                true
            }
            None => self.source.read(addr, buf),
        }
    }

    fn forget(&self) {
        // Freed, not kept for the next sample: a fleet holds one of these per process.
        *self.kept.borrow_mut() = Vec::new();
        self.source.forget();
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

    /// Memory of one readable page at 0x1000 holding its offsets' low bytes, that counts the
    /// reads made of it.
    struct OnePage(std::cell::Cell<u32>);

    impl ReadMemory for OnePage {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            self.0.set(self.0.get() + 1);
            let Some(end) = addr.checked_add(buf.len() as u64) else {
                return false;
            };
            if addr < 0x1000 || end > 0x2000 {
                return false;
            }
            for (i, byte) in buf.iter_mut().enumerate() {
                *byte = (addr + i as u64) as u8;
            }
            true
        }
    }

    struct Shared(std::rc::Rc<OnePage>);

    impl ReadMemory for Shared {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            self.0.read(addr, buf)
        }
    }

    #[test]
    fn pages_are_read_once_until_forgotten() {
        let source = std::rc::Rc::new(OnePage(std::cell::Cell::new(0)));
        let pages = Pages::new(Box::new(Shared(source.clone())));
        assert_eq!(pages.word(0x1008), Some(0x0f0e_0d0c_0b0a_0908));
        assert_eq!(pages.u8(0x1fff), Some(0xff));
        assert_eq!(pages.i32(0x1100), Some(0x0302_0100));
        assert_eq!(source.0.get(), 1, "one read of the page for all three");
        // Across a page's end, and outside what is readable: as the source says, each asked.
        assert_eq!(pages.word(0x1ffc), None);
        assert_eq!(pages.word(0x2000), None);
        assert_eq!(pages.word(0x2010), None);
        assert_eq!(source.0.get(), 1 + 1 + 2 + 1);
        pages.forget();
        assert_eq!(pages.u16(0x1002), Some(0x0302));
        assert_eq!(source.0.get(), 6, "read again once forgotten");
    }

    #[test]
    fn a_page_not_readable_whole_gives_what_the_source_gives() {
        // Only the words set are readable (as in the fuzz tests' made-up heaps).
        struct Sparse;
        impl ReadMemory for Sparse {
            fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
                addr == 0x3008 && buf.len() <= 8
            }
        }
        let pages = Pages::new(Box::new(Sparse));
        assert!(pages.word(0x3008).is_some());
        assert_eq!(pages.word(0x3010), None);
        assert!(pages.word(0x3008).is_some());
    }
}
