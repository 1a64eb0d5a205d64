//! JS frames named from V8's own heap, from outside the process and with no flag on it.
//!
//! The node binary carries V8's postmortem metadata (`v8dbg_*` globals): where a JS frame keeps
//! its function, how heap objects are laid out, the type tags. A sample's copy of the stack top
//! holds the frame slots as they were when it was taken; the frame-pointer chain through that
//! copy finds the JS frames, and their `JSFunction` pointers are followed through
//! `/proc/PID/mem` right away, while the busy interval still runs: the function, its
//! `SharedFunctionInfo`, its name and its script.
//!
//! Objects move when the GC compacts, so no pointer is trusted before the type of the object it
//! points at is checked; a frame that does not check out stays `[JS]`, never a wrong name.

use std::{
    collections::HashMap,
    fs::{self, File},
    os::unix::fs::FileExt,
    path::Path,
};

use object::{Object, ObjectSection, ObjectSymbol, read::ReadCache};

use crate::{
    decode::{RED_ZONE, StackSample},
    discover::{executable_file_mappings, mapped_file},
    symbolize::Frame,
};

/// Longest name or path read from a V8 string; longer ones are cut.
const MAX_STRING: usize = 512;
/// Cons strings nest; deeper ones are not followed.
const MAX_STRING_DEPTH: usize = 8;
/// JS frames looked at in one sample (the frame-pointer chain through the stack copy).
const MAX_CHAIN: usize = 128;
/// Entries kept in each cache before it is cleared (a long session stays bounded).
const MAX_CACHE: usize = 65_536;

/// A JS frame of a sample: the address its code ran at, and what the frame was named.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JsFrameRef {
    /// The instruction pointer (leaf) or return address the frame's function runs at.
    pub pc: u64,
    /// Index into [`JsNamer::frame`].
    pub id: u32,
}

/// What the postmortem metadata says, for the objects and frame slots we read.
#[derive(Debug, Clone)]
struct Layout {
    fp_function: i64,
    fp_context: i64,
    map: u64,
    instance_type: u64,
    first_nonstring_type: u16,
    js_function_type: u16,
    shared_function_info_type: u16,
    script_type: u16,
    function_shared: u64,
    sfi_name_or_scope_info: u64,
    sfi_script: u64,
    script_name: u64,
    strings: StringLayout,
}

#[derive(Debug, Clone)]
struct StringLayout {
    length: u64,
    seq_one_byte_chars: u64,
    seq_two_byte_chars: u64,
    cons_first: u64,
    cons_second: u64,
    thin_actual: u64,
    sliced_parent: u64,
    sliced_offset: u64,
    representation_mask: u16,
    encoding_mask: u16,
    seq_tag: u16,
    cons_tag: u16,
    sliced_tag: u16,
    thin_tag: u16,
    one_byte_tag: u16,
}

impl Layout {
    /// The layout from the `v8dbg_*` values of one binary; the name of the first one missing.
    fn from_metadata(values: &HashMap<String, i64>) -> Result<Self, String> {
        // A name ending in `__` is a field whose type suffix changes between versions
        // (`shared__SharedFunctionInfo`, `shared__Tagged_SharedFunctionInfo_`).
        let get = |names: &[&str]| -> Result<i64, String> {
            names
                .iter()
                .find_map(|name| {
                    let name = format!("v8dbg_{name}");
                    if name.ends_with("__") {
                        let mut fields = values.iter().filter(|(k, _)| k.starts_with(&name));
                        fields.next().map(|(_, &v)| v)
                    } else {
                        values.get(&name).copied()
                    }
                })
                .ok_or_else(|| format!("v8dbg_{}", names[0]))
        };
        let offset =
            |names: &[&str]| get(names).and_then(|v| u64::try_from(v).map_err(|e| e.to_string()));
        let tag =
            |names: &[&str]| get(names).and_then(|v| u16::try_from(v).map_err(|e| e.to_string()));
        if get(&["TaggedSize"])? != 8 {
            return Err("pointer compression (v8dbg_TaggedSize 4) is not read yet".to_owned());
        }
        Ok(Self {
            fp_function: get(&["off_fp_function"])?,
            fp_context: get(&["off_fp_context"])?,
            map: offset(&["class_HeapObject__map__"])?,
            instance_type: offset(&["class_Map__instance_type__"])?,
            first_nonstring_type: tag(&["FirstNonstringType"])?,
            js_function_type: tag(&["type_JSFunction__JS_FUNCTION_TYPE"])?,
            shared_function_info_type: tag(&[
                "type_SharedFunctionInfo__SHARED_FUNCTION_INFO_TYPE",
            ])?,
            script_type: tag(&["type_Script__SCRIPT_TYPE"])?,
            function_shared: offset(&["class_JSFunction__shared__"])?,
            sfi_name_or_scope_info: offset(&["class_SharedFunctionInfo__name_or_scope_info__"])?,
            sfi_script: offset(&[
                "class_SharedFunctionInfo__script_or_debug_info__",
                "class_SharedFunctionInfo__script__",
            ])?,
            script_name: offset(&["class_Script__name__"])?,
            strings: StringLayout {
                length: offset(&["class_String__length__"])?,
                seq_one_byte_chars: offset(&["class_SeqOneByteString__chars__"])?,
                seq_two_byte_chars: offset(&["class_SeqTwoByteString__chars__"])?,
                cons_first: offset(&["class_ConsString__first__"])?,
                cons_second: offset(&["class_ConsString__second__"])?,
                thin_actual: offset(&["class_ThinString__actual__"])?,
                sliced_parent: offset(&["class_SlicedString__parent__"])?,
                sliced_offset: offset(&["class_SlicedString__offset__"])?,
                representation_mask: tag(&["StringRepresentationMask"])?,
                encoding_mask: tag(&["StringEncodingMask"])?,
                seq_tag: tag(&["SeqStringTag"])?,
                cons_tag: tag(&["ConsStringTag"])?,
                sliced_tag: tag(&["SlicedStringTag"])?,
                thin_tag: tag(&["ThinStringTag"])?,
                one_byte_tag: tag(&["OneByteStringTag"])?,
            },
        })
    }
}

/// Reads the `v8dbg_*` integers of an ELF file: the symbol names and the values they hold.
fn postmortem_metadata(path: &Path) -> Option<HashMap<String, i64>> {
    let cache = ReadCache::new(File::open(path).ok()?);
    let elf = object::File::parse(&cache).ok()?;
    let mut values = HashMap::new();
    for symbol in elf.symbols().chain(elf.dynamic_symbols()) {
        let Ok(name) = symbol.name() else { continue };
        if !name.starts_with("v8dbg_") || values.contains_key(name) {
            continue;
        }
        let Some(index) = symbol.section_index() else {
            continue;
        };
        let Ok(section) = elf.section_by_index(index) else {
            continue;
        };
        // Each is an `int` in .data or .rodata (zero-initialised ones in .bss).
        let offset = symbol.address().wrapping_sub(section.address());
        let value = match section.data_range(section.address() + offset, 4) {
            Ok(Some(bytes)) => i32::from_le_bytes(bytes.try_into().ok()?),
            _ => 0,
        };
        values.insert(name.to_owned(), i64::from(value));
    }
    (!values.is_empty()).then_some(values)
}

/// The target's memory, read through `/proc/PID/mem`.
struct Memory {
    file: File,
}

impl Memory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.file.read_exact_at(buf, addr).is_ok()
    }

    fn word(&self, addr: u64) -> Option<u64> {
        let mut buf = [0; 8];
        self.read(addr, &mut buf).then(|| u64::from_le_bytes(buf))
    }

    fn u16(&self, addr: u64) -> Option<u16> {
        let mut buf = [0; 2];
        self.read(addr, &mut buf).then(|| u16::from_le_bytes(buf))
    }

    fn i32(&self, addr: u64) -> Option<i32> {
        let mut buf = [0; 4];
        self.read(addr, &mut buf).then(|| i32::from_le_bytes(buf))
    }
}

/// A tagged value that points at a heap object: its untagged address.
fn heap_object(tagged: u64) -> Option<u64> {
    (tagged & 3 == 1 && tagged > 0x10000).then(|| tagged - 1)
}

/// A small integer (Smi) of a 64-bit heap without pointer compression.
fn smi(tagged: u64) -> Option<i64> {
    (tagged & 1 == 0).then(|| (tagged.cast_signed()) >> 32)
}

/// Names JS frames of one process.
pub struct JsNamer {
    layout: Layout,
    memory: Memory,
    /// Instance type by map address (maps live in old space and seldom move).
    types: HashMap<u64, u16>,
    /// Named frame by `SharedFunctionInfo` address, with the name pointer it was named from:
    /// when the GC puts another function there, the pointer differs and it is named again.
    functions: HashMap<u64, (u64, u64, u32)>,
    /// Script name by script address, with the name pointer.
    scripts: HashMap<u64, (u64, Option<String>)>,
    frames: Vec<Frame>,
    frame_ids: HashMap<Frame, u32>,
}

impl JsNamer {
    /// The namer for `pid`; `None` when the process has no V8; why not when its V8 cannot be
    /// read.
    pub fn new(pid: u32) -> Result<Option<Self>, String> {
        let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
            .map_err(|e| format!("cannot read the target's maps: {e}"))?;
        let mut seen = Vec::new();
        let mut found = None;
        for mapping in executable_file_mappings(&maps) {
            if seen.contains(&mapping.path) {
                continue;
            }
            seen.push(mapping.path.clone());
            if let Some(values) = postmortem_metadata(&mapped_file(pid, &mapping)) {
                found = Some((mapping.path, values));
                break;
            }
        }
        let Some((path, values)) = found else {
            return Ok(None);
        };
        let layout = Layout::from_metadata(&values)
            .map_err(|missing| format!("{}: V8 metadata incomplete: {missing}", path.display()))?;
        let file = File::open(format!("/proc/{pid}/mem"))
            .map_err(|e| format!("cannot read the target's memory: {e}"))?;
        Ok(Some(Self {
            layout,
            memory: Memory { file },
            types: HashMap::new(),
            functions: HashMap::new(),
            scripts: HashMap::new(),
            frames: Vec::new(),
            frame_ids: HashMap::new(),
        }))
    }

    /// A named frame by the id a [`JsFrameRef`] carries.
    pub fn frame(&self, id: u32) -> Option<&Frame> {
        self.frames.get(id as usize)
    }

    /// The JS frames of a sample, leaf first, found on the frame-pointer chain through the
    /// sample's stack copy. Call before the unwind stage drops the copy.
    pub fn js_frames(&mut self, sample: &StackSample) -> Vec<JsFrameRef> {
        let [ip, sp, mut fp] = sample.regs;
        let base = sp.wrapping_sub(RED_ZONE);
        let stack = &sample.stack;
        let slot = |addr: u64| -> Option<u64> {
            let offset = usize::try_from(addr.checked_sub(base)?).ok()?;
            let bytes = stack.get(offset..offset.checked_add(8)?)?;
            Some(u64::from_le_bytes(bytes.try_into().ok()?))
        };
        let mut refs = Vec::new();
        let mut pc = ip;
        for _ in 0..MAX_CHAIN {
            if pc == 0 {
                break;
            }
            let function = fp
                .checked_add_signed(self.layout.fp_function)
                .and_then(slot);
            let context = fp.checked_add_signed(self.layout.fp_context).and_then(slot);
            // A JS frame has a context (a heap object) where typed frames keep a Smi marker.
            if let (Some(function), Some(context)) = (function, context)
                && heap_object(context).is_some()
                && let Some(id) = self.name_function(function)
            {
                refs.push(JsFrameRef { pc, id });
            }
            let (Some(caller_fp), Some(ra)) = (slot(fp), fp.checked_add(8).and_then(slot)) else {
                break;
            };
            // The stack grows down: a caller's frame is always above.
            if caller_fp <= fp {
                break;
            }
            (fp, pc) = (caller_fp, ra);
        }
        refs
    }

    fn instance_type(&mut self, object: u64) -> Option<u16> {
        let map = heap_object(self.memory.word(object + self.layout.map)?)?;
        if let Some(&t) = self.types.get(&map) {
            return Some(t);
        }
        let t = self.memory.u16(map + self.layout.instance_type)?;
        if self.types.len() >= MAX_CACHE {
            self.types.clear();
        }
        self.types.insert(map, t);
        Some(t)
    }

    /// Names the function a frame slot holds; `None` unless it checks out as a `JSFunction`
    /// with a `SharedFunctionInfo`.
    fn name_function(&mut self, tagged: u64) -> Option<u32> {
        let function = heap_object(tagged)?;
        // The JSFunction subtypes (class constructors, built-in constructors) sit right next
        // to JS_FUNCTION_TYPE; the SharedFunctionInfo check below is the exact one.
        let t = self.instance_type(function)?;
        if t.abs_diff(self.layout.js_function_type) > 16 {
            return None;
        }
        let shared = heap_object(self.memory.word(function + self.layout.function_shared)?)?;
        if self.instance_type(shared)? != self.layout.shared_function_info_type {
            return None;
        }
        let name_or_scope_info = self
            .memory
            .word(shared + self.layout.sfi_name_or_scope_info)?;
        let script = self.memory.word(shared + self.layout.sfi_script)?;
        if let Some(&(name_ptr, script_ptr, id)) = self.functions.get(&shared)
            && name_ptr == name_or_scope_info
            && script_ptr == script
        {
            return Some(id);
        }
        let name = self.function_name(name_or_scope_info);
        let file = self.script_name(script);
        let frame = Frame::js(
            if name.is_empty() {
                "<anonymous>".to_owned()
            } else {
                name
            },
            file,
            None,
        );
        let id = self.intern(frame);
        if self.functions.len() >= MAX_CACHE {
            self.functions.clear();
        }
        self.functions
            .insert(shared, (name_or_scope_info, script, id));
        Some(id)
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

    /// The function's own name: a string, or empty (anonymous, or kept where not read yet).
    fn function_name(&mut self, tagged: u64) -> String {
        let Some(object) = heap_object(tagged) else {
            return String::new();
        };
        match self.instance_type(object) {
            Some(t) if t < self.layout.first_nonstring_type => {
                self.string(object, 0).unwrap_or_default()
            }
            _ => String::new(),
        }
    }

    /// The script's name (its file or URL), if it has one.
    fn script_name(&mut self, tagged: u64) -> Option<String> {
        let script = heap_object(tagged)?;
        if self.instance_type(script)? != self.layout.script_type {
            return None;
        }
        let name_ptr = self.memory.word(script + self.layout.script_name)?;
        if let Some((cached_ptr, name)) = self.scripts.get(&script)
            && *cached_ptr == name_ptr
        {
            return name.clone();
        }
        let name = heap_object(name_ptr).and_then(|object| {
            let t = self.instance_type(object)?;
            (t < self.layout.first_nonstring_type)
                .then(|| self.string(object, 0))
                .flatten()
        });
        if self.scripts.len() >= MAX_CACHE {
            self.scripts.clear();
        }
        self.scripts.insert(script, (name_ptr, name.clone()));
        name
    }

    /// Reads a V8 string (sequential, cons, thin or sliced) of at most [`MAX_STRING`] chars.
    fn string(&mut self, object: u64, depth: usize) -> Option<String> {
        if depth > MAX_STRING_DEPTH {
            return None;
        }
        let t = self.instance_type(object)?;
        let s = &self.layout.strings;
        let length = usize::try_from(self.memory.i32(object + s.length)?).ok()?;
        let one_byte = t & s.encoding_mask == s.one_byte_tag;
        let representation = t & s.representation_mask;
        if representation == s.seq_tag {
            let n = length.min(MAX_STRING);
            return Some(if one_byte {
                let mut buf = vec![0; n];
                self.memory
                    .read(object + s.seq_one_byte_chars, &mut buf)
                    .then_some(())?;
                // Latin-1: each byte is the code point.
                buf.into_iter().map(char::from).collect()
            } else {
                let mut buf = vec![0; n * 2];
                self.memory
                    .read(object + s.seq_two_byte_chars, &mut buf)
                    .then_some(())?;
                let units: Vec<u16> = buf
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                String::from_utf16_lossy(&units)
            });
        }
        let (cons_first, cons_second, thin_actual) = (s.cons_first, s.cons_second, s.thin_actual);
        let (sliced_parent, sliced_offset) = (s.sliced_parent, s.sliced_offset);
        if representation == self.layout.strings.cons_tag {
            let first = heap_object(self.memory.word(object + cons_first)?)?;
            let second = heap_object(self.memory.word(object + cons_second)?)?;
            let mut text = self.string(first, depth + 1)?;
            if text.chars().count() < MAX_STRING {
                text.push_str(&self.string(second, depth + 1)?);
            }
            return Some(text.chars().take(MAX_STRING).collect());
        }
        if representation == self.layout.strings.thin_tag {
            let actual = heap_object(self.memory.word(object + thin_actual)?)?;
            return self.string(actual, depth + 1);
        }
        if representation == self.layout.strings.sliced_tag {
            let parent = heap_object(self.memory.word(object + sliced_parent)?)?;
            let start = usize::try_from(smi(self.memory.word(object + sliced_offset)?)?).ok()?;
            let text = self.string(parent, depth + 1)?;
            return Some(text.chars().skip(start).take(length).collect());
        }
        // External strings keep their characters behind a C++ object: not followed.
        None
    }
}
