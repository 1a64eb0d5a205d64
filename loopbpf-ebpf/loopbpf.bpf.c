// SPDX-License-Identifier: (MIT OR Apache-2.0)
/*
 * loopbpf's kernel side: splits each libuv loop thread's time into idle (asleep in its
 * own poll wait) and busy (everything else), and reports busy intervals at or over the
 * threshold. Nothing here runs on every loop iteration or on every syscall: a loop that
 * iterates as fast as it can, and every other process on the host, do not pay for it.
 *
 *   uprobe uv_run             finds loop threads and their uv_loop_t* as their loops start
 *   uprobe uv__io_poll        the same for loops already running at attach, for a few seconds;
 *                             for libuv before 1.45 (Node 18), it stays and counts iterations
 *   sched_switch              a loop thread falling asleep in its poll wait ends a busy interval
 *                             (exactly), waking there starts one; off-CPU stacks and time of a
 *                             busy loop thread asleep anywhere else; its waits for a CPU after
 *                             a preemption
 *   perf_event cpu-clock      every millisecond of a loop thread's CPU time: reads libuv's own
 *                             iteration count, to split busy time that never sleeps; on-CPU
 *                             stacks while busy
 *   sched_process_exit        a loop thread that dies busy still reports its block
 *   sched_process_exec        the same for one that execs; new programs for fleet mode
 *   uprobes on V8's GC        GC pauses of loop threads: prologue callbacks to epilogue ones
 */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/bpf_perf_event.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "loopbpf.h"

char LICENSE[] SEC("license") = "Dual MIT/GPL";

/* Set by userspace before load. target_tgid 0 is fleet mode: every process that runs a
 * probed libuv is a target. */
const volatile __u32 target_tgid = 0;
const volatile __u64 threshold_ns = 100000000ULL;
/* Every stack_every-th sample of a busy loop thread carries its stacks; 0: none (--no-stacks). */
const volatile __u32 stack_every = 5;
/* Each process's stack records: at most one per stack_interval_ns on average, with up to
 * stack_burst_ns of them ahead of time; 0: no limit. */
const volatile __u64 stack_interval_ns = 0;
const volatile __u64 stack_burst_ns = 0;
/* The stack ring's size, as loopbpf made it. */
const volatile __u64 stack_ring_bytes = LOOPBPF_STACK_RING_MIN_BYTES;

/* The kernel's errno for an insert into a full hash map (the kernel side's alone). */
#define E2BIG 7

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, LOOPBPF_MAX_LIBUVS);
	__type(key, __u32);                  /* the uprobe's attach cookie */
	__type(value, struct loopbpf_libuv); /* the object that uprobe sits in */
} libuvs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LOOPBPF_MAX_THREADS);
	__type(key, __u32);                   /* tid */
	__type(value, struct loopbpf_thread); /* that thread's loop state */
} threads SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE); /* userspace sets and clears bits atomically in place */
	__uint(max_entries, LOOPBPF_LOOP_TID_WORDS);
	__type(key, __u32);   /* tid / 64 */
	__type(value, __u64); /* bit tid % 64: threads may hold tid (see loopbpf.h) */
} loop_tids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, LOOPBPF_CONTROL_RING_BYTES); /* struct loopbpf_event records */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, LOOPBPF_STACK_RING_MIN_BYTES); /* sized at load; 32 KiB stack copies */
} stacks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);   /* 0 */
	__type(value, __u64); /* current reporting window, bumped by userspace */
} window SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, LOOPBPF_COUNTERS);
	__type(key, __u32);   /* enum loopbpf_counter */
	__type(value, __u64); /* how many, on this CPU */
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, LOOPBPF_MAX_STACK_BUDGETS);
	__type(key, __u32);                          /* tgid */
	__type(value, struct loopbpf_stack_budget); /* its stack rate so far */
} stack_budgets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LOOPBPF_MAX_V8_LAYOUTS);
	__type(key, __u32);                      /* tgid */
	__type(value, struct loopbpf_v8_layout); /* set once that process's V8 is read */
} v8_layouts SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, LOOPBPF_MAX_ASLEEP);
	__type(key, __u32);                        /* tid of a busy loop thread that sleeps */
	__type(value, struct loopbpf_stack_event); /* where it went to sleep, and when */
} asleep SEC(".maps");

struct user_stack {
	__u64 ips[LOOPBPF_ROLE_STACK_DEPTH];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);               /* 0 */
	__type(value, struct user_stack); /* scratch for classify_loop() */
} role_stack SEC(".maps");

/* The kernel's task (sched_switch's pointers, the current task): only the fields read here,
 * placed by CO-RE. */
struct sched_entity {
	__u64 sum_exec_runtime; /* the task's CPU time, brought up to date as it leaves a CPU */
} __attribute__((preserve_access_index));

struct task_struct {
	int pid;
	int tgid;
	int exit_state;
	struct sched_entity se;
} __attribute__((preserve_access_index));

static const struct loopbpf_thread empty_thread;
static const struct loopbpf_stack_event empty_stack;

/* More iterations than a loop can make between two looks (1 ms of CPU time apart, or a sleep):
 * the count is not one (a loop closed and its memory reused). */
#define LOOPBPF_MAX_POLLS_SEEN (1ULL << 24)

/* Longer than a thread can stay awake between two looks when it is sampled (a sample every
 * period of its CPU time; switches look too). */
#define LOOPBPF_UNSEEN_NS (4 * LOOPBPF_SAMPLE_PERIOD_NS)

/* Whether the threads map may hold `tid`: false (a clear bit) only where it holds no entry. An
 * array lookup, which the verifier inlines: the threads lookup it saves is a hash. */
static __always_inline bool may_be_loop_thread(__u32 tid)
{
	__u32 word = tid / 64;
	__u64 *bits;

	if (word >= LOOPBPF_LOOP_TID_WORDS)
		return true; /* past any tid Linux gives: look it up */
	bits = bpf_map_lookup_elem(&loop_tids, &word);
	return !bits || (*bits >> (tid % 64)) & 1;
}

/* Before the threads map gets an entry for `tid`. */
static __always_inline void mark_loop_thread(__u32 tid)
{
	__u32 word = tid / 64;
	__u64 bit = 1ULL << (tid % 64), *bits = bpf_map_lookup_elem(&loop_tids, &word);

	if (bits && !(*bits & bit))
		__sync_fetch_and_or(bits, bit);
}

/* Before the threads map's entry for `tid` is deleted. */
static __always_inline void unmark_loop_thread(__u32 tid)
{
	__u32 word = tid / 64;
	__u64 bits_off = ~(1ULL << (tid % 64)), *bits = bpf_map_lookup_elem(&loop_tids, &word);

	if (bits)
		__sync_fetch_and_and(bits, bits_off);
}

static __always_inline void bump(__u32 counter)
{
	__u64 *n = bpf_map_lookup_elem(&counters, &counter);

	if (n)
		*n += 1;
}

/* Whether process `pid` may send one more stack record now; one that may not is counted, for
 * the process and in all. Runs only when a stack is about to be taken. Threads of one process
 * on two CPUs may race on next_ns: at worst a record more gets through. */
static __always_inline bool take_stack_token(__u32 pid, __u64 now)
{
	struct loopbpf_stack_budget fresh = { .next_ns = now }, *budget;

	if (!stack_interval_ns)
		return true;
	budget = bpf_map_lookup_elem(&stack_budgets, &pid);
	if (!budget) {
		bpf_map_update_elem(&stack_budgets, &pid, &fresh, BPF_NOEXIST);
		budget = bpf_map_lookup_elem(&stack_budgets, &pid);
		if (!budget)
			return true;
	}
	if (budget->next_ns > now + stack_burst_ns) {
		__sync_fetch_and_add(&budget->limited, 1);
		bump(LOOPBPF_STACKS_LIMITED);
		return false;
	}
	budget->next_ns = (budget->next_ns > now ? budget->next_ns : now) + stack_interval_ns;
	return true;
}

/* How a record is submitted to its ring buffer: `wake` is BPF_RB_FORCE_WAKEUP (the consumer
 * is woken if it waits) or BPF_RB_NO_WAKEUP for records that can wait for loopbpf's next look
 * (it reads both rings once a second, and whenever it is woken). Not 0: the kernel's adaptive
 * wake-up skips a record submitted while an earlier one is still unread, so a block's end
 * behind an unread GC pause waited for the next look (a block's line came a median 50 ms
 * late). A wake-up is not free for the target: it wakes loopbpf from within the
 * target's own context, and a uprobe's program (not preemption-safe like a perf event's) is
 * then often preempted by it before it returns, which the target pays for. */
static __always_inline void emit_raw_wake(__u32 kind, __u32 pid, __u32 tid, __u32 flags,
					  __u64 start_ns, __u64 end_ns, __u64 loop_addr,
					  __u64 waited_ns, __u64 wake)
{
	struct loopbpf_event *e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);

	if (!e) {
		bump(LOOPBPF_LOST_CONTROL);
		return;
	}
	e->kind = kind;
	e->pid = pid;
	e->tid = tid;
	e->flags = flags;
	e->start_ns = start_ns;
	e->end_ns = end_ns;
	e->loop_addr = loop_addr;
	e->waited_ns = waited_ns;
	bpf_ringbuf_submit(e, wake);
}

static __always_inline void emit_raw(__u32 kind, __u32 pid, __u32 tid, __u32 flags,
				     __u64 start_ns, __u64 end_ns, __u64 loop_addr)
{
	emit_raw_wake(kind, pid, tid, flags, start_ns, end_ns, loop_addr, 0,
		      BPF_RB_FORCE_WAKEUP);
}

static __always_inline void emit(__u32 kind, __u32 tid, const struct loopbpf_thread *t,
				 __u64 start_ns, __u64 end_ns)
{
	emit_raw_wake(kind, t->pid, tid, t->busy_before_attach, start_ns, end_ns, t->loop_addr,
		      t->waited_ns, BPF_RB_FORCE_WAKEUP);
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0, shift;

	shift = (v > 0xFFFFFFFFULL) << 5; v >>= shift; r |= shift;
	shift = (v > 0xFFFF) << 4; v >>= shift; r |= shift;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

static __always_inline bool is_reported(const struct loopbpf_thread *t)
{
	return t->role == LOOPBPF_ROLE_MAIN || t->role == LOOPBPF_ROLE_WORKER;
}

static __always_inline bool is_target(__u64 pid_tgid)
{
	return !target_tgid || (__u32)(pid_tgid >> 32) == target_tgid;
}

static __always_inline __s32 read_backend_fd(__u64 loop)
{
	__s32 fd = -1;

	bpf_probe_read_user(&fd, sizeof(fd), (void *)(loop + LOOPBPF_UV_LOOP_BACKEND_FD_OFFSET));
	return fd;
}

/* Main thread, worker_threads Worker, or a runtime-internal loop: a worker's first poll runs
 * under the worker entry function. Runs once per adopted loop, never per iteration. */
static __always_inline __u32 classify_loop(struct pt_regs *ctx, __u64 pid_tgid, bool at_poll)
{
	__u32 zero = 0, which = bpf_get_attach_cookie(ctx);
	const struct loopbpf_libuv *uv;
	struct user_stack *stack;
	__s64 bias, bytes;

	if ((__u32)pid_tgid == (__u32)(pid_tgid >> 32))
		return LOOPBPF_ROLE_MAIN;
	uv = bpf_map_lookup_elem(&libuvs, &which);
	if (!uv || !uv->worker_entry_start)
		return LOOPBPF_ROLE_WORKER;
	stack = bpf_map_lookup_elem(&role_stack, &zero);
	if (!stack)
		return LOOPBPF_ROLE_WORKER;
	bytes = bpf_get_stack(ctx, stack->ips, sizeof(stack->ips), BPF_F_USER_STACK);
	if (bytes <= 0)
		return LOOPBPF_ROLE_WORKER; /* cannot tell: better shown than hidden */
	bias = PT_REGS_IP(ctx) - (at_poll ? uv->poll_addr : uv->run_addr);
	for (int i = 0; i < LOOPBPF_ROLE_STACK_DEPTH; i++) {
		__u64 link_addr;

		if (i * 8 >= bytes)
			break;
		link_addr = stack->ips[i] - bias;
		if (link_addr >= uv->worker_entry_start && link_addr < uv->worker_entry_end)
			return LOOPBPF_ROLE_WORKER;
	}
	return LOOPBPF_ROLE_OTHER;
}

static __always_inline void count_busy(struct loopbpf_thread *t, __u64 busy_ns, __u64 n)
{
	__u32 slot = log2_u64(busy_ns / 1000);

	if (slot >= LOOPBPF_HIST_SLOTS)
		slot = LOOPBPF_HIST_SLOTS - 1;
	t->busy_hist[slot] += n;
}

/* A busy interval begins at `at`. */
static __always_inline void begin_busy(struct loopbpf_thread *t, __u64 at)
{
	t->busy_since_ns = at;
	t->busy_before_attach = 0;
	t->waited_ns = 0;
}

/* The busy interval under way ends at `end`: the entry of the loop's next poll. */
static __always_inline void close_busy(struct loopbpf_thread *t, __u32 tid, __u64 end)
{
	__u64 busy, w, *current_window;
	__u32 zero = 0;

	if (!t->busy_since_ns || end < t->busy_since_ns)
		return;
	busy = end - t->busy_since_ns;
	count_busy(t, busy, 1);
	if (busy > t->max_busy_ns)
		t->max_busy_ns = busy;
	current_window = bpf_map_lookup_elem(&window, &zero);
	w = current_window ? *current_window : 0;
	if (t->window != w) {
		t->window = w;
		t->window_max_busy_ns = 0;
	}
	if (busy > t->window_max_busy_ns)
		t->window_max_busy_ns = busy;
	if (busy >= threshold_ns && is_reported(t)) {
		t->blocks += 1;
		emit(LOOPBPF_EVENT_BLOCK, tid, t, t->busy_since_ns, end);
	}
	t->busy_since_ns = 0;
	t->busy_before_attach = 0;
}

/* Finds where libuv counts this loop's iterations. Runs in the loop thread (its memory). */
static __always_inline void find_count(struct loopbpf_thread *t, __u64 now)
{
	__u64 fields = 0, count = 0;

	if (t->count_addr || !t->counts_iterations || !t->loop_addr)
		return;
	if (bpf_probe_read_user(&fields, sizeof(fields),
				(void *)(t->loop_addr + LOOPBPF_UV_LOOP_INTERNAL_FIELDS_OFFSET)) || !fields)
		return;
	if (bpf_probe_read_user(&count, sizeof(count), (void *)(fields + LOOPBPF_UV_LOOP_COUNT_OFFSET)))
		return;
	t->count_addr = fields + LOOPBPF_UV_LOOP_COUNT_OFFSET;
	t->seen_count = count;
	t->seen_ns = now;
}

/* libuv's iteration count now; false where it is not known (then nothing is decided), and
 * once the loop is closed (its epoll fd gone): uv_loop_close frees where the count was. */
static __always_inline bool read_count(struct loopbpf_thread *t, __u64 now, __u64 *count)
{
	find_count(t, now);
	return t->count_addr && read_backend_fd(t->loop_addr) == t->epfd &&
	       !bpf_probe_read_user(count, sizeof(*count), (void *)t->count_addr);
}

/* The loop's count went from seen_count (at seen_ns) to `count` (now), the thread awake in
 * between: the busy interval under way at seen_ns ended at the first of those polls, the one
 * under way now began at the last. Without a probe on the poll, they are placed at the middle
 * of that span: at most half a sampling period (0.5 ms of CPU time) from the truth. */
static __always_inline void observe(struct loopbpf_thread *t, __u32 tid, __u64 now, __u64 count)
{
	__u64 polls, mid;

	/* A loop initialised again in the same memory: count from there. */
	if (count < t->seen_count || count - t->seen_count > LOOPBPF_MAX_POLLS_SEEN)
		t->seen_count = count;
	polls = count - t->seen_count;
	if (polls && now - t->seen_ns > LOOPBPF_UNSEEN_NS && !t->last_sample_ns) {
		/* Awake that long without a look and no sampler yet: where the interval ended is
		 * not known, and no block is made up from a guess. But one already seen going on
		 * past the threshold at the last look is a block for sure: it ends in the unseen
		 * span, placed at its middle, rather than being lost. (With a sampler, a late look
		 * on a loaded host is placed at the middle as below: starting the next interval
		 * at `now` cut a 60 ms block under a 50 ms threshold by the gap, under churn.) */
		if (t->busy_since_ns && t->seen_ns >= t->busy_since_ns + threshold_ns)
			close_busy(t, tid, t->seen_ns + (now - t->seen_ns) / 2);
		t->iterations += polls;
		begin_busy(t, now);
		t->seen_count = count;
	} else if (polls) {
		mid = t->seen_ns + (now - t->seen_ns) / 2;
		t->iterations += polls;
		close_busy(t, tid, mid);
		if (polls > 1) /* the iterations in between, each shorter than the span */
			count_busy(t, (now - t->seen_ns) / polls, polls - 1);
		begin_busy(t, mid);
		t->seen_count = count;
	}
	t->seen_ns = now;
}

static __always_inline void off_cpu_ends(struct loopbpf_thread *t, struct loopbpf_stack_event *sleep,
					 __u64 now);

/* The thread of `t` runs again from `now`: the poll wait it slept in returns (a busy interval
 * begins), or the sleep elsewhere whose stack was taken ends. */
static __always_inline void switched_in(struct loopbpf_thread *t, __u32 tid, __u64 now)
{
	struct loopbpf_stack_event *sleep;
	bool slept = t->off_cpu == LOOPBPF_OFF_CPU_ASLEEP;
	bool preempted = t->off_cpu == LOOPBPF_OFF_CPU_PREEMPTED;

	t->off_cpu = LOOPBPF_ON_CPU;
	/* The count cannot move while the thread is off the CPU. */
	t->seen_ns = now;
	if (t->in_poll) {
		/* Woken in its poll wait: the poll returns, a busy interval begins. It slept
		 * there, not elsewhere: no off-CPU stack was begun (no asleep lookup). */
		t->in_poll = 0;
		t->idle_ns += now - t->poll_enter_ns;
		begin_busy(t, now);
		return;
	}
	if (preempted && t->busy_since_ns) {
		/* Back from a preemption (no off-CPU stack was begun): it was ready to run all
		 * along, and waited for a CPU. */
		__u64 since = t->left_cpu_ns > t->busy_since_ns ? t->left_cpu_ns : t->busy_since_ns;

		if (now > since)
			t->waited_ns += now - since;
	}
	if (!slept)
		return;
	sleep = bpf_map_lookup_elem(&asleep, &tid);
	if (!sleep)
		return;
	off_cpu_ends(t, sleep, now);
	bpf_map_delete_elem(&asleep, &tid);
}

/* Whether the thread, found running, was last seen leaving the CPU (or seeded asleep in its
 * poll wait at attach) with no switch back seen since. */
static __always_inline bool back_unseen(const struct loopbpf_thread *t)
{
	return t->off_cpu != LOOPBPF_ON_CPU || t->in_poll;
}

/* The thread is running, but no sched_switch to it was seen since it left the CPU: some kernels
 * do not always trace one when an idle CPU switches to a woken thread. It came back `ran_ns`
 * before `now` (what its CPU time says), not before it left. Without this, a block that began
 * with such a wake was not seen until the thread's next preemption, or not at all. */
static __always_inline void switched_in_unseen(struct loopbpf_thread *t, __u32 tid, __u64 now,
					       __u64 ran_ns)
{
	__u64 left = t->in_poll ? t->poll_enter_ns : t->left_cpu_ns;
	__u64 back = now > ran_ns ? now - ran_ns : 0;

	switched_in(t, tid, back > left ? back : left);
}

/* The thread's CPU time since it last left the CPU, from `runtime` (its se.sum_exec_runtime
 * now); 0 where it was not seen leaving. */
static __always_inline __u64 ran_since(const struct loopbpf_thread *t, __u64 runtime)
{
	return t->left_runtime_ns && runtime > t->left_runtime_ns ? runtime - t->left_runtime_ns : 0;
}

/* How long the running thread has run since it left the CPU, for switched_in_unseen, from a
 * probe that fires while it runs (a sample, a uprobe). Its CPU time is brought up to date only
 * now and then (each tick), so it is a lower bound; its sampler fires within one period of CPU
 * time after the switch back, so no less than half a period is taken (within 0.5 ms). */
static __always_inline __u64 ran_since_left(const struct loopbpf_thread *t)
{
	__u64 ran = ran_since(t, bpf_get_current_task_btf()->se.sum_exec_runtime);

	return ran > LOOPBPF_SAMPLE_PERIOD_NS / 2 ? ran : LOOPBPF_SAMPLE_PERIOD_NS / 2;
}

/* Makes `loop` the thread's loop when it is the first, or replaces one that was closed; and
 * for libuv before 1.45, where this probe stays on uv__io_poll, ends each iteration. */
static __always_inline void adopt_loop(struct pt_regs *ctx, __u64 loop, bool at_poll)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid, which = bpf_get_attach_cookie(ctx);
	const struct loopbpf_libuv *uv;
	__u64 now = bpf_ktime_get_ns();
	struct loopbpf_thread *t;

	if (!is_target(pid_tgid))
		return;
	/* Before the entry (this program can be preempted), and again after it: userspace
	 * forgetting an exited thread of the same tid meanwhile clears the bit. */
	mark_loop_thread(tid);
	t = bpf_map_lookup_elem(&threads, &tid);
	if (!t) {
		if (bpf_map_update_elem(&threads, &tid, &empty_thread, BPF_NOEXIST) == -E2BIG)
			bump(LOOPBPF_FULL_THREADS);
		t = bpf_map_lookup_elem(&threads, &tid);
		if (!t)
			return;
		t->epfd = -1;
	}
	mark_loop_thread(tid);

	if (t->loop_addr == loop) {
		if (at_poll && !t->counts_iterations) {
			if (back_unseen(t))
				switched_in_unseen(t, tid, now, ran_since_left(t));
			/* The poll's entry ends the busy interval; the poll returning at once
			 * starts the next, a sleep in it (sched_switch) makes it idle. */
			t->iterations += 1;
			close_busy(t, tid, now);
			begin_busy(t, now);
		}
		return;
	}

	if (t->loop_addr) {
		/* A second loop on a known loop thread is spawnSync's private loop, run
		 * inside one busy interval of the outer loop: ignore it while the outer
		 * loop still owns its epoll fd. A loop we adopted that has since been
		 * closed (a spawnSync before the real loop started) gives way. */
		if (read_backend_fd(t->loop_addr) == t->epfd)
			return;
	} else if (t->epfd >= 0 && read_backend_fd(loop) != t->epfd) {
		/* The thread sat in this epoll fd when we attached: that is its loop.
		 * Another one (spawnSync's, or one polled while Node exits) is not. */
		return;
	}

	uv = bpf_map_lookup_elem(&libuvs, &which);
	t->loop_addr = loop;
	t->epfd = read_backend_fd(loop);
	t->pid = pid_tgid >> 32;
	if (!t->discovered_ns)
		t->discovered_ns = now;
	t->in_poll = 0;
	if (!t->busy_since_ns)
		begin_busy(t, now);
	t->counts_iterations = uv ? uv->counts_iterations : 0;
	t->count_addr = 0;
	find_count(t, now);
	if (t->role == LOOPBPF_ROLE_UNKNOWN)
		t->role = classify_loop(ctx, pid_tgid, at_poll);
	if (t->role != LOOPBPF_ROLE_OTHER)
		emit(LOOPBPF_EVENT_LOOP_FOUND, tid, t, t->busy_since_ns, now);
}

SEC("uprobe/uv_run")
int uv_run_entry(struct pt_regs *ctx)
{
	adopt_loop(ctx, PT_REGS_PARM1(ctx), false);
	return 0;
}

SEC("uprobe/uv__io_poll")
int uv_io_poll_entry(struct pt_regs *ctx)
{
	adopt_loop(ctx, PT_REGS_PARM1(ctx), true);
	return 0;
}

/* A loop thread's end: it exited, or it called execve and runs another program now. */
static __always_inline void loop_thread_ends(__u32 tid)
{
	struct loopbpf_thread *t = bpf_map_lookup_elem(&threads, &tid);
	__u64 now;

	if (!t || t->exited_ns)
		return; /* not a loop thread, or ended already (it exited after an exec) */
	bpf_map_delete_elem(&asleep, &tid);
	/* A main thread seeded in its poll wait at attach is the main loop even if it
	 * never named its loop (busy from then until exit). */
	if (t->role != LOOPBPF_ROLE_MAIN && t->role != LOOPBPF_ROLE_WORKER) {
		unmark_loop_thread(tid);
		bpf_map_delete_elem(&threads, &tid);
		return;
	}
	now = bpf_ktime_get_ns();
	t->exited_ns = now;
	if (t->busy_since_ns) {
		__u64 busy = now - t->busy_since_ns;

		if (busy > t->max_busy_ns)
			t->max_busy_ns = busy;
		if (busy >= threshold_ns)
			t->blocks += 1;
	}
	/* Userspace reads the final counters, then deletes the entry. */
	emit(LOOPBPF_EVENT_LOOP_EXIT, tid, t, t->busy_since_ns, now);
}

SEC("tracepoint/sched/sched_process_exit")
int thread_exit(void *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	if (is_target(pid_tgid))
		loop_thread_ends((__u32)pid_tgid);
	return 0;
}

/* sched/sched_process_exec's record: see events/sched/sched_process_exec/format. */
struct sched_process_exec_ctx {
	__u64 common;
	__u32 filename; /* __data_loc */
	__s32 pid;
	__s32 old_pid;
};

/* Runs in the new program, with the thread that called execve now the process's only thread,
 * under the tgid; old_pid is the tid it had (a worker's, when a worker exec'd). Fleet mode
 * hears of every exec, to look for libuv in the new program. */
SEC("tracepoint/sched/sched_process_exec")
int process_exec(struct sched_process_exec_ctx *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;

	if (!is_target(pid_tgid))
		return 0;
	loop_thread_ends((__u32)ctx->old_pid);
	loop_thread_ends(tgid);
	if (!target_tgid)
		emit_raw(LOOPBPF_EVENT_EXEC, tgid, (__u32)pid_tgid, 0, 0, bpf_ktime_get_ns(), 0);
	return 0;
}

/* The thread's state if it is a reported loop thread inside a busy interval. */
static __always_inline struct loopbpf_thread *busy_loop_thread(__u32 tid)
{
	struct loopbpf_thread *t = bpf_map_lookup_elem(&threads, &tid);

	if (!t || !is_reported(t) || t->in_poll || !t->busy_since_ns || t->exited_ns)
		return NULL; /* an exited thread still switches out once, after its exit probe */
	return t;
}

/* Follows the frame-pointer chain from the sampled frame and reads, for each frame, what its
 * V8 function and receiver slots point at, before the GC can move those objects. Userspace
 * checks every pointer's type: a frame that is not a JS frame reads as garbage and is dropped
 * there. */
static __always_inline void read_js_frames(struct loopbpf_stack_event *e)
{
	__u32 pid = e->pid; /* map keys from the stack: older verifiers refuse ring-buffer memory */
	struct loopbpf_v8_layout *v8 = bpf_map_lookup_elem(&v8_layouts, &pid);
	__u64 fp = e->user_bp;

	e->js_depth = 0;
	if (!v8 || !v8->enabled)
		return;
	for (int i = 0; i < LOOPBPF_JS_FRAMES; i++) {
		__u64 function = 0, receiver = 0, caller_fp = 0;
		struct loopbpf_js_frame *frame = &e->js[i];

		frame->fp = fp;
		frame->shared = 0;
		frame->receiver_map = 0;
		bpf_probe_read_user(&function, sizeof(function), (void *)(fp + v8->fp_function));
		bpf_probe_read_user(&receiver, sizeof(receiver), (void *)(fp + v8->fp_receiver));
		if ((function & 3) == 1)
			bpf_probe_read_user(&frame->shared, sizeof(frame->shared),
					    (void *)(function - 1 + v8->function_shared));
		if ((receiver & 3) == 1)
			bpf_probe_read_user(&frame->receiver_map, sizeof(frame->receiver_map),
					    (void *)(receiver - 1));
		e->js_depth = i + 1;
		/* The stack grows down: a caller's frame is always above. */
		if (bpf_probe_read_user(&caller_fp, sizeof(caller_fp), (void *)fp) || caller_fp <= fp)
			break;
		fp = caller_fp;
	}
}

/* Copies as much of the user stack above sp as is mapped, up to LOOPBPF_STACK_COPY bytes:
 * near the top of a thread's stack a full copy would fault, so halve until one fits. A young
 * interval's samples get the full copy too: with 4 KiB, unwinding JS frames lost its way in a
 * tenth of them (tests/stacks.rs). */
static __always_inline __u32 copy_user_stack(struct loopbpf_stack_event *e)
{
	void *sp = (void *)(e->user_sp - LOOPBPF_RED_ZONE);

	if (!bpf_probe_read_user(e->stack, LOOPBPF_STACK_COPY, sp))
		return LOOPBPF_STACK_COPY;
	if (!bpf_probe_read_user(e->stack, LOOPBPF_STACK_COPY / 2, sp))
		return LOOPBPF_STACK_COPY / 2;
	if (!bpf_probe_read_user(e->stack, LOOPBPF_STACK_COPY / 4, sp))
		return LOOPBPF_STACK_COPY / 4;
	if (!bpf_probe_read_user(e->stack, LOOPBPF_STACK_COPY / 8, sp))
		return LOOPBPF_STACK_COPY / 8;
	if (!bpf_probe_read_user(e->stack, LOOPBPF_STACK_COPY / 16, sp))
		return LOOPBPF_STACK_COPY / 16;
	return 0;
}

/* Whether the busy interval begun at `busy_since_ns` is still young at `now`: younger than
 * 1/LOOPBPF_YOUNG_DIVISOR of the threshold, it is most likely to end short of a block. */
static __always_inline bool is_young(__u64 busy_since_ns, __u64 now)
{
	return now - busy_since_ns < threshold_ns / LOOPBPF_YOUNG_DIVISOR;
}

/* How thread `t`'s stack record of the busy interval begun at `busy_since_ns` is submitted, at
 * `now`. loopbpf keeps the records of a young interval raw and does nothing with them until it
 * is older: they wait for its next look (it reads the stack ring once a second, and before
 * every control event, so a block's end still comes after its stacks) instead of waking it
 * twice a record (its main thread and its naming thread). Older intervals' records wake it
 * every LOOPBPF_STACK_WAKE_SPACING_NS: it unwinds them while the interval runs, a few at a
 * time. Any record that finds the ring a quarter full wakes it too, which bounds what waits
 * however many CPUs sample at once. */
static __always_inline __u64 stack_wake(struct loopbpf_thread *t, __u64 busy_since_ns, __u64 now)
{
	if (bpf_ringbuf_query(&stacks, BPF_RB_AVAIL_DATA) >= stack_ring_bytes / 4)
		return BPF_RB_FORCE_WAKEUP;
	if (is_young(busy_since_ns, now) || now - t->stack_woke_ns < LOOPBPF_STACK_WAKE_SPACING_NS)
		return BPF_RB_NO_WAKEUP;
	t->stack_woke_ns = now;
	return BPF_RB_FORCE_WAKEUP;
}

static __always_inline void fill_stacks(void *ctx, struct loopbpf_stack_event *e)
{
	struct pt_regs *user_regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	struct pt_regs regs = {};
	long bytes = bpf_get_stack(ctx, e->user, sizeof(e->user), BPF_F_USER_STACK);

	e->user_depth = bytes > 0 ? bytes / sizeof(__u64) : 0;
	bytes = bpf_get_stack(ctx, e->kernel, sizeof(e->kernel), 0);
	e->kernel_depth = bytes > 0 ? bytes / sizeof(__u64) : 0;
	/* The user-mode registers saved when the thread entered the kernel (the sampling
	 * interrupt, or the syscall it sleeps in). */
	bpf_probe_read_kernel(&regs, sizeof(regs), user_regs);
	e->user_ip = regs.rip;
	e->user_sp = regs.rsp;
	e->user_bp = regs.rbp;
	read_js_frames(e);
	e->stack_len = copy_user_stack(e);
}

/* Attached per loop thread to a cpu-clock event: fires only while that thread runs. */
SEC("perf_event")
int on_cpu_sample(struct bpf_perf_event_data *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct loopbpf_thread *t;
	struct loopbpf_stack_event *e;
	__u64 now, count;
	__u32 every;

	if (!is_target(pid_tgid))
		return 0;
	t = bpf_map_lookup_elem(&threads, &tid);
	if (!t || t->exited_ns || t->role == LOOPBPF_ROLE_OTHER)
		return 0;
	now = bpf_ktime_get_ns();
	/* Two samplers on one thread fire at two phases: keep the samples at least 0.6 periods
	 * apart, which keeps exactly one of the two streams. */
	if (now - t->last_sample_ns < LOOPBPF_SAMPLE_PERIOD_NS * 6 / 10)
		return 0;
	if (back_unseen(t))
		switched_in_unseen(t, tid, now, ran_since_left(t));
	/* Set after observe(), which tells the first sample (no sampler before it) by a 0. */
	if (read_count(t, now, &count))
		observe(t, tid, now, count);
	t->last_sample_ns = now;
	t = busy_loop_thread(tid);
	if (!t || !stack_every)
		return 0; /* idle in its poll wait: not a stack of a block */
	every = stack_every;
	if (is_young(t->busy_since_ns, now))
		every *= LOOPBPF_YOUNG_STACK_SPACING;
	if (t->samples++ % every)
		return 0;
	if (!take_stack_token(pid_tgid >> 32, now))
		return 0;
	e = bpf_ringbuf_reserve(&stacks, sizeof(*e), 0);
	if (!e) {
		bump(LOOPBPF_LOST_STACK);
		return 0;
	}
	e->kind = LOOPBPF_EVENT_ON_CPU;
	e->pid = pid_tgid >> 32;
	e->tid = tid;
	e->busy_since_ns = t->busy_since_ns;
	e->at_ns = now;
	e->off_cpu_ns = 0;
	e->periods = every;
	fill_stacks(ctx, e);
	bpf_ringbuf_submit(e, stack_wake(t, e->busy_since_ns, now));
	return 0;
}

/* V8 calls its GC prologue callbacks as a pause begins and its epilogue callbacks as it ends,
 * whether or not any are registered: entry probes on both time the pause. Node's own 'gc'
 * performance entries are taken by callbacks it registers there. */
SEC("uprobe/gc_prologue")
int gc_prologue(struct pt_regs *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct loopbpf_thread *t = bpf_map_lookup_elem(&threads, &tid);

	if (t && is_reported(t))
		t->gc_start_ns = bpf_ktime_get_ns();
	return 0;
}

SEC("uprobe/gc_epilogue")
int gc_epilogue(struct pt_regs *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct loopbpf_thread *t = bpf_map_lookup_elem(&threads, &tid);

	if (!t || !t->gc_start_ns)
		return 0;
	/* Heap::CallGCEpilogueCallbacks(this, GCType, ...): the kind is its second argument. */
	emit_raw_wake(LOOPBPF_EVENT_GC, t->pid, tid, (__u32)PT_REGS_PARM2(ctx), t->gc_start_ns,
		      bpf_ktime_get_ns(), t->loop_addr, 0, BPF_RB_NO_WAKEUP);
	t->gc_start_ns = 0;
	return 0;
}

/* V8 10 (Node 18) inlines those calls on its GC paths; there the pause is timed from
 * Heap::GarbageCollectionPrologue to Heap::GarbageCollectionEpilogue(GarbageCollector), whose
 * argument is the collector (0 scavenger, 1 mark-compactor, 2 minor mark-compactor). */
SEC("uprobe/gc_epilogue_collector")
int gc_epilogue_collector(struct pt_regs *ctx)
{
	static const __u32 gc_types[3] = {
		LOOPBPF_GC_SCAVENGE, LOOPBPF_GC_MARK_SWEEP_COMPACT, LOOPBPF_GC_MINOR_MARK_SWEEP,
	};
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct loopbpf_thread *t = bpf_map_lookup_elem(&threads, &tid);
	__u32 collector = (__u32)PT_REGS_PARM2(ctx);

	if (!t || !t->gc_start_ns || collector > 2)
		return 0;
	emit_raw_wake(LOOPBPF_EVENT_GC, t->pid, tid, gc_types[collector], t->gc_start_ns,
		      bpf_ktime_get_ns(), t->loop_addr, 0, BPF_RB_NO_WAKEUP);
	t->gc_start_ns = 0;
	return 0;
}

struct sched_switch_ctx {
	__u64 common;
	char prev_comm[16];
	__s32 prev_pid;
	__s32 prev_prio;
	__s64 prev_state;
	char next_comm[16];
	__s32 next_pid;
	__s32 next_prio;
};

/* Whether the current task sleeps in its loop's own poll wait: a syscall of libuv's epoll
 * backend on the loop's epoll fd (spawnSync's nested loop has another). */
static __always_inline bool asleep_in_loop_poll(const struct loopbpf_thread *t)
{
	struct pt_regs *user_regs;
	__u64 nr;

	if (t->epfd < 0)
		return false;
	/* A BTF pointer: read in place (the verifier makes the loads fault-safe), no helper. */
	user_regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	nr = user_regs->orig_rax;
	if (nr != LOOPBPF_SYS_EPOLL_PWAIT && nr != LOOPBPF_SYS_EPOLL_WAIT &&
	    nr != LOOPBPF_SYS_EPOLL_PWAIT2)
		return false;
	return (__s32)user_regs->rdi == t->epfd;
}

/* A loop thread falls asleep in its poll wait: the busy interval ends, exactly, now. */
static __always_inline void poll_sleeps(struct loopbpf_thread *t, __u32 tid, __u64 now)
{
	__u64 count;

	if (t->in_poll)
		return;
	if (!t->counts_iterations) {
		/* The uv__io_poll probe ended the interval at the poll's entry. */
		t->busy_since_ns = 0;
	} else if (read_count(t, now, &count) && count > t->seen_count) {
		/* This poll's count is the last one: polls before it end earlier intervals. */
		observe(t, tid, now, count - 1);
		t->iterations += 1;
		t->seen_count = count;
		close_busy(t, tid, now);
	} else {
		/* A sample between the count's bump and this sleep ended the interval already;
		 * what it began since is this poll's own few microseconds. */
		t->busy_since_ns = 0;
	}
	t->in_poll = 1;
	t->poll_enter_ns = now;
	t->seen_ns = now;
}

/* A busy loop thread falls asleep elsewhere than its poll wait: where, for its off-CPU stack
 * (reported when it wakes, see off_cpu_ends). */
static __always_inline void off_cpu_begins(void *ctx, __u64 pid_tgid, __u64 busy_since_ns,
					   __u64 now)
{
	__u32 tid = (__u32)pid_tgid;
	struct loopbpf_stack_event *sleep;

	if (bpf_map_update_elem(&asleep, &tid, &empty_stack, BPF_ANY) == -E2BIG)
		bump(LOOPBPF_FULL_ASLEEP);
	sleep = bpf_map_lookup_elem(&asleep, &tid);
	if (!sleep)
		return;
	sleep->kind = LOOPBPF_EVENT_OFF_CPU;
	sleep->pid = pid_tgid >> 32;
	sleep->tid = tid;
	sleep->busy_since_ns = busy_since_ns;
	sleep->at_ns = now;
	sleep->periods = 0;
	fill_stacks(ctx, sleep);
}

/* The thread of `sleep` runs again. Sleeps come in bursts (a GC waits for its helper threads
 * again and again): a sleep as long as a stack period, or the first after one, is reported
 * with its stack; the time of the others is added to the next report. */
static __always_inline void off_cpu_ends(struct loopbpf_thread *t, struct loopbpf_stack_event *sleep,
					 __u64 now)
{
	__u64 budget = stack_every * LOOPBPF_SAMPLE_PERIOD_NS, slept = now - sleep->at_ns;
	__u64 pending = t->off_cpu_pending_ns;
	struct loopbpf_stack_event *e;

	if (slept < budget && now - t->last_off_cpu_ns < budget) {
		t->off_cpu_pending_ns += slept;
		return;
	}
	/* A dropped record's time is not added to the next one: that would be another stack's. */
	t->off_cpu_pending_ns = 0;
	t->last_off_cpu_ns = now;
	if (!take_stack_token(t->pid, now))
		return;
	e = bpf_ringbuf_reserve(&stacks, sizeof(*e), 0);
	if (!e) {
		bump(LOOPBPF_LOST_STACK);
		return;
	}
	bpf_probe_read_kernel(e, sizeof(*e), sleep);
	e->off_cpu_ns = slept + pending;
	bpf_ringbuf_submit(e, stack_wake(t, sleep->busy_since_ns, now));
}

/* The kernel's task states (include/linux/sched.h) that tell a sleep from a preemption. */
#define TASK_REPORT 0x7f /* running, sleeping, stopped, traced, dead, zombie, parked */
#define TASK_IDLE 0x402  /* TASK_UNINTERRUPTIBLE | TASK_NOLOAD: reported as idle */
#define TASK_RTLOCK_WAIT 0x1000
#define TASK_FROZEN 0x8000

/* Whether the tracepoint record would give prev_state 1 (S) or 2 (D), a sleep, as the
 * classic tracepoint's __trace_sched_switch_state() computes it from the same arguments: a
 * preempted thread is waiting for a CPU in the middle of its work, whatever its state. */
static __always_inline bool switch_sleeps(bool preempt, unsigned int prev_state,
					  const struct task_struct *prev)
{
	unsigned int state;

	if (preempt)
		return false;
	if (prev_state & (TASK_RTLOCK_WAIT | TASK_FROZEN))
		return true; /* reported as TASK_UNINTERRUPTIBLE */
	if ((prev_state & TASK_IDLE) == TASK_IDLE)
		return false;
	state = (prev_state | prev->exit_state) & TASK_REPORT;
	return state && state < 4; /* its highest bit is TASK_INTERRUPTIBLE's or UNINTERRUPTIBLE's */
}

/* A loop thread leaving the CPU (`prev`, a pid_tgid, when it may be one; `prev_sleeps`: to
 * sleep rather than preempted); one coming back (`next_tid`, when it may be one). Off-CPU
 * stacks: a busy loop thread leaving the CPU to sleep elsewhere than its poll wait records
 * where; coming back reports how long. */
static __always_inline void loop_threads_switch(void *ctx, bool check_prev, __u64 pid_tgid,
						bool prev_sleeps, __u64 prev_runtime,
						bool check_next, __u32 next_tid)
{
	__u32 tid = (__u32)pid_tgid;
	struct loopbpf_thread *t = NULL;
	__u64 now = 0, count;

	if (check_prev && is_target(pid_tgid))
		t = bpf_map_lookup_elem(&threads, &tid);
	/* An exited thread still switches out once, after its exit probe. */
	if (t && !t->exited_ns && t->role != LOOPBPF_ROLE_OTHER) {
		now = bpf_ktime_get_ns();
		/* Its CPU time is exact here (brought up to date as it leaves). */
		if (back_unseen(t))
			switched_in_unseen(t, tid, now, ran_since(t, prev_runtime));
		t->off_cpu = prev_sleeps ? LOOPBPF_OFF_CPU_ASLEEP : LOOPBPF_OFF_CPU_PREEMPTED;
		t->left_cpu_ns = now;
		t->left_runtime_ns = prev_runtime;
		if (prev_sleeps && asleep_in_loop_poll(t)) {
			poll_sleeps(t, tid, now);
		} else {
			if (read_count(t, now, &count))
				observe(t, tid, now, count);
			if (prev_sleeps && stack_every && (t = busy_loop_thread(tid)))
				off_cpu_begins(ctx, pid_tgid, t->busy_since_ns, now);
		}
	}

	if (!check_next)
		return;
	t = bpf_map_lookup_elem(&threads, &next_tid);
	if (!t || t->exited_ns)
		return;
	switched_in(t, next_tid, now ? now : bpf_ktime_get_ns());
}

/* Every context switch of the host runs this: a BTF tracepoint, so the kernel formats no
 * trace record for it, and it reads the two tasks' tids in place. Almost no switch is a loop
 * thread's: two bitmap tests, then nothing. Needs sched_switch's prev_state argument (Linux
 * 5.18); on_switch_record below is for older kernels. */
SEC("tp_btf/sched_switch")
int BPF_PROG(on_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	__u32 prev_tid = prev->pid, next_tid = next->pid;
	bool check_prev = may_be_loop_thread(prev_tid), check_next = may_be_loop_thread(next_tid);

	if (!check_prev && !check_next)
		return 0;
	loop_threads_switch(ctx, check_prev, (__u64)prev->tgid << 32 | prev_tid,
			    check_prev && switch_sleeps(preempt, prev_state, prev),
			    prev->se.sum_exec_runtime, check_next, next_tid);
	return 0;
}

/* The same from the classic tracepoint's record, which the kernel fills for every switch. */
SEC("tracepoint/sched/sched_switch")
int on_switch_record(struct sched_switch_ctx *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 next_tid = ctx->next_pid;
	bool check_prev = may_be_loop_thread((__u32)pid_tgid);
	bool check_next = may_be_loop_thread(next_tid);

	if (!check_prev && !check_next)
		return 0;
	/* prev_state 1 (S) or 2 (D): a sleep; a preempted thread's is another. */
	loop_threads_switch(ctx, check_prev, pid_tgid, ctx->prev_state & 3,
			    bpf_get_current_task_btf()->se.sum_exec_runtime, check_next, next_tid);
	return 0;
}
