//! Where V8 keeps what we read: the postmortem metadata of the binary (`v8dbg_*`), and what it
//! does not describe, by V8 version.

use std::{collections::HashMap, fs::File, rc::Rc};

use object::{Object, ObjectSection, ObjectSymbol, read::ReadCache};

use super::code::CodeLayout;

/// Symbols looked at for the metadata (node has about 200 thousand), and `v8dbg_` values
/// kept (about 1500): a file with more is not V8's.
const MAX_SYMBOLS: usize = 4 << 20;
const MAX_VALUES: usize = 16_384;
/// Longest `v8dbg_` name kept.
const MAX_NAME: usize = 256;

/// V8 versions whose `ScopeInfo` and source position tables we know (Node 18 to 26).
const KNOWN_MAJORS: std::ops::RangeInclusive<i64> = 10..=14;

/// A `DebugInfo` (V8 before 12) keeps the function's script here.
pub const DEBUG_INFO_SCRIPT: u64 = 24;

/// V8's version is kept in these globals, next to the metadata.
const VERSION_SYMBOLS: [(&str, &str); 2] = [
    ("_ZN2v88internal7Version6major_E", "v8_major"),
    ("_ZN2v88internal7Version6minor_E", "v8_minor"),
];

#[derive(Debug, Clone)]
pub struct Layout {
    pub fp_function: i64,
    pub fp_context: i64,
    pub fp_bytecode_array: i64,
    pub fp_bytecode_offset: i64,
    pub fp_receiver: i64,
    pub map: u64,
    pub instance_type: u64,
    pub map_constructor: u64,
    pub map_bit_field2: u64,
    pub map_bit_field3: u64,
    pub types: Types,
    pub function_shared: u64,
    pub sfi_function_data: u64,
    pub sfi_name_or_scope_info: u64,
    pub sfi_script: u64,
    pub script_name: u64,
    pub script_source: u64,
    pub script_line_ends: u64,
    pub uncompiled_inferred_name: u64,
    pub uncompiled_start: u64,
    /// Header size of a `BytecodeArray`: a frame's bytecode offset counts from the object.
    pub bytecode_header: i64,
    /// Where a `BytecodeArray` keeps its source position table.
    pub position_table: u64,
    /// V8 14 encodes code offsets in position tables unsigned.
    pub unsigned_code_offsets: bool,
    pub array_length: u64,
    pub fixed_array_data: u64,
    pub byte_array_data: u64,
    pub scope: ScopeLayout,
    pub strings: StringLayout,
    /// Where optimized code keeps what places its frames; `None`: they keep their start line.
    /// Shared: the code walk takes a copy of it for every frame.
    pub code: Option<Rc<CodeLayout>>,
    /// How objects keep their properties; `None` when the metadata does not say (requests
    /// are then not read).
    pub objects: Option<super::object::ObjectLayout>,
}

#[derive(Debug, Clone)]
pub struct Types {
    pub first_nonstring: u16,
    pub js_function: u16,
    /// The last of the `JSFunction` subtypes (class and built-in constructors), which V8
    /// numbers right after `JS_FUNCTION_TYPE`, up to the next type the metadata names.
    pub last_js_function: u16,
    pub shared_function_info: u16,
    pub script: u16,
    pub scope_info: u16,
    pub bytecode_array: u16,
    pub byte_array: u16,
    pub fixed_array: u16,
    pub debug_info: Option<u16>,
    pub uncompiled_data: Vec<u16>,
    pub map: u16,
    pub oddball: u16,
    pub global_proxy: Option<u16>,
}

/// How a `ScopeInfo` is laid out (no metadata describes it).
#[derive(Debug, Clone, Copy)]
pub struct ScopeLayout {
    /// Flags are a Smi (before V8 12.8), a plain 32-bit field after.
    pub flags_are_smi: bool,
    /// The first slot after the fixed ones (`v8dbg_scopeinfo_idx_first_vars`).
    pub first_vars: u64,
    /// A module scope keeps its variable count before the local names (V8 12.4 on).
    pub module_count_before_names: bool,
    pub function_type: u32,
    pub module_type: u32,
    /// Start position in a fixed slot (V8 12.8 on), else after the inferred name.
    pub fixed_position_slot: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct StringLayout {
    pub length: u64,
    pub seq_one_byte_chars: u64,
    pub seq_two_byte_chars: u64,
    pub cons_first: u64,
    pub cons_second: u64,
    pub thin_actual: u64,
    pub sliced_parent: u64,
    pub sliced_offset: u64,
    pub representation_mask: u16,
    pub encoding_mask: u16,
    pub seq_tag: u16,
    pub cons_tag: u16,
    pub sliced_tag: u16,
    pub thin_tag: u16,
    pub one_byte_tag: u16,
}

impl Layout {
    /// The layout from the metadata of one binary; what is missing or unknown when it cannot
    /// be used.
    #[expect(clippy::too_many_lines, reason = "one line per value read")]
    pub fn from_metadata(values: &HashMap<String, i64>) -> Result<Self, String> {
        let get = |names: &[&str]| -> Result<i64, String> {
            names
                .iter()
                .find_map(|name| metadata_value(values, name))
                .ok_or_else(|| format!("no v8dbg_{}", names[0]))
        };
        let offset = |names: &[&str]| {
            get(names).and_then(|v| u64::try_from(v).map_err(|e| format!("{}: {e}", names[0])))
        };
        let tag = |names: &[&str]| {
            get(names).and_then(|v| u16::try_from(v).map_err(|e| format!("{}: {e}", names[0])))
        };
        let (major, minor) = (get(&["v8_major"])?, get(&["v8_minor"])?);
        if !KNOWN_MAJORS.contains(&major) {
            return Err(format!(
                "V8 {major}.{minor} is not one loopbpf knows (10 to 14, Node 18 to 26)"
            ));
        }
        if get(&["TaggedSize"])? != 8 {
            return Err("pointer compression is not read yet".to_owned());
        }
        let first_vars = offset(&["scopeinfo_idx_first_vars"])?;
        // V8 12.8 moved the positions to fixed slots 3 and 4, before the variable part.
        let fixed_positions = first_vars == 5;
        let js_function = tag(&["type_JSFunction__JS_FUNCTION_TYPE"])?;
        let last_js_function = values
            .iter()
            .filter(|(k, _)| k.starts_with("v8dbg_type_"))
            .filter_map(|(_, &v)| u16::try_from(v).ok())
            .filter(|&t| t > js_function)
            .min()
            .map_or(js_function, |next| next - 1)
            .min(js_function.saturating_add(32));
        let uncompiled_data: Vec<u16> = values
            .iter()
            .filter(|(k, _)| k.starts_with("v8dbg_type_UncompiledData"))
            .filter_map(|(_, &v)| u16::try_from(v).ok())
            .collect();
        Ok(Self {
            fp_function: get(&["off_fp_function"])?,
            fp_context: get(&["off_fp_context"])?,
            fp_bytecode_array: get(&["off_fp_bytecode_array"])?,
            fp_bytecode_offset: get(&["off_fp_bytecode_offset"])?,
            // Arguments sit above the frame, the receiver first.
            fp_receiver: get(&["off_fp_args"])?,
            map: offset(&["class_HeapObject__map__"])?,
            instance_type: offset(&["class_Map__instance_type__"])?,
            map_constructor: offset(&["class_Map__constructor_or_back_pointer__"])?,
            map_bit_field2: offset(&["class_Map__bit_field2__"])?,
            map_bit_field3: offset(&["class_Map__bit_field3__"])?,
            types: Types {
                first_nonstring: tag(&["FirstNonstringType"])?,
                js_function,
                last_js_function,
                shared_function_info: tag(&["type_SharedFunctionInfo__SHARED_FUNCTION_INFO_TYPE"])?,
                script: tag(&["type_Script__SCRIPT_TYPE"])?,
                scope_info: tag(&["type_ScopeInfo__SCOPE_INFO_TYPE"])?,
                bytecode_array: tag(&["type_BytecodeArray__BYTECODE_ARRAY_TYPE"])?,
                // From V8 12 the tables live in trusted space.
                byte_array: tag(&[
                    "type_TrustedByteArray__TRUSTED_BYTE_ARRAY_TYPE",
                    "type_ByteArray__BYTE_ARRAY_TYPE",
                ])?,
                fixed_array: tag(&["type_FixedArray__FIXED_ARRAY_TYPE"])?,
                debug_info: (major < 12)
                    .then(|| tag(&["type_DebugInfo__DEBUG_INFO_TYPE"]).ok())
                    .flatten(),
                uncompiled_data,
                map: tag(&["type_Map__MAP_TYPE"])?,
                oddball: tag(&["type_Oddball__ODDBALL_TYPE"])?,
                global_proxy: tag(&["type_JSGlobalProxy__JS_GLOBAL_PROXY_TYPE"]).ok(),
            },
            function_shared: offset(&["class_JSFunction__shared__"])?,
            // The function's bytecode or uncompiled data: right after the map in every version
            // (named only in the metadata of V8 before 12).
            sfi_function_data: offset(&["class_SharedFunctionInfo__function_data__"]).unwrap_or(8),
            sfi_name_or_scope_info: offset(&["class_SharedFunctionInfo__name_or_scope_info__"])?,
            sfi_script: offset(&[
                "class_SharedFunctionInfo__script_or_debug_info__",
                "class_SharedFunctionInfo__script__",
            ])?,
            script_name: offset(&["class_Script__name__"])?,
            script_source: offset(&["class_Script__source__"])?,
            script_line_ends: offset(&["class_Script__line_ends__"])?,
            uncompiled_inferred_name: offset(&["class_UncompiledData__inferred_name__"])?,
            uncompiled_start: offset(&["class_UncompiledData__start_position__"])?,
            bytecode_header: get(&["class_BytecodeArray__data__"])?,
            // After the map, length, and (before V8 12) constant pool and handler table; from
            // V8 12 (trusted space) after the map, length and bytecode wrapper.
            position_table: if major >= 12 { 24 } else { 32 },
            unsigned_code_offsets: major >= 14,
            array_length: offset(&["class_FixedArrayBase__length__"])?,
            fixed_array_data: offset(&["class_FixedArray__data__"])?,
            // A (Trusted)ByteArray keeps its bytes where a FixedArray keeps its elements.
            byte_array_data: offset(&["class_FixedArray__data__"])?,
            scope: ScopeLayout {
                flags_are_smi: !fixed_positions,
                first_vars,
                module_count_before_names: major >= 12,
                function_type: if fixed_positions { 4 } else { 2 },
                module_type: if fixed_positions { 5 } else { 3 },
                fixed_position_slot: fixed_positions.then_some(3),
            },
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
            code: CodeLayout::from_metadata(values, major).map(Rc::new),
            objects: super::object::ObjectLayout::from_metadata(values).ok(),
        })
    }
}

/// Reads the `v8dbg_*` integers (and V8's version) of an ELF file: names and values. `None`
/// when it has none: no V8 in it.
pub fn postmortem_metadata(file: File) -> Option<HashMap<String, i64>> {
    metadata_of(&ReadCache::new(file))
}

/// The `v8dbg_*` integers of an object file's data (the target's: any bytes at all).
pub fn metadata_of<'data, R: object::ReadRef<'data>>(data: R) -> Option<HashMap<String, i64>> {
    let elf = object::File::parse(data).ok()?;
    let mut values = HashMap::new();
    for symbol in elf.symbols().chain(elf.dynamic_symbols()).take(MAX_SYMBOLS) {
        let Ok(name) = symbol.name() else { continue };
        if name.len() > MAX_NAME {
            continue;
        }
        let name = if name.starts_with("v8dbg_") {
            name
        } else if let Some(&(_, short)) = VERSION_SYMBOLS.iter().find(|(long, _)| *long == name) {
            short
        } else {
            continue;
        };
        if values.contains_key(name) {
            continue;
        }
        let Some(section) = symbol
            .section_index()
            .and_then(|index| elf.section_by_index(index).ok())
        else {
            continue;
        };
        // Each is an `int` in .data (zero-initialised ones in .bss, which has no bytes).
        let value = match section.data_range(symbol.address(), 4) {
            Ok(Some(bytes)) => i32::from_le_bytes(bytes.try_into().ok()?),
            _ => 0,
        };
        values.insert(name.to_owned(), i64::from(value));
        if values.len() > MAX_VALUES {
            return None;
        }
    }
    values
        .keys()
        .any(|k| k.starts_with("v8dbg_"))
        .then_some(values)
}

/// The value of `v8dbg_<name>` (or of `name` itself); a name ending in `__` is a field whose
/// type suffix changes between versions (`shared__SharedFunctionInfo`,
/// `shared__Tagged_SharedFunctionInfo_`), found by that prefix.
pub(super) fn metadata_value(values: &HashMap<String, i64>, name: &str) -> Option<i64> {
    if name.ends_with("__") {
        let prefix = format!("v8dbg_{name}");
        values
            .iter()
            .find(|(k, _)| k.starts_with(&prefix))
            .map(|(_, &v)| v)
    } else {
        values
            .get(name)
            .or_else(|| values.get(&format!("v8dbg_{name}")))
            .copied()
    }
}
