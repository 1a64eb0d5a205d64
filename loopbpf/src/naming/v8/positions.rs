//! Where in its script a frame is: an interpreted frame's bytecode offset through the
//! function's source position table to a script offset, and a script offset to the line and
//! column Node prints (from V8's line ends, else from the source).

use super::{
    FrameSlots, JsNamer,
    heap::{heap_object, smi},
};
use crate::target::memory::ReadMemory;

/// Longest script source read to find line ends (a large bundle is still read once), in UTF-16
/// units: 32 MiB of Latin-1, 64 MiB of two-byte source, within one sample's byte budget.
const MAX_SOURCE: usize = 32 << 20;
/// Most line ends read from a script's own table (V8 computed them), or kept for a script.
const MAX_LINES: usize = 1 << 21;
/// Longest source position table read.
const MAX_POSITION_TABLE: usize = 1 << 20;

/// Line ends of a script's source (offsets of the line terminators).
pub(super) struct LineEnds {
    source: u64,
    ends: Vec<u32>,
}

impl JsNamer {
    /// Where an interpreted frame is in its script: its bytecode offset through the source
    /// position table.
    pub(super) fn bytecode_position(&mut self, slots: &FrameSlots) -> Option<u32> {
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
        if self.may_cache() {
            self.positions.insert((array, table, offset), position, 0);
        }
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
    pub(super) fn line_column(&mut self, script: u64, offset: u32) -> Option<(u32, u32)> {
        let source = self.memory.word(script + self.layout.script_source)?;
        let fresh = self
            .line_ends
            .get(&script)
            .is_some_and(|ends| ends.source == source);
        if !fresh {
            let ends = self.read_line_ends(script, source)?;
            if ends.len() > MAX_LINES {
                return None;
            }
            let bytes = ends.len() * 4;
            let ends = LineEnds { source, ends };
            if !self.line_ends.insert(script, ends, bytes) {
                return None;
            }
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
        let units = self.string_units(source, 0, MAX_SOURCE)?;
        // A source cut short would end its last line at the cut.
        if units.len() >= MAX_SOURCE {
            return None;
        }
        line_ends(&units)
    }
}

/// Offsets of the line terminators in a source (`\n`, a lone `\r`, U+2028, U+2029), and its
/// length as the end of the last line, as V8 computes them; `None` past [`MAX_LINES`].
fn line_ends(units: &[u16]) -> Option<Vec<u32>> {
    let mut ends = Vec::new();
    for (i, &unit) in units.iter().enumerate() {
        let terminates = match unit {
            0x0a | 0x2028 | 0x2029 => true,
            0x0d => units.get(i + 1) != Some(&0x0a),
            _ => false,
        };
        if terminates {
            if ends.len() >= MAX_LINES {
                return None;
            }
            ends.push(u32::try_from(i).unwrap_or(u32::MAX));
        }
    }
    ends.push(u32::try_from(units.len()).unwrap_or(u32::MAX));
    Some(ends)
}

/// The raw source position of the last entry at or before `bytecode_offset` in a source
/// position table: pairs of (code offset delta, position delta) as variable-length numbers.
/// Code offsets are zig-zag encoded with the sign as the statement bit up to V8 13, unsigned
/// with two flag bits from V8 14.
pub(super) fn position_at(
    table: &[u8],
    bytecode_offset: i64,
    unsigned_code_offsets: bool,
) -> Option<i64> {
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
    fn line_ends_count_every_terminator_once() {
        let units: Vec<u16> = "a\nb\r\nc\rd\u{2028}e".encode_utf16().collect();
        assert_eq!(line_ends(&units).unwrap(), [1, 4, 6, 8, 10]);
        assert_eq!(line_ends(&[]).unwrap(), [0]);
        assert_eq!(line_ends(&vec![0x0a; MAX_LINES + 1]), None);
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
