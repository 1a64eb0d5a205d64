//! A libuv without its symbols (a stripped executable or library): its debug file, and what
//! to tell the user when there is none.
//!
//! The debug file is looked up by the stripped file's build ID under `/usr/lib/debug/.build-id`
//! in loopbpf's own filesystem, where a distribution's debug packages put them (Debian's
//! `libuv1-dbgsym`, Fedora's `libuv-debuginfo`): a directory only root writes, so a target can
//! plant nothing there; the build ID only chooses which of those files is read, and a file
//! of another build gives no `uv__io_poll` or the wrong offsets in the target's own file.

use std::{fmt::Write as _, fs::File, path::PathBuf};

use object::{Object, read::ReadCache};

use super::DiscoverError;
use crate::target::files::{MAX_OBJECT, open_magic_link};

/// Where distributions install debug files by build ID.
const BUILD_ID_DIR: &str = "/usr/lib/debug/.build-id";

/// The debug file of `elf` by its build ID, when one is installed. Naming reads its symbols
/// too, for the native frames of the object.
pub(crate) fn debug_file<'data, R: object::ReadRef<'data>>(
    elf: &object::File<'data, R>,
) -> Option<File> {
    let id = elf.build_id().ok()??;
    // A GNU build ID is 20 bytes (SHA-1), some linkers write 8 or 16; never a path's worth.
    if !(2..=64).contains(&id.len()) {
        return None;
    }
    let mut hex = String::with_capacity(id.len() * 2);
    for byte in id {
        let _ = write!(hex, "{byte:02x}");
    }
    let path = PathBuf::from(format!("{BUILD_ID_DIR}/{}/{}.debug", &hex[..2], &hex[2..]));
    open_magic_link(&path, MAX_OBJECT, &path.display().to_string()).ok()
}

/// The error for a libuv in `file` that lacks the symbols the probes need, with what to do
/// (`executable`: the libuv is linked into the program itself, as in node).
pub(super) fn stripped_libuv_error(who: String, file: String, executable: bool) -> DiscoverError {
    let advice = if executable {
        "install its debug file (under /usr/lib/debug/.build-id), or run a build of it that keeps its symbols (official Node.js builds do; `strip` removes them)"
    } else {
        "install its debug symbols (Debian: libuv1-dbgsym, from the debian-debug archive; they go under /usr/lib/debug/.build-id), or run it with a libuv that keeps its symbols (built from source and not stripped, or Debian's static libuv_a.a linked in)"
    };
    DiscoverError::StrippedLibuv { who, file, advice }
}

/// A note for the "not a libuv program" error: the executable may be stripped.
pub(super) fn stripped_note(file: File) -> &'static str {
    let cache = ReadCache::new(file);
    match object::File::parse(&cache) {
        Ok(elf) if elf.section_by_name(".symtab").is_none() => {
            " (the executable has no .symtab: is it stripped? loopbpf needs libuv's local symbols)"
        }
        _ => "",
    }
}
