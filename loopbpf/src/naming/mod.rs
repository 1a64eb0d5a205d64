//! Raw samples -> named stacks: unwinding ([`unwind`]), JS frames from V8's heap ([`v8`]),
//! native and JIT symbols ([`symbolize`], from the objects in [`objects`] and the perf map in
//! [`perf_map`]), and the weighting of a block's stacks ([`stacks`]).
//! Every stage reads a target's memory or files and is bounded against what it finds there;
//! they run on [`worker`] threads, never on the session's.

pub mod frame;
mod kernel;
pub mod objects;
mod perf_map;
pub mod request;
pub mod stacks;
pub mod symbolize;
pub mod unwind;
pub mod v8;
pub mod worker;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use crate::{
    decode::StackSample,
    target::{files::FileCache, proc::Process},
};
use objects::SharedObjects;
use stacks::Sample;
use symbolize::Symbolizer;
use unwind::{UnwindSections, Unwinder};
use v8::{JsNamer, LimitsHit, Metadata};

/// A sample with an address outside every mapping known looks at the process's mappings at
/// most this often (its JIT code space grows; a garbage address must not cost a look each).
const MIN_MAPS_LOOK_INTERVAL: Duration = Duration::from_millis(100);

/// The stages that name stacks: unwinding, JS frames from V8's heap, symbols.
///
/// The process's memory map (hundreds of lines to read and parse) is read again only when it
/// may have changed: when its mapped size ([`Process::mapped_pages`]: `mmap` and `munmap`
/// change it) differs from when it was last read, looked at before a block is named, once a
/// second, and when a sample has an address outside every mapping known; and always when a
/// loop of the process is found (an exec).
pub struct Naming {
    pub pid: u32,
    /// Request paths keep their query strings (`--request-query`).
    keep_query: bool,
    pub unwinder: Unwinder,
    pub symbolizer: Symbolizer,
    /// `None` while the process has no V8 we can read (a launched command before its exec, a
    /// libuv program that is not Node, metadata we cannot use).
    pub js: Option<JsNamer>,
    /// The executable `js` was last looked for in: looked for again only when it changes.
    js_looked_in: Option<PathBuf>,
    v8_metadata: FileCache<Metadata>,
    /// The mapped size when the memory map was last read (`None`: never read, or gone).
    maps_read_at_pages: Option<u64>,
    /// When the mapped size was last looked at for an unknown address.
    unknown_looked_at: Option<Instant>,
}

/// What the naming stages of every watched process share: each file is read once.
#[derive(Clone)]
pub struct SharedFiles {
    objects: SharedObjects,
    unwind_sections: FileCache<UnwindSections>,
    v8_metadata: FileCache<Metadata>,
}

impl SharedFiles {
    pub fn new() -> Self {
        Self {
            objects: SharedObjects::new(),
            unwind_sections: FileCache::new(),
            v8_metadata: FileCache::new(),
        }
    }

    /// Forgets the files no watched process uses any more.
    pub fn prune(&self) {
        self.unwind_sections.prune();
        self.v8_metadata.prune();
    }
}

impl Naming {
    /// `keep_query`: request paths keep their query strings (`--request-query`).
    pub fn new(pid: u32, shared: &SharedFiles, keep_query: bool) -> Self {
        let mut naming = Self {
            pid,
            keep_query,
            unwinder: Unwinder::new(pid, &shared.unwind_sections),
            symbolizer: Symbolizer::unread(pid, &shared.objects),
            js: None,
            js_looked_in: None,
            v8_metadata: shared.v8_metadata.clone(),
            maps_read_at_pages: None,
            unknown_looked_at: None,
        };
        naming.reread_maps();
        naming.symbolizer.sync_perf_map();
        naming.find_v8();
        naming
    }

    /// Reads the process's memory map for the unwinder and the symbolizer (one read for both).
    fn reread_maps(&mut self) {
        let process = Process::new(self.pid);
        // Before the read: a change during it is seen at the next look.
        let pages = process.mapped_pages();
        let Ok(maps) = process.maps() else {
            return; // gone: keep what we have
        };
        if self.symbolizer.take_maps(&maps) {
            self.unwinder.add_mappings(&maps);
            self.maps_read_at_pages = pages;
        }
    }

    /// Reads the memory map again if the mapped size changed since it was last read.
    fn reread_maps_if_changed(&mut self) {
        let pages = Process::new(self.pid).mapped_pages();
        if pages.is_none() || pages != self.maps_read_at_pages {
            self.reread_maps();
        }
    }

    fn find_v8(&mut self) {
        let exe = Process::new(self.pid).exe();
        if self.js.is_some() || exe.is_none() || exe == self.js_looked_in {
            return;
        }
        self.js_looked_in = exe;
        match JsNamer::new(self.pid, &self.v8_metadata) {
            Ok(js) => self.js = js,
            Err(why) => warning!("JS frames stay unnamed ([JS]): {why}"),
        }
    }

    /// Unwinds a sample and finds its JS frames; its stack copy is dropped with it.
    pub fn unwind(&mut self, sample: &StackSample) -> Sample {
        let [ip, ..] = sample.regs;
        let outside = |addr: &u64| *addr != 0 && !self.unwinder.knows(*addr);
        if (outside(&ip) || sample.user.iter().any(outside))
            && self
                .unknown_looked_at
                .is_none_or(|at| at.elapsed() >= MIN_MAPS_LOOK_INTERVAL)
        {
            self.unknown_looked_at = Some(Instant::now());
            self.reread_maps_if_changed();
        }
        let user = self.unwinder.unwind(sample);
        let (js, request) = match self.js.as_mut() {
            Some(js) => {
                let frames = js.js_frames(sample, &user);
                let request = js.request(sample, self.keep_query);
                (frames, request)
            }
            None => (Vec::new(), None),
        };
        Sample::with_frames(sample, user, js, request)
    }

    /// Where the limits on naming JS frames left them unnamed so far.
    pub fn limits_hit(&self) -> LimitsHit {
        self.js
            .as_ref()
            .map(JsNamer::limits_hit)
            .unwrap_or_default()
    }

    /// The process's loop was found: its V8 is set up now. Its mappings are re-read and its V8
    /// looked for again, even if found before: a look right after an exec, before V8 was set
    /// up, can leave the first blocks' JS frames unnamed (`[JS]`).
    pub fn loop_found(&mut self) {
        self.js = None;
        self.js_looked_in = None;
        self.reread_maps();
        self.symbolizer.sync_perf_map();
        self.find_v8();
    }

    /// New mappings (a library loaded, a launched command's exec) since the last look, and
    /// what the perf map gained; what was parsed of files and not needed lately is dropped.
    pub fn refresh(&mut self) {
        self.refresh_maps();
        self.find_v8();
        self.symbolizer.evict_idle();
    }

    /// New mappings since the last look (the memory map read again only if the mapped size
    /// changed), and what the perf map gained: before a block's stacks are named.
    pub fn refresh_maps(&mut self) {
        self.reread_maps_if_changed();
        self.symbolizer.sync_perf_map();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::maps::executable_files;

    /// Where this process has `name`'s code, if it maps it.
    fn code_of(name: &str) -> Option<u64> {
        let maps = Process::myself().maps().unwrap();
        executable_files(&maps)
            .find(|m| m.file_path().ends_with(name))
            .map(|m| m.range.start + 16)
    }

    #[test]
    fn a_library_loaded_after_the_map_was_read_is_found_at_the_next_look() {
        // A copy of libresolv (part of glibc, so always there) under a name of this test's
        // own: other tests of this binary may load libresolv itself at any moment (a name
        // lookup does), and a copy is a file of its own to the dynamic loader.
        let libc = Process::myself()
            .maps()
            .unwrap()
            .iter()
            .map(|m| m.file_path().to_owned())
            .find(|path| path.ends_with("/libc.so.6"))
            .expect("libc is mapped");
        let resolv = std::path::Path::new(&libc).with_file_name("libresolv.so.2");
        let library = format!("libloopbpf-test-{}.so", std::process::id());
        let copy = std::env::temp_dir().join(&library);
        std::fs::copy(&resolv, &copy).expect("copy libresolv");
        assert!(code_of(&library).is_none(), "{library} is mapped already");
        let mut naming = Naming::new(std::process::id(), &SharedFiles::new(), false);
        let name = std::ffi::CString::new(copy.to_str().unwrap()).unwrap();
        // SAFETY: the name is a valid C string; libresolv's initializers have no effects that
        // matter to this test, and the handle is never closed (the mapping stays).
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW) };
        let _ = std::fs::remove_file(&copy);
        assert!(!handle.is_null(), "dlopen {} failed", copy.display());
        let addr = code_of(&library).expect("the library is mapped");
        // Not `knows`: the library may reuse addresses another test thread unmapped after
        // the map was read, which the old map still shows as mapped.
        assert!(
            !naming.unwinder.has_table_at(addr),
            "read before the dlopen"
        );
        // Mapping it changed the mapped size: the map is read again.
        naming.refresh_maps();
        assert!(naming.unwinder.knows(addr), "new mapping not found");
        assert!(
            naming.unwinder.has_table_at(addr),
            "its unwind tables not loaded"
        );
    }
}
