//! Kernel frames, named from `/proc/kallsyms` once for every watched process: the kernel is the
//! same for all of them. A compact table of the kernel's functions ([`KallsymsTable`], about
//! 2.6 MB for 120,000 of them, where blazesym's took about 7.5 MB) is built at the first lookup
//! and dropped when no lookup has needed it for [`super::objects::PARSED_IDLE`]: the named
//! frames stay cached, and a kernel's stacks repeat.
//!
//! A kernel symbol has no size in kallsyms: an address is named after the symbol that starts
//! closest below it. So when two addresses are named after the same symbol, so is every
//! address between its start and the higher one, and the cache holds one range per function
//! (from its start to the highest address named after it), not one entry per address.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Read},
    time::{Duration, Instant},
};

use super::{
    frame::{Frame, FrameKind, KERNEL_MODULE, shared},
    objects::MAX_CACHED_FRAMES,
};

/// The kernel's symbols and the frames named from them.
#[derive(Default)]
pub(super) struct KernelSymbols {
    /// The kernel's functions, when a lookup needed them lately.
    table: Option<KallsymsTable>,
    /// When `table` was last asked.
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
        self.asked_at = Some(Instant::now());
        let table = self.table.get_or_insert_with(|| {
            let (table, why) = KallsymsTable::read();
            if let Some(why) = why {
                // Once per read (at most every idle period): kernel frames are unnamed.
                loss!("kernel frames are left unnamed: {why}");
            }
            table
        });
        let (start, frame) = match table.lookup(addr) {
            Some((start, name)) => (
                start,
                Frame {
                    name: demangled(name).into(),
                    ..Frame::unknown(shared!(KERNEL_MODULE), FrameKind::Kernel)
                },
            ),
            None => (
                addr,
                Frame::unknown(shared!(KERNEL_MODULE), FrameKind::Kernel),
            ),
        };
        if self.frames.len() >= MAX_CACHED_FRAMES {
            self.frames.clear();
        }
        let (highest, _) = self.frames.entry(start).or_insert((addr, frame.clone()));
        *highest = (*highest).max(addr);
        frame
    }

    /// Drops the kernel's symbols if no lookup needed them for `idle`; whether it did.
    pub(super) fn evict_idle(&mut self, idle: Duration) -> bool {
        let idle = self.asked_at.is_some_and(|at| at.elapsed() >= idle);
        if idle {
            if self.table.take().is_some() {
                crate::target::freed_much();
            }
            self.asked_at = None;
        }
        idle
    }

    /// Whether the kernel's symbols are read and held now.
    #[cfg(test)]
    pub(super) fn is_parsed(&self) -> bool {
        self.table.is_some()
    }
}

/// The most bytes of /proc/kallsyms read (about 5 MB for 122,000 lines on a typical kernel).
const MAX_KALLSYMS_BYTES: u64 = 256 << 20;
/// The most lines of /proc/kallsyms read.
const MAX_KALLSYMS_LINES: usize = 4_000_000;
/// The longest line kept; the kernel's own bound on a name is 512 bytes (`KSYM_NAME_LEN`).
const MAX_LINE_BYTES: usize = 1024;
/// The longest symbol name kept: a longer one leaves its address unnamed, not misnamed.
const MAX_NAME_BYTES: usize = 512;
/// Marks, in [`KallsymsTable::lens`], a symbol that is not code: addresses from it to the
/// next symbol are unnamed.
const NOT_TEXT: u16 = 1 << 15;
/// Marks, in [`KallsymsTable::lens`], a name that is [`PFX`] and the name stored (the padding
/// before a function, named after it): half of the kernel's names are such, and the name is
/// stored once for both when the function's line follows its padding's.
const PREFIXED: u16 = 1 << 14;
/// The length bits in [`KallsymsTable::lens`].
const LEN: u16 = PREFIXED - 1;
/// The prefix of the padding symbols before functions.
const PFX: &str = "__pfx_";

/// Addresses in a table: offsets from the lowest when the span fits 32 bits, else absolute.
enum Addresses {
    Offsets { base: u64, offsets: Box<[u32]> },
    Absolute(Box<[u64]>),
}

impl Addresses {
    fn new(addrs: Vec<u64>) -> Self {
        let base = addrs.first().copied().unwrap_or(0);
        let span = addrs.last().copied().unwrap_or(0) - base;
        if u32::try_from(span).is_ok() {
            Self::Offsets {
                base,
                offsets: addrs
                    .iter()
                    .map(|addr| u32::try_from(addr - base).unwrap_or(u32::MAX))
                    .collect(),
            }
        } else {
            Self::Absolute(addrs.into_boxed_slice())
        }
    }

    /// The index of the last address at or below `addr`.
    fn at_or_below(&self, addr: u64) -> Option<usize> {
        let count = match self {
            Self::Offsets { base, offsets } => {
                let offset = addr.checked_sub(*base)?;
                let offset = u32::try_from(offset).unwrap_or(u32::MAX);
                offsets.partition_point(|o| *o <= offset)
            }
            Self::Absolute(addrs) => addrs.partition_point(|a| *a <= addr),
        };
        count.checked_sub(1)
    }

    fn get(&self, index: usize) -> u64 {
        match self {
            Self::Offsets { base, offsets } => base + u64::from(offsets[index]),
            Self::Absolute(addrs) => addrs[index],
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        match self {
            Self::Offsets { offsets, .. } => size_of_val(&**offsets),
            Self::Absolute(addrs) => size_of_val(&**addrs),
        }
    }
}

/// The kernel's text symbols, sorted by address, in about 2.6 MB for 120,000 (8.5 MB at most
/// while building it): one read of /proc/kallsyms, bounded in bytes, lines and name length.
///
/// An address is named as blazesym names it from kallsyms (after the symbol at or closest below
/// it, the first listed of those at one address), with one difference: a symbol that is not
/// code (`D`, `R`, `B`, ...: kernels with `CONFIG_KALLSYMS_ALL` list every variable) is kept as
/// a bound, and an address from it to the next function is unnamed instead of named after the
/// function below it. (And blazesym's search names the addresses just past the lowest symbol
/// after the last of the aliases listed there, where it names every other address after the
/// first alias listed: here, the first, as everywhere.)
pub(super) struct KallsymsTable {
    addrs: Addresses,
    /// Per symbol, where its name starts in `arena`.
    starts: Box<[u32]>,
    /// Per symbol, its name's length, with the [`NOT_TEXT`] and [`PREFIXED`] flags.
    lens: Box<[u16]>,
    /// The names, in kallsyms' order.
    arena: Box<str>,
}

/// One line of kallsyms as read: its address, whether it is code, and its name in the arena.
struct RawSymbol {
    addr: u64,
    /// Where the name starts in the arena of the read.
    name_start: u32,
    /// The name's length, at most [`MAX_NAME_BYTES`], and [`PREFIXED`] (16 bytes a symbol
    /// while reading).
    name_len: u16,
    text: bool,
}

impl KallsymsTable {
    /// The table of `/proc/kallsyms`; an empty one, and why, if it cannot be read whole.
    pub(super) fn read() -> (Self, Option<String>) {
        match File::open("/proc/kallsyms") {
            Ok(file) => Self::parse(BufReader::new(file)),
            Err(e) => (
                Self::empty(),
                Some(format!("cannot read /proc/kallsyms: {e}")),
            ),
        }
    }

    fn empty() -> Self {
        Self {
            addrs: Addresses::Absolute(Box::new([])),
            starts: Box::new([]),
            lens: Box::new([]),
            arena: Box::from(""),
        }
    }

    /// The table of the kallsyms text `input`. Lines without an address, type and name, or
    /// with an address of 0 (hidden from non-root), are skipped, as blazesym skips them; a name
    /// too long leaves its address unnamed. If a bound stops the read, the table is empty (a
    /// part of it could name an address after a symbol below one it did not read) and the
    /// reason is returned.
    fn parse(input: impl BufRead) -> (Self, Option<String>) {
        let mut input = input.take(MAX_KALLSYMS_BYTES);
        let mut raw = Vec::new();
        let mut arena = String::new();
        let mut line = Vec::with_capacity(MAX_LINE_BYTES);
        let mut lines = 0;
        loop {
            line.clear();
            let read = match (&mut input)
                .take(MAX_LINE_BYTES as u64)
                .read_until(b'\n', &mut line)
            {
                Ok(0) => break,
                Ok(read) => read,
                Err(e) => return (Self::empty(), Some(format!("reading /proc/kallsyms: {e}"))),
            };
            lines += 1;
            if lines > MAX_KALLSYMS_LINES {
                let why = format!("/proc/kallsyms has over {MAX_KALLSYMS_LINES} lines");
                return (Self::empty(), Some(why));
            }
            if read == MAX_LINE_BYTES && line.last() != Some(&b'\n') {
                // Too long for any symbol: the rest of the line is skipped, and the line.
                if let Err(e) = skip_line(&mut input) {
                    return (Self::empty(), Some(format!("reading /proc/kallsyms: {e}")));
                }
                continue;
            }
            if let Some(symbol) = parse_line(&line, raw.last(), &mut arena) {
                raw.push(symbol);
            }
        }
        if input.limit() == 0 {
            let why = format!("/proc/kallsyms is over {MAX_KALLSYMS_BYTES} bytes");
            return (Self::empty(), Some(why));
        }
        let table = Self::from_raw(raw, arena);
        // The read's symbols (about 2 MB) are freed now.
        crate::target::freed_much();
        (table, None)
    }

    /// Sorts `raw`, keeps the first symbol at each address (blazesym's choice) and one bound of
    /// each run of symbols that are not code.
    fn from_raw(mut raw: Vec<RawSymbol>, arena: String) -> Self {
        // Stable: of the symbols at one address, code first, then in kallsyms' order.
        raw.sort_by_key(|symbol| (symbol.addr, !symbol.text));
        let mut addrs = Vec::new();
        let mut starts = Vec::new();
        let mut lens = Vec::new();
        let mut last_text = None;
        for symbol in &raw {
            if addrs.last() == Some(&symbol.addr) || (!symbol.text && last_text == Some(false)) {
                continue;
            }
            addrs.push(symbol.addr);
            starts.push(symbol.name_start);
            lens.push(if symbol.text {
                symbol.name_len
            } else {
                NOT_TEXT
            });
            last_text = Some(symbol.text);
        }
        Self {
            addrs: Addresses::new(addrs),
            starts: starts.into_boxed_slice(),
            lens: lens.into_boxed_slice(),
            arena: arena.into_boxed_str(),
        }
    }

    /// The start and name of the function at `addr`; `None` below the first symbol and from a
    /// symbol that is not code to the next function.
    pub(super) fn lookup(&self, addr: u64) -> Option<(u64, String)> {
        let index = self.addrs.at_or_below(addr)?;
        let name = self.name(index)?;
        Some((self.addrs.get(index), name))
    }

    fn name(&self, index: usize) -> Option<String> {
        let len = *self.lens.get(index)?;
        if len & NOT_TEXT != 0 {
            return None;
        }
        let start = *self.starts.get(index)? as usize;
        let name = self.arena.get(start..)?.get(..usize::from(len & LEN))?;
        Some(if len & PREFIXED == 0 {
            name.to_owned()
        } else {
            format!("{PFX}{name}")
        })
    }

    /// Bytes the table holds.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.addrs.bytes()
            + size_of_val(&*self.starts)
            + size_of_val(&*self.lens)
            + self.arena.len()
    }

    /// How many symbols (and bounds) the table holds.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lens.len()
    }
}

/// Reads `input` past the next newline, holding none of it.
fn skip_line(input: &mut impl BufRead) -> std::io::Result<()> {
    loop {
        let buffer = input.fill_buf()?;
        if buffer.is_empty() {
            return Ok(());
        }
        if let Some(newline) = memchr::memchr(b'\n', buffer) {
            input.consume(newline + 1);
            return Ok(());
        }
        let read = buffer.len();
        input.consume(read);
    }
}

/// The symbol on one line of kallsyms (`ADDRESS TYPE NAME [MODULE]`), its name appended to
/// `arena` (or found there: a function's name right after its padding's, the line before);
/// `None` for a line blazesym skips too.
fn parse_line(line: &[u8], before: Option<&RawSymbol>, arena: &mut String) -> Option<RawSymbol> {
    let line = std::str::from_utf8(line).ok()?;
    let mut fields = line.split_ascii_whitespace();
    let addr = u64::from_str_radix(fields.next()?, 16).ok()?;
    let kind = fields.next()?;
    let name = fields.next()?;
    if addr == 0 {
        return None;
    }
    // `t`/`T` text, `w`/`W` weak text.
    let text = matches!(kind, "t" | "T" | "w" | "W") && name.len() <= MAX_NAME_BYTES;
    let mut symbol = RawSymbol {
        addr,
        name_start: u32::try_from(arena.len()).ok()?,
        name_len: 0,
        text,
    };
    if !text {
        return Some(symbol);
    }
    let (stored, prefixed) = name
        .strip_prefix(PFX)
        .map_or((name, 0), |stored| (stored, PREFIXED));
    let padding = before.filter(|before| before.text && before.name_len & PREFIXED != 0);
    if let Some(padding) = padding
        && prefixed == 0
        && arena.get(padding.name_start as usize..) == Some(name)
    {
        symbol.name_start = padding.name_start;
    } else {
        arena.push_str(stored);
    }
    symbol.name_len = u16::try_from(stored.len()).ok()? | prefixed;
    Some(symbol)
}

/// `name` demangled as blazesym demangles a kernel symbol's (Rust, else C++), else as it is.
fn demangled(name: String) -> String {
    if let Ok(rust) = rustc_demangle::try_demangle(&name) {
        return format!("{rust:#}");
    }
    cpp_demangle::Symbol::new(name.as_bytes())
        .ok()
        .and_then(|symbol| symbol.demangle().ok())
        .unwrap_or(name)
}

#[cfg(test)]
mod tests {
    use blazesym::{
        MaybeDefault,
        symbolize::{
            Input, Symbolized, Symbolizer as Blazesym,
            source::{Kernel, Source},
        },
    };

    use super::{super::symbolize::frame_from_sym, *};

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
        assert_eq!(&*frame.name, "schedule", "{frame:?}");
        assert_eq!(&*frame.module, KERNEL_MODULE);
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
        assert_eq!(&*frame.name, "schedule");
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
        assert_ne!(&*kernel.frame(schedule - 1).name, "schedule");
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
                Ok(Symbolized::Sym(sym)) => {
                    frame_from_sym(sym, &shared!(KERNEL_MODULE), FrameKind::Kernel)
                }
                _ => Frame::unknown(shared!(KERNEL_MODULE), FrameKind::Kernel),
            };
            assert_eq!(kernel.frame(addr), expected, "at {addr:#x}");
        }
        assert!(kernel.frames.len() > 1, "several functions");
    }

    #[test]
    fn odd_lines_are_skipped_and_never_name_wrong() {
        let long_name = "x".repeat(MAX_NAME_BYTES + 1);
        let long_line = format!("{}\n", "f".repeat(MAX_LINE_BYTES * 3));
        let input = format!(
            "\n\
             garbage\n\
             1000 T\n\
             zzzz T not_hex\n\
             0000000000000000 T hidden\n\
             {long_line}\
             1000 T first\n\
             1000 T alias_of_first\n\
             1100 d some_variable\n\
             1180 b another_variable\n\
             1200 t __pfx_second\n\
             1210 t second\t[some_module]\n\
             1300 T {long_name}\n\
             1400 W weak_one extra fields here\n\
             1500 T \u{e9}t\u{e9}\n\
             1600 T \u{ff}\n"
        );
        let mut bytes = input.into_bytes();
        // A line that is not UTF-8.
        bytes.extend_from_slice(b"1700 T bad\xff\n1800 T after_bad");
        let (table, why) = KallsymsTable::parse(&bytes[..]);
        assert_eq!(why, None);
        let name = |addr| table.lookup(addr);
        assert_eq!(name(0xfff), None, "below the first symbol");
        assert_eq!(
            name(0x1000),
            Some((0x1000, "first".to_owned())),
            "first listed wins"
        );
        assert_eq!(name(0x10ff), Some((0x1000, "first".to_owned())));
        assert_eq!(name(0x1100), None, "a variable is no function's");
        assert_eq!(name(0x11ff), None);
        assert_eq!(name(0x1200), Some((0x1200, "__pfx_second".to_owned())));
        assert_eq!(
            name(0x1210),
            Some((0x1210, "second".to_owned())),
            "module dropped"
        );
        assert_eq!(
            name(0x1300),
            None,
            "a name too long leaves its address unnamed"
        );
        assert_eq!(name(0x1400), Some((0x1400, "weak_one".to_owned())));
        assert_eq!(name(0x1500), Some((0x1500, "\u{e9}t\u{e9}".to_owned())));
        assert_eq!(name(0x1600), Some((0x1600, "\u{ff}".to_owned())));
        assert_eq!(
            name(0x1700),
            Some((0x1600, "\u{ff}".to_owned())),
            "a line that is not UTF-8 is skipped"
        );
        assert_eq!(
            name(u64::MAX),
            Some((0x1800, "after_bad".to_owned())),
            "no end"
        );
        assert_eq!(
            table.len(),
            9,
            "the alias and the second variable are not kept"
        );
    }

    #[test]
    fn a_read_stopped_by_a_bound_names_nothing_and_says_why() {
        let mut input = String::new();
        for line in 0..=MAX_KALLSYMS_LINES {
            input.push_str(if line == 0 { "1000 T f\n" } else { "\n" });
        }
        let (table, why) = KallsymsTable::parse(input.as_bytes());
        assert_eq!(table.lookup(0x1000), None);
        assert_eq!(
            why.as_deref(),
            Some(format!("/proc/kallsyms has over {MAX_KALLSYMS_LINES} lines").as_str())
        );
    }

    #[test]
    fn rust_and_cpp_names_are_demangled_as_blazesym_does() {
        assert_eq!(
            demangled("_RNvCs1234_7mycrate3foo".to_owned()),
            "mycrate::foo"
        );
        assert_eq!(demangled("_ZN3foo3barEv".to_owned()), "foo::bar()");
        assert_eq!(demangled("schedule".to_owned()), "schedule");
    }

    /// Every symbol of the running kernel, and the addresses just past it, are named as
    /// blazesym names them, but where a symbol that is not code bounds a function.
    #[test]
    fn every_kernel_symbol_is_named_as_blazesym_names_it() {
        let started = Instant::now();
        let (table, why) = KallsymsTable::read();
        let took = started.elapsed();
        assert_eq!(why, None);
        let kallsyms = std::fs::read_to_string("/proc/kallsyms").unwrap();
        eprintln!(
            "table of {} symbols: {} bytes ({} of names), read in {took:?}",
            table.len(),
            table.bytes(),
            table.arena.len()
        );
        let blazesym = Blazesym::new();
        let source = Source::Kernel(Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            debug_syms: false,
            ..Kernel::default()
        });
        let started = Instant::now();
        let _ = blazesym.symbolize_single(&source, Input::AbsAddr(0));
        eprintln!("blazesym's first lookup: {:?}", started.elapsed());
        let mut bounds = Vec::new();
        let mut addrs = Vec::new();
        let mut text = std::collections::HashSet::new();
        for line in kallsyms.lines() {
            let mut fields = line.split_ascii_whitespace();
            let (Some(addr), Some(kind)) = (fields.next(), fields.next()) else {
                continue;
            };
            let addr = u64::from_str_radix(addr, 16).unwrap();
            if matches!(kind, "t" | "T" | "w" | "W") {
                text.insert(addr);
                addrs.extend([addr.saturating_sub(1), addr, addr + 1, addr + 15]);
            } else {
                bounds.push(addr);
            }
        }
        assert!(addrs.len() > 4_000, "{} symbols", addrs.len() / 4);
        bounds.sort_unstable();
        let lowest = *addrs.iter().min().unwrap() + 1;
        let mut compared = 0;
        for addr in addrs {
            let expected = match blazesym.symbolize_single(&source, Input::AbsAddr(addr)) {
                Ok(Symbolized::Sym(sym)) => Some((sym.addr, sym.name.into_owned())),
                _ => None,
            };
            let ours = table
                .lookup(addr)
                .map(|(start, name)| (start, demangled(name)));
            // Where blazesym names an address after a symbol that is not code, or after a
            // function with such a symbol between it and the address, ours is unnamed.
            let bounded = expected.as_ref().is_some_and(|(start, _)| {
                let from = bounds.partition_point(|bound| bound <= start);
                bounds.get(from).is_some_and(|bound| *bound <= addr)
                    || (bounds.binary_search(start).is_ok() && !text.contains(start))
            });
            // blazesym's search names the addresses past the lowest one (not the lowest
            // itself) after the last listed symbol there, where it names all others after the
            // first: ours, after the first.
            let lowest_run =
                expected.as_ref().is_some_and(|(start, _)| *start == lowest) && addr != lowest;
            if bounded {
                assert_eq!(ours, None, "at {addr:#x}, blazesym: {expected:?}");
            } else if lowest_run {
                assert_eq!(ours.map(|(start, _)| start), Some(lowest));
            } else {
                assert_eq!(ours, expected, "at {addr:#x}");
                compared += 1;
            }
        }
        assert!(compared > 4_000, "{compared}");
    }
}
