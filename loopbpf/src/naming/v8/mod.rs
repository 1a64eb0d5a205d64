//! JS frames named from V8's own heap, from outside the process and with no flag on it.
//!
//! The node binary carries V8's postmortem metadata (`v8dbg_*` globals): where a JS frame keeps
//! its function, how heap objects are laid out, the type tags. A sample's copy of the stack top
//! holds the frame slots as they were when it was taken; the frame-pointer chain through that
//! copy finds the JS frames, and their pointers are followed through `/proc/PID/mem` right
//! away, while the busy interval still runs: the function and its `SharedFunctionInfo` give the
//! name and the script, the bytecode offset of an interpreted frame gives the line and column
//! it was at, the pc of an optimized frame (`TurboFan`, Maglev, OSR code) gives its position and
//! the functions inlined into it, the receiver gives the class of a method call, as Node
//! prints them. A baseline (Sparkplug) frame, and an optimized one whose code does not check
//! out, is placed where its function starts, without a column.
//!
//! Objects move when the GC runs, so what the GC moves soonest (functions, receivers) is read
//! by the kernel side when the sample is taken, and no pointer is followed before the type of
//! the object it points at is checked; a frame that does not check out stays `[JS]`.
//!
//! What the metadata does not describe (the `ScopeInfo` layout, the source position table,
//! parts of the code objects) is read as V8 10.2 to 14.6 (Node 18 to 26) lay it out, chosen by
//! V8's version in the binary.
//!
//! Here: the walk of a sample's frames and the naming of each. The heap reading is in [`heap`],
//! source positions in [`positions`], optimized code and its inlining in [`code`], the
//! metadata in [`layout`], source maps in [`source_maps`].

mod code;
#[cfg(test)]
mod fuzz;
mod heap;
mod http;
mod layout;
mod object;
mod positions;
mod regexp;
mod source_maps;

use std::{
    collections::HashMap,
    mem::size_of,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use crate::{
    abi::{CapturedFrame, RED_ZONE, V8Layout},
    decode::StackSample,
    naming::frame::{Frame, shared},
    target::{
        budget::{BoundedCache, BudgetedMemory, Limits, NAMING_LIMITS},
        files::{FileCache, MAX_OBJECT, Weigh},
        maps::executable_files,
        memory::ReadMemory,
        proc::Process,
    },
};

use heap::{FunctionInfo, heap_object};
use http::MapKind;
#[cfg(test)]
pub use layout::metadata_of;
use layout::{Layout, postmortem_metadata};
use object::MapProperties;
use positions::LineEnds;
use regexp::RegExpLayout;
use source_maps::SourceMaps;

/// What the `v8dbg_*` values of a node binary say: read once per binary, for every process
/// that runs it (the values themselves are dropped once read).
pub struct Metadata {
    /// The layout of its heap objects and frames; what is missing when it cannot be used.
    layout: Result<Layout, String>,
    regexp: Option<RegExpLayout>,
}

impl Metadata {
    fn read(file: std::fs::File) -> Option<Self> {
        let values = postmortem_metadata(file)?;
        Some(Self {
            layout: Layout::from_metadata(&values),
            regexp: RegExpLayout::from_metadata(&values),
        })
    }
}

impl Weigh for Metadata {
    fn heap_bytes(&self) -> usize {
        // The layouts' few vectors of type tags, and a reason why not.
        1024
    }
}

/// Frames looked at in one sample (the frame-pointer chain through the stack copy).
const MAX_CHAIN: usize = 256;
/// Unwound return addresses where a broken frame-pointer chain is picked up again.
const MAX_SEEDS: usize = 16;
/// Frames from the top of a chain where compiled regexp code is looked for.
const MAX_REGEXP_DEPTH: usize = 4;
/// Entries kept in each cache before it is cleared (a long session stays bounded).
const MAX_CACHE: usize = 65_536;
/// Bytes kept by the caches of what functions and receivers are named (names and paths up to
/// 512 characters each).
const MAX_NAME_CACHE_BYTES: usize = 8 << 20;
/// Bytes kept by the cache of scripts' line ends (4 bytes a line).
const MAX_LINE_ENDS_BYTES: usize = 16 << 20;
/// Executable file mappings kept to tell V8's code from the files' (a process maps a few
/// dozen).
const MAX_FILE_CODE: usize = 4096;
/// Distinct named frames kept for the run (a sample refers to them by index, so they are never
/// dropped), and their bytes: past either, new frames stay `[JS]`.
const MAX_FRAMES: usize = 1 << 20;
const MAX_FRAME_BYTES: usize = 64 << 20;

/// A JS frame of a sample: the address its code ran at, and what the frame was named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JsFrameRef {
    /// The instruction pointer (leaf) or return address the frame's function runs at.
    pub pc: u64,
    /// Index into [`JsNamer::frame`].
    pub id: u32,
    /// The outermost function of its physical frame (the ones before it at the same pc were
    /// inlined into it). Interpreted frames all return into the same trampoline: the pc alone
    /// does not tell two of them apart.
    pub ends_frame: bool,
}

/// Frames of one busy interval whose names are kept for its later samples (a loop's stacks
/// share most of their frames); past them, frames are named anew at every sample.
const MAX_INTERVAL_FRAMES: usize = 4096;
/// Threads whose current interval's frames are kept; past them, all are dropped.
const MAX_INTERVAL_THREADS: usize = 256;

/// The frames named in a thread's current busy interval, and the interval (its start).
/// A frame is known by its frame pointer and its slots: the same call at the same place.
type IntervalFrames = (u64, HashMap<(u64, FrameSlots), Vec<u32>>);

/// The slots of a JS frame as the sample's stack copy holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FrameSlots {
    function: u64,
    /// Interpreted and baseline frames: the `BytecodeArray`.
    bytecode_array: Option<u64>,
    /// Interpreted frames: a Smi; baseline frames keep the feedback there instead.
    bytecode_offset: Option<u64>,
    receiver: Option<u64>,
    /// What the kernel side read through the slots when the sample was taken.
    captured: Option<CapturedFrame>,
    /// Where the frame's code runs: the sample's instruction pointer (the leaf) or a return
    /// address.
    pc: u64,
    is_return: bool,
    /// The leaf's caller's return address as unwound: where a leaf JS frame's code is when the
    /// pc is in a builtin it called without a frame of its own.
    leaf_return: Option<u64>,
}

/// Names JS frames of one process.
pub struct JsNamer {
    pid: u32,
    layout: Layout,
    /// Where regexps keep their source; `None`: regexps stay unnamed.
    regexp: Option<RegExpLayout>,
    /// Held while the process is named, so that the cache keeps it for the next process of
    /// that binary: unheld, every exit pruned it, and under churn each new process read the
    /// 100 MB node binary's symbols again (most of loopbpf's CPU then).
    held_metadata: Option<std::rc::Rc<Metadata>>,
    /// The process's memory, read within [`NAMING_LIMITS`].
    memory: BudgetedMemory,
    /// Instance type by map address (maps live in old space and seldom move).
    types: BoundedCache<u64, u16>,
    functions: BoundedCache<u64, FunctionInfo>,
    /// Script offset by bytecode array, its position table and bytecode offset.
    positions: BoundedCache<(u64, u64, i64), Option<u32>>,
    line_ends: BoundedCache<u64, LineEnds>,
    /// What the kernel side read for a frame (thread, busy interval, frame pointer, function
    /// and receiver slots): for samples where it could not follow the chain to that frame (a
    /// leaf in libc). Within one busy interval a frame is one call, and the GC rewrites its
    /// slots when it moves the objects, so equal slots mean the same objects. Across intervals
    /// they do not: a new call at the same depth may find a function at an address a moved one
    /// left (a worker's message handler named as the bootstrap's, its frames at the same place).
    captured_before: BoundedCache<(u32, u64, u64, u64, u64), CapturedFrame>,
    /// Class name of receivers by their map, with the constructor word it was read from.
    receiver_types: BoundedCache<u64, (u64, Arc<str>)>,
    source_maps: SourceMaps,
    /// Where the header of the code holding a pc was found (checked again on every use).
    code_headers: BoundedCache<u64, u64>,
    /// Pcs with no code header below them.
    no_code: BoundedCache<u64, ()>,
    /// The executable files' code as mapped when the namer was made (node's own builtins and
    /// interpreter among it): no V8 code object there, not searched.
    file_code: Vec<std::ops::Range<u64>>,
    /// The map of the objects whose instructions follow them, once one was found.
    code_header_map: Option<u64>,
    /// By thread: what the frames of its current busy interval were named. Within one interval
    /// a frame is one call, and the GC rewrites its slots when it moves the objects, so a frame
    /// with the same slots, pc and captured reads is the same call of the same function at the
    /// same place, named the same (the argument [`JsNamer::captured_before`] rests on); across
    /// intervals it is not, so a thread's frames are dropped when its next interval starts.
    interval_frames: HashMap<u32, IntervalFrames>,
    frames: Vec<Frame>,
    frame_ids: HashMap<Frame, u32>,
    /// Estimated bytes of `frames` and `frame_ids`.
    frame_bytes: usize,
    limits_hit: LimitsHit,
    /// The JS frames of the last sample walked, for [`JsNamer::request`].
    frame_pointers: Vec<u64>,
    /// Where maps keep the properties read of requests, and what made them.
    map_properties: BoundedCache<u64, MapProperties>,
    request_maps: BoundedCache<u64, (u64, MapKind)>,
    /// Requests read in a busy interval, and the interval being read for.
    requests_read: BoundedCache<http::RequestKey, crate::naming::request::Request>,
    reading_for: (u32, u64, bool),
}

/// Where the limits on naming one process's JS frames left frames unnamed or dropped what was
/// read: each counted, for the summary and the metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsHit {
    /// Samples whose JS frames were left (partly) unnamed because the read budget was spent.
    pub budget_exceeded: u64,
    /// Frames left `[JS]` because the table of named frames was full.
    pub frames_refused: u64,
    /// Times a cache was cleared because it was full, or an entry refused as too large.
    pub cache_evictions: u64,
}

impl JsNamer {
    /// The namer for `pid`; `None` when the process has no V8; why not when its V8 cannot be
    /// read.
    /// `metadata` keeps what was read of each file, for other processes that map it.
    pub fn new(pid: u32, metadata: &FileCache<Metadata>) -> Result<Option<Self>, String> {
        let process = Process::new(pid);
        let maps = process
            .maps()
            .map_err(|e| format!("cannot read the target's maps: {e}"))?;
        let mut seen = Vec::new();
        let mut found = None;
        for mapping in executable_files(&maps) {
            let path = Path::new(mapping.file_path());
            if seen.contains(&path) {
                continue;
            }
            seen.push(path);
            if let Some(values) = metadata.get_or_read(
                &mapping.file(),
                Path::new(mapping.file_path()),
                || process.open_mapped(mapping, MAX_OBJECT).ok(),
                Metadata::read,
            ) {
                found = Some((PathBuf::from(path), values));
                break;
            }
        }
        let Some((path, metadata)) = found else {
            return Ok(None);
        };
        let layout = metadata
            .layout
            .clone()
            .map_err(|why| format!("{}: V8 metadata not usable: {why}", path.display()))?;
        let memory = process
            .memory()
            .map_err(|e| format!("cannot read the target's memory: {e}"))?;
        let mut namer = Self::with_memory(pid, layout, Box::new(memory), NAMING_LIMITS);
        namer.regexp.clone_from(&metadata.regexp);
        namer.file_code = executable_files(&maps)
            .take(MAX_FILE_CODE)
            .map(|m| m.range.clone())
            .collect();
        namer.held_metadata = Some(metadata);
        Ok(Some(namer))
    }

    /// The namer of `pid`'s V8 laid out as `layout`, reading `memory` within `limits`.
    fn with_memory(pid: u32, layout: Layout, memory: Box<dyn ReadMemory>, limits: Limits) -> Self {
        Self {
            pid,
            layout,
            regexp: None,
            held_metadata: None,
            memory: BudgetedMemory::new(memory, limits),
            types: BoundedCache::new(MAX_CACHE, MAX_CACHE * 64),
            functions: BoundedCache::new(MAX_CACHE, MAX_NAME_CACHE_BYTES),
            positions: BoundedCache::new(MAX_CACHE, MAX_CACHE * 96),
            line_ends: BoundedCache::new(MAX_CACHE, MAX_LINE_ENDS_BYTES),
            receiver_types: BoundedCache::new(MAX_CACHE, MAX_NAME_CACHE_BYTES),
            captured_before: BoundedCache::new(MAX_CACHE, MAX_CACHE * 128),
            source_maps: SourceMaps::new(&Process::new(pid)),
            code_headers: BoundedCache::new(MAX_CACHE, MAX_CACHE * 64),
            no_code: BoundedCache::new(MAX_CACHE, MAX_CACHE * 48),
            file_code: Vec::new(),
            code_header_map: None,
            interval_frames: HashMap::new(),
            frames: Vec::new(),
            frame_ids: HashMap::new(),
            frame_bytes: 0,
            limits_hit: LimitsHit::default(),
            frame_pointers: Vec::new(),
            map_properties: BoundedCache::new(MAX_CACHE, MAX_NAME_CACHE_BYTES),
            request_maps: BoundedCache::new(MAX_CACHE, MAX_CACHE * 64),
            requests_read: BoundedCache::new(4096, 4 << 20),
            reading_for: (0, 0, false),
        }
    }

    /// Where limits left frames unnamed so far.
    pub fn limits_hit(&self) -> LimitsHit {
        let caches = [
            (self.types.cleared, self.types.refused),
            (self.functions.cleared, self.functions.refused),
            (self.positions.cleared, self.positions.refused),
            (self.line_ends.cleared, self.line_ends.refused),
            (self.receiver_types.cleared, self.receiver_types.refused),
            (self.captured_before.cleared, self.captured_before.refused),
            (self.code_headers.cleared, self.code_headers.refused),
            (self.no_code.cleared, self.no_code.refused),
            (self.map_properties.cleared, self.map_properties.refused),
            (self.request_maps.cleared, self.request_maps.refused),
            (self.requests_read.cleared, self.requests_read.refused),
        ];
        LimitsHit {
            cache_evictions: caches.iter().map(|(c, r)| c + r).sum::<u64>()
                + self.source_maps.evictions(),
            ..self.limits_hit
        }
    }

    /// What was read of the process's memory.
    #[cfg(test)]
    pub fn memory_used(&self) -> crate::target::budget::Used {
        self.memory.used()
    }

    /// Whether what was read in this sample may be cached: not when a read was refused, which
    /// made it look missing.
    fn may_cache(&self) -> bool {
        !self.memory.spent()
    }

    /// What the kernel side reads of each sampled frame, for this process's V8.
    pub fn kernel_layout(&self) -> V8Layout {
        let l = &self.layout;
        // Out of range (never in a real V8): the kernel side reads nothing.
        let fields = (
            i32::try_from(l.fp_function),
            i32::try_from(l.fp_receiver),
            u32::try_from(l.function_shared),
        );
        match fields {
            (Ok(fp_function), Ok(fp_receiver), Ok(function_shared)) => V8Layout {
                fp_function,
                fp_receiver,
                function_shared,
                enabled: 1,
            },
            _ => V8Layout::default(),
        }
    }

    /// A named frame by the id a [`JsFrameRef`] carries.
    pub fn frame(&self, id: u32) -> Option<&Frame> {
        self.frames.get(id as usize)
    }

    /// The JS frames of a sample, leaf first, found on the frame-pointer chain through the
    /// sample's stack copy. Where code without frame pointers (libc) breaks the chain, it is
    /// picked up again at `user`, the unwound return addresses.
    pub fn js_frames(&mut self, sample: &StackSample, user: &[u64]) -> Vec<JsFrameRef> {
        self.memory.start_sample(Instant::now());
        self.frame_pointers.clear();
        let refs = self.js_frames_within_budget(sample, user);
        if self.memory.spent() {
            if self.limits_hit.budget_exceeded == 0 {
                let limits = self.memory.limits();
                warning!(
                    "JS frames of pid {} left unnamed: naming budget spent (at most {} reads and \
                     {} MiB per sample, {} reads and {} MiB a second)",
                    self.pid,
                    limits.sample_reads,
                    limits.sample_bytes >> 20,
                    limits.reads_per_second,
                    limits.bytes_per_second >> 20,
                );
            }
            self.limits_hit.budget_exceeded += 1;
        }
        refs
    }

    fn js_frames_within_budget(&mut self, sample: &StackSample, user: &[u64]) -> Vec<JsFrameRef> {
        let [ip, sp, bp] = sample.regs;
        let base = sp.wrapping_sub(RED_ZONE);
        let stack = &sample.stack;
        let slot = |addr: Option<u64>| -> Option<u64> {
            let offset = usize::try_from(addr?.checked_sub(base)?).ok()?;
            let bytes = stack.get(offset..offset.checked_add(8)?)?;
            Some(u64::from_le_bytes(bytes.try_into().ok()?))
        };
        let mut refs = Vec::new();
        let mut seen = Vec::new();
        let leaf_return = user.get(1).copied();
        self.walk_chain(sample, (ip, leaf_return), bp, &slot, &mut seen, &mut refs);
        // A return address found in the copy sits right above its callee's saved frame
        // pointer: the caller's frame pointer.
        let words = stack
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().unwrap()));
        let words: Vec<u64> = words.collect();
        // Above the red zone: below sp are leftovers of calls that returned.
        let mut from = usize::try_from(RED_ZONE / 8).unwrap_or(0) + 1;
        for (k, &ra) in user.iter().enumerate().skip(1).take(MAX_SEEDS) {
            let Some(at) = words[from.min(words.len())..].iter().position(|&w| w == ra) else {
                continue;
            };
            let at = from + at;
            from = at + 1;
            let caller_fp = words[at - 1];
            // The caller's frame is above this one, inside the copy.
            let slot_addr = base + 8 * (at as u64 - 1);
            let copy_end = base + words.len() as u64 * 8;
            // And it is the frame of the function at `ra` only if it returns where the
            // unwinding says that function returns.
            let returns_to = slot(caller_fp.checked_add(8));
            if caller_fp > slot_addr
                && caller_fp < copy_end
                && returns_to.is_some()
                && returns_to == user.get(k + 1).copied()
                && !seen.contains(&caller_fp)
            {
                self.walk_chain(sample, (ra, None), caller_fp, &slot, &mut seen, &mut refs);
            }
        }
        // Leaf first: frames deeper in the stack sit at higher addresses.
        refs.sort_by_key(|&(fp, _)| fp);
        refs.into_iter().map(|(_, r)| r).collect()
    }

    /// Names the JS frames of the chain from frame pointer `fp`, whose code runs at `pc` (with
    /// the return address a frameless leaf returns to, for the sample's own leaf).
    fn walk_chain(
        &mut self,
        sample: &StackSample,
        (mut pc, leaf_return): (u64, Option<u64>),
        mut fp: u64,
        slot: &impl Fn(Option<u64>) -> Option<u64>,
        seen: &mut Vec<u64>,
        refs: &mut Vec<(u64, JsFrameRef)>,
    ) {
        let l = &self.layout;
        let (fp_function, fp_context) = (l.fp_function, l.fp_context);
        let (fp_bytecode_array, fp_bytecode_offset) = (l.fp_bytecode_array, l.fp_bytecode_offset);
        let fp_receiver = l.fp_receiver;
        for _ in 0..MAX_CHAIN {
            if seen.contains(&fp) {
                break; // another walk named this part already
            }
            seen.push(fp);
            if pc == 0 {
                break;
            }
            let at = |offset: i64| fp.checked_add_signed(offset);
            // Compiled regexp code runs at the leaf, or calls a helper: near it, before any JS.
            if refs.is_empty()
                && seen.len() <= MAX_REGEXP_DEPTH
                && let Some(id) = self.irregexp_frame(fp, slot)
            {
                // The JS frame of the same frame pointer, if any, follows it.
                refs.push((
                    fp,
                    JsFrameRef {
                        pc,
                        id,
                        ends_frame: false,
                    },
                ));
            }
            // A JS frame has a context (a heap object) where typed frames keep a Smi marker.
            let context = slot(at(fp_context));
            if let (Some(function), Some(context)) = (slot(at(fp_function)), context)
                && heap_object(context).is_some()
            {
                self.frame_pointers.push(fp);
                let receiver = slot(at(fp_receiver));
                let mut captured = sample.captured.iter().find(|c| c.fp == fp).copied();
                // The same frame, with the same slots, read at an earlier sample of this call.
                let key = (
                    sample.of.tid,
                    sample.of.busy_since_ns,
                    fp,
                    function,
                    receiver.unwrap_or(0),
                );
                match captured {
                    Some(c) => {
                        self.captured_before.insert(key, c, 0);
                    }
                    None => captured = self.captured_before.get(&key).copied(),
                }
                let slots = FrameSlots {
                    function,
                    bytecode_array: slot(at(fp_bytecode_array)),
                    bytecode_offset: slot(at(fp_bytecode_offset)),
                    receiver,
                    captured,
                    pc,
                    is_return: pc != sample.regs[0],
                    leaf_return: leaf_return.filter(|_| pc == sample.regs[0]),
                };
                // Inlined functions first: they run inside this frame.
                let mut ids = self.name_frame_once(sample, fp, &slots);
                // A builtin with only native code leafward (the regexp interpreter): the
                // regexp it was called with, when it was.
                if refs.is_empty()
                    && !ids.is_empty()
                    && let Some(regexp) =
                        self.builtin_regexp(function, receiver, slot(at(fp_receiver + 8)))
                {
                    ids = vec![regexp];
                }
                let last = ids.len().saturating_sub(1);
                for (n, id) in ids.into_iter().enumerate() {
                    refs.push((
                        fp,
                        JsFrameRef {
                            pc,
                            id,
                            ends_frame: n == last,
                        },
                    ));
                }
            }
            let (Some(caller_fp), Some(ra)) = (slot(Some(fp)), slot(fp.checked_add(8))) else {
                break;
            };
            // The stack grows down: a caller's frame is always above.
            if caller_fp <= fp {
                break;
            }
            (fp, pc) = (caller_fp, ra);
        }
    }

    /// [`Self::name_frame`], once per busy interval for a frame that stays the same call at the
    /// same place (see [`Self::interval_frames`]).
    fn name_frame_once(&mut self, sample: &StackSample, fp: u64, slots: &FrameSlots) -> Vec<u32> {
        let key = (fp, *slots);
        let (tid, since) = (sample.of.tid, sample.of.busy_since_ns);
        if let Some((at, named)) = self.interval_frames.get(&tid)
            && *at == since
            && let Some(ids) = named.get(&key)
        {
            return ids.clone();
        }
        let ids = self.name_frame(slots);
        // Only what was named whole and exactly: a frame left unnamed for a spent budget, or
        // placed at its function's start because its code did not check out this time (code
        // just installed by OSR), is tried again at the next sample, as before.
        let exact = |id: &u32| {
            self.frame(*id)
                .is_some_and(|f| f.line.is_none() || f.column.is_some())
        };
        if ids.is_empty() || !ids.iter().all(exact) || !self.may_cache() {
            return ids;
        }
        if !self.interval_frames.contains_key(&tid)
            && self.interval_frames.len() >= MAX_INTERVAL_THREADS
        {
            self.interval_frames.clear();
        }
        let (at, named) = self.interval_frames.entry(tid).or_default();
        if *at != since {
            *at = since;
            named.clear();
        }
        if named.len() < MAX_INTERVAL_FRAMES {
            named.insert(key, ids.clone());
        }
        ids
    }

    /// Names a frame, and the functions inlined into it where its code is optimized, leaf
    /// first; nothing unless its function checks out as a `JSFunction` with a
    /// `SharedFunctionInfo` whose name can be read.
    fn name_frame(&mut self, slots: &FrameSlots) -> Vec<u32> {
        self.name_frames(slots).unwrap_or_default()
    }

    fn name_frames(&mut self, slots: &FrameSlots) -> Option<Vec<u32>> {
        let function = heap_object(slots.function)?;
        let shared = if let Some(captured) = slots.captured {
            // Read when the sample was taken; checked below as a SharedFunctionInfo.
            heap_object(captured.shared)?
        } else {
            // Not read by the kernel side (deeper than it walks, past a chain it could not
            // follow, or before the layout was set): read now, and type-checked.
            if !self.is_function(function) {
                return None;
            }
            heap_object(self.memory.word(function + self.layout.function_shared)?)?
        };
        let info = self.function_info(shared)?;
        let name = info.name.clone()?;
        // Exact for optimized code that checks out (with the functions inlined into it) and
        // for an interpreted frame; another compiled one is placed where its function starts,
        // and says so by having no column. Optimized code first: code that replaced an
        // interpreted frame on the stack (OSR) keeps its slots, at the loop it left.
        let mut ids = Vec::new();
        let chain = self
            .optimized_chain(slots.pc, slots.is_return, shared)
            .or_else(|| self.optimized_chain(slots.leaf_return?, true, shared));
        let current = match chain.as_ref().and_then(|c| c.split_last()) {
            Some((own, inlined)) => {
                for function in inlined {
                    ids.push(self.name_inlined(function)?);
                }
                own.offset
            }
            None => self.bytecode_position(slots),
        };
        let exact = current.is_some();
        let offset = current
            .or(info.start)
            .and_then(|offset| Some((info.script?, offset)));
        let position = offset.and_then(|(script, offset)| self.line_column(script, offset));
        // The receiver's class only from its map as read at sample time: a young receiver
        // moves with every scavenge, and what is at its old address now says nothing.
        let map_at_sample = slots.captured.and_then(|c| heap_object(c.receiver_map));
        let type_name = match (slots.receiver, map_at_sample) {
            (Some(receiver), Some(map)) => self.receiver_type(receiver, map),
            _ => None,
        };
        let mut frame = Frame::js_at(
            display_name(&name, type_name.as_deref()),
            info.file.clone(),
            position.map(|(line, column)| (line, exact.then_some(column))),
        );
        if let (Some(file), Some((line, column))) = (&info.file, position) {
            frame.original = self.source_maps.original(file, line, column);
        }
        ids.push(self.intern(frame)?);
        Some(ids)
    }

    /// A function inlined into an optimized frame, at its position (no receiver is read for
    /// it: a method inlined goes without its class).
    fn name_inlined(&mut self, function: &code::Inlined) -> Option<u32> {
        let info = self.function_info(function.shared)?;
        let name = info.name.clone()?;
        let exact = function.offset.is_some();
        let position = info
            .script
            .zip(function.offset.or(info.start))
            .and_then(|(script, offset)| self.line_column(script, offset));
        let mut frame = Frame::js_at(
            display_name(&name, None),
            info.file.clone(),
            position.map(|(line, column)| (line, exact.then_some(column))),
        );
        if let (Some(file), Some((line, column))) = (&info.file, position) {
            frame.original = self.source_maps.original(file, line, column);
        }
        self.intern(frame)
    }

    /// The id of a named frame; `None` (the frame stays `[JS]`, counted) once the table of
    /// frames is full.
    fn intern(&mut self, frame: Frame) -> Option<u32> {
        if let Some(&id) = self.frame_ids.get(&frame) {
            return Some(id);
        }
        // Kept twice (the table and its index), each with its strings.
        let bytes = 2 * (size_of::<Frame>() + frame_heap_bytes(&frame)) + 16;
        if self.frames.len() >= MAX_FRAMES || self.frame_bytes + bytes > MAX_FRAME_BYTES {
            self.limits_hit.frames_refused += 1;
            return None;
        }
        let id = u32::try_from(self.frames.len()).ok()?;
        self.frame_bytes += bytes;
        self.frames.push(frame.clone());
        self.frame_ids.insert(frame, id);
        Some(id)
    }
}

/// The bytes a frame's strings keep.
fn frame_heap_bytes(frame: &Frame) -> usize {
    frame.name.len()
        + frame.module.len()
        + frame.file.as_ref().map_or(0, |file| file.len())
        + frame.original.as_ref().map_or(0, |o| o.file.len())
}

/// A frame's name as `Error.stack` prints it: `Class.method` for a method call whose name is
/// an identifier other than the class's own, `<anonymous>` for a function without one.
fn display_name(name: &Arc<str>, receiver_type: Option<&str>) -> Arc<str> {
    match receiver_type {
        Some(class) if name.is_empty() => format!("{class}.<anonymous>").into(),
        Some(class) if is_identifier(name) && **name != *class => format!("{class}.{name}").into(),
        _ if name.is_empty() => shared!("<anonymous>"),
        _ => Arc::clone(name),
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_like_node_prints_them() {
        let shown = |name: &str, class| display_name(&name.into(), class).to_string();
        assert_eq!(shown("crunch", Some("Worker")), "Worker.crunch");
        assert_eq!(shown("", Some("Object")), "Object.<anonymous>");
        assert_eq!(shown("Worker", Some("Worker")), "Worker");
        assert_eq!(shown("ns.inner", Some("Object")), "ns.inner");
        assert_eq!(shown("spin", None), "spin");
        assert_eq!(shown("", None), "<anonymous>");
    }

    #[test]
    fn a_frame_is_named_once_per_busy_interval() {
        let mut b = fuzz::Builder::new();
        let run = b.string("run");
        let shared = b.shared_named(run);
        let mut namer = b.namer();
        let mut sample = fuzz::one_frame_sample(shared);
        let mut name_it = |sample: &StackSample| {
            let refs = namer.js_frames(sample, &[]);
            let got: Vec<String> = refs
                .iter()
                .map(|r| namer.frame(r.id).unwrap().name.to_string())
                .collect();
            (got, namer.memory_used().sample_reads)
        };
        let (got, first_reads) = name_it(&sample);
        assert_eq!(got, ["run"]);
        // The same frame again in the same interval: named from the first sample.
        let (got, reads) = name_it(&sample);
        assert_eq!(got, ["run"]);
        assert!(first_reads > 0);
        assert_eq!(reads, 0, "named without reading the target's memory again");
        // In the thread's next interval it may be another call: read again.
        sample.of.busy_since_ns += 1;
        let (got, next_reads) = name_it(&sample);
        assert_eq!(got, ["run"]);
        assert!(next_reads > 0, "checked again in another interval");
    }
}
