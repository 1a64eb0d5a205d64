//! Original positions of transpiled JS (TypeScript, bundles): the source map a script names in
//! its `//# sourceMappingURL=` comment, next to it or inline, read from the target's own
//! filesystem (`/proc/PID/root`, so a container's files), resolved inside the target's root only
//! and read only from regular files of at most [`MAX_FILE`] bytes (see
//! [`crate::target::files`]): a script may name `/dev/zero`, a FIFO or a symlink to a host file.

use std::{
    collections::HashMap,
    io::Read,
    path::{Component, Path, PathBuf},
};

use crate::{naming::frame::Original, target::proc::Process};
use sourcemap::{DecodedMap, SourceMap, decode_slice, locate_sourcemap_reference_slice};

/// Largest script or source map read (a bundle's map can be tens of MB).
const MAX_FILE: u64 = 256 << 20;

/// The source maps of one process's scripts, read once each.
pub struct SourceMaps {
    process: Process,
    /// By script path; `None` when the script has no readable source map.
    maps: HashMap<String, Option<Loaded>>,
}

struct Loaded {
    map: SourceMap,
    /// Where relative source paths start: the map's directory and its `sourceRoot`.
    base: PathBuf,
}

impl SourceMaps {
    pub fn new(process: &Process) -> Self {
        Self {
            process: process.clone(),
            maps: HashMap::new(),
        }
    }

    /// The original file, line and column of `script`'s `line:column` (from 1), if the script
    /// has a source map that covers it.
    pub fn original(&mut self, script: &str, line: u32, column: u32) -> Option<Original> {
        if !self.maps.contains_key(script) {
            let loaded = self.load(script);
            self.maps.insert(script.to_owned(), loaded);
        }
        let loaded = self.maps.get(script)?.as_ref()?;
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

    fn load(&self, script: &str) -> Option<Loaded> {
        // CommonJS scripts are named by path, ES modules by file URL; node: and the rest have
        // no file of their own.
        let path = Path::new(script.strip_prefix("file://").unwrap_or(script));
        if !path.is_absolute() {
            return None;
        }
        let code = self.read(path)?;
        let reference = locate_sourcemap_reference_slice(&code).ok()??;
        let dir = path.parent()?;
        let (map, map_dir) = if let Ok(Some(inline)) = reference.get_embedded_sourcemap() {
            (regular(inline)?, dir.to_path_buf())
        } else {
            let url = reference.get_url();
            let map_path = normalize(&dir.join(url.strip_prefix("file://").unwrap_or(url)));
            let bytes = self.read(&map_path)?;
            let map_dir = map_path.parent()?.to_path_buf();
            (regular(decode_slice(&bytes).ok()?)?, map_dir)
        };
        let base = match map.get_source_root() {
            Some(root) if !root.is_empty() => map_dir.join(root),
            _ => map_dir,
        };
        Some(Loaded { map, base })
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

/// A plain source map; an index of maps (a bundle's sections) flattened into one.
fn regular(map: DecodedMap) -> Option<SourceMap> {
    match map {
        DecodedMap::Regular(map) => Some(map),
        DecodedMap::Index(index) => index.flatten().ok(),
        DecodedMap::Hermes(_) => None,
    }
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
}
