//! Original positions of transpiled JS (TypeScript, bundles): the source map a script names in
//! its `//# sourceMappingURL=` comment, next to it or inline, read from the target's own
//! filesystem (`/proc/PID/root`, so a container's files), resolved inside the target's root only
//! and read only from regular files of at most [`MAX_FILE`] bytes (see
//! [`crate::target::files`]): a script may name `/dev/zero`, a FIFO or a symlink to a host file.

use std::{
    io::Read,
    mem::size_of,
    path::{Component, Path, PathBuf},
};

use crate::{
    naming::frame::Original,
    target::{budget::BoundedCache, proc::Process},
};
use sourcemap::{DecodedMap, RawToken, SourceMap, decode_slice, locate_sourcemap_reference_slice};

/// Largest script or source map read (a bundle's map can be tens of MB).
const MAX_FILE: u64 = 256 << 20;
/// Bytes the parsed source maps of one process keep (their tokens and names; the sources'
/// contents are dropped), and so the largest one kept: about 2 million mappings.
const MAX_MAPS_BYTES: usize = 64 << 20;
/// Scripts whose source map (or lack of one) is remembered.
const MAX_SCRIPTS: usize = 4096;
/// Largest inline (data URL) source map parsed.
const MAX_INLINE: usize = 64 << 20;

/// The source maps of one process's scripts, read once each.
pub struct SourceMaps {
    process: Process,
    /// By script path; `None` when the script has no readable source map.
    maps: BoundedCache<String, Option<Loaded>>,
    /// Source maps not parsed or not kept because they were over the bounds.
    too_large: u64,
}

struct Loaded {
    map: SourceMap,
    /// Where relative source paths start: the map's directory and its `sourceRoot`.
    base: PathBuf,
    /// Estimated bytes the parsed map keeps.
    bytes: usize,
}

impl SourceMaps {
    pub fn new(process: &Process) -> Self {
        Self {
            process: process.clone(),
            maps: BoundedCache::new(MAX_SCRIPTS, MAX_MAPS_BYTES),
            too_large: 0,
        }
    }

    /// Source maps dropped or not read for the bounds on them.
    pub fn evictions(&self) -> u64 {
        self.maps.cleared + self.maps.refused + self.too_large
    }

    /// The original file, line and column of `script`'s `line:column` (from 1), if the script
    /// has a source map that covers it.
    pub fn original(&mut self, script: &str, line: u32, column: u32) -> Option<Original> {
        let key = script.to_owned();
        if !self.maps.contains_key(&key) {
            let loaded = self.load(script);
            let bytes = script.len() + loaded.as_ref().map_or(0, |l| l.bytes);
            if !self.maps.insert(key.clone(), loaded, bytes) {
                return None;
            }
        }
        let loaded = self.maps.get(&key)?.as_ref()?;
        let token = loaded
            .map
            .lookup_token(line.checked_sub(1)?, column.checked_sub(1)?)?;
        let source = token.get_source()?;
        let file = if source.contains("://") || Path::new(source).is_absolute() {
            source.to_owned()
        } else {
            normalize(&loaded.base.join(source)).display().to_string()
        };
        Some(Original {
            file,
            line: token.get_src_line() + 1,
            column: token.get_src_col() + 1,
        })
    }

    fn load(&mut self, script: &str) -> Option<Loaded> {
        // CommonJS scripts are named by path, ES modules by file URL; node: and the rest have
        // no file of their own.
        let path = Path::new(script.strip_prefix("file://").unwrap_or(script));
        if !path.is_absolute() {
            return None;
        }
        let code = self.read(path)?;
        let reference = locate_sourcemap_reference_slice(&code).ok()??;
        let dir = path.parent()?;
        let url = reference.get_url();
        let inline = url.starts_with("data:");
        if inline && url.len() > MAX_INLINE {
            self.too_large += 1;
            return None;
        }
        let (map, map_dir) = if let Ok(Some(inline)) = reference.get_embedded_sourcemap() {
            (regular(inline)?, dir.to_path_buf())
        } else if inline {
            return None;
        } else {
            let map_path = normalize(&dir.join(url.strip_prefix("file://").unwrap_or(url)));
            let bytes = self.read(&map_path)?;
            // Each mapping is at least a letter and a separator: refused before parsing what
            // would not be kept.
            let most_tokens = bytes.iter().filter(|&&b| b == b',' || b == b';').count() + 1;
            if most_tokens.saturating_mul(size_of::<RawToken>()) > MAX_MAPS_BYTES {
                self.too_large += 1;
                return None;
            }
            let map_dir = map_path.parent()?.to_path_buf();
            (parse(&bytes)?, map_dir)
        };
        let bytes = map_bytes(&map);
        if bytes > MAX_MAPS_BYTES {
            self.too_large += 1;
            return None;
        }
        let base = match map.get_source_root() {
            Some(root) if !root.is_empty() => map_dir.join(root),
            _ => map_dir,
        };
        Some(Loaded { map, base, bytes })
    }

    /// A file as the target sees it.
    fn read(&self, path: &Path) -> Option<Vec<u8>> {
        let file = self.process.open_file(path, MAX_FILE).ok()?;
        let mut bytes = Vec::new();
        // Bounded again: the target may append to it as it is read.
        file.take(MAX_FILE).read_to_end(&mut bytes).ok()?;
        Some(bytes)
    }
}

/// A source map file's bytes, parsed; `None` when they are not one.
fn parse(bytes: &[u8]) -> Option<SourceMap> {
    regular(decode_slice(bytes).ok()?)
}

/// A plain source map, without the sources' contents (not used, often most of the map); an
/// index of maps (a bundle's sections) flattened into one.
fn regular(map: DecodedMap) -> Option<SourceMap> {
    let mut map = match map {
        DecodedMap::Regular(map) => map,
        DecodedMap::Index(index) => index.flatten().ok()?,
        DecodedMap::Hermes(_) => return None,
    };
    for source in 0..map.get_source_count() {
        map.set_source_contents(source, None);
    }
    Some(map)
}

/// Estimated bytes a parsed source map keeps: its tokens and strings.
fn map_bytes(map: &SourceMap) -> usize {
    let strings = map.sources().chain(map.names());
    let string_bytes: usize = strings.map(|s| s.len() + 2 * size_of::<usize>()).sum();
    size_of::<SourceMap>() + map.get_token_count() as usize * size_of::<RawToken>() + string_bytes
}

/// `a/./b/../c` -> `a/c`, without touching the filesystem (the path is the target's).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn paths_normalize_lexically() {
        assert_eq!(
            normalize(Path::new("/app/dist/../src/./a.ts")),
            Path::new("/app/src/a.ts")
        );
    }

    #[test]
    fn a_script_with_a_map_next_to_it_maps_back_to_its_source() {
        let dir = std::env::temp_dir().join(format!("loopbpf-sourcemap-{}", std::process::id()));
        fs::create_dir_all(dir.join("dist")).unwrap();
        // `let a = 1;` on line 1 of src/a.ts became line 2 of dist/a.js, column 5.
        fs::write(
            dir.join("dist/a.js"),
            "'use strict';\n    let a = 1;\n//# sourceMappingURL=a.js.map\n",
        )
        .unwrap();
        fs::write(
            dir.join("dist/a.js.map"),
            r#"{"version":3,"file":"a.js","sourceRoot":"","sources":["../src/a.ts"],"names":[],"mappings":";IAAA"}"#,
        )
        .unwrap();
        let mut maps = SourceMaps::new(&Process::myself());
        let script = dir.join("dist/a.js").display().to_string();
        let original = maps.original(&script, 2, 5).unwrap();
        assert_eq!(original.file, dir.join("src/a.ts").display().to_string());
        assert_eq!((original.line, original.column), (1, 1));
        assert_eq!(maps.original("node:internal/timers", 1, 1), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn source_maps_take_any_bytes_within_bounds() {
        use crate::target::fuzz::fuzz;
        let seeds = [
            br#"{"version":3,"file":"a.js","sourceRoot":"","sources":["../src/a.ts"],"names":["x"],"mappings":";IAAA,KAAKA;AACL,gBAAgB"}"#.to_vec(),
            br#"{"version":3,"sections":[{"offset":{"line":0,"column":0},"map":{"version":3,"sources":["b.ts"],"names":[],"mappings":"AAAA"}}]}"#.to_vec(),
            br#"{"version":3,"sources":["c.ts"],"sourcesContent":["let c = 1;"],"names":[],"mappings":"AAAA,+/+/+/B;;;;;;;gBAAgB"}"#.to_vec(),
        ];
        // What a map of at most 64 KiB parses to, its tokens 28 bytes each, a few times over.
        fuzz(&seeds, 5_000, 64 << 20, |input| {
            if let Some(map) = parse(input) {
                assert!(map_bytes(&map) >= map.get_token_count() as usize);
                for (line, column) in [(0, 0), (1, 5), (u32::MAX, u32::MAX)] {
                    if let Some(token) = map.lookup_token(line, column) {
                        let _ = (token.get_source(), token.get_src_line());
                    }
                }
            }
        });
    }
}
