//! Reading V8's heap: the type of an object (through its map), strings, what a
//! `SharedFunctionInfo` says of its function (name, script, start) and the class of a method
//! call's receiver. No pointer is followed before the type of what it points at is checked.

use std::sync::Arc;

use super::{JsNamer, layout};
use crate::target::memory::ReadMemory;

/// Longest name or path read from a V8 string; longer ones are cut.
pub(super) const MAX_NAME: usize = 512;
/// Cons strings nest; deeper ones are not followed.
const MAX_STRING_DEPTH: usize = 16;
/// Parts (cons, thin, sliced and sequential strings) followed to read one string: a tree of
/// empty strings reads nothing but could take 2^16 reads.
const MAX_STRING_PARTS: usize = 1024;
/// Maps followed from a receiver's map back to its constructor (one per property added; V8
/// keeps at most 1020 descriptors in a map).
const MAX_BACK_POINTERS: usize = 1024;
/// V8 keeps up to this many context local names inline in a `ScopeInfo`, a hash table beyond.
const MAX_INLINED_LOCAL_NAMES: u64 = 75;

/// What a `SharedFunctionInfo` says about its function.
#[derive(Clone)]
pub(super) struct FunctionInfo {
    /// The `name_or_scope_info` and script pointers it was read from: when the GC puts another
    /// function at this address, they differ and it is read again.
    pub(super) read_from: (u64, u64),
    /// V8's debug name (own name, else the inferred one); `None` when it cannot be read.
    pub(super) name: Option<Arc<str>>,
    pub(super) script: Option<u64>,
    pub(super) file: Option<Arc<str>>,
    /// Where the function starts in its script (UTF-16 units).
    pub(super) start: Option<u32>,
}

/// A tagged value that points at a heap object: its untagged address.
pub(super) fn heap_object(tagged: u64) -> Option<u64> {
    (tagged & 3 == 1 && tagged > 0x10000).then(|| tagged - 1)
}

/// A small integer (Smi) of a 64-bit heap without pointer compression.
pub(super) fn smi(tagged: u64) -> Option<i64> {
    (tagged & 1 == 0).then(|| tagged.cast_signed() >> 32)
}

impl JsNamer {
    pub(super) fn instance_type(&mut self, object: u64) -> Option<u16> {
        let map = heap_object(self.memory.word(object + self.layout.map)?)?;
        self.map_type(map)
    }

    /// The instance type a map describes.
    fn map_type(&mut self, map: u64) -> Option<u16> {
        if let Some(&t) = self.types.get(&map) {
            return Some(t);
        }
        let t = self.memory.u16(map + self.layout.instance_type)?;
        self.types.insert(map, t, 0);
        Some(t)
    }

    /// A `JSFunction` or one of its subtypes (class and built-in constructors).
    pub(super) fn is_function(&mut self, object: u64) -> bool {
        self.instance_type(object)
            .is_some_and(|t| self.is_function_type(t))
    }

    fn is_function_type(&self, t: u16) -> bool {
        let types = &self.layout.types;
        (types.js_function..=types.last_js_function).contains(&t)
    }

    pub(super) fn is_string(&mut self, object: u64) -> bool {
        self.instance_type(object)
            .is_some_and(|t| t < self.layout.types.first_nonstring)
    }

    pub(super) fn function_info(&mut self, shared: u64) -> Option<FunctionInfo> {
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
                .then(|| self.string(name, MAX_NAME))
                .flatten()
        });
        let info = FunctionInfo {
            read_from,
            name: name.map(Arc::from),
            script,
            file: file.map(Arc::from),
            start,
        };
        if self.may_cache() {
            let bytes = info.name.as_ref().map_or(0, |name| name.len())
                + info.file.as_ref().map_or(0, |file| file.len());
            self.functions.insert(shared, info.clone(), bytes);
        }
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
            let Some(name) = self.string(object, MAX_NAME) else {
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
            .and_then(|s| self.string(s, MAX_NAME))
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
                name = self.string(object, MAX_NAME)?;
            }
            index += 2;
        }
        if (flags >> 14) & 1 != 0 {
            let tagged = self.memory.word(slot(index))?;
            if name.is_empty()
                && let Some(object) = heap_object(tagged)
                && self.is_string(object)
            {
                name = self.string(object, MAX_NAME)?;
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

    /// The class name of a method call's receiver, as `Error.stack` prints it before the
    /// method; `None` for a plain call (undefined, null, the global proxy) or a primitive.
    pub(super) fn receiver_type(&mut self, tagged: u64, map: u64) -> Option<Arc<str>> {
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
        let bytes = name.len();
        self.receiver_types
            .insert(map, (constructor, name.clone()), bytes);
        Some(name)
    }

    /// The name of the constructor a map was made by (following back pointers to it).
    fn constructor_name(&mut self, mut map: u64) -> Option<Arc<str>> {
        for _ in 0..MAX_BACK_POINTERS {
            let next = heap_object(self.memory.word(map + self.layout.map_constructor)?)?;
            if next == map {
                return None; // a map that is its own back pointer
            }
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
    fn string(&mut self, object: u64, max: usize) -> Option<String> {
        let units = self.string_units(object, 0, max)?;
        Some(String::from_utf16_lossy(&units))
    }

    /// The UTF-16 code units of a V8 string (V8's positions count these): at most `max` of
    /// them, from unit `skip` on. `None` when any part of it cannot be read, or it has more
    /// parts or nests deeper than is followed.
    pub(super) fn string_units(
        &mut self,
        object: u64,
        skip: usize,
        max: usize,
    ) -> Option<Vec<u16>> {
        let mut units = Vec::new();
        let mut parts = 0;
        self.append_units(object, skip, max, 0, &mut parts, &mut units)?;
        Some(units)
    }

    /// Appends at most `max` units of a string from unit `skip` on: never more than asked, what
    /// the string claims as its length notwithstanding.
    fn append_units(
        &mut self,
        object: u64,
        skip: usize,
        max: usize,
        depth: usize,
        parts: &mut usize,
        out: &mut Vec<u16>,
    ) -> Option<()> {
        if depth > MAX_STRING_DEPTH || *parts >= MAX_STRING_PARTS {
            return None;
        }
        *parts += 1;
        let t = self.instance_type(object)?;
        if t >= self.layout.types.first_nonstring {
            return None;
        }
        let s = &self.layout.strings;
        let length = usize::try_from(self.memory.i32(object + s.length)?).ok()?;
        let want = length.saturating_sub(skip).min(max);
        if want == 0 {
            return Some(());
        }
        let one_byte = t & s.encoding_mask == s.one_byte_tag;
        let representation = t & s.representation_mask;
        let (first, second, actual) = (s.cons_first, s.cons_second, s.thin_actual);
        let (parent, parent_offset) = (s.sliced_parent, s.sliced_offset);
        if representation == s.seq_tag {
            let (chars, unit) = if one_byte {
                (s.seq_one_byte_chars, 1)
            } else {
                (s.seq_two_byte_chars, 2)
            };
            let at = (object + chars).checked_add(u64::try_from(skip * unit).ok()?)?;
            let bytes = self.memory.bytes(at, want * unit)?;
            if one_byte {
                // Latin-1: each byte is the code point.
                out.extend(bytes.into_iter().map(u16::from));
            } else {
                out.extend(
                    bytes
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]])),
                );
            }
            return Some(());
        }
        if representation == s.cons_tag {
            let first = heap_object(self.memory.word(object + first)?)?;
            let second = heap_object(self.memory.word(object + second)?)?;
            let first_length = self.string_length(first)?;
            let before = out.len();
            if skip < first_length {
                self.append_units(first, skip, want, depth + 1, parts, out)?;
            }
            let got = out.len() - before;
            if got < want {
                let skip = skip.saturating_sub(first_length);
                self.append_units(second, skip, want - got, depth + 1, parts, out)?;
            }
            return Some(());
        }
        if representation == s.thin_tag {
            let actual = heap_object(self.memory.word(object + actual)?)?;
            return self.append_units(actual, skip, want, depth + 1, parts, out);
        }
        if representation == s.sliced_tag {
            let parent = heap_object(self.memory.word(object + parent)?)?;
            let start = usize::try_from(smi(self.memory.word(object + parent_offset)?)?).ok()?;
            return self.append_units(
                parent,
                start.checked_add(skip)?,
                want,
                depth + 1,
                parts,
                out,
            );
        }
        // External strings keep their characters behind a C++ object: not followed.
        None
    }

    /// The length a string claims.
    fn string_length(&self, object: u64) -> Option<usize> {
        usize::try_from(self.memory.i32(object + self.layout.strings.length)?).ok()
    }
}
