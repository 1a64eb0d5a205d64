//! Diagnostics: every line loopbpf writes on stderr that is not an output or a fatal error.
//!
//! Outputs (the records on stdout, the files, the metrics) and the one-line fatal error of
//! `main` do not come here. Everything else does, through four macros, so that `--quiet` and
//! `record`'s progress line are dealt with in one place:
//!
//! - `status!`: what loopbpf is doing (`loopbpf: watching pid ...`);
//! - `note!`: something worth knowing that loses nothing (`loopbpf: note: ...`);
//! - `warning!`: something is missing from what loopbpf sees (`loopbpf: warning: ...`);
//! - `loss!`: a warning that the output itself misses data (events lost), which `--quiet`
//!   does not silence: a quiet run must not look complete when it is not.
//!
//! The macros take `format!` arguments and add `loopbpf: ` and the kind's word. `progress`
//! draws a line that the next one replaces, on a terminal only.
//!
//! A message may hold what a target wrote (its process name, a path): [`printable`] escapes
//! what a terminal would act on, here for every diagnostic and in every output for the names
//! it prints; the JSON outputs escape the same characters, as `\uXXXX`.

use std::{
    borrow::Cow,
    fmt::{self, Write as _},
    io::{self, IsTerminal, Write},
    sync::atomic::{AtomicBool, Ordering},
};

/// `--quiet`: only `loss!` lines are written.
static QUIET: AtomicBool = AtomicBool::new(false);
/// A progress line without its newline is on the terminal: the next line replaces it.
static PROGRESS_SHOWN: AtomicBool = AtomicBool::new(false);

/// What a diagnostic is, which decides its word and whether `--quiet` silences it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Status,
    Note,
    Warning,
    Loss,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Self::Status => "",
            Self::Note => "note: ",
            Self::Warning | Self::Loss => "warning: ",
        }
    }
}

/// Silences every diagnostic but `loss!` from now on.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// Whether a diagnostic of `kind` is written.
fn shown(kind: Kind) -> bool {
    kind == Kind::Loss || !QUIET.load(Ordering::Relaxed)
}

/// The line a diagnostic is written as, without its newline.
fn line(kind: Kind, message: fmt::Arguments<'_>) -> String {
    format!(
        "loopbpf: {}{}",
        kind.word(),
        printable(&message.to_string())
    )
}

/// Text a target wrote (a process or function name, a path), safe to print: each character a
/// terminal acts on or that could forge a line is written as a visible escape (`\x1b`, `\n`,
/// `\u{202e}`), everything else unchanged. Escaped are the control characters (C0, DEL, C1:
/// escape sequences, cursor moves, line ends), the bidirectional overrides (which reorder
/// what a line seems to say) and U+FFFE and U+FFFF (which XML cannot carry).
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(unprintable) {
        return Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => shown.push_str("\\n"),
            '\r' => shown.push_str("\\r"),
            '\t' => shown.push_str("\\t"),
            c if c.is_ascii() && unprintable(c) => {
                let _ = write!(shown, "\\x{:02x}", u32::from(c));
            }
            c if unprintable(c) => {
                let _ = write!(shown, "\\u{{{:x}}}", u32::from(c));
            }
            c => shown.push(c),
        }
    }
    Cow::Owned(shown)
}

/// Whether [`printable`] escapes `c`; the JSON outputs escape the same characters
/// (`output::safe_json`), so what a terminal must not see raw is decided here only.
pub fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{fffe}' | '\u{ffff}'
        )
}

/// Writes one diagnostic line (the macros' back end).
pub fn emit(kind: Kind, message: fmt::Arguments<'_>) {
    if !shown(kind) {
        return;
    }
    let cut = if PROGRESS_SHOWN.swap(false, Ordering::Relaxed) {
        "\r\x1b[K"
    } else {
        ""
    };
    // A closed stderr is no reason to stop profiling.
    let _ = writeln!(io::stderr().lock(), "{cut}{}", line(kind, message));
}

/// Whether a progress line would be seen: stderr is a terminal and the run is not quiet.
pub fn progress_wanted() -> bool {
    !QUIET.load(Ordering::Relaxed) && io::stderr().is_terminal()
}

/// Draws `loopbpf: TEXT` as the progress line, over the previous one; the next diagnostic
/// replaces it.
pub fn progress(text: &str) {
    if !progress_wanted() {
        return;
    }
    let _ = write!(
        io::stderr().lock(),
        "\r{}\x1b[K",
        line(Kind::Status, format_args!("{text}"))
    );
    PROGRESS_SHOWN.store(true, Ordering::Relaxed);
}

/// `loopbpf: MESSAGE`: what loopbpf is doing. Silenced by `--quiet`.
macro_rules! status {
    ($($arg:tt)+) => {
        $crate::diag::emit($crate::diag::Kind::Status, format_args!($($arg)+))
    };
}

/// `loopbpf: note: MESSAGE`. Silenced by `--quiet`.
macro_rules! note {
    ($($arg:tt)+) => {
        $crate::diag::emit($crate::diag::Kind::Note, format_args!($($arg)+))
    };
}

/// `loopbpf: warning: MESSAGE`. Silenced by `--quiet`.
macro_rules! warning {
    ($($arg:tt)+) => {
        $crate::diag::emit($crate::diag::Kind::Warning, format_args!($($arg)+))
    };
}

/// `loopbpf: warning: MESSAGE` for data missing from the output. Written even with `--quiet`.
macro_rules! loss {
    ($($arg:tt)+) => {
        $crate::diag::emit($crate::diag::Kind::Loss, format_args!($($arg)+))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_has_its_word() {
        assert_eq!(
            line(Kind::Status, format_args!("watching pid {}", 7)),
            "loopbpf: watching pid 7"
        );
        assert_eq!(
            line(Kind::Note, format_args!("no GC pauses")),
            "loopbpf: note: no GC pauses"
        );
        assert_eq!(
            line(Kind::Warning, format_args!("pid 7 is not watched")),
            "loopbpf: warning: pid 7 is not watched"
        );
        assert_eq!(
            line(Kind::Loss, format_args!("3 events lost so far")),
            "loopbpf: warning: 3 events lost so far"
        );
    }

    #[test]
    fn what_a_terminal_acts_on_is_escaped_visibly() {
        assert!(matches!(
            printable("node ä <x>&"),
            Cow::Borrowed("node ä <x>&")
        ));
        assert_eq!(
            printable("evil\x1b[31m\x1b]0;pwned\x07\n\r\tx\x7f\u{9b}2J\u{202e}\u{fffe}\0"),
            "evil\\x1b[31m\\x1b]0;pwned\\x07\\n\\r\\tx\\x7f\\u{9b}2J\\u{202e}\\u{fffe}\\x00"
        );
        assert_eq!(
            line(
                Kind::Warning,
                format_args!("pid 7 ({}) is not watched", "a\nloopbpf: b")
            ),
            "loopbpf: warning: pid 7 (a\\nloopbpf: b) is not watched"
        );
    }

    // The only test that sets the process-wide flag: tests run on parallel threads.
    #[test]
    fn quiet_keeps_only_lost_data() {
        set_quiet(true);
        let quiet: Vec<bool> = [Kind::Status, Kind::Note, Kind::Warning, Kind::Loss]
            .into_iter()
            .map(shown)
            .collect();
        set_quiet(false);
        assert_eq!(quiet, [false, false, false, true]);
        assert!(shown(Kind::Status) && shown(Kind::Warning));
    }
}
