//! Which frames of a long stack to show when there is room for a few only (the terminal's call
//! tree, the bundle's page): the rest are folded into `... N frames ...`.
//!
//! The rule: the application's own frames are never folded away, then room goes to what a
//! person reads next, in this order: the app's npm dependencies, native code that does work
//! (`PKCS5_PBKDF2_HMAC`, `JsonStringifier::Serialize_`, a syscall), and last the runtime's
//! plumbing (Node's own `node:` JS, V8 builtins and stubs, the calls that enter JS from C++,
//! libuv's internals, unnamed frames, kernel frames above and below the syscall). The two ends
//! of a stack are always shown, so that where it starts and where it went stay in sight.
//!
//! An app frame is a JS frame whose script (its original source when a source map gives one)
//! is neither one of Node's `node:` modules nor under a `node_modules` directory: the scripts
//! the application ships itself. A program whose every script is under `node_modules` (a tool
//! installed with npm) has no app frames by this rule; its frames are kept next.

use crate::naming::frame::{FrameKind, UNKNOWN, UNNAMED_JS};

/// How much a frame is needed on screen; the lower, the sooner it gets room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rank {
    /// The application's own JS: always shown.
    App,
    /// JS of a package under `node_modules`.
    Dependency,
    /// Native code that does work, and the syscall a thread went to sleep in.
    Work,
    /// The runtime's plumbing: folded first.
    Plumbing,
}

/// Native functions that only carry a call from the loop into JS and back, by name prefix.
const NATIVE_PLUMBING: [&str; 14] = [
    "Builtins_",
    "v8::internal::Execution::",
    "v8::internal::(anonymous namespace)::Invoke",
    "v8::Function::Call",
    "v8::Script::Run",
    "node::InternalMakeCallback",
    "node::MakeCallback",
    "node::InternalCallbackScope",
    "node::AsyncWrap::MakeCallback",
    "node::CallbackScope",
    "node::Environment::RunTimers",
    "node::Environment::CheckImmediate",
    "node::LibuvStreamWrap::",
    "uv__",
];

/// What a frame is, for the fold: `file` is its script (JS), `original` the source its script
/// was built from, when known.
pub fn rank(kind: FrameKind, name: &str, file: Option<&str>, original: Option<&str>) -> Rank {
    match kind {
        FrameKind::Js => {
            let Some(script) = original.or(file) else {
                return Rank::Plumbing;
            };
            if name == UNNAMED_JS || script.starts_with("node:") {
                Rank::Plumbing
            } else if script.contains("node_modules/") {
                Rank::Dependency
            } else {
                Rank::App
            }
        }
        FrameKind::Native => {
            // A name without the return type a demangled C++ name may start with.
            let bare = name.rsplit_once(' ').map_or(name, |(_, rest)| rest);
            if name == UNKNOWN
                || NATIVE_PLUMBING
                    .iter()
                    .any(|p| name.starts_with(p) || bare.starts_with(p))
            {
                Rank::Plumbing
            } else {
                Rank::Work
            }
        }
        // The syscall says what the thread waited for; the entry code and the scheduler's
        // insides around it do not.
        FrameKind::Kernel if is_syscall(name) => Rank::Work,
        FrameKind::Kernel => Rank::Plumbing,
    }
}

fn is_syscall(name: &str) -> bool {
    ["__x64_sys_", "__arm64_sys_", "__ia32_sys_", "__do_sys_"]
        .iter()
        .any(|p| name.starts_with(p))
}

/// A line of a folded stack: a frame shown (by index), or a run of frames folded away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    Frame(usize),
    Folded(usize),
}

/// App frames shown of one stack at most (a deep mutual recursion, a hostile target's stack):
/// past this, those in the middle are folded too, and nothing else gets room.
pub const MAX_APP_FRAMES: usize = 48;

/// The lines to show of a stack whose frames rank as `ranks`, in `max_lines` lines when the
/// app frames leave room: the first and last frames and every app frame always (up to
/// [`MAX_APP_FRAMES`], those nearest the ends), then frames by rank (ties: nearer the start
/// first). A run of one hidden frame is shown instead, since its fold line would take as much
/// room.
pub fn fold(ranks: &[Rank], max_lines: usize) -> Vec<Piece> {
    let n = ranks.len();
    let apps: Vec<usize> = (0..n).filter(|&i| ranks[i] == Rank::App).collect();
    let mut shown = vec![false; n];
    if apps.len() > MAX_APP_FRAMES {
        let half = MAX_APP_FRAMES / 2;
        for &i in apps[..half].iter().chain(&apps[apps.len() - half..]) {
            shown[i] = true;
        }
    } else {
        for &i in &apps {
            shown[i] = true;
        }
    }
    if n > 0 {
        shown[0] = true;
        shown[n - 1] = true;
    }
    let limit = max_lines.max(lines(&shown));
    let mut candidates: Vec<usize> = (0..n).filter(|&i| !shown[i]).collect();
    candidates.sort_by_key(|&i| (ranks[i], i));
    for i in candidates {
        shown[i] = true;
        if lines(&shown) > limit {
            shown[i] = false;
        }
    }
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < n {
        if shown[i] {
            pieces.push(Piece::Frame(i));
            i += 1;
            continue;
        }
        let run = shown[i..].iter().take_while(|s| !**s).count();
        if run == 1 {
            pieces.push(Piece::Frame(i));
        } else {
            pieces.push(Piece::Folded(run));
        }
        i += run;
    }
    pieces
}

/// Lines taken by a stack showing `shown`: one per frame shown, one per run of hidden frames.
fn lines(shown: &[bool]) -> usize {
    let frames = shown.iter().filter(|s| **s).count();
    let runs = shown
        .iter()
        .enumerate()
        .filter(|&(i, s)| !*s && (i == 0 || shown[i - 1]))
        .count();
    frames + runs
}

#[cfg(test)]
mod tests {
    use super::*;

    use Rank::{App, Dependency, Plumbing, Work};

    fn shown(pieces: &[Piece]) -> Vec<usize> {
        pieces
            .iter()
            .filter_map(|p| match p {
                Piece::Frame(i) => Some(*i),
                Piece::Folded(_) => None,
            })
            .collect()
    }

    #[test]
    fn frames_are_ranked_app_first_plumbing_last() {
        let js = |name, file| rank(FrameKind::Js, name, file, None);
        assert_eq!(js("blockFor", Some("/srv/app/report.js")), App);
        assert_eq!(js("listOnTimeout", Some("node:internal/timers")), Plumbing);
        assert_eq!(
            js(
                "Range.parseRange",
                Some("/srv/app/node_modules/semver/classes/range.js")
            ),
            Dependency
        );
        assert_eq!(js(UNNAMED_JS, None), Plumbing);
        assert_eq!(js("anonymous", None), Plumbing);
        // A bundle's frame is judged by the source it came from.
        assert_eq!(
            rank(
                FrameKind::Js,
                "chunk",
                Some("/srv/dist/main.js"),
                Some("webpack://app/node_modules/lodash/lodash.js")
            ),
            Dependency
        );
        let native = |name| rank(FrameKind::Native, name, None, None);
        assert_eq!(native("PKCS5_PBKDF2_HMAC"), Work);
        assert_eq!(native("Builtins_JSEntryTrampoline"), Plumbing);
        assert_eq!(
            native("v8::internal::(anonymous namespace)::Invoke(v8::internal::Isolate*)"),
            Plumbing
        );
        assert_eq!(
            native(
                "v8::internal::MaybeHandle<v8::internal::Object> v8::internal::Execution::Call(int)"
            ),
            Plumbing
        );
        assert_eq!(native("uv__run_timers"), Plumbing);
        assert_eq!(native(UNKNOWN), Plumbing);
        let kernel = |name| rank(FrameKind::Kernel, name, None, None);
        assert_eq!(kernel("__x64_sys_read"), Work);
        assert_eq!(kernel("do_syscall_64"), Plumbing);
    }

    #[test]
    fn a_short_stack_is_shown_whole() {
        let ranks = [Plumbing, Plumbing, Plumbing, Plumbing];
        assert_eq!(
            fold(&ranks, 4),
            (0..4).map(Piece::Frame).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_issue_stack_keeps_the_function_the_user_wrote() {
        // Callers first, as the terminal printed it: `listOnTimeout ... 2 frames ... blockFor`
        // hid `parseHugeReportSynchronously` (and node's `processTimers`).
        let ranks = [Plumbing, Plumbing, Plumbing, App, App];
        assert_eq!(
            fold(&ranks, 4),
            [
                Piece::Frame(0),
                Piece::Folded(2),
                Piece::Frame(3),
                Piece::Frame(4)
            ]
        );
    }

    #[test]
    fn a_stack_deeper_than_the_budget_keeps_every_app_frame() {
        // 40 frames: plumbing everywhere, app frames scattered in it, a dependency and work.
        let mut ranks = vec![Plumbing; 40];
        for i in [3, 11, 12, 25, 38] {
            ranks[i] = App;
        }
        ranks[20] = Dependency;
        ranks[30] = Work;
        let pieces = fold(&ranks, 4);
        let kept = shown(&pieces);
        for i in [0, 3, 11, 12, 25, 38, 39] {
            assert!(kept.contains(&i), "frame {i} hidden: {pieces:?}");
        }
        // Every frame is either shown or counted in a fold, once, in order.
        let mut next = 0;
        for piece in &pieces {
            match *piece {
                Piece::Frame(i) => {
                    assert_eq!(i, next);
                    next += 1;
                }
                Piece::Folded(n) => {
                    assert!(n >= 2);
                    next += n;
                }
            }
        }
        assert_eq!(next, 40);
        // No room was spent on plumbing while app frames needed it.
        assert!(
            kept.iter()
                .all(|&i| ranks[i] != Plumbing || i == 0 || i == 39),
            "{pieces:?}"
        );
    }

    #[test]
    fn a_stack_of_endless_app_frames_is_bounded() {
        let ranks = vec![App; 1000];
        let pieces = fold(&ranks, 4);
        assert_eq!(pieces.len(), MAX_APP_FRAMES + 1, "{pieces:?}");
        assert_eq!(
            pieces[MAX_APP_FRAMES / 2],
            Piece::Folded(1000 - MAX_APP_FRAMES)
        );
    }

    #[test]
    fn spare_room_goes_to_dependencies_then_work_then_plumbing() {
        let mut ranks = vec![Plumbing; 20];
        ranks[5] = Work;
        ranks[10] = Dependency;
        // First, last, and room for one more frame and its folds: the dependency.
        let kept = shown(&fold(&ranks, 5));
        assert_eq!(kept, [0, 10, 19]);
        let kept = shown(&fold(&ranks, 7));
        assert_eq!(kept, [0, 5, 10, 19]);
        // Plenty of room: everything.
        assert_eq!(shown(&fold(&ranks, 20)).len(), 20);
    }
}
