//! The kernel ABI: the `#[repr(C)]` mirror of `loopbpf-ebpf/loopbpf.h`, its constants and enum
//! values, each named as in the header without `LOOPBPF_`. It depends on nothing. A test
//! compiles the header and fails on any drift: a field's offset, size or type, a struct's size
//! or alignment, a constant's value, or a header constant or struct without a twin here.

/// Log2 buckets of busy time per iteration (`LOOPBPF_HIST_SLOTS`).
pub const HIST_SLOTS: usize = 32;

/// `struct loopbpf_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RawEvent {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub flags: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub loop_addr: u64,
    pub waited_ns: u64,
}

/// Frames per stack sample (`LOOPBPF_USER_FRAMES`, `LOOPBPF_KERNEL_FRAMES`).
pub const USER_FRAMES: usize = 96;
pub const KERNEL_FRAMES: usize = 32;
/// Bytes of user stack copied per sample (`LOOPBPF_STACK_COPY`), from this far below sp
/// (`LOOPBPF_RED_ZONE`).
pub const STACK_COPY: usize = 32768;
/// A busy interval is young until it has run for 1/`YOUNG_DIVISOR` of the threshold
/// (`LOOPBPF_YOUNG_DIVISOR`): its samples are unwound only once it is no longer young.
pub const YOUNG_DIVISOR: u64 = 2;
/// A young interval's on-CPU stacks are taken this many times less often, each standing for
/// that many more sampling periods (`LOOPBPF_YOUNG_STACK_SPACING`).
pub const YOUNG_STACK_SPACING: u32 = 2;
pub const RED_ZONE: u64 = 128;
/// Frames of the chain whose V8 objects are read at sample time (`LOOPBPF_JS_FRAMES`).
pub const JS_FRAMES: usize = 32;

/// `struct loopbpf_js_frame`: what a frame's function and receiver slots pointed at when the
/// sample was taken (tagged pointers; 0 where nothing was read).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CapturedFrame {
    pub fp: u64,
    pub shared: u64,
    pub receiver_map: u64,
}

/// `struct loopbpf_libuv`: the `libuvs` map's value for one probed object.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LibuvInfo {
    pub poll_addr: u64,
    pub run_addr: u64,
    pub worker_entry_start: u64,
    pub worker_entry_end: u64,
    pub counts_iterations: u32,
    pub reserved: u32,
}

// SAFETY: repr(C) of u64 and u32 fields that tile the struct (no padding: the mirror test
// checks), so every byte is initialised and any bytes are a valid value.
unsafe impl aya::Pod for LibuvInfo {}

/// Where libuv 1.45+ counts a loop's iterations: `uv_loop_t`'s `internal_fields` pointer, and
/// `loop_count` behind it (`LOOPBPF_UV_LOOP_INTERNAL_FIELDS_OFFSET`, `_COUNT_OFFSET`).
pub const UV_LOOP_INTERNAL_FIELDS_OFFSET: u64 = 40;
pub const UV_LOOP_COUNT_OFFSET: u64 = 8;
/// `int backend_fd` in `uv_loop_t` (`LOOPBPF_UV_LOOP_BACKEND_FD_OFFSET`).
pub const UV_LOOP_BACKEND_FD_OFFSET: u64 = 64;
/// x86-64 numbers of the syscalls libuv's epoll backend waits in (`LOOPBPF_SYS_EPOLL_*`).
pub const SYS_EPOLL_WAIT: u64 = 232;
pub const SYS_EPOLL_PWAIT: u64 = 281;
pub const SYS_EPOLL_PWAIT2: u64 = 441;
/// The loop threads' cpu-clock sampling period (`LOOPBPF_SAMPLE_PERIOD_NS`).
pub const SAMPLE_PERIOD_NS: u64 = 1_000_000;

/// Objects probed at once (`LOOPBPF_MAX_LIBUVS`).
pub const MAX_LIBUVS: u32 = 64;

/// `struct loopbpf_v8_layout`: the `v8_layouts` map's value for one process.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct V8Layout {
    pub fp_function: i32,
    pub fp_receiver: i32,
    pub function_shared: u32,
    pub enabled: u32,
}

// SAFETY: repr(C) of i32 and u32 fields that tile the struct (no padding: the mirror test
// checks), so every byte is initialised and any bytes are a valid value.
unsafe impl aya::Pod for V8Layout {}

/// `struct loopbpf_stack_event`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct RawStackEvent {
    pub kind: u32,
    pub pid: u32,
    pub tid: u32,
    pub user_depth: u32,
    pub busy_since_ns: u64,
    pub at_ns: u64,
    pub off_cpu_ns: u64,
    pub kernel_depth: u32,
    /// On-CPU: the sampling periods of CPU time the record stands for.
    pub periods: u32,
    pub user: [u64; USER_FRAMES],
    pub kernel: [u64; KERNEL_FRAMES],
    pub user_ip: u64,
    pub user_sp: u64,
    pub user_bp: u64,
    pub stack_len: u32,
    pub js_depth: u32,
    pub js: [CapturedFrame; JS_FRAMES],
    pub stack: [u8; STACK_COPY],
}

/// The stack records' ring buffer, in bytes: this much per online CPU, a power of two within
/// the bounds (`LOOPBPF_STACK_RING_*`).
pub const STACK_RING_BYTES_PER_CPU: u32 = 2 * 1024 * 1024;
pub const STACK_RING_MIN_BYTES: u32 = 4 * 1024 * 1024;
pub const STACK_RING_MAX_BYTES: u32 = 32 * 1024 * 1024;

/// Entries of the kernel side's hash maps (`LOOPBPF_MAX_*`).
pub const MAX_THREADS: u32 = 16384;
pub const MAX_ASLEEP: u32 = 64;
pub const MAX_V8_LAYOUTS: u32 = 4096;
/// Words of the `loop_tids` bitmap (`LOOPBPF_LOOP_TID_WORDS`): a bit per possible thread id.
pub const LOOP_TID_WORDS: u32 = 65536;

/// `enum loopbpf_counter`: the `counters` map's indexes.
pub const LOST_CONTROL: u32 = 0;
pub const LOST_STACK: u32 = 1;
pub const STACKS_LIMITED: u32 = 2;
pub const FULL_THREADS: u32 = 3;
pub const FULL_ASLEEP: u32 = 4;

/// `struct loopbpf_stack_budget`: the `stack_budgets` map's value for one process.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StackBudget {
    pub next_ns: u64,
    pub limited: u64,
}

// SAFETY: repr(C) of two u64 fields (no padding: the mirror test checks), so every byte is
// initialised and any bytes are a valid value.
unsafe impl aya::Pod for StackBudget {}

/// `struct loopbpf_thread`: the state map's value.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadState {
    pub loop_addr: u64,
    pub epfd: i32,
    pub pid: u32,
    pub discovered_ns: u64,
    pub busy_since_ns: u64,
    pub poll_enter_ns: u64,
    pub in_poll: u32,
    pub counts_iterations: u32,
    pub role: u32,
    pub busy_before_attach: u32,
    pub idle_ns: u64,
    pub iterations: u64,
    pub seen_ns: u64,
    pub seen_count: u64,
    pub max_busy_ns: u64,
    pub window_max_busy_ns: u64,
    pub window: u64,
    pub blocks: u64,
    pub exited_ns: u64,
    pub busy_hist: [u64; HIST_SLOTS],
    pub gc_start_ns: u64,
    pub count_addr: u64,
    pub samples: u64,
    pub last_sample_ns: u64,
    pub last_off_cpu_ns: u64,
    pub off_cpu_pending_ns: u64,
    pub left_cpu_ns: u64,
    pub left_runtime_ns: u64,
    pub stack_woke_ns: u64,
    pub waited_ns: u64,
    pub off_cpu: u32,
    pub reserved: u32,
}

// SAFETY: repr(C) of u64, u32, i32 fields and a u64 array that tile the struct (no padding:
// the mirror test checks), so every byte is initialised and any bytes are a valid value.
unsafe impl aya::Pod for ThreadState {}

impl ThreadState {
    /// Idle time up to `now_ns`, counting a poll wait that is still going on.
    pub fn idle_ns_at(&self, now_ns: u64) -> u64 {
        let ongoing = if self.in_poll != 0 {
            now_ns.saturating_sub(self.poll_enter_ns)
        } else {
            0
        };
        self.idle_ns + ongoing
    }

    /// Whether this is a loop loopbpf reports (main or worker), as opposed to one not yet
    /// named or a runtime-internal one.
    pub fn is_reported_loop(&self) -> bool {
        matches!(self.role, ROLE_MAIN | ROLE_WORKER)
    }

    /// How long the current busy interval has lasted at `now_ns`, if the thread is busy.
    pub fn busy_for_ns(&self, now_ns: u64) -> Option<u64> {
        (self.is_reported_loop() && self.in_poll == 0 && self.busy_since_ns != 0)
            .then(|| now_ns.saturating_sub(self.busy_since_ns))
    }
}

/// `enum loopbpf_role` values.
pub const ROLE_UNKNOWN: u32 = 0;
pub const ROLE_MAIN: u32 = 1;
pub const ROLE_WORKER: u32 = 2;
pub const ROLE_OTHER: u32 = 3;

/// `LOOPBPF_BUSY_BEFORE_ATTACH`.
pub const BUSY_BEFORE_ATTACH: u32 = 1;

/// `enum loopbpf_event_kind` values.
pub const EVENT_BLOCK: u32 = 1;
pub const EVENT_LOOP_FOUND: u32 = 2;
pub const EVENT_LOOP_EXIT: u32 = 3;
pub const EVENT_ON_CPU: u32 = 4;
pub const EVENT_OFF_CPU: u32 = 5;
pub const EVENT_EXEC: u32 = 6;
pub const EVENT_GC: u32 = 7;

/// `LOOPBPF_GC_*`: V8's `GCType` bits.
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the decoder counts every GCType but the three below as minor"
    )
)]
pub const GC_SCAVENGE: u32 = 1;
#[cfg_attr(
    not(test),
    expect(
        dead_code,
        reason = "the decoder counts every GCType but the three below as minor"
    )
)]
pub const GC_MINOR_MARK_SWEEP: u32 = 2;
pub const GC_MARK_SWEEP_COMPACT: u32 = 4;
pub const GC_INCREMENTAL_MARKING: u32 = 8;
pub const GC_PROCESS_WEAK_CALLBACKS: u32 = 16;

/// A ring-buffer record: `decode` turns bytes the kernel wrote, as many as the type's size,
/// into one with `read_unaligned`.
///
/// # Safety
/// Any `size_of::<Self>()` initialised bytes must be a valid `Self`. That holds for a
/// `#[repr(C)]` struct whose fields are integers, arrays of them and other such structs, and
/// not once a field is a `bool`, `char`, enum, reference or `NonZero*`. To match the C side
/// it must also be the twin of a struct of `loopbpf.h`, checked by the mirror test.
pub unsafe trait Record: Copy {}
// SAFETY: repr(C) of u32 and u64 fields only.
unsafe impl Record for RawEvent {}
// SAFETY: repr(C) of u32 and u64 fields, arrays of u64 and u8, and an array of
// `CapturedFrame`, itself repr(C) of u64 fields only.
unsafe impl Record for RawStackEvent {}

#[cfg(test)]
mod tests {
    use std::{
        collections::{BTreeMap, BTreeSet},
        fmt::Write as _,
        mem::offset_of,
        path::{Path, PathBuf},
        process::Command,
    };

    use super::*;

    #[test]
    fn ongoing_idle_and_busy_time() {
        let idle = ThreadState {
            loop_addr: 1,
            role: ROLE_MAIN,
            in_poll: 1,
            poll_enter_ns: 100,
            idle_ns: 50,
            ..ThreadState::default()
        };
        assert_eq!(idle.idle_ns_at(130), 80);
        assert_eq!(idle.busy_for_ns(130), None);
        let busy = ThreadState {
            loop_addr: 1,
            role: ROLE_MAIN,
            busy_since_ns: 100,
            idle_ns: 50,
            ..ThreadState::default()
        };
        assert_eq!(busy.idle_ns_at(130), 50);
        assert_eq!(busy.busy_for_ns(130), Some(30));
    }

    /// The header's constants (macros and enum values) with no twin here, and why.
    const HEADER_ONLY: [(&str, &str); 9] = [
        ("LOOPBPF_H", "the include guard"),
        (
            "LOOPBPF_CONTROL_RING_BYTES",
            "the control ring buffer's size: userspace reads it to the end, whatever its size",
        ),
        (
            "LOOPBPF_MAX_STACK_BUDGETS",
            "an LRU map: the kernel evicts its oldest entry, an insert never fails",
        ),
        (
            "LOOPBPF_COUNTERS",
            "the counters map's size: userspace reads the counters it knows by index",
        ),
        (
            "LOOPBPF_ROLE_STACK_DEPTH",
            "how deep the kernel side looks for the worker entry; userspace never sees that stack",
        ),
        (
            "LOOPBPF_STACK_WAKE_SPACING_NS",
            "how often the kernel side wakes loopbpf for stacks; userspace drains what it finds",
        ),
        ("LOOPBPF_ON_CPU", OFF_CPU),
        ("LOOPBPF_OFF_CPU_PREEMPTED", OFF_CPU),
        ("LOOPBPF_OFF_CPU_ASLEEP", OFF_CPU),
    ];
    const OFF_CPU: &str = "the probes' own note of how a thread left the CPU, until it is back";

    /// A field's type as the layout probe program names it, so a sign or element type that
    /// changes with the size kept is drift too.
    trait CType {
        fn c_type() -> String;
    }
    macro_rules! c_type {
        ($($rust:ty => $c:literal),+) => {
            $(impl CType for $rust {
                fn c_type() -> String {
                    $c.to_owned()
                }
            })+
        };
    }
    c_type!(
        u8 => "u8",
        u32 => "u32",
        i32 => "i32",
        u64 => "u64",
        CapturedFrame => "struct loopbpf_js_frame"
    );
    impl<T: CType, const N: usize> CType for [T; N] {
        fn c_type() -> String {
            format!("{}[]", T::c_type())
        }
    }

    /// Size and type of the field `field` reaches.
    fn field_of<S, T: CType>(_field: fn(&S) -> &T) -> (usize, String) {
        (size_of::<T>(), T::c_type())
    }

    /// Runs clang (`LOOPBPF_CLANG`, else clang-19) and returns its standard output; any
    /// failure, a missing clang first of all, fails the test.
    fn clang(args: &[&str]) -> String {
        let compiler = std::env::var("LOOPBPF_CLANG").unwrap_or_else(|_| "clang-19".into());
        let output = Command::new(&compiler)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {compiler} to check loopbpf.h: {e}"));
        assert!(
            output.status.success(),
            "{compiler} {args:?} failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// The macros in `clang -dM` output: name -> body.
    fn macros(defines: &str) -> BTreeMap<String, String> {
        defines
            .lines()
            .filter_map(|line| line.strip_prefix("#define "))
            .map(|rest| {
                let end = rest.find([' ', '(']).unwrap_or(rest.len());
                (rest[..end].to_owned(), rest[end..].trim().to_owned())
            })
            .collect()
    }

    /// The enum constants and struct tags defined in C source without comments or directives.
    fn enums_and_structs(source: &str) -> (Vec<String>, BTreeSet<String>) {
        let mut tokens = Vec::new();
        let mut rest = source;
        while let Some(c) = rest.chars().next() {
            let len = if c.is_ascii_alphanumeric() || c == '_' {
                rest.find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                    .unwrap_or(rest.len())
            } else {
                c.len_utf8()
            };
            if !c.is_whitespace() {
                tokens.push(&rest[..len]);
            }
            rest = &rest[len..];
        }
        let (mut constants, mut structs) = (Vec::new(), BTreeSet::new());
        for (i, window) in tokens.windows(3).enumerate() {
            match window {
                ["struct", tag, "{"] => {
                    structs.insert((*tag).to_owned());
                }
                ["enum", _, "{"] => {
                    let body = tokens[i + 3..].split(|&t| t == "}").next().unwrap();
                    // Each enumerator starts the body or follows a comma.
                    let mut at_start = true;
                    for &token in body {
                        if at_start && token != "," {
                            constants.push(token.to_owned());
                        }
                        at_start = token == ",";
                    }
                }
                _ => {}
            }
        }
        (constants, structs)
    }

    /// The Rust mirror must match the C header field for field and constant for constant:
    /// read the header's constants and structs with the preprocessor, compile a program that
    /// prints their values and layout, and compare with this module's, listing every
    /// difference.
    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one line per mirrored field and constant"
    )]
    fn mirror_matches_the_c_header() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../loopbpf-ebpf");
        let header = dir.join("loopbpf.h");
        let header = header.to_str().unwrap();

        // What the header itself defines: its macros are those the preprocessor knows after
        // reading it and not before; with __VMLINUX_H__ set, <linux/types.h> stays out, so
        // the preprocessed text is the header's own declarations.
        let vmlinux = "-D__VMLINUX_H__";
        let builtin = macros(&clang(&["-dM", "-E", vmlinux, "-x", "c", "/dev/null"]));
        let mut defined = macros(&clang(&["-dM", "-E", vmlinux, "-x", "c", header]));
        defined.retain(|name, _| !builtin.contains_key(name));
        let (enumerators, c_structs) =
            enums_and_structs(&clang(&["-E", "-P", vmlinux, "-x", "c", header]));
        let header_constants: BTreeSet<String> =
            defined.keys().cloned().chain(enumerators).collect();
        // A macro with no value (an include guard) has none to print; it still needs a twin.
        let valueless: BTreeMap<String, String> = defined
            .iter()
            .filter(|(_, body)| body.is_empty())
            .map(|(name, _)| (format!("constant {name}"), String::new()))
            .collect();

        let mut program = String::from(
            "#include <stdio.h>\n#include <stddef.h>\n#include \"loopbpf.h\"\n\
             #define CTYPE(x) _Generic((x), __u8 *: \"u8[]\", __u32: \"u32\", __s32: \"i32\", \
             __u64: \"u64\", __u64 *: \"u64[]\", \
             struct loopbpf_js_frame *: \"struct loopbpf_js_frame[]\", default: \"?\")\n\
             int main(void) {\n",
        );
        // What the probe program must print, line for line: "what value".
        let mut expected = BTreeMap::new();
        let mut differences = Vec::new();

        for name in &header_constants {
            let header_only = HEADER_ONLY.iter().any(|(only, _)| only == name);
            if !header_only && !valueless.contains_key(&format!("constant {name}")) {
                writeln!(
                    program,
                    "printf(\"constant {name} %lld\\n\", (long long)({name}));"
                )
                .unwrap();
            }
        }
        for (only, _) in HEADER_ONLY {
            if !header_constants.contains(only) {
                differences.push(format!(
                    "{only} is allowed header-only but is not in loopbpf.h"
                ));
            }
        }
        macro_rules! constants {
            ($($name:ident),+ $(,)?) => {
                $(expected.insert(
                    concat!("constant LOOPBPF_", stringify!($name)).to_owned(),
                    $name.to_string(),
                );)+
            };
        }
        constants!(
            HIST_SLOTS,
            USER_FRAMES,
            KERNEL_FRAMES,
            STACK_COPY,
            YOUNG_DIVISOR,
            YOUNG_STACK_SPACING,
            RED_ZONE,
            JS_FRAMES,
            UV_LOOP_BACKEND_FD_OFFSET,
            UV_LOOP_INTERNAL_FIELDS_OFFSET,
            UV_LOOP_COUNT_OFFSET,
            SYS_EPOLL_WAIT,
            SYS_EPOLL_PWAIT,
            SYS_EPOLL_PWAIT2,
            SAMPLE_PERIOD_NS,
            MAX_LIBUVS,
            BUSY_BEFORE_ATTACH,
            ROLE_UNKNOWN,
            ROLE_MAIN,
            ROLE_WORKER,
            ROLE_OTHER,
            EVENT_BLOCK,
            EVENT_LOOP_FOUND,
            EVENT_LOOP_EXIT,
            EVENT_ON_CPU,
            EVENT_OFF_CPU,
            EVENT_EXEC,
            EVENT_GC,
            GC_SCAVENGE,
            GC_MINOR_MARK_SWEEP,
            GC_MARK_SWEEP_COMPACT,
            GC_INCREMENTAL_MARKING,
            GC_PROCESS_WEAK_CALLBACKS,
            STACK_RING_BYTES_PER_CPU,
            STACK_RING_MIN_BYTES,
            STACK_RING_MAX_BYTES,
            MAX_THREADS,
            MAX_ASLEEP,
            MAX_V8_LAYOUTS,
            LOOP_TID_WORDS,
            LOST_CONTROL,
            LOST_STACK,
            STACKS_LIMITED,
            FULL_THREADS,
            FULL_ASLEEP,
        );

        // Each struct: its size and alignment, and every field's offset, size and type, with
        // the fields listed in Rust tiling the struct from 0 to its size: none left out here,
        // and no padding (which aya::Pod rules out and Record's decoding never relies on).
        let mut mirrored_structs = BTreeSet::new();
        macro_rules! layout {
            ($rust:ty = $c:literal { $($field:ident),+ $(,)? }) => {{
                mirrored_structs.insert(stringify!($rust));
                expected.insert(
                    format!("struct {}", $c),
                    format!("{} {}", size_of::<$rust>(), align_of::<$rust>()),
                );
                writeln!(
                    program,
                    "printf(\"struct {0} %zu %zu\\n\", sizeof(struct {0}), _Alignof(struct {0}));",
                    $c
                )
                .unwrap();
                let mut end = 0;
                $(
                    let (size, c_type) = field_of(|s: &$rust| &s.$field);
                    let offset = offset_of!($rust, $field);
                    if offset != end {
                        differences.push(format!(
                            "{}.{} is at {offset}, not right after the field before it \
                             (at {end}): padding, or a field not listed here",
                            stringify!($rust),
                            stringify!($field)
                        ));
                    }
                    end = offset + size;
                    let field = format!("{}.{}", $c, stringify!($field));
                    expected.insert(format!("field {field}"), format!("{offset} {size} {c_type}"));
                    let lvalue = format!("((struct {} *)0)->{}", $c, stringify!($field));
                    writeln!(
                        program,
                        "printf(\"field {field} %zu %zu %s\\n\", offsetof(struct {}, {}), \
                         sizeof({lvalue}), CTYPE({lvalue}));",
                        $c,
                        stringify!($field)
                    )
                    .unwrap();
                )+
                if end != size_of::<$rust>() {
                    differences.push(format!(
                        "{}'s fields end at {end}, its size is {}: padding, or a field not listed",
                        stringify!($rust),
                        size_of::<$rust>()
                    ));
                }
            }};
        }
        layout!(RawEvent = "loopbpf_event" {
            kind, pid, tid, flags, start_ns, end_ns, loop_addr, waited_ns,
        });
        layout!(CapturedFrame = "loopbpf_js_frame" { fp, shared, receiver_map });
        layout!(LibuvInfo = "loopbpf_libuv" {
            poll_addr, run_addr, worker_entry_start, worker_entry_end, counts_iterations, reserved,
        });
        layout!(V8Layout = "loopbpf_v8_layout" {
            fp_function, fp_receiver, function_shared, enabled,
        });
        layout!(RawStackEvent = "loopbpf_stack_event" {
            kind, pid, tid, user_depth, busy_since_ns, at_ns, off_cpu_ns, kernel_depth, periods,
            user, kernel, user_ip, user_sp, user_bp, stack_len, js_depth, js, stack,
        });
        layout!(StackBudget = "loopbpf_stack_budget" { next_ns, limited });
        layout!(ThreadState = "loopbpf_thread" {
            loop_addr, epfd, pid, discovered_ns, busy_since_ns, poll_enter_ns, in_poll,
            counts_iterations, role, busy_before_attach, idle_ns, iterations, seen_ns, seen_count,
            max_busy_ns, window_max_busy_ns, window, blocks, exited_ns, busy_hist, gc_start_ns,
            count_addr, samples, last_sample_ns, last_off_cpu_ns, off_cpu_pending_ns, left_cpu_ns,
            left_runtime_ns, stack_woke_ns, waited_ns, off_cpu, reserved,
        });
        program.push_str("return 0;\n}\n");

        // Nothing in this module outside the test escapes the comparison: every constant and
        // struct it declares is in the lists above.
        let source = include_str!("abi.rs");
        let source = &source[..source.find("#[cfg(test)]").unwrap()];
        for line in source.lines() {
            if let Some(name) = line.strip_prefix("pub const ") {
                let name = &name[..name.find(':').unwrap()];
                if !expected.contains_key(&format!("constant LOOPBPF_{name}")) {
                    differences.push(format!("abi::{name} is not compared with loopbpf.h"));
                }
            } else if let Some(name) = line.strip_prefix("pub struct ") {
                let name = &name[..name.find([' ', '{']).unwrap_or(name.len())];
                if !mirrored_structs.contains(name) {
                    differences.push(format!("abi::{name} is not compared with loopbpf.h"));
                }
            }
        }
        for tag in &c_structs {
            if !expected.contains_key(&format!("struct {tag}")) {
                differences.push(format!("struct {tag} of loopbpf.h has no twin in abi.rs"));
            }
        }

        let mut got = run_probe_program(&dir, &program);
        got.extend(valueless.into_iter().filter(|(key, _)| {
            !HEADER_ONLY
                .iter()
                .any(|(only, _)| key.strip_prefix("constant ") == Some(only))
        }));
        for (key, want) in &expected {
            match got.get(key) {
                Some(value) if value == want => {}
                Some(value) => differences.push(format!("{key}: loopbpf.h {value}, abi.rs {want}")),
                None => differences.push(format!("{key}: in abi.rs, not in loopbpf.h")),
            }
        }
        for key in got.keys().filter(|key| !expected.contains_key(*key)) {
            differences.push(format!("{key}: in loopbpf.h, no twin in abi.rs"));
        }
        assert!(
            differences.is_empty(),
            "loopbpf.h and abi.rs differ:\n{}",
            differences.join("\n")
        );
    }

    /// Compiles and runs the probe program; its output as "what" -> "value".
    fn run_probe_program(include: &Path, program: &str) -> BTreeMap<String, String> {
        let out: PathBuf =
            std::env::temp_dir().join(format!("loopbpf-layout-{}", std::process::id()));
        let source = out.with_extension("c");
        std::fs::write(&source, program).unwrap();
        clang(&[
            "-Wall",
            "-Werror",
            "-I",
            include.to_str().unwrap(),
            source.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        let output = Command::new(&out).output().unwrap();
        let _ = std::fs::remove_file(&source);
        let _ = std::fs::remove_file(&out);
        assert!(output.status.success(), "the layout probe program failed");
        String::from_utf8(output.stdout)
            .unwrap()
            .lines()
            .map(|line| {
                // "constant NAME value", "struct TAG size align", "field TAG.NAME offset size type"
                let mut words = line.splitn(3, ' ');
                let key = format!("{} {}", words.next().unwrap(), words.next().unwrap());
                (key, words.next().unwrap().to_owned())
            })
            .collect()
    }
}
