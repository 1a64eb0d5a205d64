//! Kernel frames, named from `/proc/kallsyms` once for every watched process: the kernel is the
//! same for all of them. blazesym's table of the kernel's symbols (about 6 MB for 120,000 of
//! them) is built at the first lookup and dropped when no lookup has needed it for
//! [`super::objects::PARSED_IDLE`]: the named frames stay cached, and a kernel's stacks repeat.
//!
//! A kernel symbol has no size in kallsyms: an address is named after the symbol that starts
//! closest below it. So when two addresses are named after the same symbol, so is every
//! address between its start and the higher one, and the cache holds one range per function
//! (from its start to the highest address named after it), not one entry per address.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use blazesym::{
    MaybeDefault,
    symbolize::{
        Input, Symbolized, Symbolizer as Blazesym,
        source::{Kernel, Source},
    },
};

use super::{
    frame::{Frame, FrameKind, KERNEL_MODULE},
    objects::MAX_CACHED_FRAMES,
    symbolize::frame_from_sym,
};

/// The kernel's symbols and the frames named from them.
#[derive(Default)]
pub(super) struct KernelSymbols {
    /// blazesym with the kernel's symbols parsed, when a lookup needed them lately.
    blazesym: Option<Blazesym>,
    /// When `blazesym` was last asked.
    asked_at: Option<Instant>,
    /// Named frames by the start of their symbol, with the highest address named after it
    /// (at most [`MAX_CACHED_FRAMES`]). Addresses no symbol names, by themselves.
    frames: BTreeMap<u64, (u64, Frame)>,
}

impl KernelSymbols {
    /// The kernel frame at `addr`.
    pub(super) fn frame(&mut self, addr: u64) -> Frame {
        if let Some((_, (highest, frame))) = self.frames.range(..=addr).next_back()
            && addr <= *highest
        {
            return frame.clone();
        }
        let source = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            kaslr_offset: None,
            debug_syms: false,
            ..Kernel::default()
        });
        self.asked_at = Some(Instant::now());
        let blazesym = self.blazesym.get_or_insert_with(Blazesym::new);
        let (start, frame) = match blazesym.symbolize_single(&source, Input::AbsAddr(addr)) {
            Ok(Symbolized::Sym(sym)) if sym.addr <= addr => (
                sym.addr,
                frame_from_sym(sym, KERNEL_MODULE, FrameKind::Kernel),
            ),
            Ok(_) | Err(_) => (addr, Frame::unknown(KERNEL_MODULE, FrameKind::Kernel)),
        };
        if self.frames.len() >= MAX_CACHED_FRAMES {
            self.frames.clear();
        }
        let (highest, _) = self.frames.entry(start).or_insert((addr, frame.clone()));
        *highest = (*highest).max(addr);
        frame
    }

    /// Drops the parsed symbols if no lookup needed them for `idle`; whether it did.
    pub(super) fn evict_idle(&mut self, idle: Duration) -> bool {
        let idle = self.asked_at.is_some_and(|at| at.elapsed() >= idle);
        if idle {
            self.blazesym = None;
            self.asked_at = None;
        }
        idle
    }

    /// Whether the kernel's symbols are parsed and held now.
    #[cfg(test)]
    pub(super) fn is_parsed(&self) -> bool {
        self.blazesym.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The address of the kernel function `name`, from /proc/kallsyms.
    fn kallsyms_address(name: &str) -> u64 {
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
        let addr = kallsyms
            .lines()
            .find_map(|line| {
                let mut fields = line.split_whitespace();
                let addr = fields.next()?;
                (fields.next()? == "T" && fields.next()? == name && fields.next().is_none())
                    .then(|| u64::from_str_radix(addr, 16).ok())?
            })
            .unwrap_or_else(|| panic!("/proc/kallsyms lists {name}"));
        assert_ne!(
            addr, 0,
            "kernel addresses are hidden: run the tests as root"
        );
        addr
    }

    #[test]
    fn the_kernels_symbols_are_dropped_when_idle_and_read_again_when_needed() {
        let addr = kallsyms_address("schedule");
        let mut kernel = KernelSymbols::default();
        let frame = kernel.frame(addr);
        assert_eq!(frame.name, "schedule", "{frame:?}");
        assert_eq!(frame.module, KERNEL_MODULE);
        assert!(kernel.is_parsed());
        assert!(
            !kernel.evict_idle(Duration::from_hours(1)),
            "asked just now"
        );
        assert!(kernel.is_parsed());

        assert!(kernel.evict_idle(Duration::ZERO));
        assert!(!kernel.is_parsed());
        assert_eq!(kernel.frame(addr), frame, "named from the cache");
        assert!(!kernel.is_parsed(), "a cached frame parses nothing");
        assert_eq!(kernel.frame(addr + 1), frame, "read again");
        assert!(kernel.is_parsed());
    }

    #[test]
    fn addresses_between_two_named_after_one_symbol_are_named_from_the_cache() {
        let schedule = kallsyms_address("schedule");
        let mut kernel = KernelSymbols::default();
        let frame = kernel.frame(schedule + 8);
        assert_eq!(frame.name, "schedule");
        assert_eq!(kernel.frame(schedule + 2), frame);
        assert_eq!(kernel.frames.len(), 1, "one range for the function");
        kernel.evict_idle(Duration::ZERO);
        for addr in schedule..=schedule + 8 {
            assert_eq!(kernel.frame(addr), frame);
        }
        assert!(
            !kernel.is_parsed(),
            "every address in the range is named from the cache"
        );
        // Past the range: asked again, and named right.
        let next = kernel.frame(schedule + 9);
        assert!(kernel.is_parsed());
        assert_eq!(next, frame, "schedule is longer than 9 bytes");
        // Below the symbol's start: another symbol's.
        assert_ne!(kernel.frame(schedule - 1).name, "schedule");
    }

    #[test]
    fn the_cache_names_every_address_as_blazesym_does() {
        let start = kallsyms_address("schedule") - 4096;
        let mut kernel = KernelSymbols::default();
        let uncached = Blazesym::new();
        let source = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            debug_syms: false,
            ..Kernel::default()
        });
        // Out of order, so that ranges grow both ways and addresses fall between them.
        let addrs = (0..16_384_u32)
            .step_by(7)
            .chain((0..16_384_u32).step_by(5).rev());
        for addr in addrs.map(|offset| start + u64::from(offset)) {
            let expected = match uncached.symbolize_single(&source, Input::AbsAddr(addr)) {
                Ok(Symbolized::Sym(sym)) => frame_from_sym(sym, KERNEL_MODULE, FrameKind::Kernel),
                _ => Frame::unknown(KERNEL_MODULE, FrameKind::Kernel),
            };
            assert_eq!(kernel.frame(addr), expected, "at {addr:#x}");
        }
        assert!(kernel.frames.len() > 1, "several functions");
    }
}
