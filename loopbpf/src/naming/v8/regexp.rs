//! Regular expressions named: a block inside a regexp (catastrophic backtracking) shows as
//! `RegExp /<source>/<flags>` instead of an anonymous `[JS]` leaf.
//!
//! V8 compiles a regexp to machine code (irregexp) that runs in a frame of its own: the frame
//! pointer is kept, the slot below it holds the frame's type marker (`IrregexpFrame`, V8 11
//! on; V8 10 keeps the input string there), and the arguments the code was called with sit
//! above the return address, the last of them the regexp (a `JSRegExp`, from V8 12.x its
//! `IrRegExpData`): at `fp + 32` in Node 18 to 26 on x86-64, the System V ABI placing the 7th
//! to 9th arguments (call origin, isolate, regexp) on the stack.
//!
//! When V8 runs a regexp's bytecode instead (`--regexp-interpret-all`, or before it tiers up),
//! the leaf is the interpreter, native code of the node binary, which keeps the regexp where
//! no fixed slot says. There the regexp is taken from the JS-linkage builtin that was called
//! with it (`String.prototype.replace`, `RegExp.prototype.exec`, ...: its receiver or first
//! argument), when no irregexp frame was found in the sample.
//!
//! Everything is read as hostile: the marker must match, the object must be of a regexp type
//! by its map, the source a V8 string, read at most [`MAX_SOURCE`] units; anything else leaves
//! today's naming.

use std::{collections::HashMap, fmt::Write as _};

use super::{
    JsNamer,
    heap::{heap_object, smi},
};
use crate::{diag::printable, naming::frame::Frame, target::memory::ReadMemory};

/// Characters of a regexp's source shown; longer ones end in an ellipsis.
pub const MAX_SOURCE: usize = 60;

/// Where the irregexp frame keeps the regexp it runs, from its frame pointer.
const FP_REGEXP: i64 = 32;
/// The slot below the frame pointer: the type marker (V8 11 on) or the input string (V8 10).
const FP_MARKER: i64 = -8;

/// The flags of a regexp as `RegExp.prototype.flags` prints them, with V8's bit for each.
const FLAGS: [(char, u32); 8] = [
    ('d', 1 << 7),
    ('g', 1 << 0),
    ('i', 1 << 1),
    ('m', 1 << 2),
    ('s', 1 << 5),
    ('u', 1 << 4),
    ('v', 1 << 8),
    ('y', 1 << 3),
];
/// Every flag bit V8 has (with `l`, linear, which `flags` does not print).
const KNOWN_FLAG_BITS: u32 = 0x1ff;

/// Where V8 keeps a regexp's source and flags, from the postmortem metadata.
#[derive(Debug, Clone)]
pub struct RegExpLayout {
    pub js_regexp: u16,
    /// `JSRegExp::source`; the flags (a Smi) follow it.
    pub js_regexp_source: u64,
    /// `RegExpData` and its subtypes (V8 12.x on): what the irregexp frame holds instead.
    pub regexp_data: Vec<u16>,
    /// `RegExpData::source`; the flags (a Smi) follow it.
    pub regexp_data_source: Option<u64>,
    /// The irregexp frame's marker (V8 11 on); `None`: the slot holds the input string.
    pub frame_marker: Option<u64>,
}

impl RegExpLayout {
    /// `None` when the metadata does not describe a regexp (then they stay unnamed).
    pub fn from_metadata(values: &HashMap<String, i64>) -> Option<Self> {
        let get = |name: &str| values.get(&format!("v8dbg_{name}")).copied();
        let by_prefix = |prefix: &str| {
            let prefix = format!("v8dbg_{prefix}");
            values
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(_, &v)| v)
                .next()
        };
        let js_regexp = u16::try_from(get("type_JSRegExp__JS_REG_EXP_TYPE")?).ok()?;
        let js_regexp_source = u64::try_from(by_prefix("class_JSRegExp__source__")?).ok()?;
        let regexp_data = [
            "type_RegExpData__REG_EXP_DATA_TYPE",
            "type_IrRegExpData__IR_REG_EXP_DATA_TYPE",
            "type_AtomRegExpData__ATOM_REG_EXP_DATA_TYPE",
        ]
        .iter()
        .filter_map(|name| u16::try_from(get(name)?).ok())
        .collect();
        let regexp_data_source =
            by_prefix("class_RegExpData__source__").and_then(|v| u64::try_from(v).ok());
        // V8 writes a frame's type shifted left by the Smi tag.
        let frame_marker = get("frametype_IrregexpFrame")
            .and_then(|t| u64::try_from(t).ok())
            .map(|t| t << 1);
        Some(Self {
            js_regexp,
            js_regexp_source,
            regexp_data,
            regexp_data_source,
            frame_marker,
        })
    }
}

/// `RegExp /<source>/<flags>`: the source cut to [`MAX_SOURCE`] characters (an ellipsis says
/// so) and made printable.
pub fn regexp_name(source: &str, flags: u32, truncated: bool) -> String {
    let mut shown: String = source.chars().take(MAX_SOURCE).collect();
    if truncated || source.chars().count() > MAX_SOURCE {
        shown.push('…');
    }
    let mut name = format!("RegExp /{}/", printable(&shown));
    for (letter, bit) in FLAGS {
        if flags & bit != 0 {
            let _ = write!(name, "{letter}");
        }
    }
    name
}

impl JsNamer {
    /// The regexp an irregexp frame at `fp` runs, named; `None` when the frame is not one.
    pub(super) fn irregexp_frame(
        &mut self,
        fp: u64,
        slot: &impl Fn(Option<u64>) -> Option<u64>,
    ) -> Option<u32> {
        let layout = self.regexp.as_ref()?;
        let below = slot(fp.checked_add_signed(FP_MARKER))?;
        match layout.frame_marker {
            Some(marker) if below != marker => return None,
            Some(_) => {}
            // V8 10: the input string.
            None => {
                if !heap_object(below).is_some_and(|s| self.is_string(s)) {
                    return None;
                }
            }
        }
        let regexp = slot(fp.checked_add_signed(FP_REGEXP))?;
        self.regexp_frame(regexp)
    }

    /// The regexp a JS-linkage builtin (`function`, with no script) was called with, as its
    /// receiver (`RegExp.prototype.exec`) or first argument (`String.prototype.replace`).
    pub(super) fn builtin_regexp(
        &mut self,
        function: u64,
        receiver: Option<u64>,
        first_argument: Option<u64>,
    ) -> Option<u32> {
        self.regexp.as_ref()?;
        let function = heap_object(function)?;
        if !self.is_function(function) {
            return None;
        }
        let shared = heap_object(self.memory.word(function + self.layout.function_shared)?)?;
        if self.function_info(shared)?.script.is_some() {
            return None;
        }
        [receiver, first_argument]
            .into_iter()
            .flatten()
            .find_map(|tagged| self.regexp_frame(tagged))
    }

    /// `tagged` named as a regexp, when it is a `JSRegExp` or a `RegExpData`.
    pub(super) fn regexp_frame(&mut self, tagged: u64) -> Option<u32> {
        let object = heap_object(tagged)?;
        let layout = self.regexp.as_ref()?;
        let (js_regexp, data) = (layout.js_regexp, layout.regexp_data.clone());
        let (js_source, data_source) = (layout.js_regexp_source, layout.regexp_data_source);
        let t = self.instance_type(object)?;
        let source_at = if t == js_regexp {
            js_source
        } else if data.contains(&t) {
            data_source?
        } else {
            return None;
        };
        let source = heap_object(self.memory.word(object + source_at)?)?;
        if !self.is_string(source) {
            return None;
        }
        let flags = smi(self.memory.word(object + source_at + 8)?)?;
        let flags = u32::try_from(flags)
            .ok()
            .filter(|f| f & !KNOWN_FLAG_BITS == 0)?;
        // One more than shown tells whether it was cut.
        let units = self.string_units(source, 0, MAX_SOURCE + 1)?;
        let truncated = units.len() > MAX_SOURCE;
        let source = String::from_utf16_lossy(&units[..units.len().min(MAX_SOURCE)]);
        let frame = Frame::js(regexp_name(&source, flags, truncated), None, None);
        self.intern(frame)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::naming::v8::fuzz::Builder;

    /// Made-up type tags and offsets, consistent with the fuzz tests' layout.
    const JS_REGEXP: u16 = 300;
    const IR_REGEXP_DATA: u16 = 310;
    const MARKER: u64 = 54;
    /// A one-byte sequential string's type in the fuzz layout.
    const ONE_BYTE: u16 = 8;

    fn regexp_layout() -> RegExpLayout {
        RegExpLayout {
            js_regexp: JS_REGEXP,
            js_regexp_source: 32,
            regexp_data: vec![IR_REGEXP_DATA],
            regexp_data_source: Some(16),
            frame_marker: Some(MARKER),
        }
    }

    /// A one-byte string of `text` that claims `length` characters.
    fn string(b: &mut Builder, text: &[u8], length: i32) -> u64 {
        let s = b.object(ONE_BYTE, 16 + text.len() as u64 + 8);
        b.set_length(s, length);
        for (i, chunk) in text.chunks(8).enumerate() {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            b.set(s + 16 + 8 * i as u64, u64::from_le_bytes(word));
        }
        s
    }

    /// An object of type `t` whose source (at `source_at`) and flags (after it) are as given.
    fn regexp(b: &mut Builder, t: u16, source_at: u64, source: u64, flags: u64) -> u64 {
        let r = b.object(t, 64);
        b.set(r + source_at, source);
        b.set(r + source_at + 8, flags);
        r
    }

    fn namer(b: Builder) -> JsNamer {
        let mut namer = b.namer();
        namer.regexp = Some(regexp_layout());
        namer.memory.start_sample(Instant::now());
        namer
    }

    fn name_of(namer: &mut JsNamer, tagged: u64) -> Option<String> {
        let id = namer.regexp_frame(tagged)?;
        Some(namer.frame(id)?.name.to_string())
    }

    #[test]
    fn a_regexp_and_its_data_are_read_as_v8_keeps_them() {
        let mut b = Builder::new();
        let source = string(&mut b, b"(a+)+$", 6);
        let js = regexp(&mut b, JS_REGEXP, 32, source + 1, 3 << 32);
        let data = regexp(&mut b, IR_REGEXP_DATA, 16, source + 1, 1 << 32);
        let mut namer = namer(b);
        assert_eq!(
            name_of(&mut namer, js + 1).as_deref(),
            Some("RegExp /(a+)+$/gi")
        );
        assert_eq!(
            name_of(&mut namer, data + 1).as_deref(),
            Some("RegExp /(a+)+$/g")
        );
        let id = namer.regexp_frame(js + 1).unwrap();
        let frame = namer.frame(id).unwrap();
        assert!(frame.is_js_regexp());
    }

    #[test]
    fn a_source_that_claims_gigabytes_is_read_as_far_as_is_shown() {
        let mut b = Builder::new();
        // A raw escape sequence, as a hostile heap may hold.
        let text = [b"\x1b[2J".as_slice(), &[b'a'; 200]].concat();
        let source = string(&mut b, &text, i32::MAX);
        let js = regexp(&mut b, JS_REGEXP, 32, source + 1, 0);
        let mut namer = namer(b);
        let name = name_of(&mut namer, js + 1).expect("named");
        assert!(name.starts_with("RegExp /\\x1b[2Jaaa"), "{name}");
        // 60 characters shown, the escape made 4 of them.
        assert_eq!(
            name.chars().count(),
            "RegExp /".len() + 3 + MAX_SOURCE + "…/".chars().count()
        );
        assert!(name.ends_with("…/"), "{name}");
        let used = namer.memory_used();
        assert!(
            used.sample_reads < 16 && used.sample_bytes < 256,
            "{used:?}"
        );
    }

    #[test]
    fn what_does_not_check_out_stays_unnamed() {
        let mut b = Builder::new();
        let source = string(&mut b, b"x", 1);
        let not_a_regexp = regexp(&mut b, ONE_BYTE, 32, source + 1, 0);
        let source_not_a_string = regexp(&mut b, JS_REGEXP, 32, not_a_regexp + 1, 0);
        let source_a_smi = regexp(&mut b, JS_REGEXP, 32, 7 << 32, 0);
        let flags_not_a_smi = regexp(&mut b, JS_REGEXP, 32, source + 1, source + 1);
        let unknown_flags = regexp(&mut b, JS_REGEXP, 32, source + 1, 1 << 41);
        let mut namer = namer(b);
        for (what, tagged) in [
            ("a string", source + 1),
            ("not a regexp", not_a_regexp + 1),
            ("a source that is not a string", source_not_a_string + 1),
            ("a Smi source", source_a_smi + 1),
            ("flags that are not a Smi", flags_not_a_smi + 1),
            ("unknown flags", unknown_flags + 1),
            ("a Smi", 5 << 32),
            ("unreadable", (1 << 50) + 1),
        ] {
            assert_eq!(name_of(&mut namer, tagged), None, "{what}");
        }
    }

    #[test]
    fn only_a_frame_with_the_irregexp_marker_is_read() {
        let mut b = Builder::new();
        let source = string(&mut b, b"x", 1);
        let js = regexp(&mut b, JS_REGEXP, 32, source + 1, 0);
        let mut namer = namer(b);
        let fp = 0x7ff0_0000_0000u64;
        let frame = |marker: u64| {
            move |addr: Option<u64>| match addr? {
                a if a == fp - 8 => Some(marker),
                a if a == fp + 32 => Some(js + 1),
                _ => None,
            }
        };
        assert!(namer.irregexp_frame(fp, &frame(MARKER)).is_some());
        // Another frame type (a JS frame's context, a stub's marker): not read.
        assert_eq!(namer.irregexp_frame(fp, &frame(MARKER + 2)), None);
        assert_eq!(namer.irregexp_frame(fp, &frame(js + 1)), None);
        // V8 10 has no marker: the slot holds the input string.
        namer.regexp.as_mut().unwrap().frame_marker = None;
        assert_eq!(namer.irregexp_frame(fp, &frame(MARKER)), None);
        assert!(namer.irregexp_frame(fp, &frame(source + 1)).is_some());
    }

    #[test]
    fn a_regexp_is_named_as_javascript_writes_it() {
        assert_eq!(regexp_name("^\\s*(a+)+$", 0, false), "RegExp /^\\s*(a+)+$/");
        // Flags in the order `RegExp.prototype.flags` gives them.
        assert_eq!(
            regexp_name("x", 1 | 2 | 4 | 8 | 16 | 32 | 128, false),
            "RegExp /x/dgimsuy"
        );
        assert_eq!(regexp_name("x", 256 | 64, false), "RegExp /x/v");
    }

    #[test]
    fn a_long_or_hostile_source_is_cut_and_escaped() {
        let long = "a".repeat(200);
        let name = regexp_name(&long[..MAX_SOURCE], 0, true);
        assert_eq!(name, format!("RegExp /{}…/", "a".repeat(MAX_SOURCE)));
        assert_eq!(
            regexp_name("\u{1b}[2J\u{202e}x", 0, false),
            "RegExp /\\x1b[2J\\u{202e}x/"
        );
    }
}
