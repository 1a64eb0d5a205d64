//! The kernel ABI: the `#[repr(C)]` mirror of `loopbpf-ebpf/loopbpf.h`, its constants and enum
//! values. It depends on nothing; a test compiles the header and fails on any drift.

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
}

/// Frames per stack sample (`LOOPBPF_USER_FRAMES`, `LOOPBPF_KERNEL_FRAMES`).
pub const USER_FRAMES: usize = 96;
pub const KERNEL_FRAMES: usize = 32;
/// Bytes of user stack copied per sample (`LOOPBPF_STACK_COPY`), from this far below sp
/// (`LOOPBPF_RED_ZONE`).
pub const STACK_COPY: usize = 32768;
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

// SAFETY: integers only, no padding.
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

// SAFETY: integers only, no padding.
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
    pub reserved: u32,
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
}

// SAFETY: plain old data of integers only, no padding the kernel could leave uninitialised
// that we would read as a value other than an integer.
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
pub const ROLE_MAIN: u32 = 1;
pub const ROLE_WORKER: u32 = 2;
pub const ROLE_OTHER: u32 = 3;

/// `LOOPBPF_BUSY_BEFORE_ATTACH`.
pub const BUSY_BEFORE_ATTACH: u32 = 1;

pub const EVENT_BLOCK: u32 = 1;
pub const EVENT_LOOP_FOUND: u32 = 2;
pub const EVENT_LOOP_EXIT: u32 = 3;
pub const EVENT_ON_CPU: u32 = 4;
pub const EVENT_OFF_CPU: u32 = 5;
pub const EVENT_EXEC: u32 = 6;
pub const EVENT_GC: u32 = 7;

/// `LOOPBPF_GC_*`: V8's `GCType` bits (scavenges, 1, and minor mark-sweeps, 2, are minor).
pub const GC_MARK_SWEEP_COMPACT: u32 = 4;
pub const GC_INCREMENTAL_MARKING: u32 = 8;
pub const GC_PROCESS_WEAK_CALLBACKS: u32 = 16;

/// A `#[repr(C)]` record read from ring-buffer bytes with `read_unaligned`.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs of integers (and arrays of them) without padding:
/// every bit pattern of their size must be a valid value.
pub unsafe trait Record: Copy {}
// SAFETY: repr(C) integers only, no padding (the mirror test checks size and offsets).
unsafe impl Record for RawEvent {}
// SAFETY: as above.
unsafe impl Record for RawStackEvent {}

#[cfg(test)]
mod tests {
    use std::{mem::offset_of, path::Path, process::Command};

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

    /// The Rust mirror must match the C header field for field: compile a probe program that
    /// prints the header's layout and compare.
    #[test]
    #[expect(
        clippy::too_many_lines,
        reason = "one line per field of the mirrored structs"
    )]
    fn mirror_matches_the_c_header() {
        const GC_SCAVENGE: u32 = 1;
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../loopbpf-ebpf");
        let out = std::env::temp_dir().join(format!("loopbpf-layout-{}", std::process::id()));
        let program = out.with_extension("c");
        let mut c = String::from(
            "#include <stdio.h>\n#include <stddef.h>\n#include \"loopbpf.h\"\nint main(void) {\n",
        );
        let mut expected = Vec::new();
        macro_rules! field {
            ($c_struct:literal, $rust:ty, $field:ident) => {
                c.push_str(&format!(
                    "printf(\"%zu\\n\", offsetof(struct {}, {}));\n",
                    $c_struct,
                    stringify!($field)
                ));
                expected.push(offset_of!($rust, $field));
            };
        }
        macro_rules! size {
            ($c_struct:literal, $rust:ty) => {
                c.push_str(&format!(
                    "printf(\"%zu\\n\", sizeof(struct {}));\n",
                    $c_struct
                ));
                expected.push(size_of::<$rust>());
            };
        }
        size!("loopbpf_event", RawEvent);
        field!("loopbpf_event", RawEvent, kind);
        field!("loopbpf_event", RawEvent, pid);
        field!("loopbpf_event", RawEvent, tid);
        field!("loopbpf_event", RawEvent, start_ns);
        field!("loopbpf_event", RawEvent, end_ns);
        field!("loopbpf_event", RawEvent, loop_addr);
        size!("loopbpf_stack_event", RawStackEvent);
        field!("loopbpf_stack_event", RawStackEvent, kind);
        field!("loopbpf_stack_event", RawStackEvent, user_depth);
        field!("loopbpf_stack_event", RawStackEvent, busy_since_ns);
        field!("loopbpf_stack_event", RawStackEvent, at_ns);
        field!("loopbpf_stack_event", RawStackEvent, off_cpu_ns);
        field!("loopbpf_stack_event", RawStackEvent, kernel_depth);
        field!("loopbpf_stack_event", RawStackEvent, user);
        field!("loopbpf_stack_event", RawStackEvent, kernel);
        field!("loopbpf_stack_event", RawStackEvent, user_ip);
        field!("loopbpf_stack_event", RawStackEvent, user_sp);
        field!("loopbpf_stack_event", RawStackEvent, user_bp);
        field!("loopbpf_stack_event", RawStackEvent, stack_len);
        field!("loopbpf_stack_event", RawStackEvent, js_depth);
        field!("loopbpf_stack_event", RawStackEvent, js);
        size!("loopbpf_js_frame", CapturedFrame);
        field!("loopbpf_js_frame", CapturedFrame, shared);
        field!("loopbpf_js_frame", CapturedFrame, receiver_map);
        size!("loopbpf_libuv", LibuvInfo);
        field!("loopbpf_libuv", LibuvInfo, run_addr);
        field!("loopbpf_libuv", LibuvInfo, worker_entry_start);
        field!("loopbpf_libuv", LibuvInfo, worker_entry_end);
        field!("loopbpf_libuv", LibuvInfo, counts_iterations);
        size!("loopbpf_v8_layout", V8Layout);
        field!("loopbpf_v8_layout", V8Layout, fp_receiver);
        field!("loopbpf_v8_layout", V8Layout, function_shared);
        field!("loopbpf_v8_layout", V8Layout, enabled);
        field!("loopbpf_stack_event", RawStackEvent, stack);
        size!("loopbpf_thread", ThreadState);
        field!("loopbpf_thread", ThreadState, loop_addr);
        field!("loopbpf_thread", ThreadState, epfd);
        field!("loopbpf_thread", ThreadState, pid);
        field!("loopbpf_thread", ThreadState, discovered_ns);
        field!("loopbpf_thread", ThreadState, busy_since_ns);
        field!("loopbpf_thread", ThreadState, poll_enter_ns);
        field!("loopbpf_thread", ThreadState, in_poll);
        field!("loopbpf_thread", ThreadState, counts_iterations);
        field!("loopbpf_thread", ThreadState, role);
        field!("loopbpf_thread", ThreadState, busy_before_attach);
        field!("loopbpf_event", RawEvent, flags);
        field!("loopbpf_thread", ThreadState, idle_ns);
        field!("loopbpf_thread", ThreadState, iterations);
        field!("loopbpf_thread", ThreadState, seen_ns);
        field!("loopbpf_thread", ThreadState, seen_count);
        field!("loopbpf_thread", ThreadState, max_busy_ns);
        field!("loopbpf_thread", ThreadState, window_max_busy_ns);
        field!("loopbpf_thread", ThreadState, window);
        field!("loopbpf_thread", ThreadState, blocks);
        field!("loopbpf_thread", ThreadState, exited_ns);
        field!("loopbpf_thread", ThreadState, busy_hist);
        field!("loopbpf_thread", ThreadState, gc_start_ns);
        field!("loopbpf_thread", ThreadState, count_addr);
        field!("loopbpf_thread", ThreadState, samples);
        field!("loopbpf_thread", ThreadState, last_sample_ns);
        field!("loopbpf_thread", ThreadState, off_cpu_pending_ns);
        c.push_str(
            "printf(\"%d %d %d\\n\", LOOPBPF_ROLE_MAIN, LOOPBPF_ROLE_WORKER, LOOPBPF_BUSY_BEFORE_ATTACH);\n\
             printf(\"%d %d %d %d %d %d\\n\", LOOPBPF_USER_FRAMES, LOOPBPF_KERNEL_FRAMES, LOOPBPF_STACK_COPY, LOOPBPF_RED_ZONE, LOOPBPF_EVENT_ON_CPU, LOOPBPF_EVENT_OFF_CPU);\n\
             printf(\"%d\\n\", LOOPBPF_HIST_SLOTS);\n\
             printf(\"%d %d %d %d %d\\n\", LOOPBPF_EVENT_GC, LOOPBPF_GC_SCAVENGE, LOOPBPF_GC_MARK_SWEEP_COMPACT, LOOPBPF_GC_INCREMENTAL_MARKING, LOOPBPF_GC_PROCESS_WEAK_CALLBACKS);\n\
             printf(\"%d %d %d %d %d\\n\", LOOPBPF_EVENT_BLOCK, LOOPBPF_EVENT_LOOP_FOUND, LOOPBPF_EVENT_LOOP_EXIT, LOOPBPF_EVENT_EXEC, LOOPBPF_MAX_LIBUVS);\n\
             printf(\"%d %d %d %d\\n\", LOOPBPF_UV_LOOP_INTERNAL_FIELDS_OFFSET, LOOPBPF_UV_LOOP_COUNT_OFFSET, LOOPBPF_UV_LOOP_BACKEND_FD_OFFSET, LOOPBPF_SAMPLE_PERIOD_NS);\n\
             printf(\"%d %d %d\\n\", LOOPBPF_SYS_EPOLL_WAIT, LOOPBPF_SYS_EPOLL_PWAIT, LOOPBPF_SYS_EPOLL_PWAIT2);\n\
             return 0;\n}\n",
        );
        std::fs::write(&program, c).unwrap();
        let compiler = std::env::var("LOOPBPF_CLANG").unwrap_or_else(|_| "clang-19".into());
        let status = Command::new(&compiler)
            .arg("-I")
            .arg(&dir)
            .arg(&program)
            .arg("-o")
            .arg(&out)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {compiler} to check the header: {e}"));
        assert!(status.success(), "the layout probe program did not compile");
        let output = Command::new(&out).output().unwrap();
        let _ = std::fs::remove_file(&program);
        let _ = std::fs::remove_file(&out);
        let text = String::from_utf8(output.stdout).unwrap();
        let mut lines = text.lines();
        for (i, want) in expected.iter().enumerate() {
            let got: usize = lines.next().unwrap().parse().unwrap();
            assert_eq!(
                got, *want,
                "layout entry {i} differs between loopbpf.h and decode.rs"
            );
        }
        assert_eq!(
            lines.next(),
            Some(format!("{ROLE_MAIN} {ROLE_WORKER} {BUSY_BEFORE_ATTACH}").as_str())
        );
        assert_eq!(
            lines.next(),
            Some(
                format!(
                    "{USER_FRAMES} {KERNEL_FRAMES} {STACK_COPY} {RED_ZONE} {EVENT_ON_CPU} {EVENT_OFF_CPU}"
                )
                .as_str()
            )
        );
        assert_eq!(lines.next(), Some(HIST_SLOTS.to_string().as_str()));
        assert_eq!(
            lines.next(),
            Some(
                format!(
                    "{EVENT_GC} {GC_SCAVENGE} {GC_MARK_SWEEP_COMPACT} {GC_INCREMENTAL_MARKING} {GC_PROCESS_WEAK_CALLBACKS}"
                )
                .as_str()
            )
        );
        assert_eq!(
            lines.next(),
            Some(
                format!(
                    "{EVENT_BLOCK} {EVENT_LOOP_FOUND} {EVENT_LOOP_EXIT} {EVENT_EXEC} {MAX_LIBUVS}"
                )
                .as_str()
            )
        );
        assert_eq!(
            lines.next(),
            Some(
                format!(
                    "{UV_LOOP_INTERNAL_FIELDS_OFFSET} {UV_LOOP_COUNT_OFFSET} {UV_LOOP_BACKEND_FD_OFFSET} {SAMPLE_PERIOD_NS}"
                )
                .as_str()
            )
        );
        assert_eq!(
            lines.next(),
            Some(format!("{SYS_EPOLL_WAIT} {SYS_EPOLL_PWAIT} {SYS_EPOLL_PWAIT2}").as_str())
        );
    }
}
