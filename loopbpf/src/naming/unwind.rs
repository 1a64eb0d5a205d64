//! Unwinding user stacks with `.eh_frame` (framehop) from the registers and the copy of the
//! stack top that each sample carries. It goes through code without frame pointers, where the
//! kernel's frame-pointer walk gets lost (OpenSSL's hand-written assembly, glibc's syscall
//! wrappers), and joins that walk again for the frames beyond the copy. JIT code has no unwind
//! tables; framehop walks it by its frame pointers, which V8 keeps. A leaf whose canonical frame
//! address is a DWARF expression (OpenSSL's SHA-2 assembly realigns its stack) is unwound here
//! with gimli, then framehop goes on from its caller.
//!
//! The unwind tables of a file only root can change, in loopbpf's own filesystem (node, the
//! system's libraries), are read where the file is mapped: only the pages a lookup touches are
//! resident (node's tables are 4 MB). Any other file could be truncated under the mapping,
//! which would kill loopbpf with SIGBUS: its tables are copied.

use std::{
    collections::HashSet,
    fs::File,
    mem::size_of,
    ops::{Deref, Range},
    path::Path,
    rc::Rc,
    sync::Arc,
};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, EvaluationResult, LittleEndian, Location,
    RegisterRule, UnwindContext, UnwindSection, Value, X86_64,
};
use memmap2::Mmap;
use object::{CompressionFormat, Object, ObjectSection, read::ReadCache};

use crate::{
    abi::RED_ZONE,
    decode::StackSample,
    target::{
        files::{FileCache, MAX_OBJECT, Segment, Weigh, bias_of, segments},
        maps::{MapsEntry, executable_files},
        proc::Process,
    },
};

/// More frames than any real stack has: a loop in corrupted memory stops here.
const MAX_FRAMES: usize = 256;
/// Largest unwind section read from a file (node's `.eh_frame` is a few MiB): a file that
/// claims more, or decompresses to more, is not unwound through.
const MAX_SECTION: u64 = 64 << 20;
/// Executable mappings given to the unwinder of one process: one that maps and unmaps files
/// at new addresses without end stops being followed into new ones here.
const MAX_MODULES: usize = 4096;

/// What unwinding needs of an object file, wherever it is mapped.
pub struct UnwindSections {
    segments: Vec<Segment>,
    text_svma: Option<Range<u64>>,
    eh_frame_svma: Range<u64>,
    eh_frame: SectionBytes,
    eh_frame_hdr: Option<(Range<u64>, SectionBytes)>,
}

/// The bytes of an unwind section: where its file is mapped, or a copy.
#[derive(Clone)]
pub enum SectionBytes {
    Copied(Arc<[u8]>),
    /// A range of a mapped file only root can change (see the module docs).
    Mapped(Arc<Mmap>, Range<usize>),
}

impl SectionBytes {
    /// What it holds on the heap.
    fn heap_bytes(&self) -> usize {
        match self {
            Self::Copied(bytes) => bytes.len(),
            Self::Mapped(..) => 0,
        }
    }
}

/// No bytes (framehop's sections this module does not give).
impl Default for SectionBytes {
    fn default() -> Self {
        Self::Copied(Arc::from([]))
    }
}

impl Deref for SectionBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Copied(bytes) => bytes,
            // In bounds: checked when the range was taken.
            Self::Mapped(map, range) => &map[range.clone()],
        }
    }
}

/// Unwinds the stacks of one process.
pub struct Unwinder {
    process: Process,
    /// Sections by file, shared with the unwinders of other processes.
    sections: FileCache<UnwindSections>,
    framehop: UnwinderX86_64<SectionBytes>,
    cache: CacheX86_64,
    /// Start addresses of the executable mappings already given to framehop.
    known: HashSet<u64>,
    /// Every mapping of the process when its map was last read, by start.
    mapped: Vec<Range<u64>>,
    /// The same unwind tables, for leaves framehop cannot unwind.
    eh_frames: Vec<EhFrameTable>,
    /// The cache's entries this process uses: they stay cached while it lives.
    in_use: Vec<Rc<UnwindSections>>,
    /// Refreshes that found mappings past [`MAX_MODULES`].
    pub modules_refused: u64,
}

impl Weigh for UnwindSections {
    fn heap_bytes(&self) -> usize {
        self.segments.len() * size_of::<Segment>()
            + self.eh_frame.heap_bytes()
            + self
                .eh_frame_hdr
                .as_ref()
                .map_or(0, |(_, d)| d.heap_bytes())
    }
}

/// One mapping's `.eh_frame`, placed where the process mapped it.
struct EhFrameTable {
    range: Range<u64>,
    bias: u64,
    eh_frame_svma: u64,
    eh_frame: SectionBytes,
    eh_frame_hdr: Option<(u64, SectionBytes)>,
}

impl Unwinder {
    /// An unwinder that knows no mapping yet: see [`Unwinder::add_mappings`].
    pub fn new(pid: u32, sections: &FileCache<UnwindSections>) -> Self {
        Self {
            process: Process::new(pid),
            sections: sections.clone(),
            framehop: UnwinderX86_64::new(),
            cache: CacheX86_64::new(),
            known: HashSet::new(),
            mapped: Vec::new(),
            eh_frames: Vec::new(),
            in_use: Vec::new(),
            modules_refused: 0,
        }
    }

    /// Whether `addr` was inside one of the process's mappings when they were last given
    /// here: a sample with an address outside all of them ran in something mapped since.
    pub fn knows(&self, addr: u64) -> bool {
        let after = self.mapped.partition_point(|range| range.start <= addr);
        after
            .checked_sub(1)
            .is_some_and(|i| self.mapped[i].contains(&addr))
    }

    /// Whether the unwind tables of a mapping that holds `addr` were loaded.
    #[cfg(test)]
    pub fn has_table_at(&self, addr: u64) -> bool {
        self.eh_frames.iter().any(|t| t.range.contains(&addr))
    }

    /// Loads the unwind tables of executable mappings in `maps` (the process's memory map,
    /// read now) that were not given before.
    pub fn add_mappings(&mut self, maps: &[MapsEntry]) {
        self.mapped = maps.iter().map(|entry| entry.range.clone()).collect();
        self.mapped.sort_unstable_by_key(|range| range.start);
        for mapping in executable_files(maps) {
            if self.known.len() >= MAX_MODULES {
                if self.modules_refused == 0 {
                    warning!(
                        "pid {}: more than {MAX_MODULES} executable mappings; native frames in \
                         new ones may be cut short",
                        self.process.pid()
                    );
                }
                self.modules_refused += 1;
                break;
            }
            if !self.known.insert(mapping.range.start) {
                continue;
            }
            let opened = self.process.mapped_file(mapping);
            let Some(sections) = self.sections.get_or_read(
                &mapping.file(),
                Path::new(mapping.file_path()),
                || self.process.open_mapped(mapping, MAX_OBJECT).ok(),
                |file| {
                    // Root's file in loopbpf's filesystem, which the target cannot change:
                    // only root can truncate it, and root can kill loopbpf anyway.
                    let only_root_changes = file.metadata().is_ok_and(|meta| {
                        self.process
                            .writer()
                            .is_some_and(|writer| writer.trusts_links(&meta))
                    });
                    read_sections(file, only_root_changes)
                },
            ) else {
                continue;
            };
            if let Some((module, table)) = place_module(&opened, mapping, &sections) {
                self.framehop.add_module(module);
                self.eh_frames.push(table);
            }
            self.in_use.push(sections);
        }
    }

    /// The sample's user frames, leaf first: the `.eh_frame` unwinding of its stack copy,
    /// continued by the kernel's frame-pointer walk where the copy ends (that walk alone where
    /// nothing could be unwound).
    pub fn unwind(&mut self, sample: &StackSample) -> Vec<u64> {
        self.unwind_copy(sample)
            .and_then(|frames| join(&frames, &sample.user))
            .unwrap_or_else(|| sample.user.clone())
    }

    fn unwind_copy(&mut self, sample: &StackSample) -> Option<Vec<u64>> {
        let [ip, sp, bp] = sample.regs;
        let stack = &sample.stack;
        if ip == 0 || stack.is_empty() {
            return None;
        }
        let base = sp.wrapping_sub(RED_ZONE);
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            let offset = usize::try_from(addr.checked_sub(base).ok_or(())?).map_err(|_| ())?;
            let bytes = stack.get(offset..offset + 8).ok_or(())?;
            Ok(u64::from_le_bytes(bytes.try_into().map_err(|_| ())?))
        };
        // framehop has no rule for a CFA expression; it would fall back to a frame pointer
        // that such code does not keep.
        let leaf = self
            .eh_frames
            .iter()
            .find(|t| t.range.contains(&ip))
            .and_then(|table| unwind_expression_leaf(table, ip, sp, bp, &mut read_stack));
        Some(match leaf {
            Some((ra, cfa, caller_bp)) => {
                let mut frames = vec![ip];
                frames.extend(self.framehop_frames(ra, cfa, caller_bp, &mut read_stack));
                frames
            }
            None => self.framehop_frames(ip, sp, bp, &mut read_stack),
        })
    }

    /// framehop's frames from these registers: the instruction pointer, then return addresses.
    fn framehop_frames(
        &mut self,
        ip: u64,
        sp: u64,
        bp: u64,
        read_stack: &mut impl FnMut(u64) -> Result<u64, ()>,
    ) -> Vec<u64> {
        let regs = UnwindRegsX86_64::new(ip, sp, bp);
        let mut frames = Vec::new();
        let mut iter = self
            .framehop
            .iter_frames(ip, regs, &mut self.cache, read_stack);
        // An error ends the walk: the stack copy ran out, or the tables had no rule.
        while let Ok(Some(frame)) = iter.next() {
            frames.push(match frame {
                FrameAddress::InstructionPointer(a) => a,
                FrameAddress::ReturnAddress(a) => a.get(),
            });
            if frames.len() >= MAX_FRAMES {
                break;
            }
        }
        frames
    }
}

/// The unwound frames, continued by the frame-pointer walk after the last frame they share;
/// `None` when unwinding found nothing better than the walk.
fn join(unwound: &[u64], frame_pointer_walk: &[u64]) -> Option<Vec<u64>> {
    if unwound.len() < 2 {
        return None;
    }
    let mut joined = unwound.to_vec();
    // The deepest return address both found, if the walk goes on beyond it (deeper than the
    // copy). Sharing only the leaf says nothing: the walk may be lost right after it.
    for (i, address) in unwound.iter().enumerate().skip(1).rev() {
        match frame_pointer_walk.iter().position(|a| a == address) {
            Some(at) if at + 1 < frame_pointer_walk.len() => {
                joined.truncate(i + 1);
                joined.extend_from_slice(&frame_pointer_walk[at + 1..]);
                break;
            }
            _ => {}
        }
    }
    Some(joined)
}

/// One frame up from a leaf whose `.eh_frame` row computes its CFA with a DWARF expression:
/// the return address, the caller's stack pointer (the CFA) and its frame pointer. `None` for
/// every other leaf (framehop handles those).
fn unwind_expression_leaf(
    table: &EhFrameTable,
    ip: u64,
    sp: u64,
    bp: u64,
    read_stack: &mut impl FnMut(u64) -> Result<u64, ()>,
) -> Option<(u64, u64, u64)> {
    let eh_frame = EhFrame::new(&table.eh_frame[..], LittleEndian);
    let (hdr_svma, hdr) = table.eh_frame_hdr.as_ref()?;
    let bases = BaseAddresses::default()
        .set_eh_frame(table.eh_frame_svma)
        .set_eh_frame_hdr(*hdr_svma);
    let svma = ip.wrapping_sub(table.bias);
    // The header's sorted table finds the FDE by binary search.
    let fde = EhFrameHdr::new(hdr, LittleEndian)
        .parse(&bases, 8)
        .ok()?
        .table()?
        .fde_for_address(&eh_frame, &bases, svma, EhFrame::cie_from_offset)
        .ok()?;
    let mut context = UnwindContext::new();
    let row = fde
        .unwind_info_for_address(&eh_frame, &bases, &mut context, svma)
        .ok()?;
    let register = |r: gimli::Register| match r {
        X86_64::RSP => Some(sp),
        X86_64::RBP => Some(bp),
        _ => None,
    };
    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { .. } => return None,
        CfaRule::Expression(expression) => {
            let expression = expression.get(&eh_frame).ok()?;
            let mut evaluation = expression.evaluation(fde.cie().encoding());
            let mut step = evaluation.evaluate().ok()?;
            loop {
                step = match step {
                    EvaluationResult::Complete => break,
                    EvaluationResult::RequiresRegister { register: r, .. } => evaluation
                        .resume_with_register(Value::Generic(register(r)?))
                        .ok()?,
                    EvaluationResult::RequiresMemory { address, .. } => evaluation
                        .resume_with_memory(Value::Generic(read_stack(address).ok()?))
                        .ok()?,
                    _ => return None,
                };
            }
            match evaluation.result().first()?.location {
                Location::Address { address } => address,
                _ => return None,
            }
        }
    };
    let saved = |r: gimli::Register, read_stack: &mut dyn FnMut(u64) -> Result<u64, ()>| match row
        .register(r)
    {
        RegisterRule::Offset(offset) => read_stack(cfa.checked_add_signed(offset)?).ok(),
        _ => None,
    };
    let ra = saved(X86_64::RA, read_stack)?;
    let caller_bp = saved(X86_64::RBP, read_stack).unwrap_or(bp);
    Some((ra, cfa, caller_bp))
}

/// The unwind tables of `file`, read where it is mapped if `mappable` (only root can change
/// it), else copied.
fn read_sections(file: File, mappable: bool) -> Option<UnwindSections> {
    if mappable {
        // SAFETY: only root can change the file (see the module docs), so it is not truncated
        // under the mapping; the mapping is read-only and read only as bytes.
        if let Ok(map) = unsafe { Mmap::map(&file) } {
            let map = Arc::new(map);
            return sections_of(&map[..], Some(&map));
        }
    }
    sections_of(&ReadCache::new(file), None)
}

/// The unwind tables of an object file's data (the target's: any bytes at all); `mapped`: the
/// same data mapped, for sections stored uncompressed to be used in place.
fn sections_of<'data, R: object::ReadRef<'data>>(
    data: R,
    mapped: Option<&Arc<Mmap>>,
) -> Option<UnwindSections> {
    let elf = object::File::parse(data).ok()?;
    let section = |name: &str| {
        elf.section_by_name(name).and_then(|s| {
            // Checked before anything is read or decompressed: the file is the target's.
            let compressed = s.compressed_file_range().ok()?;
            if s.size() > MAX_SECTION || compressed.uncompressed_size > MAX_SECTION {
                return None;
            }
            let in_place = mapped.and_then(|map| {
                if compressed.format != CompressionFormat::None
                    || compressed.compressed_size != s.size()
                {
                    return None;
                }
                let start = usize::try_from(compressed.offset).ok()?;
                let end = start.checked_add(usize::try_from(s.size()).ok()?)?;
                map.get(start..end)?;
                Some(SectionBytes::Mapped(Arc::clone(map), start..end))
            });
            let data = match in_place {
                Some(data) => data,
                None => SectionBytes::Copied(s.uncompressed_data().ok()?.into_owned().into()),
            };
            Some((s.address()..s.address() + s.size(), data))
        })
    };
    let (eh_frame_svma, eh_frame) = section(".eh_frame")?;
    Some(UnwindSections {
        segments: segments(&elf),
        text_svma: elf
            .section_by_name(".text")
            .map(|s| s.address()..s.address() + s.size()),
        eh_frame_svma,
        eh_frame,
        eh_frame_hdr: section(".eh_frame_hdr"),
    })
}

/// A file's unwind sections where this process maps it.
fn place_module(
    path: &Path,
    mapping: &MapsEntry,
    sections: &UnwindSections,
) -> Option<(Module<SectionBytes>, EhFrameTable)> {
    let bias = bias_of(&sections.segments, mapping.range.start, mapping.offset)?;
    let table = EhFrameTable {
        range: mapping.range.clone(),
        bias,
        eh_frame_svma: sections.eh_frame_svma.start,
        eh_frame: sections.eh_frame.clone(),
        eh_frame_hdr: sections
            .eh_frame_hdr
            .as_ref()
            .map(|(r, d)| (r.start, d.clone())),
    };
    let info = ExplicitModuleSectionInfo {
        base_svma: 0,
        text_svma: sections.text_svma.clone(),
        eh_frame_svma: Some(sections.eh_frame_svma.clone()),
        eh_frame: Some(sections.eh_frame.clone()),
        eh_frame_hdr_svma: sections.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
        eh_frame_hdr: sections.eh_frame_hdr.as_ref().map(|(_, d)| d.clone()),
        ..Default::default()
    };
    let module = Module::new(
        path.display().to_string(),
        mapping.range.clone(),
        bias,
        info,
    );
    Some((module, table))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwound_frames_continue_with_the_deeper_frame_pointer_walk() {
        // The walk lost its way after the leaf (garbage 0xdead), then found 30, 40, 50.
        let walk = [10, 0xdead, 30, 40, 50];
        assert_eq!(join(&[10, 20, 30], &walk), Some(vec![10, 20, 30, 40, 50]));
        // Nothing shared but the leaf: the unwound frames alone, not the lost walk.
        assert_eq!(join(&[10, 20, 25], &[10, 0xdead]), Some(vec![10, 20, 25]));
        // Unwinding failed at once: keep the walk.
        assert_eq!(join(&[10], &walk), None);
    }

    #[test]
    fn a_file_only_root_changes_is_read_in_place_with_the_same_tables() {
        let open = || File::open("/bin/true").expect("/bin/true");
        let mapped = read_sections(open(), true).expect("unwind tables");
        let copied = read_sections(open(), false).expect("unwind tables");
        assert!(matches!(mapped.eh_frame, SectionBytes::Mapped(..)));
        assert!(matches!(copied.eh_frame, SectionBytes::Copied(_)));
        assert!(!copied.eh_frame.is_empty());
        assert_eq!(mapped.eh_frame[..], copied.eh_frame[..]);
        let hdr = |sections: &UnwindSections| {
            let (svma, bytes) = sections.eh_frame_hdr.clone().expect(".eh_frame_hdr");
            (svma, bytes.to_vec())
        };
        assert_eq!(hdr(&mapped), hdr(&copied));
        assert!(mapped.heap_bytes() + copied.eh_frame.len() <= copied.heap_bytes());
    }

    #[test]
    fn elf_files_of_any_bytes_are_read_within_bounds() {
        use crate::{naming::v8::metadata_of, target::fuzz::fuzz};
        let real = std::fs::read("/bin/true").expect("/bin/true");
        assert!(
            sections_of(&*real, None).is_some(),
            "a real ELF has unwind tables"
        );
        // Mutations near the headers, where the sizes and offsets are.
        let seeds = [real[..real.len().min(8192)].to_vec(), real.clone()];
        fuzz(
            &seeds,
            2_000,
            2 * MAX_SECTION as usize + (1 << 20),
            |input| {
                if let Some(sections) = sections_of(input, None) {
                    assert!(sections.eh_frame.len() as u64 <= MAX_SECTION);
                }
                let _ = metadata_of(input);
            },
        );
    }
}
