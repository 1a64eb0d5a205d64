//! A named frame of a stack: what every output shows, whichever stage named it.

use std::sync::Arc;

use serde::Serialize;

/// Name of a JS frame that the perf map does not name (consecutive ones collapse into one).
pub(crate) const UNNAMED_JS: &str = "[JS]";
/// Name (and module) of an address nothing names.
pub(crate) const UNKNOWN: &str = "[unknown]";
pub(crate) const JIT_MODULE: &str = "[JIT]";
pub(crate) const KERNEL_MODULE: &str = "[kernel]";
pub(crate) const VDSO: &str = "[vdso]";
/// How the name of a regular expression's frame starts (`RegExp /<source>/<flags>`).
pub(crate) const REGEXP_PREFIX: &str = "RegExp /";

/// A constant as the `Arc<str>` of a frame's name or module, made once. A frame's texts are
/// `Arc`s because frames are cloned from the caches that name them into every sample and every
/// line, and cloning an `Arc` copies no bytes.
macro_rules! shared {
    ($text:expr) => {{
        static TEXT: std::sync::LazyLock<std::sync::Arc<str>> =
            std::sync::LazyLock::new(|| std::sync::Arc::from($text));
        std::sync::Arc::clone(&TEXT)
    }};
}
pub(crate) use shared;

/// Where a position of transpiled JS came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Original {
    pub file: String,
    /// From 1, like Node's stack traces.
    pub line: u32,
    pub column: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FrameKind {
    Js,
    Native,
    Kernel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Frame {
    /// Demangled function name; `[JS]` for a JS frame that cannot be named; `[unknown]` for a
    /// native address with no symbol. V8 builtins, bytecode handlers and stubs named by the perf
    /// map keep their prefix (`Builtin:JsonStringify`) and are kind `Js`: they run in V8's code
    /// space on behalf of JS. The same builtins reached in node's own text are named by ELF
    /// (`Builtins_JsonStringify`) and are kind `Native`.
    pub name: Arc<str>,
    /// Basename of the object (`node`, `libc.so.6`); `[kernel]` for kernel frames; `[JIT]` for
    /// JS/JIT code.
    pub module: Arc<str>,
    /// Source file when known (DWARF line info, or the script of a perf-map JS entry).
    pub file: Option<Arc<str>>,
    pub line: Option<u32>,
    /// Column of a JS frame's position, as Node prints it (from 1).
    pub column: Option<u32>,
    /// Where a JS frame's position comes from in the source its script was built from
    /// (TypeScript, a bundle's modules), by the script's source map.
    pub original: Option<Original>,
    pub kind: FrameKind,
}

impl Frame {
    pub(crate) fn unnamed_js() -> Self {
        Self::js(shared!(UNNAMED_JS), None, None)
    }

    pub(crate) fn js(name: impl Into<Arc<str>>, file: Option<Arc<str>>, line: Option<u32>) -> Self {
        Self::js_at(name, file, line.map(|line| (line, None)))
    }

    /// A JS frame at a script position (line, and column when known).
    pub(crate) fn js_at(
        name: impl Into<Arc<str>>,
        file: Option<Arc<str>>,
        position: Option<(u32, Option<u32>)>,
    ) -> Self {
        Self {
            name: name.into(),
            module: shared!(JIT_MODULE),
            file,
            line: position.map(|(line, _)| line),
            column: position.and_then(|(_, column)| column),
            original: None,
            kind: FrameKind::Js,
        }
    }

    pub(crate) fn unknown(module: Arc<str>, kind: FrameKind) -> Self {
        Self {
            name: shared!(UNKNOWN),
            module,
            file: None,
            line: None,
            column: None,
            original: None,
            kind,
        }
    }

    /// A regular expression's frame: a JS frame with no script named `RegExp /...` (no JS
    /// function's name has a `/` in it unless computed).
    pub(crate) fn is_js_regexp(&self) -> bool {
        self.kind == FrameKind::Js && self.file.is_none() && self.name.starts_with(REGEXP_PREFIX)
    }

    pub(crate) fn is_unnamed_js(&self) -> bool {
        self.kind == FrameKind::Js && &*self.name == UNNAMED_JS
    }
}
