//! Kernel frames, named from `/proc/kallsyms` once for every watched process: the kernel is the
//! same for all of them. blazesym's table of the kernel's symbols (about 6 MB for 120,000 of
//! them) is built at the first lookup and dropped when no lookup has needed it for
//! [`super::objects::PARSED_IDLE`]: the named frames stay cached, and a kernel's stacks repeat.

use std::{
    collections::HashMap,
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
    objects::remember,
    symbolize::frame_from_sym,
};

/// The kernel's symbols and the frames named from them.
#[derive(Default)]
pub(super) struct KernelSymbols {
    /// blazesym with the kernel's symbols parsed, when a lookup needed them lately.
    blazesym: Option<Blazesym>,
    /// When `blazesym` was last asked.
    asked_at: Option<Instant>,
    /// Named frames by address (at most [`super::objects::MAX_CACHED_FRAMES`]).
    frames: HashMap<u64, Frame>,
}

impl KernelSymbols {
    /// The kernel frame at `addr`.
    pub(super) fn frame(&mut self, addr: u64) -> Frame {
        if let Some(frame) = self.frames.get(&addr) {
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
        let frame = match blazesym.symbolize_single(&source, Input::AbsAddr(addr)) {
            Ok(Symbolized::Sym(sym)) => frame_from_sym(sym, KERNEL_MODULE, FrameKind::Kernel),
            Ok(Symbolized::Unknown(_)) | Err(_) => Frame::unknown(KERNEL_MODULE, FrameKind::Kernel),
        };
        remember(&mut self.frames, addr, frame.clone());
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
}
