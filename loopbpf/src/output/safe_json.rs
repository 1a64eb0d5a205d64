//! Serializing an output record to JSON text that a terminal cannot be driven by: every JSON
//! output (the `--json` lines, a recording's report.json) goes through here, never through
//! `serde_json::to_*` directly.
//!
//! `serde_json` escapes only what JSON requires (U+0000 to U+001F, `"` and `\`) and passes
//! everything else raw, so a name a target chose could still carry DEL, the C1 controls (U+009B
//! starts an escape sequence on some terminals), the bidirectional overrides (which make a name
//! show as another) or U+FFFE/U+FFFF to whoever reads `loopbpf --json | less`. Here each of the
//! characters [`diag::unprintable`] takes for unprintable is written as a `\uXXXX` escape
//! too: still valid JSON, which decodes to the very same string, so parsers see no change.

use std::io;

use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter, PrettyFormatter, Serializer};

use crate::diag;

/// `value` as one line of compact JSON.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    text(write(value, Escaping(CompactFormatter))?)
}

/// `value` as indented JSON, as report.json is written.
pub fn to_vec_pretty<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    write(value, Escaping(PrettyFormatter::new()))
}

/// [`to_vec_pretty`], as text.
#[cfg(test)]
pub fn to_string_pretty<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    text(to_vec_pretty(value)?)
}

fn write<T: Serialize + ?Sized, F: Formatter>(
    value: &T,
    formatter: Escaping<F>,
) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(256);
    value.serialize(&mut Serializer::with_formatter(&mut out, formatter))?;
    Ok(out)
}

fn text(bytes: Vec<u8>) -> serde_json::Result<String> {
    // `serde_json` writes only UTF-8 (it starts from `str`s), and so does `Escaping`.
    String::from_utf8(bytes).map_err(|e| serde_json::Error::io(io::Error::other(e)))
}

/// `serde_json`'s compact or pretty formatter, escaping the unprintable characters `serde_json`
/// leaves raw. Only those two are wrapped: both leave every method but the layout ones (which
/// are forwarded here) to the trait's defaults, which `Escaping` keeps too.
struct Escaping<F>(F);

impl<F: Formatter> Formatter for Escaping<F> {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        // `serde_json` has already split out the characters JSON must escape; cut the fragment
        // again at each one a terminal must not see raw.
        let mut rest = fragment;
        while let Some((at, c)) = rest.char_indices().find(|&(_, c)| diag::unprintable(c)) {
            self.0.write_string_fragment(writer, &rest[..at])?;
            let mut units = [0; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{unit:04x}")?;
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_string_fragment(writer, rest)
    }

    fn begin_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.begin_array(writer)
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.end_array(writer)
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.0.begin_array_value(writer, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.end_array_value(writer)
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.begin_object(writer)
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.end_object(writer)
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.0.begin_object_key(writer, first)
    }

    fn end_object_key<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.end_object_key(writer)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.begin_object_value(writer)
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.0.end_object_value(writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every character `diag::printable` escapes that `serde_json` alone would leave raw.
    const RAW: &str =
        "\u{7f}\u{80}\u{9b}\u{9f}\u{200e}\u{200f}\u{202a}\u{202e}\u{2066}\u{2069}\u{fffe}\u{ffff}";

    #[test]
    fn unprintable_characters_are_escaped_and_decode_unchanged() {
        let name = format!("a{RAW}b\x1b[31m\"\\\u{fffd}é");
        let json = to_string(&name).unwrap();
        assert_eq!(
            json,
            r#""a\u007f\u0080\u009b\u009f\u200e\u200f\u202a\u202e\u2066\u2069\ufffe\uffffb\u001b[31m\"\\"#
                .to_owned()
                + "\u{fffd}é\""
        );
        assert_eq!(serde_json::from_str::<String>(&json).unwrap(), name);
        // In keys too, and in pretty JSON.
        let map = std::collections::BTreeMap::from([(name.clone(), name.clone())]);
        let pretty = to_string_pretty(&map).unwrap();
        assert!(
            !pretty.chars().any(|c| c != '\n' && diag::unprintable(c)),
            "{pretty:?}"
        );
        assert_eq!(
            serde_json::from_str::<std::collections::BTreeMap<String, String>>(&pretty).unwrap(),
            map
        );
    }

    #[test]
    fn printable_text_is_as_serde_json_writes_it() {
        let value = serde_json::json!({"a": [1, 2.5, null, true], "b": "x\u{fffd}\ty", "c": {}});
        assert_eq!(
            to_string(&value).unwrap(),
            serde_json::to_string(&value).unwrap()
        );
        assert_eq!(
            to_string_pretty(&value).unwrap(),
            serde_json::to_string_pretty(&value).unwrap()
        );
    }
}
