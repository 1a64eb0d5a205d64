//! Optimized frames (`TurboFan`, `Maglev`, OSR code) at their current position, with the functions
//! inlined into them.
//!
//! A compiled frame keeps no pointer to its code: the code is found from the pc, as V8 finds it.
//! The instructions of a code object follow its header in code space (the `Code` itself in
//! V8 10; an `InstructionStream` pointing back at its `Code` from V8 11), so the header is the
//! nearest word before the pc that is the map of such an object. It is taken only when
//! everything agrees: the map's type, the back pointer, the instruction range holding the pc,
//! an optimized kind, and the deoptimization data naming the frame's own function. Then the pc
//! goes through the code's source position table to a source position, and the position's
//! inlining id through the deoptimization data's inlining positions and literals to the chain
//! of inlined functions, each at its own position, as `Error.stack` lists them.
//!
//! What no metadata describes (where the `Code` keeps its deoptimization data and position
//! table from V8 12, the instruction start and size in V8 11, the deoptimization data's
//! indices in V8 10) is chosen by V8's version, like the `ScopeInfo` layout.

use std::collections::HashMap;

use super::{
    JsNamer,
    heap::{heap_object, smi},
    layout::metadata_value,
    positions::position_at,
};
use crate::target::memory::ReadMemory;

/// Bytes before a pc searched for its code's header (a `TurboFan` function of a large bundle is
/// tens of KiB; larger ones stay at their start line).
const MAX_CODE_SCAN: u64 = 256 << 10;
/// Bytes read at a time while searching back.
const SCAN_CHUNK: u64 = 4096;
/// Words looked at as possible maps (each costs a read or two) before the code's map is known:
/// once a process.
const MAX_MAP_PROBES: usize = 1024;
/// Longest chain of inlined functions followed (`TurboFan`'s inlining budget is far below).
const MAX_INLINING_DEPTH: usize = 64;
/// Longest position table or inlining-position array read.
const MAX_TABLE: usize = 1 << 20;

/// How V8 lays out its code objects (chosen by version where the metadata is silent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeLayout {
    /// The type of the object whose header the instructions follow.
    pub header_type: u16,
    /// Instructions start this far after that object.
    pub header_size: u64,
    /// V8 11 on: where the `InstructionStream` points back at its `Code`, and where the `Code`
    /// points at its `InstructionStream` and keeps its instruction start.
    pub split: Option<SplitCode>,
    pub code_type: u16,
    pub instruction_size: u64,
    pub flags: u64,
    pub kind_mask: u32,
    /// `MAGLEV` and `TURBOFAN` kinds (right after `BASELINE` in every version).
    pub optimized_kinds: [u32; 2],
    /// Maglev code of V8 13 on places its calls (and the calls it inlined) at their
    /// statements: only where the leaf runs is its position the one `Error.stack` prints.
    pub maglev_places_statements: bool,
    pub deopt_data: u64,
    pub position_table: u64,
    pub deopt: DeoptIndices,
    /// Types a literal array may have (weak or trusted, by version).
    pub literal_array_types: Vec<u16>,
    /// Types deoptimization data may have.
    pub deopt_data_types: Vec<u16>,
    /// Types of position tables and inlining positions (trusted from V8 12 or 13).
    pub byte_array_types: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitCode {
    pub back_pointer: u64,
    pub instruction_stream: u64,
    pub instruction_start: u64,
}

/// Element indices of a `DeoptimizationData`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeoptIndices {
    pub inlined_count: u64,
    pub literal_array: u64,
    pub shared: u64,
    /// V8 13 on: the function is behind a `SharedFunctionInfoWrapper`, at this offset.
    pub shared_wrapper_field: Option<u64>,
    pub inlining_positions: u64,
    /// Where the deopt exits start (a lazily deoptimized frame returns there).
    pub deopt_exit_start: u64,
}

impl CodeLayout {
    /// The layout for V8 `major`, from its metadata; `None` when something needed is missing
    /// (frames keep their start line then).
    pub fn from_metadata(values: &HashMap<String, i64>, major: i64) -> Option<Self> {
        let get = |name: &str| metadata_value(values, name);
        let offset = |name: &str| get(name).and_then(|v| u64::try_from(v).ok());
        let tag = |name: &str| get(name).and_then(|v| u16::try_from(v).ok());
        let code_type = tag("type_Code__CODE_TYPE")?;
        let baseline = u32::try_from(get("CodeKindBaseline")?).ok()?;
        let types = |names: &[&str]| -> Vec<u16> { names.iter().filter_map(|n| tag(n)).collect() };
        let (header_type, header_size, split, deopt_data, position_table) = if major == 10 {
            // The instructions follow the `Code` itself.
            (
                code_type,
                offset("class_Code__instruction_start__")?,
                None,
                16,
                24,
            )
        } else {
            let split = SplitCode {
                back_pointer: 8,
                instruction_stream: offset("class_Code__instruction_stream__").unwrap_or(32),
                instruction_start: offset("class_Code__instruction_start__").unwrap_or(40),
            };
            let (deopt, positions) = if major == 11 {
                (
                    offset("class_Code__deoptimization_data__")?,
                    offset("class_Code__source_position_table__")?,
                )
            } else {
                (8, 16)
            };
            (
                tag("type_InstructionStream__INSTRUCTION_STREAM_TYPE")?,
                offset("class_InstructionStream__instruction_start__")?,
                Some(split),
                deopt,
                positions,
            )
        };
        let index = |name: &str, default: u64| {
            get(&format!("DeoptimizationData{name}Index"))
                .and_then(|v| u64::try_from(v).ok())
                .unwrap_or(default)
        };
        let wrapped = get("DeoptimizationDataWrappedSharedFunctionInfoIndex");
        let inlining_positions = index("InliningPositions", 7);
        let deopt = DeoptIndices {
            inlined_count: index("InlinedFunctionCount", 1),
            literal_array: index("LiteralArray", 2),
            shared: match wrapped {
                Some(i) => u64::try_from(i).ok()?,
                None => index("SharedFunctionInfo", 6),
            },
            shared_wrapper_field: wrapped
                .map(|_| offset("class_SharedFunctionInfoWrapper__shared_info__").unwrap_or(8)),
            inlining_positions,
            deopt_exit_start: inlining_positions + 1,
        };
        Some(Self {
            header_type,
            header_size,
            split,
            code_type,
            // V8 11 names neither; they follow the flags and the builtin id.
            instruction_size: offset("class_Code__instruction_size__").unwrap_or(56),
            flags: offset("class_Code__flags__").unwrap_or(48),
            kind_mask: u32::try_from(get("CodeKindFieldMask")?).ok()?,
            optimized_kinds: [baseline + 1, baseline + 2],
            maglev_places_statements: major >= 13,
            deopt_data,
            position_table,
            deopt,
            literal_array_types: types(&[
                "type_WeakFixedArray__WEAK_FIXED_ARRAY_TYPE",
                "type_TrustedWeakFixedArray__TRUSTED_WEAK_FIXED_ARRAY_TYPE",
                "type_FixedArray__FIXED_ARRAY_TYPE",
                "type_TrustedFixedArray__TRUSTED_FIXED_ARRAY_TYPE",
            ]),
            deopt_data_types: types(&[
                "type_FixedArray__FIXED_ARRAY_TYPE",
                "type_TrustedFixedArray__TRUSTED_FIXED_ARRAY_TYPE",
                "type_ProtectedFixedArray__PROTECTED_FIXED_ARRAY_TYPE",
                "type_DeoptimizationData__DEOPTIMIZATION_DATA_TYPE",
            ]),
            byte_array_types: types(&[
                "type_ByteArray__BYTE_ARRAY_TYPE",
                "type_TrustedByteArray__TRUSTED_BYTE_ARRAY_TYPE",
            ]),
        })
    }
}

/// A code object found for a pc, checked.
#[derive(Debug, Clone, Copy)]
struct FoundCode {
    code: u64,
    start: u64,
    maglev: bool,
}

/// The code object holding a pc: optimized (where it is), or another kind (baseline).
enum Holder {
    Optimized(FoundCode),
    NotOptimized,
}

impl Holder {
    fn optimized(self) -> Option<FoundCode> {
        match self {
            Self::Optimized(found) => Some(found),
            Self::NotOptimized => None,
        }
    }
}

/// One function of an optimized frame's inlined chain: its `SharedFunctionInfo` and where it
/// is in its script (`None`: not known exactly, placed at its start).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Inlined {
    pub shared: u64,
    pub offset: Option<u32>,
}

/// A raw `SourcePosition`: not external, the script offset + 1 in bits 1 to 30, the inlining
/// id + 1 in bits 31 to 46. `None` for an external position.
fn split_position(raw: i64) -> Option<(Option<u32>, Option<usize>)> {
    let raw = raw.cast_unsigned();
    if raw & 1 != 0 {
        return None;
    }
    let offset = ((raw >> 1) & ((1 << 30) - 1)).checked_sub(1);
    let inlining = ((raw >> 31) & 0xffff).checked_sub(1);
    Some((
        offset.and_then(|o| u32::try_from(o).ok()),
        inlining.and_then(|i| usize::try_from(i).ok()),
    ))
}

/// A strong pointer from a tagged value that may be a weak reference (tag 3).
fn strong(tagged: u64) -> Option<u64> {
    heap_object(if tagged & 3 == 3 { tagged - 2 } else { tagged })
}

impl JsNamer {
    /// The chain of functions an optimized frame of `shared` is running, leaf (innermost
    /// inlined) first and `shared` itself last, each at its current position. `pc` is the
    /// frame's instruction pointer (`is_return` when it is a return address). `None` when the
    /// code does not check out: the frame keeps its start line.
    pub(super) fn optimized_chain(
        &mut self,
        pc: u64,
        is_return: bool,
        shared: u64,
    ) -> Option<Vec<Inlined>> {
        let code = self.code_at(pc)?;
        let layout = self.layout.code.clone()?;
        let at = if is_return { pc.checked_sub(1)? } else { pc };
        let offset = at.checked_sub(code.start)?;
        let data = heap_object(self.memory.word(code.code + layout.deopt_data)?)?;
        let data_type = self.instance_type(data)?;
        if !layout.deopt_data_types.contains(&data_type) {
            return None;
        }
        let element = |namer: &mut Self, index: u64| -> Option<u64> {
            let length =
                u64::try_from(smi(namer.memory.word(data + namer.layout.array_length)?)?).ok()?;
            (index < length)
                .then(|| {
                    namer
                        .memory
                        .word(data + namer.layout.fixed_array_data + 8 * index)
                })
                .flatten()
        };
        let d = layout.deopt;
        // The code is this frame's function's, and the pc is not at a deopt exit (where a
        // lazily deoptimized frame returns: no position there).
        let mut own = heap_object(element(self, d.shared)?)?;
        if let Some(field) = d.shared_wrapper_field {
            own = heap_object(self.memory.word(own + field)?)?;
        }
        if own != shared {
            return None;
        }
        let exits = u64::try_from(smi(element(self, d.deopt_exit_start)?)?).ok()?;
        if offset >= exits {
            return None;
        }
        let table = heap_object(self.memory.word(code.code + layout.position_table)?)?;
        let table = self.byte_array(table)?;
        let raw = position_at(
            &table,
            i64::try_from(offset).ok()?,
            self.layout.unsigned_code_offsets,
        )?;
        let (leaf_offset, mut inlining) = split_position(raw)?;
        // Where a call was made is known exactly except in Maglev code that places calls at
        // their statements.
        let calls_exact = !(code.maglev && layout.maglev_places_statements);
        let mut chain = Vec::new();
        let mut offset = Some(leaf_offset?).filter(|_| calls_exact || !is_return);
        if inlining.is_none() {
            chain.push(Inlined { shared, offset });
            return Some(chain);
        }
        let positions = heap_object(element(self, d.inlining_positions)?)?;
        let positions = self.byte_array(positions)?;
        let count = usize::try_from(smi(element(self, d.inlined_count)?)?).ok()?;
        let literals = heap_object(element(self, d.literal_array)?)?;
        if !layout
            .literal_array_types
            .contains(&self.instance_type(literals)?)
        {
            return None;
        }
        let literal_count = usize::try_from(smi(self
            .memory
            .word(literals + self.layout.array_length)?)?)
        .ok()?;
        while let Some(id) = inlining {
            if chain.len() >= MAX_INLINING_DEPTH {
                return None;
            }
            // An `InliningPosition`: the call's raw position, then the inlined function's
            // literal index (16 bytes with padding).
            let entry = positions.get(id * 16..id * 16 + 12)?;
            let call = i64::from_le_bytes(entry[..8].try_into().ok()?);
            let function =
                usize::try_from(i32::from_le_bytes(entry[8..12].try_into().ok()?)).ok()?;
            if function >= count || function >= literal_count {
                return None;
            }
            let word = self
                .memory
                .word(literals + self.layout.fixed_array_data + 8 * function as u64)?;
            let inlined = strong(word)?;
            if self.instance_type(inlined)? != self.layout.types.shared_function_info {
                return None;
            }
            chain.push(Inlined {
                shared: inlined,
                offset,
            });
            let (call_offset, caller) = split_position(call)?;
            offset = Some(call_offset?).filter(|_| calls_exact);
            // Callers come before their callees: an id that does not go down loops.
            if caller.is_some_and(|c| c >= id) {
                return None;
            }
            inlining = caller;
        }
        chain.push(Inlined { shared, offset });
        Some(chain)
    }

    /// The bytes of a (trusted) byte array, at most [`MAX_TABLE`].
    fn byte_array(&mut self, array: u64) -> Option<Vec<u8>> {
        let t = self.instance_type(array)?;
        if !self.layout.code.as_ref()?.byte_array_types.contains(&t) {
            return None;
        }
        let length =
            usize::try_from(smi(self.memory.word(array + self.layout.array_length)?)?).ok()?;
        if length > MAX_TABLE {
            return None;
        }
        self.memory
            .bytes(array + self.layout.byte_array_data, length)
    }

    /// The optimized code object whose instructions hold `pc`, checked.
    fn code_at(&mut self, pc: u64) -> Option<FoundCode> {
        // Its code found before, optimized or not, and still there: no search.
        if let Some(&header) = self.code_headers.get(&pc)
            && let Some(holder) = self.check_header(header, pc)
        {
            return holder.optimized();
        }
        if self.no_code.contains_key(&pc) || self.file_code.iter().any(|r| r.contains(&pc)) {
            return None;
        }
        let layout = self.layout.code.clone()?;
        let mut probes = 0;
        let lowest = pc.saturating_sub(MAX_CODE_SCAN);
        let mut end = pc & !7;
        // The word after the one looked at: a header's next field is a pointer too (the
        // back pointer, or the relocation info).
        let mut above = None;
        while end > lowest {
            let from = end.saturating_sub(SCAN_CHUNK).max(lowest);
            let bytes = self.memory.bytes(from, usize::try_from(end - from).ok()?)?;
            for (i, word) in bytes.chunks_exact(8).enumerate().rev() {
                let word = u64::from_le_bytes(word.try_into().ok()?);
                let at = from + 8 * i as u64;
                let next = above.replace(word);
                let is_header = if let Some(map) = self.code_header_map {
                    word == map
                } else {
                    let Some(map) = heap_object(word) else {
                        continue;
                    };
                    if next.and_then(heap_object).is_none() {
                        continue;
                    }
                    probes += 1;
                    if probes > MAX_MAP_PROBES {
                        // Not searched again: what looks like pointers here is not code.
                        if self.may_cache() {
                            self.no_code.insert(pc, (), 0);
                        }
                        return None;
                    }
                    self.instance_type(map) == Some(self.layout.types.map)
                        && self.memory.u16(map + self.layout.instance_type)
                            == Some(layout.header_type)
                };
                if !is_header {
                    continue;
                }
                // The first header below the pc is its code's, or the pc is in no code. Its
                // map is the map of code headers (its type checked).
                self.code_header_map = Some(word);
                let holder = self.check_header(at, pc);
                if self.may_cache() {
                    if holder.is_some() {
                        self.code_headers.insert(pc, at, 0);
                    } else {
                        self.no_code.insert(pc, (), 0);
                    }
                }
                return holder.and_then(Holder::optimized);
            }
            end = from;
        }
        // Nothing like a code header below it: a pc in no code object (a builtin in the
        // binary's text), not searched again.
        if self.may_cache() {
            self.no_code.insert(pc, (), 0);
        }
        None
    }

    /// The code whose header is at `header`: `None` unless its instructions hold `pc`.
    fn check_header(&mut self, header: u64, pc: u64) -> Option<Holder> {
        let layout = self.layout.code.clone()?;
        if self.instance_type(header)? != layout.header_type {
            return None;
        }
        let start = header.checked_add(layout.header_size)?;
        let code = match layout.split {
            None => header,
            Some(split) => {
                let code = heap_object(self.memory.word(header + split.back_pointer)?)?;
                if self.instance_type(code)? != layout.code_type
                    || heap_object(self.memory.word(code + split.instruction_stream)?)? != header
                    || self.memory.word(code + split.instruction_start)? != start
                {
                    return None;
                }
                code
            }
        };
        let size = u64::try_from(self.memory.i32(code + layout.instruction_size)?).ok()?;
        if !(start..start.checked_add(size)?).contains(&pc) {
            return None;
        }
        let flags = self.memory.i32(code + layout.flags)?.cast_unsigned();
        let kind = flags & layout.kind_mask;
        if !layout.optimized_kinds.contains(&kind) {
            return Some(Holder::NotOptimized);
        }
        Some(Holder::Optimized(FoundCode {
            code,
            start,
            maglev: kind == layout.optimized_kinds[0],
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata of each Node major's binary that the code layout is read from (the values
    /// of Node 18.20, 20.20, 22.23, 24.22 and 26.12).
    fn metadata(major: i64) -> HashMap<String, i64> {
        let mut values: Vec<(&str, i64)> = vec![("CodeKindFieldMask", 15)];
        match major {
            10 => values.extend([
                ("type_Code__CODE_TYPE", 240),
                ("CodeKindBaseline", 11),
                ("class_Code__instruction_start__uintptr_t", 128),
                ("class_Code__instruction_size__int", 40),
                ("class_Code__flags__uint32_t", 48),
            ]),
            11 => values.extend([
                ("type_Code__CODE_TYPE", 245),
                ("type_InstructionStream__INSTRUCTION_STREAM_TYPE", 252),
                ("CodeKindBaseline", 11),
                ("class_InstructionStream__instruction_start__uintptr_t", 16),
                ("class_Code__deoptimization_data__FixedArray", 16),
                ("class_Code__source_position_table__ByteArray", 24),
                ("DeoptimizationDataInlinedFunctionCountIndex", 1),
                ("DeoptimizationDataLiteralArrayIndex", 2),
                ("DeoptimizationDataSharedFunctionInfoIndex", 6),
                ("DeoptimizationDataInliningPositionsIndex", 7),
            ]),
            12 => values.extend([
                ("type_Code__CODE_TYPE", 206),
                ("type_InstructionStream__INSTRUCTION_STREAM_TYPE", 210),
                ("CodeKindBaseline", 10),
                ("class_InstructionStream__instruction_start__uintptr_t", 32),
                (
                    "class_Code__instruction_stream__Tagged_InstructionStream_",
                    32,
                ),
                ("class_Code__instruction_start__Address", 40),
                ("class_Code__flags__uint32_t", 48),
                ("class_Code__instruction_size__int", 52),
                ("DeoptimizationDataInlinedFunctionCountIndex", 1),
                ("DeoptimizationDataLiteralArrayIndex", 2),
                ("DeoptimizationDataSharedFunctionInfoIndex", 6),
                ("DeoptimizationDataInliningPositionsIndex", 7),
            ]),
            _ => values.extend([
                ("type_Code__CODE_TYPE", 187),
                ("type_InstructionStream__INSTRUCTION_STREAM_TYPE", 192),
                ("CodeKindBaseline", if major == 13 { 10 } else { 11 }),
                ("class_InstructionStream__instruction_start__uintptr_t", 32),
                (
                    "class_Code__instruction_stream__Tagged_InstructionStream_",
                    32,
                ),
                ("class_Code__instruction_start__Address", 40),
                ("class_Code__flags__uint32_t", 52),
                ("class_Code__instruction_size__int", 56),
                ("DeoptimizationDataInlinedFunctionCountIndex", 1),
                ("DeoptimizationDataLiteralArrayIndex", 3),
                ("DeoptimizationDataWrappedSharedFunctionInfoIndex", 7),
                ("DeoptimizationDataInliningPositionsIndex", 8),
                (
                    "class_SharedFunctionInfoWrapper__shared_info__Tagged_SharedFunctionInfo_",
                    8,
                ),
            ]),
        }
        values
            .into_iter()
            .map(|(k, v)| (format!("v8dbg_{k}"), v))
            .collect()
    }

    /// Each version's choices, as read in live processes of each Node major.
    #[test]
    fn code_is_laid_out_by_version() {
        // Node 18: the instructions follow the Code; the deoptimization data's indices are
        // not in the metadata (V8 11's).
        let v10 = CodeLayout::from_metadata(&metadata(10), 10).unwrap();
        assert_eq!(
            (v10.header_type, v10.header_size, v10.split),
            (240, 128, None)
        );
        assert_eq!((v10.deopt_data, v10.position_table), (16, 24));
        assert_eq!((v10.instruction_size, v10.flags), (40, 48));
        assert_eq!(v10.optimized_kinds, [12, 13]);
        let d = v10.deopt;
        assert_eq!(
            (
                d.inlined_count,
                d.literal_array,
                d.shared,
                d.inlining_positions
            ),
            (1, 2, 6, 7)
        );
        assert_eq!((d.shared_wrapper_field, d.deopt_exit_start), (None, 8));
        // Node 20: an InstructionStream and its Code; the instruction start and size are not
        // in the metadata.
        let v11 = CodeLayout::from_metadata(&metadata(11), 11).unwrap();
        assert_eq!((v11.header_type, v11.header_size), (252, 16));
        let split = v11.split.unwrap();
        assert_eq!(
            (
                split.back_pointer,
                split.instruction_stream,
                split.instruction_start
            ),
            (8, 32, 40)
        );
        assert_eq!((v11.deopt_data, v11.position_table), (16, 24));
        assert_eq!((v11.instruction_size, v11.flags), (56, 48));
        // Node 22: the Code in trusted space, its tables not in the metadata.
        let v12 = CodeLayout::from_metadata(&metadata(12), 12).unwrap();
        assert_eq!((v12.deopt_data, v12.position_table), (8, 16));
        assert_eq!((v12.instruction_size, v12.flags), (52, 48));
        assert_eq!(v12.optimized_kinds, [11, 12]);
        assert!(!v12.maglev_places_statements);
        // Node 24 and 26: the function behind a wrapper.
        for major in [13, 14] {
            let l = CodeLayout::from_metadata(&metadata(major), major).unwrap();
            assert_eq!((l.deopt_data, l.position_table), (8, 16));
            assert_eq!((l.instruction_size, l.flags), (56, 52));
            let d = l.deopt;
            assert_eq!((d.shared, d.shared_wrapper_field), (7, Some(8)));
            assert_eq!(
                (d.literal_array, d.inlining_positions, d.deopt_exit_start),
                (3, 8, 9)
            );
            assert!(l.maglev_places_statements);
        }
        // Without the code's type, no layout: frames keep their start line.
        let mut partial = metadata(12);
        partial.remove("v8dbg_type_Code__CODE_TYPE");
        assert_eq!(CodeLayout::from_metadata(&partial, 12), None);
    }

    #[test]
    fn source_positions_split_into_offset_and_inlining() {
        // Offset 186, not inlined (V8 writes both plus one).
        assert_eq!(split_position(0x176), Some((Some(186), None)));
        let raw = ((3i64 + 1) << 31) | ((41 + 1) << 1);
        assert_eq!(split_position(raw), Some((Some(41), Some(3))));
        assert_eq!(split_position(0x177), None, "external");
    }
}
