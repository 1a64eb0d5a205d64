//! What `/proc` says of a target process: when it started, what it maps, its memory.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    ops::Range,
    path::{Path, PathBuf},
};

use super::files::FileId;

/// When a process started (clock ticks since boot, `/proc/PID/stat` field 22): with the pid,
/// it names one process even after the pid is reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from its last `)`.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// One executable mapping of a file in a process.
pub struct Mapping {
    pub range: Range<u64>,
    /// Where in the file the mapping starts.
    pub offset: u64,
    pub path: PathBuf,
    pub file: FileId,
}

/// The executable file mappings of `/proc/PID/maps` text, in map order.
pub fn executable_file_mappings(maps: &str) -> Vec<Mapping> {
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?;
            let offset = u64::from_str_radix(fields.next()?, 16).ok()?;
            let dev = fields.next()?;
            let inode = fields.next()?.parse().ok()?;
            let path = fields.next()?;
            let range = u64::from_str_radix(start, 16).ok()?..u64::from_str_radix(end, 16).ok()?;
            (perms.contains('x') && path.starts_with('/')).then(|| Mapping {
                range,
                offset,
                path: PathBuf::from(path),
                file: FileId {
                    dev: dev.to_owned(),
                    inode,
                },
            })
        })
        .collect()
}

/// A path that opens the very file a mapping of `pid` maps: `/proc/PID/map_files/...`, which
/// holds even when the file was replaced or deleted since (an upgrade under a running service),
/// or lives in another mount namespace; `/proc/PID/root/PATH` where that link cannot be read.
pub fn mapped_file(pid: u32, mapping: &Mapping) -> PathBuf {
    let link = PathBuf::from(format!(
        "/proc/{pid}/map_files/{:x}-{:x}",
        mapping.range.start, mapping.range.end
    ));
    if File::open(&link).is_ok() {
        return link;
    }
    let path = &mapping.path;
    Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path))
}

/// The first executable mapping of each distinct file, in map order.
pub fn first_mapping_per_file(maps: &str) -> Vec<Mapping> {
    let mut seen = BTreeSet::new();
    executable_file_mappings(maps)
        .into_iter()
        .filter(|m| seen.insert(m.path.clone()))
        .collect()
}

/// A process's resident memory now, from `/proc/PID/statm`.
pub fn rss_of(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}
