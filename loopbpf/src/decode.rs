//! Ring-buffer bytes -> events: what the kernel side hands over, length-checked before it is
//! read ([`crate::abi`] holds the records' layout). Stack samples come out raw, as captured.

use thiserror::Error;

use crate::abi::{
    BUSY_BEFORE_ATTACH, CapturedFrame, EVENT_BLOCK, EVENT_EXEC, EVENT_GC, EVENT_LOOP_EXIT,
    EVENT_LOOP_FOUND, EVENT_OFF_CPU, EVENT_ON_CPU, GC_INCREMENTAL_MARKING, GC_MARK_SWEEP_COMPACT,
    GC_PROCESS_WEAK_CALLBACKS, JS_FRAMES, KERNEL_FRAMES, RawEvent, RawStackEvent, Record,
    SAMPLE_PERIOD_NS, STACK_COPY, USER_FRAMES, YOUNG_STACK_SPACING,
};

/// Most sampling periods one stack record stands for (one stack a second, `--sample-rate 1`, in
/// a young interval): a bad count from the kernel side cannot make one stack outweigh a
/// block's others.
const MAX_PERIODS: u32 = (1_000_000_000 / SAMPLE_PERIOD_NS) as u32 * YOUNG_STACK_SPACING;

/// Whose stack a sample is, and when it was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleOf {
    pub pid: u32,
    pub tid: u32,
    /// The busy interval it belongs to (its start).
    pub busy_since_ns: u64,
    pub at_ns: u64,
    /// `None` for an on-CPU sample; how long the thread slept for an off-CPU one.
    pub off_cpu_ns: Option<u64>,
    /// On-CPU: the sampling periods of CPU time it stands for (at least 1): a young busy
    /// interval's stacks are taken less often, each standing for more of its time.
    pub periods: u64,
}

/// A stack of a busy loop thread, addresses leaf first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackSample {
    pub of: SampleOf,
    /// User frames, leaf first: the kernel's frame-pointer walk.
    pub user: Vec<u64>,
    pub kernel: Vec<u64>,
    /// User registers (ip, sp, bp) when the stack was taken.
    pub regs: [u64; 3],
    /// The top of the user stack from sp - [`crate::abi::RED_ZONE`], for unwinding.
    pub stack: Vec<u8>,
    /// The frame-pointer chain with what its V8 slots pointed at when the sample was taken.
    pub captured: Vec<CapturedFrame>,
}

/// What happened, as the kernel side reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A busy interval at or over the threshold ended at the loop's next poll wait.
    Block {
        pid: u32,
        tid: u32,
        start_ns: u64,
        end_ns: u64,
        /// It began before loopbpf attached: `start_ns` is the attach time.
        before_attach: bool,
        /// Of its time, how long the thread was ready to run but waited for a CPU.
        waited_ns: u64,
    },
    /// A loop thread was found (or moved to a new loop).
    LoopFound {
        pid: u32,
        tid: u32,
        loop_addr: u64,
        at_ns: u64,
    },
    /// A loop thread exited; `busy_since_ns` is set when it died busy.
    LoopExit {
        pid: u32,
        tid: u32,
        busy_since_ns: Option<u64>,
        at_ns: u64,
        before_attach: bool,
        /// Of the busy interval it died in, how long it waited for a CPU.
        waited_ns: u64,
    },
    /// Where a busy loop thread was running, or where it slept.
    Stack(StackSample),
    /// A process called execve (fleet mode): it may run a libuv program now.
    Exec { pid: u32, at_ns: u64 },
    /// A V8 garbage-collection pause of a loop thread.
    Gc {
        pid: u32,
        tid: u32,
        start_ns: u64,
        end_ns: u64,
        kind: GcKind,
    },
}

/// What kind of GC a pause was, as Node's `perf_hooks` and prom-client name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GcKind {
    /// Scavenge or minor mark-sweep: the young generation.
    Minor,
    /// Mark-sweep-compact: the whole heap.
    Major,
    /// A step of incremental marking.
    Incremental,
    /// Processing weak callbacks (finalizers).
    WeakCallbacks,
}

impl GcKind {
    /// From V8's `GCType` bits (`LOOPBPF_GC_*`).
    pub fn from_gc_type(gc_type: u32) -> Self {
        match gc_type {
            GC_MARK_SWEEP_COMPACT => Self::Major,
            GC_INCREMENTAL_MARKING => Self::Incremental,
            GC_PROCESS_WEAK_CALLBACKS => Self::WeakCallbacks,
            _ => Self::Minor,
        }
    }

    /// The label prom-client and OpenTelemetry use.
    pub fn label(self) -> &'static str {
        match self {
            Self::Minor => "minor",
            Self::Major => "major",
            Self::Incremental => "incremental",
            Self::WeakCallbacks => "weakcb",
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event record of kind {kind} with {len} bytes, expected {expected}")]
    Length {
        kind: u32,
        len: usize,
        expected: usize,
    },
    #[error("event record of unknown kind {0}")]
    Kind(u32),
}

impl Event {
    /// Decodes one ring-buffer record.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let kind = bytes
            .get(..4)
            .map(|k| u32::from_ne_bytes(k.try_into().unwrap()))
            .ok_or(DecodeError::Length {
                kind: 0,
                len: bytes.len(),
                expected: size_of::<RawEvent>(),
            })?;
        match kind {
            EVENT_ON_CPU | EVENT_OFF_CPU => {
                let raw: RawStackEvent = read_record(kind, bytes)?;
                let user = &raw.user[..(raw.user_depth as usize).min(USER_FRAMES)];
                let kernel = &raw.kernel[..(raw.kernel_depth as usize).min(KERNEL_FRAMES)];
                let stack = &raw.stack[..(raw.stack_len as usize).min(STACK_COPY)];
                let captured = &raw.js[..(raw.js_depth as usize).min(JS_FRAMES)];
                Ok(Self::Stack(StackSample {
                    of: SampleOf {
                        pid: raw.pid,
                        tid: raw.tid,
                        busy_since_ns: raw.busy_since_ns,
                        at_ns: raw.at_ns,
                        off_cpu_ns: (kind == EVENT_OFF_CPU).then_some(raw.off_cpu_ns),
                        periods: u64::from(raw.periods.clamp(1, MAX_PERIODS)),
                    },
                    user: user.to_vec(),
                    kernel: kernel.to_vec(),
                    regs: [raw.user_ip, raw.user_sp, raw.user_bp],
                    stack: stack.to_vec(),
                    captured: captured.to_vec(),
                }))
            }
            EVENT_BLOCK | EVENT_LOOP_FOUND | EVENT_LOOP_EXIT | EVENT_EXEC | EVENT_GC => {
                let RawEvent {
                    pid,
                    tid,
                    start_ns,
                    end_ns,
                    loop_addr,
                    flags,
                    waited_ns,
                    ..
                } = read_record(kind, bytes)?;
                let before_attach = flags & BUSY_BEFORE_ATTACH != 0;
                Ok(match kind {
                    EVENT_BLOCK => Self::Block {
                        pid,
                        tid,
                        start_ns,
                        end_ns,
                        before_attach,
                        waited_ns,
                    },
                    EVENT_LOOP_FOUND => Self::LoopFound {
                        pid,
                        tid,
                        loop_addr,
                        at_ns: end_ns,
                    },
                    EVENT_EXEC => Self::Exec { pid, at_ns: end_ns },
                    EVENT_GC => Self::Gc {
                        pid,
                        tid,
                        start_ns,
                        end_ns,
                        kind: GcKind::from_gc_type(flags),
                    },
                    _ => Self::LoopExit {
                        pid,
                        tid,
                        busy_since_ns: (start_ns != 0).then_some(start_ns),
                        at_ns: end_ns,
                        before_attach,
                        waited_ns,
                    },
                })
            }
            other => Err(DecodeError::Kind(other)),
        }
    }
}

/// A record from ring-buffer bytes, which must be exactly its size.
fn read_record<T: Record>(kind: u32, bytes: &[u8]) -> Result<T, DecodeError> {
    if bytes.len() != size_of::<T>() {
        return Err(DecodeError::Length {
            kind,
            len: bytes.len(),
            expected: size_of::<T>(),
        });
    }
    // SAFETY: `bytes` holds size_of::<T>() initialised bytes, and `T: Record` promises any
    // such bytes are a valid T; read_unaligned because ring-buffer bytes carry no alignment
    // promise to Rust.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes_of(raw: &RawEvent) -> Vec<u8> {
        // SAFETY: RawEvent is repr(C) integers without padding.
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(raw).cast::<u8>(), size_of::<RawEvent>())
        }
        .to_vec()
    }

    #[test]
    fn decodes_each_kind() {
        let raw = RawEvent {
            kind: 1,
            pid: 10,
            tid: 11,
            start_ns: 5,
            end_ns: 9,
            waited_ns: 3,
            ..RawEvent::default()
        };
        assert_eq!(
            Event::decode(&bytes_of(&raw)),
            Ok(Event::Block {
                pid: 10,
                tid: 11,
                start_ns: 5,
                end_ns: 9,
                before_attach: false,
                waited_ns: 3,
            })
        );
        let raw = RawEvent {
            kind: 3,
            pid: 10,
            tid: 12,
            start_ns: 0,
            end_ns: 9,
            ..RawEvent::default()
        };
        assert_eq!(
            Event::decode(&bytes_of(&raw)),
            Ok(Event::LoopExit {
                pid: 10,
                tid: 12,
                busy_since_ns: None,
                at_ns: 9,
                before_attach: false,
                waited_ns: 0,
            })
        );
    }

    /// Property: whatever the bytes (random, or a valid record of any kind with random fields,
    /// cut short or lengthened), decoding returns, never panics.
    #[test]
    fn any_bytes_decode_or_fail_without_panicking() {
        // xorshift64*: deterministic, so a failure reproduces.
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            state.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let sizes = [size_of::<RawEvent>(), size_of::<RawStackEvent>()];
        for round in 0..20_000 {
            let base = sizes[round % 2];
            let len = match next() % 4 {
                0 => base,
                1 => (next() as usize) % (base + 1),
                2 => base + 1 + (next() as usize) % 64,
                _ => (next() as usize) % 256,
            };
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if len >= 4 {
                // Mostly kinds that exist, so the per-kind decoding is exercised.
                let kind = (next() % 9) as u32;
                bytes[..4].copy_from_slice(&kind.to_ne_bytes());
            }
            if let Ok(Event::Stack(sample)) = Event::decode(&bytes) {
                assert!(sample.user.len() <= USER_FRAMES && sample.kernel.len() <= KERNEL_FRAMES);
            }
        }
    }

    #[test]
    fn rejects_truncated_long_and_unknown_records() {
        let raw = RawEvent {
            kind: 1,
            ..RawEvent::default()
        };
        let bytes = bytes_of(&raw);
        assert!(matches!(
            Event::decode(&bytes[..7]),
            Err(DecodeError::Length { len: 7, .. })
        ));
        assert!(matches!(
            Event::decode(&[1, 0]),
            Err(DecodeError::Length { len: 2, .. })
        ));
        assert!(Event::decode(&[]).is_err());
        // A stack record cut short, or a small record claiming to be a stack.
        let mut stack = vec![0u8; size_of::<RawStackEvent>()];
        stack[0] = 4;
        assert!(matches!(Event::decode(&stack), Ok(Event::Stack(_))));
        assert!(Event::decode(&stack[..100]).is_err());
        let raw = RawEvent {
            kind: 5,
            ..RawEvent::default()
        };
        assert!(Event::decode(&bytes_of(&raw)).is_err());
        let mut long = bytes.clone();
        long.push(0);
        assert!(Event::decode(&long).is_err());
        let raw = RawEvent {
            kind: 99,
            ..RawEvent::default()
        };
        assert_eq!(Event::decode(&bytes_of(&raw)), Err(DecodeError::Kind(99)));
    }

    #[test]
    fn stack_depths_beyond_the_arrays_are_clamped() {
        let mut stack = vec![0xffu8; size_of::<RawStackEvent>()];
        stack[..4].copy_from_slice(&5u32.to_ne_bytes());
        let Ok(Event::Stack(sample)) = Event::decode(&stack) else {
            panic!("not a stack")
        };
        assert_eq!(sample.user.len(), USER_FRAMES);
        assert_eq!(sample.kernel.len(), KERNEL_FRAMES);
        assert!(sample.of.off_cpu_ns.is_some());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every length up to two records, many bit patterns.
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        for len in (0..(2 * size_of::<RawEvent>())).chain([size_of::<RawStackEvent>()]) {
            for _ in 0..64 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        seed as u8
                    })
                    .collect();
                let mut bytes = bytes;
                if let Some(kind) = bytes.get_mut(..4) {
                    // Known kinds too, not only garbage ones.
                    kind.copy_from_slice(&(u32::from(kind[0]) % 7).to_ne_bytes());
                }
                let _ = Event::decode(&bytes);
            }
        }
    }
}
