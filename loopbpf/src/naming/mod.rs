//! Raw samples -> named stacks: unwinding ([`unwind`]), JS frames from V8's heap ([`v8`]),
//! native and JIT symbols ([`symbolize`], from the objects in [`objects`] and the perf map in
//! [`perf_map`]), and the weighting of a block's stacks ([`stacks`]).
//! Every stage reads a target's memory or files and is bounded against what it finds there;
//! they run on [`worker`] threads, never on the session's.

pub mod frame;
pub mod objects;
mod perf_map;
pub mod request;
pub mod stacks;
pub mod symbolize;
pub mod unwind;
pub mod v8;
pub mod worker;

use std::path::PathBuf;

use crate::{
    decode::StackSample,
    target::{files::FileCache, proc::Process},
};
use objects::SharedObjects;
use stacks::Sample;
use symbolize::Symbolizer;
use unwind::{UnwindSections, Unwinder};
use v8::{JsNamer, LimitsHit, Metadata};

/// The stages that name stacks: unwinding, JS frames from V8's heap, symbols.
pub struct Naming {
    pub pid: u32,
    pub unwinder: Unwinder,
    pub symbolizer: Symbolizer,
    /// `None` while the process has no V8 we can read (a launched command before its exec, a
    /// libuv program that is not Node, metadata we cannot use).
    pub js: Option<JsNamer>,
    /// The executable `js` was last looked for in: looked for again only when it changes.
    js_looked_in: Option<PathBuf>,
    v8_metadata: FileCache<Metadata>,
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
    pub fn new(pid: u32, shared: &SharedFiles) -> Self {
        let mut naming = Self {
            pid,
            unwinder: Unwinder::new(pid, &shared.unwind_sections),
            symbolizer: Symbolizer::sharing(pid, &shared.objects),
            js: None,
            js_looked_in: None,
            v8_metadata: shared.v8_metadata.clone(),
        };
        naming.find_v8();
        naming
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
        let user = self.unwinder.unwind(sample);
        let (js, request) = match self.js.as_mut() {
            Some(js) => {
                let frames = js.js_frames(sample, &user);
                let request = js.request(sample, request::keeps_query());
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
        self.refresh();
    }

    /// New mappings (a library loaded, a launched command's exec) since the last refresh.
    pub fn refresh(&mut self) {
        self.symbolizer.refresh();
        self.unwinder.refresh();
        self.find_v8();
    }
}
