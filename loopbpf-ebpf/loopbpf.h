/* SPDX-License-Identifier: (MIT OR Apache-2.0) */
/*
 * The one definition of what crosses the kernel/user boundary: the ring-buffer
 * records, the values of the maps userspace reads or writes (threads, libuvs,
 * v8_layouts) and the constants both sides use. loopbpf.bpf.c includes it;
 * loopbpf/src/abi.rs mirrors it, and its test fails when a struct's layout or a
 * constant differs, or when one here has no twin there.
 */
#ifndef LOOPBPF_H
#define LOOPBPF_H

#ifndef __VMLINUX_H__
#include <linux/types.h>
#endif

/* Log2 buckets of busy time per loop iteration, in microseconds. */
#define LOOPBPF_HIST_SLOTS 32

/* Offset of `int backend_fd` (the epoll fd) in libuv's uv_loop_t on 64-bit
 * Linux; unchanged from libuv 1.0 to today. */
#define LOOPBPF_UV_LOOP_BACKEND_FD_OFFSET 64

/* libuv 1.45 and later count their loop's iterations: uv_loop_t's internal_fields pointer
 * (at this offset since libuv 1.39) leads to loop_metrics.metrics.loop_count, which uv_run
 * bumps right before each uv__io_poll. Reading it lets the probes leave the iterations alone. */
#define LOOPBPF_UV_LOOP_INTERNAL_FIELDS_OFFSET 40
#define LOOPBPF_UV_LOOP_COUNT_OFFSET 8

/* x86-64 numbers of the syscalls libuv's epoll backend waits in (Node 20 uses epoll_pwait): the
 * probes tell a loop's own poll wait by them, userspace a loop idle at attach by
 * /proc/<tid>/syscall. */
#define LOOPBPF_SYS_EPOLL_WAIT 232
#define LOOPBPF_SYS_EPOLL_PWAIT 281
#define LOOPBPF_SYS_EPOLL_PWAIT2 441

/* Period of the per-loop-thread cpu-clock sampler, which also reads the iteration count:
 * where a loop iterates without sleeping, its busy intervals end within this of the truth. */
#define LOOPBPF_SAMPLE_PERIOD_NS 1000000

enum loopbpf_event_kind {
	/* A busy interval at or over the threshold ended at a poll wait. */
	LOOPBPF_EVENT_BLOCK = 1,
	/* A loop thread was seen for the first time (or adopted a new loop). */
	LOOPBPF_EVENT_LOOP_FOUND = 2,
	/* A loop thread exited; start_ns is its busy start if it was busy. */
	LOOPBPF_EVENT_LOOP_EXIT = 3,
	/* struct loopbpf_stack_event: a busy loop thread sampled on the CPU. */
	LOOPBPF_EVENT_ON_CPU = 4,
	/* struct loopbpf_stack_event: a busy loop thread that slept, with where it slept. */
	LOOPBPF_EVENT_OFF_CPU = 5,
	/* A process called execve (fleet mode watches for new libuv programs); a loop thread
	 * that execs also reports LOOPBPF_EVENT_LOOP_EXIT first. */
	LOOPBPF_EVENT_EXEC = 6,
	/* A V8 garbage-collection pause of a loop thread: start_ns at the entry of V8's GC
	 * prologue callbacks, end_ns at the entry of its epilogue callbacks (the calls Node's
	 * own 'gc' performance entries are timed by); flags is the epilogue's GCType. V8 10
	 * inlines those calls: there the whole collection is timed, flags from its collector. */
	LOOPBPF_EVENT_GC = 7,
};

/* V8's GCType bits (v8-callbacks.h), as the GC callbacks get them. */
#define LOOPBPF_GC_SCAVENGE 1
#define LOOPBPF_GC_MINOR_MARK_SWEEP 2
#define LOOPBPF_GC_MARK_SWEEP_COMPACT 4
#define LOOPBPF_GC_INCREMENTAL_MARKING 8
#define LOOPBPF_GC_PROCESS_WEAK_CALLBACKS 16

/* Distinct libuv objects (a node binary, a libuv.so) probed at once: each has one uprobe,
 * whose attach cookie indexes the libuvs map. */
#define LOOPBPF_MAX_LIBUVS 64

/* The libuvs map's value: what the uprobes need of the object they sit in, link-time
 * addresses of uv__io_poll, of uv_run, and of the function a worker_threads Worker runs its
 * loop under (node::worker::Worker::Run; zero when the object has none). */
struct loopbpf_libuv {
	__u64 poll_addr;
	__u64 run_addr;
	__u64 worker_entry_start;
	__u64 worker_entry_end;
	__u32 counts_iterations; /* libuv >= 1.45: loop_count is there to read */
	__u32 reserved;
};

/* What a loop thread is, decided when its loop is adopted. */
enum loopbpf_role {
	LOOPBPF_ROLE_UNKNOWN = 0, /* seen in a poll wait, loop not named yet */
	LOOPBPF_ROLE_MAIN = 1,    /* the process's main thread */
	LOOPBPF_ROLE_WORKER = 2,  /* a worker_threads Worker (or any other libuv loop thread) */
	LOOPBPF_ROLE_OTHER = 3,   /* a runtime-internal loop (Node's delayed-task scheduler): not reported */
};

/* How a loop thread left the CPU, until sched_switch or its own sampler sees it back. Some
 * kernels do not always trace sched_switch when an idle CPU switches to a woken thread (6.18
 * on our VMs): the probes then find the thread running while it is marked asleep, and place
 * the wake they did not see (see switched_in_unseen). */
enum loopbpf_off_cpu {
	LOOPBPF_ON_CPU = 0,
	LOOPBPF_OFF_CPU_PREEMPTED = 1,
	LOOPBPF_OFF_CPU_ASLEEP = 2,
};

/* Frames kept per stack sample. */
#define LOOPBPF_USER_FRAMES 96
#define LOOPBPF_KERNEL_FRAMES 32
/* Bytes of user stack copied per sample (libuv alone keeps 12 KiB of epoll events on it), for unwinding with .eh_frame where frame pointers
 * stop (hand-written assembly, glibc's syscall wrappers). */
#define LOOPBPF_STACK_COPY 32768
/* A busy interval is young until it has run for 1/LOOPBPF_YOUNG_DIVISOR of the threshold: most
 * end before that and are no block. loopbpf unwinds its samples only once it is no longer
 * young, and the kernel side submits a young interval's stack records without waking it. */
#define LOOPBPF_YOUNG_DIVISOR 2
/* A young interval's on-CPU stacks are taken every LOOPBPF_YOUNG_STACK_SPACING times as many
 * samples as an older one's, each record standing for that many more sampling periods (its
 * `periods`): most busy intervals end young, and a block's young part keeps an unbiased
 * profile, only coarser. */
#define LOOPBPF_YOUNG_STACK_SPACING 2
/* An older interval's stack records wake loopbpf at most this often per thread (the others wait
 * for the next wake-up, or for the interval's end): it unwinds a few at a time, not one. */
#define LOOPBPF_STACK_WAKE_SPACING_NS 20000000
/* The copy starts this far below sp: the x86-64 red zone, where leaf code may keep values its
 * unwind rules read (OpenSSL's SHA-2 assembly saves its caller's stack pointer there). */
#define LOOPBPF_RED_ZONE 128

/* Frames on the frame-pointer chain whose V8 objects are read when the sample is taken: the
 * GC moves young objects, so a pointer from the stack is followed right away or not at all. */
#define LOOPBPF_JS_FRAMES 32

/* One frame of that chain: what its function and receiver slots pointed at, at sample time. */
struct loopbpf_js_frame {
	__u64 fp;           /* the frame pointer, to match the frame in the stack copy */
	__u64 shared;       /* the function slot's JSFunction -> its SharedFunctionInfo (tagged) */
	__u64 receiver_map; /* the receiver slot's object -> its Map (tagged) */
};

/* Where V8 keeps those (from the target's postmortem metadata): the v8_layouts map's value
 * for a process, written by userspace once it has read that process's V8; none, or
 * enabled == 0, turns the reads off. */
struct loopbpf_v8_layout {
	__s32 fp_function;     /* frame slot of the JSFunction, from the frame pointer */
	__s32 fp_receiver;     /* frame slot of the receiver */
	__u32 function_shared; /* JSFunction field of the SharedFunctionInfo */
	__u32 enabled;
};

/* Most user stack frames searched for the worker entry function when a loop is adopted
 * (the kernel side's alone). */
#define LOOPBPF_ROLE_STACK_DEPTH 32

/* A busy interval that was already going on when loopbpf attached: its start is unknown, its
 * duration a lower bound. */
#define LOOPBPF_BUSY_BEFORE_ATTACH 1

/* Two ring buffers: the control events (struct loopbpf_event: loops found, blocks, exits, execs,
 * GC pauses), small and drained first, and the stack records (struct loopbpf_stack_event, about
 * 33 KiB each), so that a flood of stacks can never crowd the control events out. loopbpf sizes
 * the stack ring when it loads the object: LOOPBPF_STACK_RING_BYTES_PER_CPU for each online
 * CPU (a CPU runs one sampled loop thread at a time; 2 MiB holds about 300 ms of one CPU's
 * stacks at the default rate), a power of two within the bounds below. Its data pages are mapped
 * twice into loopbpf, so they count twice in its RSS. */
#define LOOPBPF_CONTROL_RING_BYTES (1024 * 1024)
#define LOOPBPF_STACK_RING_BYTES_PER_CPU (2 * 1024 * 1024)
#define LOOPBPF_STACK_RING_MIN_BYTES (4 * 1024 * 1024)
#define LOOPBPF_STACK_RING_MAX_BYTES (32 * 1024 * 1024)

/* Entries of the kernel side's hash maps. */
#define LOOPBPF_MAX_THREADS 16384
#define LOOPBPF_MAX_ASLEEP 64
#define LOOPBPF_MAX_V8_LAYOUTS 4096
#define LOOPBPF_MAX_STACK_BUDGETS 4096

/* The loop_tids map: one bit per thread id (PID_MAX_LIMIT, 2^22 on 64-bit, in 64-bit words),
 * set for every tid the threads map may hold an entry for. sched_switch runs for every context
 * switch of the host: a clear bit lets it skip the threads lookup. A stale bit costs that
 * lookup only. Set before an entry is made (by the probes and by userspace's seeds), cleared
 * before it is deleted. */
#define LOOPBPF_LOOP_TID_WORDS 65536

/* What the kernel side counts (the counters map, per CPU, indexed by these): nothing it drops
 * goes uncounted. */
enum loopbpf_counter {
	/* control events dropped: their ring buffer was full */
	LOOPBPF_LOST_CONTROL = 0,
	/* stack records dropped: the stack ring buffer was full */
	LOOPBPF_LOST_STACK = 1,
	/* stack records not taken: their process was over its stack rate (see stack_budgets) */
	LOOPBPF_STACKS_LIMITED = 2,
	/* loop threads not followed: the threads map was full */
	LOOPBPF_FULL_THREADS = 3,
	/* off-CPU stacks not taken: the asleep map was full */
	LOOPBPF_FULL_ASLEEP = 4,
	LOOPBPF_COUNTERS = 5,
};

/* The stack_budgets map's value, per process (tgid; an LRU map): a token bucket kept as the
 * time its next record is due (GCRA). A record is taken when now + the burst allowance reaches
 * next_ns, which then moves on by one record's interval. */
struct loopbpf_stack_budget {
	__u64 next_ns; /* CLOCK_MONOTONIC */
	__u64 limited; /* this process's stack records dropped by the limit */
};

/* A ring-buffer record of every kind but the stack samples. */
struct loopbpf_event {
	__u32 kind;     /* enum loopbpf_event_kind */
	__u32 pid;      /* tgid */
	__u32 tid;
	__u32 flags;    /* LOOPBPF_BUSY_BEFORE_ATTACH; GC: the GCType bits (LOOPBPF_GC_*) */
	__u64 start_ns; /* CLOCK_MONOTONIC: busy start (0 = was idle); GC: the pause's start */
	__u64 end_ns;   /* CLOCK_MONOTONIC: when it happened (a block's end, the loop found, the
	                 * exit, the exec, the pause's end) */
	__u64 loop_addr;/* the thread's uv_loop_t* in the target; 0 for an exec */
	__u64 waited_ns;/* BLOCK, LOOP_EXIT: of the busy interval, the time the thread was ready
	                 * to run but waited for a CPU (preempted, or throttled by a CPU limit) */
};

/* A stack of a busy loop thread: a ring-buffer record, and the asleep map's value while the
 * thread sleeps off-CPU. Userspace keeps the stacks of the current busy interval
 * (busy_since_ns) and names them if the interval turns out to be a block. */
struct loopbpf_stack_event {
	__u32 kind;          /* LOOPBPF_EVENT_ON_CPU or LOOPBPF_EVENT_OFF_CPU */
	__u32 pid;
	__u32 tid;
	__u32 user_depth;    /* frames in user[], leaf first */
	__u64 busy_since_ns; /* start of the busy interval the stack belongs to */
	__u64 at_ns;         /* sample time; OFF_CPU: when the thread went to sleep */
	__u64 off_cpu_ns;    /* OFF_CPU: how long it slept */
	__u32 kernel_depth;  /* frames in kernel[], leaf first */
	__u32 periods;       /* ON_CPU: the sampling periods of CPU time it stands for (its share
	                      * of the interval's on-CPU time); OFF_CPU: 0, it weighs its sleep */
	__u64 user[LOOPBPF_USER_FRAMES];   /* the kernel's frame-pointer walk */
	__u64 kernel[LOOPBPF_KERNEL_FRAMES];
	__u64 user_ip;       /* user registers when the stack was taken */
	__u64 user_sp;
	__u64 user_bp;
	__u32 stack_len;     /* bytes of stack[] copied from user_sp - LOOPBPF_RED_ZONE */
	__u32 js_depth;      /* frames in js[], from user_bp up the chain */
	struct loopbpf_js_frame js[LOOPBPF_JS_FRAMES];
	__u8 stack[LOOPBPF_STACK_COPY];
};

/* The threads map's value: per loop thread state, keyed by tid. Written by the
 * probes that fire for the thread (sched_switch too, as it switches the thread
 * in); userspace seeds it for loops already running at attach, reads it for
 * ELU, ongoing blocks and the summary, and deletes it after the thread exited. */
struct loopbpf_thread {
	__u64 loop_addr;       /* uv_loop_t* of the outer loop; 0 = not yet known */
	__s32 epfd;            /* that loop's backend (epoll) fd; -1 = not known yet */
	__u32 pid;             /* tgid */
	__u64 discovered_ns;   /* first probe hit on this thread, or userspace's seed */
	__u64 busy_since_ns;   /* start of the current busy interval, 0 = in poll or unknown */
	__u64 poll_enter_ns;   /* when it went to sleep in its loop's poll wait */
	__u32 in_poll;         /* asleep in the loop's own poll wait: idle */
	__u32 counts_iterations; /* its libuv counts iterations (count_addr); else the
	                          * uv__io_poll probe stays and counts them */
	__u32 role;            /* enum loopbpf_role */
	__u32 busy_before_attach; /* LOOPBPF_BUSY_BEFORE_ATTACH: the current busy interval began
	                           * before loopbpf attached; busy_since_ns is the attach time */
	__u64 idle_ns;         /* sum of finished idle poll waits */
	__u64 iterations;      /* completed uv__io_poll -> uv__io_poll iterations */
	__u64 seen_ns;         /* when the iteration count was last known to be seen_count */
	__u64 seen_count;      /* libuv's loop_count then */
	__u64 max_busy_ns;     /* longest finished busy interval */
	__u64 window_max_busy_ns; /* longest in the current reporting window */
	__u64 window;          /* which window (the window map's value) window_max_busy_ns is of */
	__u64 blocks;          /* busy intervals at or over the threshold */
	__u64 exited_ns;       /* thread exit (or exec), 0 while alive */
	__u64 busy_hist[LOOPBPF_HIST_SLOTS]; /* log2(us) of busy time per iteration */
	__u64 gc_start_ns;     /* entry of the GC prologue callbacks, 0 outside a GC pause */
	__u64 count_addr;      /* where libuv counts this loop's iterations; 0 = not found yet */
	__u64 samples;         /* cpu-clock samples taken while busy: every stack_every-th has a stack
	                        * (a young interval's, every LOOPBPF_YOUNG_STACK_SPACING times that) */
	__u64 last_sample_ns;  /* the last sample kept: a thread sampled twice (its own sampler and
	                        * one inherited from the thread that created it) keeps one stream */
	__u64 last_off_cpu_ns; /* the last off-CPU record: short sleeps get at most one per stack period */
	__u64 off_cpu_pending_ns; /* the other short sleeps' time, added to the next record */
	__u64 left_cpu_ns;     /* when it last left the CPU (sched_switch) */
	__u64 left_runtime_ns; /* its CPU time then (the scheduler's se.sum_exec_runtime) */
	__u64 stack_woke_ns;   /* when its last stack record woke loopbpf */
	__u64 waited_ns;       /* of the current busy interval, the time it waited for a CPU:
	                        * from a preemption to its switch back in */
	__u32 off_cpu;         /* enum loopbpf_off_cpu: how it left, until it is seen back */
	__u32 reserved;
};

#endif /* LOOPBPF_H */
