//! Budgets for work a target drives: whatever a process puts in its memory (a string that
//! claims gigabytes, a cons string of a million parts, a map chain that loops), reading it
//! costs loopbpf no more than a fixed number of reads and bytes per sample and per second.
//!
//! [`BudgetedMemory`] counts the reads of one process's memory against its [`Limits`] and
//! refuses those past them (a refused read is a failed read: the reader gives up on what it was
//! reading). [`BoundedCache`] keeps what was read within a number of entries and of bytes.

use std::{
    cell::Cell,
    collections::HashMap,
    hash::Hash,
    mem::size_of,
    time::{Duration, Instant},
};

use super::memory::ReadMemory;

/// How much of a process's memory may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Reads for one sample (naming all of its frames).
    pub sample_reads: u64,
    /// Bytes for one sample: room for one large script source, read once to find its lines.
    pub sample_bytes: u64,
    /// Reads per second, on average; a second's worth may be spent at once.
    pub reads_per_second: u64,
    /// Bytes per second, on average; a second's worth may be spent at once.
    pub bytes_per_second: u64,
}

/// What naming the JS frames of one process may read of its memory. Normal naming takes a few
/// hundred reads and kilobytes per sample at the start and tens once the caches are warm (see
/// the test `naming_a_real_node_stays_well_within_budget` of the V8 reader); a script source
/// read to find its line ends is the largest single read.
pub const NAMING_LIMITS: Limits = Limits {
    sample_reads: 16_384,
    sample_bytes: 64 << 20,
    reads_per_second: 100_000,
    bytes_per_second: 64 << 20,
};

/// One process's memory, read within [`Limits`]: per sample, and per second through a token
/// bucket that holds one second's worth.
pub struct BudgetedMemory {
    source: Box<dyn ReadMemory>,
    limits: Limits,
    sample_reads: Cell<u64>,
    sample_bytes: Cell<u64>,
    /// Tokens left in the per-second buckets.
    bucket_reads: Cell<u64>,
    bucket_bytes: Cell<u64>,
    refilled_at: Option<Instant>,
    /// A read of the current sample was refused.
    spent: Cell<bool>,
    /// Reads and bytes over the whole run.
    total_reads: Cell<u64>,
    total_bytes: Cell<u64>,
}

impl BudgetedMemory {
    /// `source` read within `limits`, its buckets full.
    pub fn new(source: Box<dyn ReadMemory>, limits: Limits) -> Self {
        Self {
            source,
            limits,
            sample_reads: Cell::new(0),
            sample_bytes: Cell::new(0),
            bucket_reads: Cell::new(limits.reads_per_second),
            bucket_bytes: Cell::new(limits.bytes_per_second),
            refilled_at: None,
            spent: Cell::new(false),
            total_reads: Cell::new(0),
            total_bytes: Cell::new(0),
        }
    }

    /// A new sample at `now`: its own per-sample budget, and the buckets refilled for the time
    /// since the last one.
    pub fn start_sample(&mut self, now: Instant) {
        let elapsed = self
            .refilled_at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        self.refilled_at = Some(now);
        let refill = |bucket: &Cell<u64>, rate: u64| {
            let added = elapsed.as_nanos().saturating_mul(u128::from(rate)) / 1_000_000_000;
            let added = u64::try_from(added).unwrap_or(u64::MAX);
            bucket.set(bucket.get().saturating_add(added).min(rate));
        };
        refill(&self.bucket_reads, self.limits.reads_per_second);
        refill(&self.bucket_bytes, self.limits.bytes_per_second);
        self.sample_reads.set(0);
        self.sample_bytes.set(0);
        self.spent.set(false);
        self.source.forget_snapshot();
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Whether a read of the current sample was refused.
    pub fn spent(&self) -> bool {
        self.spent.get()
    }

    /// Reads and bytes read over the whole run, and of the current sample.
    #[cfg(test)]
    pub fn used(&self) -> Used {
        Used {
            total_reads: self.total_reads.get(),
            total_bytes: self.total_bytes.get(),
            sample_reads: self.sample_reads.get(),
            sample_bytes: self.sample_bytes.get(),
        }
    }

    /// Takes one read of `len` bytes from the budgets; false (and nothing taken) when any of
    /// them has not enough left.
    fn take(&self, len: usize) -> bool {
        let len = len as u64;
        let (reads, bytes) = (self.sample_reads.get() + 1, self.sample_bytes.get() + len);
        let fits = reads <= self.limits.sample_reads
            && bytes <= self.limits.sample_bytes
            && self.bucket_reads.get() >= 1
            && self.bucket_bytes.get() >= len;
        if !fits {
            self.spent.set(true);
            return false;
        }
        self.sample_reads.set(reads);
        self.sample_bytes.set(bytes);
        self.bucket_reads.set(self.bucket_reads.get() - 1);
        self.bucket_bytes.set(self.bucket_bytes.get() - len);
        self.total_reads.set(self.total_reads.get() + 1);
        self.total_bytes.set(self.total_bytes.get() + len);
        true
    }
}

impl ReadMemory for BudgetedMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.take(buf.len()) && self.source.read(addr, buf)
    }

    fn forget_snapshot(&self) {
        self.source.forget_snapshot();
    }
}

/// What a [`BudgetedMemory`] has read.
#[cfg(test)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Used {
    pub total_reads: u64,
    pub total_bytes: u64,
    pub sample_reads: u64,
    pub sample_bytes: u64,
}

/// A cache bounded in entries and in bytes (the caller's estimate of what each entry keeps,
/// plus its key and value themselves). Full, it is cleared, and counted; an entry larger than
/// the whole bound is refused, and counted.
pub struct BoundedCache<K, V> {
    map: HashMap<K, (V, usize)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    /// Times it was cleared because it was full.
    pub cleared: u64,
    /// Entries not kept because they alone were over the bound.
    pub refused: u64,
}

impl<K: Hash + Eq, V> BoundedCache<K, V> {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        Self {
            map: HashMap::new(),
            bytes: 0,
            max_entries,
            max_bytes,
            cleared: 0,
            refused: 0,
        }
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key).map(|(value, _)| value)
    }

    pub fn contains_key(&self, key: &K) -> bool {
        self.map.contains_key(key)
    }

    /// Keeps `value`, which holds `heap_bytes` beyond its own size; false when refused.
    pub fn insert(&mut self, key: K, value: V, heap_bytes: usize) -> bool {
        // A hash map keeps a control byte and some slack per entry besides the pair.
        let size = heap_bytes.saturating_add(size_of::<(K, V, usize)>() + 8);
        if size > self.max_bytes {
            self.refused += 1;
            return false;
        }
        if let Some((_, old)) = self.map.remove(&key) {
            self.bytes -= old;
        }
        if self.map.len() >= self.max_entries || self.bytes + size > self.max_bytes {
            self.map.clear();
            self.bytes = 0;
            self.cleared += 1;
        }
        self.bytes += size;
        self.map.insert(key, (value, size));
        true
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// The estimated bytes of what is kept.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// Tests' measure of what a piece of work allocates: the peak of bytes live on this thread
/// above where it started (a counting global allocator, in the test binary only).
#[cfg(test)]
pub mod peak {
    use std::{
        alloc::{GlobalAlloc, Layout, System},
        cell::Cell,
    };

    struct Counting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn count(delta: isize) {
        // Not during a thread's teardown, when the counters may be gone.
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    // SAFETY: every call is passed on to the system allocator unchanged; the counting only
    // touches this thread's own counters.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            count(layout.size().cast_signed());
            // SAFETY: the caller keeps `alloc`'s contract, passed on as is.
            unsafe { System.alloc(layout) }
        }

        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            count(-layout.size().cast_signed());
            // SAFETY: the caller keeps `dealloc`'s contract, passed on as is.
            unsafe { System.dealloc(ptr, layout) }
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            count(layout.size().cast_signed());
            // SAFETY: the caller keeps `alloc_zeroed`'s contract, passed on as is.
            unsafe { System.alloc_zeroed(layout) }
        }

        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            count(new_size.cast_signed() - layout.size().cast_signed());
            // SAFETY: the caller keeps `realloc`'s contract, passed on as is.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static COUNTING: Counting = Counting;

    /// `work`'s result, and the most bytes it had allocated on this thread at once.
    pub fn measure<R>(work: impl FnOnce() -> R) -> (R, usize) {
        let start = LIVE.with(Cell::get);
        PEAK.with(|peak| peak.set(start));
        let result = work();
        let peak = PEAK.with(Cell::get) - start;
        (result, usize::try_from(peak).unwrap_or(0))
    }

    /// A deterministic pseudo-random sequence (xorshift64*), for fuzzing with fixed seeds.
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Self {
            Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
        }

        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        /// A number below `n` (n > 0).
        pub fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn peak_counts_what_is_live_at_once() {
        let ((), peak) = measure(|| {
            let a = vec![0u8; 1 << 20];
            drop(a);
            let b = vec![0u8; 1 << 10];
            drop(b);
        });
        assert!((1 << 20..(1 << 20) + 4096).contains(&peak), "{peak}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory where every read succeeds (zeros).
    struct Zeros;

    impl ReadMemory for Zeros {
        fn read(&self, _: u64, buf: &mut [u8]) -> bool {
            buf.fill(0);
            true
        }
    }

    const SMALL: Limits = Limits {
        sample_reads: 10,
        sample_bytes: 100,
        reads_per_second: 25,
        bytes_per_second: 1000,
    };

    #[test]
    fn a_sample_gets_its_reads_and_bytes_and_no_more() {
        let mut memory = BudgetedMemory::new(Box::new(Zeros), SMALL);
        let start = Instant::now();
        memory.start_sample(start);
        assert!((0..10).all(|_| memory.u8(0x1000).is_some()));
        assert!(!memory.spent());
        assert_eq!(memory.u8(0x1000), None, "the 11th read of a sample");
        assert!(memory.spent());
        memory.start_sample(start);
        assert!(!memory.spent());
        assert!(memory.bytes(0x1000, 100).is_some());
        assert_eq!(memory.u8(0x1000), None, "over the sample's bytes");
        assert_eq!(memory.bytes(0x1000, 101), None);
        let used = memory.used();
        assert_eq!((used.total_reads, used.total_bytes), (11, 110));
    }

    #[test]
    fn the_per_second_bucket_empties_and_refills_with_time() {
        let mut memory = BudgetedMemory::new(Box::new(Zeros), SMALL);
        let start = Instant::now();
        // 25 reads a second: two samples of 10, then 5 left.
        for _ in 0..2 {
            memory.start_sample(start);
            assert!((0..10).all(|_| memory.u8(0).is_some()));
        }
        memory.start_sample(start);
        assert_eq!((0..10).filter(|_| memory.u8(0).is_some()).count(), 5);
        assert!(memory.spent());
        // 200 ms later: 5 more.
        memory.start_sample(start + Duration::from_millis(200));
        assert_eq!((0..10).filter(|_| memory.u8(0).is_some()).count(), 5);
        // Long after: full, but never more than a second's worth.
        memory.start_sample(start + Duration::from_hours(1));
        assert_eq!(memory.bucket_reads.get(), 25);
    }

    #[test]
    fn a_cache_stays_within_its_bytes_and_entries() {
        let mut cache = BoundedCache::new(4, 1000);
        let overhead = size_of::<(u32, String, usize)>() + 8;
        assert!(cache.insert(1, "a".repeat(100), 100));
        assert!(cache.insert(2, "b".repeat(100), 100));
        assert_eq!(cache.bytes(), 2 * (100 + overhead));
        // Replacing an entry counts it once.
        assert!(cache.insert(2, "c".repeat(100), 100));
        assert_eq!((cache.len(), cache.bytes()), (2, 2 * (100 + overhead)));
        // Larger than the whole bound: refused, and what is kept stays.
        assert!(!cache.insert(3, String::new(), 5000));
        assert_eq!((cache.len(), cache.refused), (2, 1));
        // Over the bytes: cleared first.
        assert!(cache.insert(4, "d".repeat(800), 800));
        assert_eq!((cache.len(), cache.cleared), (1, 1));
        assert_eq!(cache.get(&4).map(String::len), Some(800));
        assert!(cache.bytes() <= 1000);
        // Over the entries: cleared first.
        for key in 10..13 {
            cache.insert(key, String::new(), 0);
        }
        assert_eq!((cache.len(), cache.cleared), (4, 1));
        cache.insert(13, String::new(), 0);
        assert_eq!((cache.len(), cache.cleared), (1, 2));
    }
}
