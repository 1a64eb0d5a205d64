//! `/proc/PID/maps`: what a process has mapped where. The one parser of it; each reader (discovery,
//! unwinding, V8, symbols) keeps only its own choice of entries.

use std::{collections::BTreeSet, ops::Range, path::Path};

use super::files::FileId;

/// Largest maps text read: a process at the default `vm.max_map_count` (65,530 mappings) has
/// some 7 MB; what lies beyond the bound is left out, never read in part.
pub const MAX_MAPS_BYTES: usize = 32 << 20;

/// A mapping's permissions (`r-xp`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[expect(
    clippy::struct_excessive_bools,
    reason = "the four flags the kernel prints"
)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
    /// `s`: shared, else `p`: private (copy on write).
    pub shared: bool,
}

impl Perms {
    fn parse(text: &str) -> Option<Self> {
        let &[read, write, execute, shared] = text.as_bytes() else {
            return None;
        };
        let flag = |byte: u8, set: u8| match byte {
            b'-' => Some(false),
            _ if byte == set => Some(true),
            _ => None,
        };
        Some(Self {
            read: flag(read, b'r')?,
            write: flag(write, b'w')?,
            execute: flag(execute, b'x')?,
            shared: match shared {
                b's' => true,
                b'p' => false,
                _ => return None,
            },
        })
    }
}

/// The device of a mapped file, `major:minor` as the kernel prints it in hex.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Device {
    pub major: u32,
    pub minor: u32,
}

impl Device {
    /// `hh:hh`, in hex; `None` for anything else.
    fn parse(text: &str) -> Option<Self> {
        let (major, minor) = text.split_once(':')?;
        let number = |n: &str| {
            (!n.is_empty() && n.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(n, 16).ok())
                .flatten()
        };
        Some(Self {
            major: number(major)?,
            minor: number(minor)?,
        })
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}", self.major, self.minor)
    }
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry {
    /// Never empty: `start < end`.
    pub range: Range<u64>,
    pub perms: Perms,
    /// Where in the file the mapping starts.
    pub offset: u64,
    /// The file's device.
    pub dev: Device,
    pub inode: u64,
    /// As the kernel prints it: a file path (maybe with ` (deleted)`), `[vdso]`, `[stack]`,
    /// `[anon:NAME]`, or empty for anonymous memory.
    pub path: String,
}

impl MapsEntry {
    /// Parses one line; `None` for anything that is not one (a line cut short, garbage).
    pub fn parse(line: &str) -> Option<Self> {
        // Fields are split by single spaces; the path, padded in front, may hold spaces itself.
        let mut fields = line.splitn(6, ' ');
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = Perms::parse(fields.next()?)?;
        let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
        let dev = Device::parse(fields.next()?)?;
        let inode = fields.next()?.parse().ok()?;
        let range = u64::from_str_radix(start, 16).ok()?..u64::from_str_radix(end, 16).ok()?;
        if range.is_empty() {
            return None;
        }
        Some(Self {
            range,
            perms,
            offset,
            dev,
            inode,
            path: fields.next().unwrap_or("").trim_start().to_owned(),
        })
    }

    /// The path without the ` (deleted)` the kernel appends to unlinked files.
    pub fn file_path(&self) -> &str {
        self.path.strip_suffix(" (deleted)").unwrap_or(&self.path)
    }

    /// A mapping of a file (not anonymous memory nor a `[...]` region).
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/')
    }

    /// The mapped file across mount namespaces.
    pub fn file(&self) -> FileId {
        FileId {
            dev: self.dev,
            inode: self.inode,
            stamp: None,
        }
    }
}

/// The entries of maps text, in map order; lines that do not parse are left out.
pub fn parse_maps(text: &str) -> Vec<MapsEntry> {
    text.lines().filter_map(MapsEntry::parse).collect()
}

/// The executable mappings of files, in map order.
pub fn executable_files(maps: &[MapsEntry]) -> impl Iterator<Item = &MapsEntry> {
    maps.iter().filter(|m| m.perms.execute && m.is_file())
}

/// The first executable mapping of each distinct file, in map order.
pub fn first_mapping_per_file(maps: &[MapsEntry]) -> Vec<&MapsEntry> {
    let mut seen = BTreeSet::new();
    executable_files(maps)
        .filter(|m| seen.insert(Path::new(m.file_path())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_lines_parse() {
        let line = MapsEntry::parse(
            "00b72000-025fe000 r-xp 00772000 fe:00 247584                             /usr/bin/node (deleted)",
        )
        .unwrap();
        assert_eq!(
            (line.range.clone(), line.offset, line.inode),
            (0xb7_2000..0x25f_e000, 0x77_2000, 247_584)
        );
        assert!(line.perms.execute && line.perms.read && !line.perms.write && !line.perms.shared);
        assert_eq!(line.dev.to_string(), "fe:00");
        assert_eq!(line.file_path(), "/usr/bin/node");
        assert!(line.is_file());
        let anon = MapsEntry::parse("7f91f1fc3000-7f91f1fff000 rw-p 00000000 00:00 0 ").unwrap();
        assert!(!anon.perms.execute && !anon.is_file());
        assert_eq!(anon.path, "");
        let bare = MapsEntry::parse("7f91f1fc3000-7f91f1fff000 rw-s 00000000 00:00 0").unwrap();
        assert!(bare.perms.shared);
        assert_eq!(bare.path, "");
        let named = MapsEntry::parse(
            "7ffd1000-7ffd3000 r-xp 00000000 00:00 0                          [vdso]",
        )
        .unwrap();
        assert_eq!(named.path, "[vdso]");
        let spaced =
            MapsEntry::parse("1000-2000 r-xp 00001000 08:01 7 /opt/my app/lib (x).so").unwrap();
        assert_eq!(spaced.file_path(), "/opt/my app/lib (x).so");
    }

    #[test]
    fn hostile_lines_give_none() {
        for line in [
            "",
            "garbage",
            "2000-1000 r-xp 00000000 00:00 0 ",
            "1000-1000 r-xp 00000000 00:00 0 ",
            "1000-2000 r-xp 00000000 00:00",
            "1000-2000 r-xp 00000000",
            "1000-2000 r-x",
            "1000-2000 rwxq 00000000 00:00 0 ",
            "1000-2000 r-xpp 00000000 00:00 0 ",
            "1000-2000 r-xp 00000000 0000 0 ",
            "1000-2000 r-xp 00000000 00:00 -1 ",
            "1000-2000 r-xp 00000000 00:00 99999999999999999999999 /a",
            "1000-10000000000000000 r-xp 00000000 00:00 0 ",
            "1000-2000 r-xp 10000000000000000 00:00 0 ",
            "1000-2000  r-xp 00000000 00:00 0 ",
            "1000 r-xp 00000000 00:00 0 ",
            "-2000 r-xp 00000000 00:00 0 ",
            "1000-2000 r-xp 00000000 00:00 0\u{0} /x",
            "ffffffffffffffff-fffffffffffffffff r-xp 0 0:0 0",
        ] {
            assert_eq!(MapsEntry::parse(line), None, "{line:?}");
        }
        // A maps text cut in the middle of a line keeps the lines before.
        let cut = "1000-2000 r-xp 00000000 08:01 1 /a\n3000-4000 r-xp 000";
        assert_eq!(parse_maps(cut).len(), 1);
    }

    #[test]
    fn executable_mappings_are_distinct_and_ordered() {
        let maps = parse_maps(
            "\
00400000-00401000 r--p 00000000 08:01 1 /usr/bin/node
00401000-00402000 r-xp 00001000 08:01 1 /usr/bin/node
7f00-7f01 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
7f01-7f02 r-xp 00000000 00:00 0 [vdso]
7f02-7f03 rw-p 00000000 00:00 0
7f03-7f04 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
",
        );
        let found: Vec<_> = first_mapping_per_file(&maps)
            .into_iter()
            .map(|m| (m.path.as_str(), m.range.clone(), m.offset))
            .collect();
        assert_eq!(
            found,
            [
                ("/usr/bin/node", 0x40_1000..0x40_2000, 0x1000),
                ("/usr/lib/x86_64-linux-gnu/libc.so.6", 0x7f00..0x7f01, 0)
            ]
        );
    }
}
