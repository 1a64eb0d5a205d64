//! JS frames named from V8's own heap, from outside the process and with no flag on it.
//!
//! The node binary carries V8's postmortem metadata (`v8dbg_*` globals): where a JS frame keeps
//! its function, how heap objects are laid out, the type tags. A sample's copy of the stack top
//! holds the frame slots as they were when it was taken; the frame-pointer chain through that
//! copy finds the JS frames, and their pointers are followed through `/proc/PID/mem` right
//! away, while the busy interval still runs: the function and its `SharedFunctionInfo` give the
//! name and the script, the bytecode offset of an interpreted frame gives the line and column
//! it was at, the receiver gives the class of a method call, as Node prints them.
//!
//! Objects move when the GC runs, so what the GC moves soonest (functions, receivers) is read
//! by the kernel side when the sample is taken, and no pointer is followed before the type of
//! the object it points at is checked; a frame that does not check out stays `[JS]`.
//!
//! What the metadata does not describe (the `ScopeInfo` layout, the source position table) is
//! read as V8 10.2 to 14.6 (Node 18 to 26) lay it out, chosen by V8's version in the binary.

mod layout;
mod source_maps;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use crate::{
    abi::{CapturedFrame, RED_ZONE, V8Layout},
    decode::StackSample,
    naming::frame::Frame,
    target::{files::FileCache, maps::executable_files, memory::Memory, proc::Process},
};

use layout::{Layout, postmortem_metadata};

/// The `v8dbg_*` values of a node binary, by name.
pub type Metadata = HashMap<String, i64>;
use source_maps::SourceMaps;

/// Longest name or path read from a V8 string; longer ones are cut.
const MAX_NAME: usize = 512;
/// Longest script source read to find line ends (a large bundle is still read once).
const MAX_SOURCE: usize = 64 << 20;
/// Most line ends read from a script's own table (V8 computed them).
const MAX_LINES: usize = 1 << 22;
/// Longest source position table read.
const MAX_POSITION_TABLE: usize = 1 << 20;
/// Cons strings nest; deeper ones are not followed.
const MAX_STRING_DEPTH: usize = 16;
/// Frames looked at in one sample (the frame-pointer chain through the stack copy).
const MAX_CHAIN: usize = 256;
/// Unwound return addresses where a broken frame-pointer chain is picked up again.
const MAX_SEEDS: usize = 16;
/// Maps followed from a receiver's map back to its constructor (one per property added).
const MAX_BACK_POINTERS: usize = 4096;
/// Entries kept in each cache before it is cleared (a long session stays bounded).
const MAX_CACHE: usize = 65_536;
/// V8 keeps up to this many context local names inline in a `ScopeInfo`, a hash table beyond.
const MAX_INLINED_LOCAL_NAMES: u64 = 75;

/// A JS frame of a sample: the address its code ran at, and what the frame was named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JsFrameRef {
    /// The instruction pointer (leaf) or return address the frame's function runs at.
    pub pc: u64,
    /// Index into [`JsNamer::frame`].
    pub id: u32,
}

/// The slots of a JS frame as the sample's stack copy holds them.
struct FrameSlots {
    function: u64,
    /// Interpreted and baseline frames: the `BytecodeArray`.
    bytecode_array: Option<u64>,
    /// Interpreted frames: a Smi; baseline frames keep the feedback there instead.
    bytecode_offset: Option<u64>,
    receiver: Option<u64>,
    /// What the kernel side read through the slots when the sample was taken.
    captured: Option<CapturedFrame>,
}

/// What a `SharedFunctionInfo` says about its function.
#[derive(Clone)]
struct FunctionInfo {
    /// The `name_or_scope_info` and script pointers it was read from: when the GC puts another
    /// function at this address, they differ and it is read again.
    read_from: (u64, u64),
    /// V8's debug name (own name, else the inferred one); `None` when it cannot be read.
    name: Option<String>,
    script: Option<u64>,
    file: Option<String>,
    /// Where the function starts in its script (UTF-16 units).
    start: Option<u32>,
}

/// Line ends of a script's source (offsets of the line terminators).
struct LineEnds {
    source: u64,
    ends: Vec<u32>,
}

/// A tagged value that points at a heap object: its untagged address.
fn heap_object(tagged: u64) -> Option<u64> {
    (tagged & 3 == 1 && tagged > 0x10000).then(|| tagged - 1)
}

/// A small integer (Smi) of a 64-bit heap without pointer compression.
fn smi(tagged: u64) -> Option<i64> {
    (tagged & 1 == 0).then(|| tagged.cast_signed() >> 32)
}

/// Names JS frames of one process.
pub struct JsNamer {
    layout: Layout,
    memory: Memory,
    /// Instance type by map address (maps live in old space and seldom move).
    types: HashMap<u64, u16>,
    functions: HashMap<u64, FunctionInfo>,
    /// Script offset by bytecode array, its position table and bytecode offset.
    positions: HashMap<(u64, u64, i64), Option<u32>>,
    line_ends: HashMap<u64, LineEnds>,
    /// What the kernel side read for a frame (thread, busy interval, frame pointer, function
    /// and receiver slots): for samples where it could not follow the chain to that frame (a
    /// leaf in libc). Within one busy interval a frame is one call, and the GC rewrites its
    /// slots when it moves the objects, so equal slots mean the same objects. Across intervals
    /// they do not: a new call at the same depth may find a function at an address a moved one
    /// left (a worker's message handler named as the bootstrap's, its frames at the same place).
    captured_before: HashMap<(u32, u64, u64, u64, u64), CapturedFrame>,
    /// Class name of receivers by their map, with the constructor word it was read from.
    receiver_types: HashMap<u64, (u64, String)>,
    source_maps: SourceMaps,
    frames: Vec<Frame>,
    frame_ids: HashMap<Frame, u32>,
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
            let opened = process.mapped_file(mapping);
            if let Some(values) =
                metadata.get_or_read(&mapping.file(), &opened, || postmortem_metadata(&opened))
            {
                found = Some((PathBuf::from(path), values));
                break;
            }
        }
        let Some((path, values)) = found else {
            return Ok(None);
        };
        let layout = Layout::from_metadata(&values)
            .map_err(|why| format!("{}: V8 metadata not usable: {why}", path.display()))?;
        let memory = process
            .memory()
            .map_err(|e| format!("cannot read the target's memory: {e}"))?;
        Ok(Some(Self {
            layout,
            memory,
            types: HashMap::new(),
            functions: HashMap::new(),
            positions: HashMap::new(),
            line_ends: HashMap::new(),
            receiver_types: HashMap::new(),
            captured_before: HashMap::new(),
            source_maps: SourceMaps::new(&process),
            frames: Vec::new(),
            frame_ids: HashMap::new(),
        }))
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
        self.walk_chain(sample, ip, bp, &slot, &mut seen, &mut refs);
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
                self.walk_chain(sample, ra, caller_fp, &slot, &mut seen, &mut refs);
            }
        }
        // Leaf first: frames deeper in the stack sit at higher addresses.
        refs.sort_by_key(|&(fp, _)| fp);
        refs.into_iter().map(|(_, r)| r).collect()
    }

    /// Names the JS frames of the chain from frame pointer `fp`, whose code runs at `pc`.
    fn walk_chain(
        &mut self,
        sample: &StackSample,
        mut pc: u64,
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
            // A JS frame has a context (a heap object) where typed frames keep a Smi marker.
            let context = slot(at(fp_context));
            if let (Some(function), Some(context)) = (slot(at(fp_function)), context)
                && heap_object(context).is_some()
            {
                let receiver = slot(at(fp_receiver));
                let mut captured = sample.captured.iter().find(|c| c.fp == fp).copied();
                // The same frame, with the same slots, read at an earlier sample of this call.
                let key = (
                    sample.tid,
                    sample.busy_since_ns,
                    fp,
                    function,
                    receiver.unwrap_or(0),
                );
                match captured {
                    Some(c) => {
                        bounded(&mut self.captured_before).insert(key, c);
                    }
                    None => captured = self.captured_before.get(&key).copied(),
                }
                let slots = FrameSlots {
                    function,
                    bytecode_array: slot(at(fp_bytecode_array)),
                    bytecode_offset: slot(at(fp_bytecode_offset)),
                    receiver,
                    captured,
                };
                if let Some(id) = self.name_frame(&slots) {
                    refs.push((fp, JsFrameRef { pc, id }));
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

    /// Names a frame; `None` unless its function checks out as a `JSFunction` with a
    /// `SharedFunctionInfo` whose name can be read.
    fn name_frame(&mut self, slots: &FrameSlots) -> Option<u32> {
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
        // Exact for an interpreted frame; a compiled one is placed where its function starts,
        // and says so by having no column.
        let current = self.bytecode_position(slots);
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
        Some(self.intern(frame))
    }

    fn intern(&mut self, frame: Frame) -> u32 {
        if let Some(&id) = self.frame_ids.get(&frame) {
            return id;
        }
        let id = u32::try_from(self.frames.len()).unwrap_or(u32::MAX);
        self.frames.push(frame.clone());
        self.frame_ids.insert(frame, id);
        id
    }

    fn instance_type(&mut self, object: u64) -> Option<u16> {
        let map = heap_object(self.memory.word(object + self.layout.map)?)?;
        self.map_type(map)
    }

    /// The instance type a map describes.
    fn map_type(&mut self, map: u64) -> Option<u16> {
        if let Some(&t) = self.types.get(&map) {
            return Some(t);
        }
        let t = self.memory.u16(map + self.layout.instance_type)?;
        bounded(&mut self.types).insert(map, t);
        Some(t)
    }

    /// A `JSFunction` or one of its subtypes (class and built-in constructors).
    fn is_function(&mut self, object: u64) -> bool {
        self.instance_type(object)
            .is_some_and(|t| self.is_function_type(t))
    }

    fn is_function_type(&self, t: u16) -> bool {
        let types = &self.layout.types;
        (types.js_function..=types.last_js_function).contains(&t)
    }

    fn is_string(&mut self, object: u64) -> bool {
        self.instance_type(object)
            .is_some_and(|t| t < self.layout.types.first_nonstring)
    }

    fn function_info(&mut self, shared: u64) -> Option<FunctionInfo> {
        if self.instance_type(shared)? != self.layout.types.shared_function_info {
            return None;
        }
        let l = &self.layout;
        let name_or_scope_info = self.memory.word(shared + l.sfi_name_or_scope_info)?;
        let script_or_debug_info = self.memory.word(shared + l.sfi_script)?;
        let read_from = (name_or_scope_info, script_or_debug_info);
        if let Some(info) = self.functions.get(&shared)
            && info.read_from == read_from
        {
            return Some(info.clone());
        }
        let (name, start) = self.name_and_start(shared, name_or_scope_info);
        let script = self.script(script_or_debug_info);
        let file = script.and_then(|script| {
            let name = heap_object(self.memory.word(script + self.layout.script_name)?)?;
            self.is_string(name)
                .then(|| self.string(name, MAX_NAME, 0))
                .flatten()
        });
        let info = FunctionInfo {
            read_from,
            name,
            script,
            file,
            start,
        };
        bounded(&mut self.functions).insert(shared, info.clone());
        Some(info)
    }

    /// The script of a function (through a debug info in V8 before 12).
    fn script(&mut self, tagged: u64) -> Option<u64> {
        let mut object = heap_object(tagged)?;
        let t = self.instance_type(object)?;
        if Some(t) == self.layout.types.debug_info {
            object = heap_object(self.memory.word(object + layout::DEBUG_INFO_SCRIPT)?)?;
        }
        (self.instance_type(object)? == self.layout.types.script).then_some(object)
    }

    /// V8's debug name of a function (its own name, else the inferred one) and where it starts
    /// in its script. The name is `None` when it cannot be read safely.
    fn name_and_start(
        &mut self,
        shared: u64,
        name_or_scope_info: u64,
    ) -> (Option<String>, Option<u32>) {
        // No shared name: the sentinel Smi 0.
        if smi(name_or_scope_info).is_some() {
            return self.uncompiled(shared, String::new());
        }
        let Some(object) = heap_object(name_or_scope_info) else {
            return (None, None);
        };
        if self.is_string(object) {
            let Some(name) = self.string(object, MAX_NAME, 0) else {
                return (None, None);
            };
            return self.uncompiled(shared, name);
        }
        if self.instance_type(object) == Some(self.layout.types.scope_info) {
            return self.scope_info(object).unwrap_or((None, None));
        }
        (None, None)
    }

    /// A function not compiled yet: its name as given, else the inferred name, and the start
    /// position from its `UncompiledData`.
    fn uncompiled(&mut self, shared: u64, name: String) -> (Option<String>, Option<u32>) {
        let data = self
            .memory
            .word(shared + self.layout.sfi_function_data)
            .and_then(heap_object);
        let data = data.filter(|&data| {
            self.instance_type(data)
                .is_some_and(|t| self.layout.types.uncompiled_data.contains(&t))
        });
        let Some(data) = data else {
            return (Some(name), None);
        };
        let start = self
            .memory
            .i32(data + self.layout.uncompiled_start)
            .and_then(|s| u32::try_from(s).ok());
        if !name.is_empty() {
            return (Some(name), start);
        }
        let inferred = self
            .memory
            .word(data + self.layout.uncompiled_inferred_name)
            .and_then(heap_object)
            .filter(|&s| self.is_string(s))
            .and_then(|s| self.string(s, MAX_NAME, 0))
            .unwrap_or_default();
        (Some(inferred), start)
    }

    /// Name, inferred name and start position from a compiled function's `ScopeInfo`; `None`
    /// when its flags do not describe a scope we know how to read.
    fn scope_info(&mut self, scope_info: u64) -> Option<(Option<String>, Option<u32>)> {
        let l = self.layout.scope;
        let slot = |i: u64| scope_info + 8 + 8 * i;
        let flags = self.memory.word(slot(0))?;
        let flags = if l.flags_are_smi {
            u32::try_from(smi(flags)?).ok()?
        } else {
            flags as u32
        };
        let locals = u64::try_from(smi(self.memory.word(slot(2))?)?).ok()?;
        if locals > 1 << 20 {
            return None;
        }
        let scope_type = flags & 0xf;
        let mut index = l.first_vars;
        if l.module_count_before_names && scope_type == l.module_type {
            index += 1;
        }
        index += if locals < MAX_INLINED_LOCAL_NAMES {
            locals
        } else {
            1 // a hash table of the names instead
        };
        index += locals; // their infos
        index += u64::from((flags >> 10) & 1); // a saved class variable
        let mut name = String::new();
        if (flags >> 12) & 3 != 0 {
            let tagged = self.memory.word(slot(index))?;
            if let Some(object) = heap_object(tagged) {
                if !self.is_string(object) {
                    return None;
                }
                name = self.string(object, MAX_NAME, 0)?;
            }
            index += 2;
        }
        if (flags >> 14) & 1 != 0 {
            let tagged = self.memory.word(slot(index))?;
            if name.is_empty()
                && let Some(object) = heap_object(tagged)
                && self.is_string(object)
            {
                name = self.string(object, MAX_NAME, 0)?;
            }
            index += 1;
        }
        let start = if let Some(fixed) = l.fixed_position_slot {
            Some(fixed)
        } else {
            (scope_type == l.function_type).then_some(index)
        };
        let start = start
            .and_then(|i| self.memory.word(slot(i)))
            .and_then(smi)
            .and_then(|s| u32::try_from(s).ok());
        Some((Some(name), start))
    }

    /// Where an interpreted frame is in its script: its bytecode offset through the source
    /// position table.
    fn bytecode_position(&mut self, slots: &FrameSlots) -> Option<u32> {
        let array = heap_object(slots.bytecode_array?)?;
        let raw_offset = smi(slots.bytecode_offset?)?;
        if self.instance_type(array)? != self.layout.types.bytecode_array {
            return None;
        }
        let offset = raw_offset - (self.layout.bytecode_header - 1);
        // With the table's address: flushed bytecode leaves its address to other bytecode.
        let table = self.memory.word(array + self.layout.position_table)?;
        if let Some(&position) = self.positions.get(&(array, table, offset)) {
            return position;
        }
        let position = self.source_position(table, offset);
        bounded(&mut self.positions).insert((array, table, offset), position);
        position
    }

    fn source_position(&mut self, table: u64, offset: i64) -> Option<u32> {
        let table = heap_object(table)?;
        if self.instance_type(table)? != self.layout.types.byte_array {
            return None; // not collected (yet)
        }
        let length =
            usize::try_from(smi(self.memory.word(table + self.layout.array_length)?)?).ok()?;
        let bytes = self.memory.bytes(
            table + self.layout.byte_array_data,
            length.min(MAX_POSITION_TABLE),
        )?;
        let raw = position_at(&bytes, offset, self.layout.unsigned_code_offsets)?;
        // A SourcePosition: bit 0 says external, then the script offset + 1.
        (raw & 1 == 0)
            .then(|| (raw >> 1) - 1)
            .and_then(|o| u32::try_from(o).ok())
    }

    /// Line and column (from 1, as Node prints them) of a script offset.
    fn line_column(&mut self, script: u64, offset: u32) -> Option<(u32, u32)> {
        let source = self.memory.word(script + self.layout.script_source)?;
        let fresh = self
            .line_ends
            .get(&script)
            .is_some_and(|ends| ends.source == source);
        if !fresh {
            let ends = self.read_line_ends(script, source)?;
            bounded(&mut self.line_ends).insert(script, LineEnds { source, ends });
        }
        let ends = &self.line_ends.get(&script)?.ends;
        let line = ends.partition_point(|&end| end < offset);
        let line_start = line.checked_sub(1).map_or(0, |i| ends[i] + 1);
        Some((
            u32::try_from(line + 1).ok()?,
            offset.checked_sub(line_start)? + 1,
        ))
    }

    /// V8's line ends when it computed them, else ours from the source.
    fn read_line_ends(&mut self, script: u64, source: u64) -> Option<Vec<u32>> {
        let l = &self.layout;
        let fixed_array = l.types.fixed_array;
        // Until V8 needs them, undefined or Smi 0.
        if let Some(array) = self
            .memory
            .word(script + l.script_line_ends)
            .and_then(heap_object)
            .filter(|&array| self.instance_type(array) == Some(fixed_array))
        {
            let l = &self.layout;
            let length = smi(self.memory.word(array + l.array_length)?)?;
            let length = usize::try_from(length).ok()?;
            if length > MAX_LINES {
                return None;
            }
            let bytes = self.memory.bytes(array + l.fixed_array_data, length * 8)?;
            return bytes
                .chunks_exact(8)
                .map(|w| {
                    smi(u64::from_le_bytes(w.try_into().ok()?)).and_then(|v| u32::try_from(v).ok())
                })
                .collect();
        }
        let source = heap_object(source).filter(|&s| self.is_string(s))?;
        let units = self.string_units(source, MAX_SOURCE, 0)?;
        // A source cut short would end its last line at the cut.
        (units.len() < MAX_SOURCE).then(|| line_ends(&units))
    }

    /// The class name of a method call's receiver, as `Error.stack` prints it before the
    /// method; `None` for a plain call (undefined, null, the global proxy) or a primitive.
    fn receiver_type(&mut self, tagged: u64, map: u64) -> Option<String> {
        let receiver = heap_object(tagged)?;
        let t = self.map_type(map)?;
        let types = &self.layout.types;
        if t < types.first_nonstring || t == types.oddball || Some(t) == types.global_proxy {
            return None;
        }
        // A static method: the receiver is the class itself.
        if self.is_function_type(t) {
            let shared = heap_object(self.memory.word(receiver + self.layout.function_shared)?)?;
            return self.function_info(shared)?.name.filter(|n| !n.is_empty());
        }
        // Node names the class by the map's constructor only for an instance of the class
        // itself; a subclass instance's map names the base class (V8 copies the base's initial
        // map), and a prototype's map says nothing: no class then, rather than a wrong one.
        let new_target_is_base = self.memory.u8(map + self.layout.map_bit_field2)? & 1 != 0;
        let is_prototype_map = self.memory.i32(map + self.layout.map_bit_field3)? & (1 << 20) != 0;
        if !new_target_is_base || is_prototype_map {
            return None;
        }
        // Checked on every use: a map that died or moved leaves its address to another.
        let constructor = self.memory.word(map + self.layout.map_constructor)?;
        if let Some((read_from, name)) = self.receiver_types.get(&map)
            && *read_from == constructor
        {
            return Some(name.clone());
        }
        // Not kept when not found: the map may have been read in the middle of a change.
        let name = self.constructor_name(map)?;
        bounded(&mut self.receiver_types).insert(map, (constructor, name.clone()));
        Some(name)
    }

    /// The name of the constructor a map was made by (following back pointers to it).
    fn constructor_name(&mut self, mut map: u64) -> Option<String> {
        for _ in 0..MAX_BACK_POINTERS {
            let next = heap_object(self.memory.word(map + self.layout.map_constructor)?)?;
            if self.instance_type(next)? == self.layout.types.map {
                map = next;
                continue;
            }
            if !self.is_function(next) {
                return None;
            }
            let shared = heap_object(self.memory.word(next + self.layout.function_shared)?)?;
            return self.function_info(shared)?.name.filter(|n| !n.is_empty());
        }
        None
    }

    /// Reads a V8 string (sequential, cons, thin or sliced) of at most `max` chars.
    fn string(&mut self, object: u64, max: usize, depth: usize) -> Option<String> {
        let units = self.string_units(object, max, depth)?;
        Some(String::from_utf16_lossy(&units))
    }

    /// The UTF-16 code units of a V8 string (V8's positions count these), at most `max`.
    fn string_units(&mut self, object: u64, max: usize, depth: usize) -> Option<Vec<u16>> {
        if depth > MAX_STRING_DEPTH {
            return None;
        }
        let t = self.instance_type(object)?;
        let s = &self.layout.strings;
        let length = usize::try_from(self.memory.i32(object + s.length)?).ok()?;
        let one_byte = t & s.encoding_mask == s.one_byte_tag;
        let representation = t & s.representation_mask;
        let (first, second, actual) = (s.cons_first, s.cons_second, s.thin_actual);
        let (parent, parent_offset) = (s.sliced_parent, s.sliced_offset);
        if representation == s.seq_tag {
            let n = length.min(max);
            return Some(if one_byte {
                // Latin-1: each byte is the code point.
                let bytes = self.memory.bytes(object + s.seq_one_byte_chars, n)?;
                bytes.into_iter().map(u16::from).collect()
            } else {
                let bytes = self.memory.bytes(object + s.seq_two_byte_chars, n * 2)?;
                bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect()
            });
        }
        if representation == s.cons_tag {
            let first = heap_object(self.memory.word(object + first)?)?;
            let second = heap_object(self.memory.word(object + second)?)?;
            let mut units = self.string_units(first, max, depth + 1)?;
            if units.len() < max {
                units.extend(self.string_units(second, max - units.len(), depth + 1)?);
            }
            return Some(units);
        }
        if representation == s.thin_tag {
            let actual = heap_object(self.memory.word(object + actual)?)?;
            return self.string_units(actual, max, depth + 1);
        }
        if representation == s.sliced_tag {
            let parent = heap_object(self.memory.word(object + parent)?)?;
            let start = usize::try_from(smi(self.memory.word(object + parent_offset)?)?).ok()?;
            let units =
                self.string_units(parent, start.saturating_add(length.min(max)), depth + 1)?;
            return Some(units.into_iter().skip(start).collect());
        }
        // External strings keep their characters behind a C++ object: not followed.
        None
    }
}

/// Clears a cache that has grown to [`MAX_CACHE`] entries.
fn bounded<K, V>(cache: &mut HashMap<K, V>) -> &mut HashMap<K, V> {
    if cache.len() >= MAX_CACHE {
        cache.clear();
    }
    cache
}

/// A frame's name as `Error.stack` prints it: `Class.method` for a method call whose name is
/// an identifier other than the class's own, `<anonymous>` for a function without one.
fn display_name(name: &str, receiver_type: Option<&str>) -> String {
    match receiver_type {
        Some(class) if name.is_empty() => format!("{class}.<anonymous>"),
        Some(class) if is_identifier(name) && name != class => format!("{class}.{name}"),
        _ if name.is_empty() => "<anonymous>".to_owned(),
        _ => name.to_owned(),
    }
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_alphanumeric() || c == '_' || c == '$')
}

/// Offsets of the line terminators in a source (`\n`, a lone `\r`, U+2028, U+2029), and its
/// length as the end of the last line, as V8 computes them.
fn line_ends(units: &[u16]) -> Vec<u32> {
    let mut ends = Vec::new();
    for (i, &unit) in units.iter().enumerate() {
        let terminates = match unit {
            0x0a | 0x2028 | 0x2029 => true,
            0x0d => units.get(i + 1) != Some(&0x0a),
            _ => false,
        };
        if terminates {
            ends.push(u32::try_from(i).unwrap_or(u32::MAX));
        }
    }
    ends.push(u32::try_from(units.len()).unwrap_or(u32::MAX));
    ends
}

/// The raw source position of the last entry at or before `bytecode_offset` in a source
/// position table: pairs of (code offset delta, position delta) as variable-length numbers.
/// Code offsets are zig-zag encoded with the sign as the statement bit up to V8 13, unsigned
/// with two flag bits from V8 14.
fn position_at(table: &[u8], bytecode_offset: i64, unsigned_code_offsets: bool) -> Option<i64> {
    let mut at = 0;
    let mut code_offset: i64 = -1;
    let mut position: i64 = 0;
    let mut found = None;
    while at < table.len() {
        let code = vlq(table, &mut at)?;
        let delta = if unsigned_code_offsets {
            (code >> 2).cast_signed()
        } else {
            let v = zigzag(code);
            if v >= 0 { v } else { v.checked_neg()? - 1 }
        };
        code_offset = code_offset.checked_add(delta)?;
        position = position.checked_add(zigzag(vlq(table, &mut at)?))?;
        if code_offset > bytecode_offset {
            break;
        }
        found = Some(position);
    }
    found
}

fn vlq(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn zigzag(u: u64) -> i64 {
    (u >> 1).cast_signed() ^ -((u & 1).cast_signed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_like_node_prints_them() {
        assert_eq!(display_name("crunch", Some("Worker")), "Worker.crunch");
        assert_eq!(display_name("", Some("Object")), "Object.<anonymous>");
        assert_eq!(display_name("Worker", Some("Worker")), "Worker");
        assert_eq!(display_name("ns.inner", Some("Object")), "ns.inner");
        assert_eq!(display_name("spin", None), "spin");
        assert_eq!(display_name("", None), "<anonymous>");
    }

    #[test]
    fn line_ends_count_every_terminator_once() {
        let units: Vec<u16> = "a\nb\r\nc\rd\u{2028}e".encode_utf16().collect();
        assert_eq!(line_ends(&units), [1, 4, 6, 8, 10]);
        assert_eq!(line_ends(&[]), [0]);
    }

    #[test]
    fn source_positions_decode_in_both_encodings() {
        fn zz(v: i64) -> u64 {
            ((v << 1) ^ (v >> 63)).cast_unsigned()
        }
        fn push(out: &mut Vec<u8>, mut u: u64) {
            loop {
                let byte = (u & 0x7f) as u8;
                u >>= 7;
                if u == 0 {
                    out.push(byte);
                    return;
                }
                out.push(byte | 0x80);
            }
        }
        // (code offset, raw position): entry at -1, then at bytecode 0, 5 and 12.
        let entries = [(-1i64, 30i64), (0, 42), (5, 300), (12, 96)];
        let (mut old, mut new) = (Vec::new(), Vec::new());
        let (mut code, mut position) = (-1i64, 0i64);
        for (i, (c, p)) in entries.into_iter().enumerate() {
            let (dc, dp) = (c - code, p - position);
            (code, position) = (c, p);
            let statement = i % 2 == 0;
            push(&mut old, zz(if statement { dc } else { -dc - 1 }));
            push(&mut old, zz(dp));
            push(&mut new, (dc.cast_unsigned() << 2) | u64::from(statement));
            push(&mut new, zz(dp));
        }
        for (table, unsigned) in [(&old, false), (&new, true)] {
            assert_eq!(position_at(table, 0, unsigned), Some(42));
            assert_eq!(position_at(table, 4, unsigned), Some(42));
            assert_eq!(position_at(table, 5, unsigned), Some(300));
            assert_eq!(position_at(table, 100, unsigned), Some(96));
        }
        assert_eq!(position_at(&[0x80], 3, false), None, "cut short");
    }
}
