//! The V8 reader against made-up memory: random heap words, and heaps built to be hostile
//! (strings that claim gigabytes, cons strings that nest without end or share their parts,
//! maps that are their own back pointers, tables of absurd length). Whatever it finds, naming a
//! sample stays within its read budget and a bounded allocation, and never panics.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use super::{
    FrameSlots, JsNamer,
    code::{CodeLayout, DeoptIndices, SplitCode},
    layout::{Layout, ScopeLayout, StringLayout, Types},
    object::ObjectLayout,
};
use crate::{
    abi::{CapturedFrame, RED_ZONE},
    decode::{SampleOf, StackSample},
    target::{
        budget::{
            Limits,
            peak::{Rng, measure},
        },
        memory::ReadMemory,
    },
};

/// Where made-up heap objects live, and how far: pointers stay inside so they alias and loop.
const HEAP: u64 = 0x1000_0000;
const HEAP_SIZE: u64 = 1 << 16;
/// The made-up thread's stack pointer.
const SP: u64 = 0x7ff0_0000_0000;

/// Small budgets, so a case is quick: a sample may read 4096 times and 4 MiB.
const LIMITS: Limits = Limits {
    sample_reads: 4096,
    sample_bytes: 4 << 20,
    reads_per_second: 1 << 40,
    bytes_per_second: 1 << 40,
};

/// A V8 layout as the metadata would give it (the numbers are made up, and consistent).
pub(super) fn layout() -> Layout {
    Layout {
        fp_function: -16,
        fp_context: -8,
        fp_bytecode_array: -32,
        fp_bytecode_offset: -40,
        fp_receiver: 16,
        map: 0,
        instance_type: 12,
        map_constructor: 32,
        map_bit_field2: 10,
        map_bit_field3: 16,
        types: Types {
            first_nonstring: 128,
            js_function: 2000,
            last_js_function: 2010,
            shared_function_info: 180,
            script: 190,
            scope_info: 200,
            bytecode_array: 210,
            byte_array: 220,
            fixed_array: 230,
            debug_info: Some(240),
            uncompiled_data: vec![250, 251],
            map: 260,
            oddball: 270,
            global_proxy: Some(280),
        },
        function_shared: 24,
        sfi_function_data: 8,
        sfi_name_or_scope_info: 16,
        sfi_script: 32,
        script_name: 16,
        script_source: 8,
        script_line_ends: 24,
        uncompiled_inferred_name: 8,
        uncompiled_start: 16,
        bytecode_header: 32,
        position_table: 24,
        unsigned_code_offsets: false,
        array_length: 8,
        fixed_array_data: 16,
        byte_array_data: 16,
        scope: ScopeLayout {
            flags_are_smi: true,
            first_vars: 3,
            module_count_before_names: true,
            function_type: 2,
            module_type: 3,
            fixed_position_slot: None,
        },
        strings: StringLayout {
            length: 12,
            seq_one_byte_chars: 16,
            seq_two_byte_chars: 16,
            cons_first: 16,
            cons_second: 24,
            thin_actual: 16,
            sliced_parent: 16,
            sliced_offset: 24,
            representation_mask: 7,
            encoding_mask: 8,
            seq_tag: 0,
            cons_tag: 1,
            sliced_tag: 3,
            thin_tag: 5,
            one_byte_tag: 8,
        },
        code: Some(std::rc::Rc::new(code_layout())),
        objects: Some(object_layout()),
    }
}

/// Code laid out as V8 12 lays it out (the type tags made up).
fn code_layout() -> CodeLayout {
    CodeLayout {
        header_type: 290,
        header_size: 32,
        split: Some(SplitCode {
            back_pointer: 8,
            instruction_stream: 32,
            instruction_start: 40,
        }),
        code_type: 300,
        instruction_size: 52,
        flags: 48,
        kind_mask: 15,
        optimized_kinds: [11, 12],
        maglev_places_statements: false,
        deopt_data: 8,
        position_table: 16,
        deopt: DeoptIndices {
            inlined_count: 1,
            literal_array: 2,
            shared: 6,
            shared_wrapper_field: None,
            inlining_positions: 7,
            deopt_exit_start: 8,
        },
        literal_array_types: vec![230],
        deopt_data_types: vec![230],
        byte_array_types: vec![220],
    }
}

/// How the made-up V8 keeps objects' properties (as V8 12 does).
fn object_layout() -> ObjectLayout {
    ObjectLayout {
        properties: 8,
        elements: 16,
        descriptors: 40,
        instance_size_words: 8,
        inobject_start_words: 9,
        dictionary_map_bit: 21,
        own_descriptors_mask: 0x000f_fc00,
        own_descriptors_shift: 10,
        descriptor_header: 24,
        descriptor_size: 3,
        descriptor_key: 0,
        descriptor_details: 1,
        descriptor_value: 2,
        kind_mask: 1,
        kind_data: 0,
        location_mask: 32,
        location_field: 0,
        location_shift: 5,
        index_mask: 0x1ff8_0000,
        index_shift: 19,
        representation_mask: 0x1c0,
        representation_shift: 6,
        representation_double: 2,
        dictionary_entries: 6,
        dictionary_entry_size: 3,
        js_object: 1057,
        js_array: 2113,
        symbol: 128,
        symbol_description: 16,
        property_array: 259,
        descriptor_arrays: [236, 237],
    }
}

/// Every type tag the layout knows, and the string types: what random words are drawn from.
fn type_tags(l: &Layout) -> Vec<u16> {
    let t = &l.types;
    let mut tags = vec![
        t.js_function,
        t.shared_function_info,
        t.script,
        t.scope_info,
        t.bytecode_array,
        t.byte_array,
        t.fixed_array,
        t.map,
        t.oddball,
        250,
        240,
        290,
        300,
    ];
    if let Some(o) = &l.objects {
        tags.extend([o.js_object, o.js_array, o.property_array]);
        tags.extend(o.descriptor_arrays);
    }
    // Sequential, cons, sliced, thin; one- and two-byte.
    tags.extend([0, 1, 3, 5, 8, 9, 11, 13]);
    tags
}

/// Made-up memory: the words set, else (with a seed) a random word drawn for the address,
/// else unreadable. Addresses far out (past 2^47) are never readable.
struct FakeHeap {
    words: HashMap<u64, u64>,
    random: Option<(u64, Vec<u16>)>,
}

impl FakeHeap {
    fn new() -> Self {
        Self {
            words: HashMap::new(),
            random: None,
        }
    }

    fn random(seed: u64) -> Self {
        Self {
            words: HashMap::new(),
            random: Some((seed, type_tags(&layout()))),
        }
    }

    fn set(&mut self, addr: u64, word: u64) {
        self.words.insert(addr, word);
    }

    /// The word at an aligned address.
    fn word_at(&self, addr: u64) -> Option<u64> {
        if let Some(&word) = self.words.get(&addr) {
            return Some(word);
        }
        let (seed, tags) = self.random.as_ref()?;
        let mut rng = Rng::new(seed ^ addr.wrapping_mul(0xff51_afd7_ed55_8ccd));
        let pick = rng.below(100);
        Some(match pick {
            // A tagged pointer into the heap: objects alias and loop.
            0..40 => HEAP + (rng.below(HEAP_SIZE) & !7) + 1,
            // A Smi, small or huge, either sign.
            40..55 => (rng.below(64) << 32) | u64::from(rng.below(2) == 0) << 63,
            55..60 => rng.next() & !1,
            // A type tag (a map's instance type) next to a length that claims all it can.
            60..80 => u64::from(tags[rng.below(tags.len() as u64) as usize]) << 32 | 0x7fff_ffff,
            // Text with newlines.
            80..90 => u64::from_le_bytes(*b"ab\ncd\ref"),
            _ => rng.next(),
        })
    }
}

impl ReadMemory for FakeHeap {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let Some(end) = addr.checked_add(buf.len() as u64) else {
            return false;
        };
        if end > 1 << 47 {
            return false;
        }
        for (i, byte) in buf.iter_mut().enumerate() {
            let at = addr + i as u64;
            let Some(word) = self.word_at(at & !7) else {
                return false;
            };
            *byte = (word >> (8 * (at & 7))) as u8;
        }
        true
    }
}

/// A sample whose stack copy holds a chain of `frames` JS-looking frames with random slots.
fn random_sample(rng: &mut Rng, frames: usize) -> StackSample {
    let base = SP - RED_ZONE;
    let mut words = vec![0u64; 64 + frames * 8 + 8];
    let mut captured = Vec::new();
    let random_slot = |rng: &mut Rng| match rng.below(4) {
        0 => rng.next(),
        1 => (rng.below(1 << 20)) << 32,
        _ => HEAP + (rng.below(HEAP_SIZE) & !7) + 1,
    };
    let first = 32;
    for k in 0..frames {
        let at = first + k * 8;
        let fp = base + 8 * at as u64;
        words[at] = base + 8 * (at + 8) as u64; // the caller's frame pointer
        // The return address: sometimes in the heap, among made-up code headers.
        words[at + 1] = if rng.below(2) == 0 {
            HEAP + rng.below(HEAP_SIZE)
        } else {
            0x40_0000 + k as u64
        };
        words[at + 2] = random_slot(rng); // receiver
        words[at - 1] = random_slot(rng); // context
        words[at - 2] = random_slot(rng); // function
        words[at - 3] = rng.below(6); // the argument count, receiver included
        words[at + 3] = random_slot(rng); // the first arguments
        words[at + 4] = random_slot(rng);
        words[at - 4] = random_slot(rng); // bytecode array
        words[at - 5] = random_slot(rng); // bytecode offset
        if rng.below(2) == 0 {
            captured.push(CapturedFrame {
                fp,
                shared: random_slot(rng),
                receiver_map: random_slot(rng),
            });
        }
    }
    StackSample {
        of: SampleOf {
            pid: 1,
            tid: 1,
            busy_since_ns: 0,
            at_ns: 0,
            off_cpu_ns: None,
            periods: 1,
        },
        user: vec![0x40_0000, 0x40_0001],
        kernel: Vec::new(),
        regs: [0x40_0000, SP, base + 8 * first as u64],
        stack: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
        captured,
    }
}

/// The most a sample may allocate: its bytes read, as read and as UTF-16, the line ends
/// of a source that size, and room for what the caches keep.
const MAX_SAMPLE_ALLOCATION: usize = 4 * (4 << 20) + 16 * (4 << 20) + (1 << 20);

#[test]
fn random_heaps_are_named_within_budget() {
    let started = Instant::now();
    let mut cases = 0;
    // Deterministic seeds; stops after 2 s (or 300 heaps) whatever the machine's speed.
    for seed in 0..300u64 {
        if started.elapsed() > Duration::from_secs(2) {
            break;
        }
        cases += 1;
        let mut namer = JsNamer::with_memory(0, layout(), Box::new(FakeHeap::random(seed)), LIMITS);
        let mut rng = Rng::new(seed);
        for _ in 0..4 {
            let frames = 1 + rng.below(24) as usize;
            let sample = random_sample(&mut rng, frames);
            let (refs, peak) = measure(|| namer.js_frames(&sample, &sample.user));
            let used = namer.memory_used();
            assert!(
                used.sample_reads <= LIMITS.sample_reads,
                "seed {seed}: {used:?}"
            );
            assert!(
                used.sample_bytes <= LIMITS.sample_bytes,
                "seed {seed}: {used:?}"
            );
            assert!(peak <= MAX_SAMPLE_ALLOCATION, "seed {seed}: {peak} bytes");
            for r in refs {
                let frame = namer.frame(r.id).expect("a ref names a kept frame");
                assert!(frame.name.chars().count() <= 2 * super::heap::MAX_NAME + 1);
            }
            // The request the frames ran for, within the same sample's budget.
            let (request, peak) = measure(|| namer.request(&sample, true));
            let used = namer.memory_used();
            assert!(
                used.sample_reads <= LIMITS.sample_reads,
                "seed {seed}: {used:?}"
            );
            assert!(peak <= MAX_SAMPLE_ALLOCATION, "seed {seed}: {peak} bytes");
            if let Some(request) = request {
                assert!(request.method.len() <= 16 && request.path.chars().count() <= 2048);
            }
        }
    }
    assert!(cases >= 10, "only {cases} cases in 2 s");
}

/// Properties and headers of random objects, whatever their maps and arrays claim: read
/// within the sample's budget, never a panic.
#[test]
fn random_objects_are_read_within_budget() {
    for seed in 0..200u64 {
        let mut namer = JsNamer::with_memory(0, layout(), Box::new(FakeHeap::random(seed)), LIMITS);
        let mut rng = Rng::new(seed);
        namer.memory.start_sample(Instant::now());
        for _ in 0..64 {
            let object = HEAP + (rng.below(HEAP_SIZE) & !7);
            let map = HEAP + (rng.below(HEAP_SIZE) & !7);
            let ((), peak) = measure(|| {
                namer.properties(object, map, ["method", "url", "rawHeaders"]);
                namer.traceparent(object + 1);
            });
            assert!(peak <= MAX_SAMPLE_ALLOCATION, "seed {seed}: {peak} bytes");
        }
        let used = namer.memory_used();
        assert!(
            used.sample_reads <= LIMITS.sample_reads,
            "seed {seed}: {used:?}"
        );
    }
}

/// A heap built object by object.
pub(super) struct Builder {
    heap: FakeHeap,
    layout: Layout,
    next: u64,
}

impl Builder {
    pub(super) fn new() -> Self {
        Self {
            heap: FakeHeap::new(),
            layout: layout(),
            next: HEAP,
        }
    }

    /// The map of objects of type `t`.
    fn map(&mut self, t: u16) -> u64 {
        let map = 0x0800_0000 + u64::from(t) * 0x100;
        self.heap
            .set((map + self.layout.instance_type) & !7, u64::from(t) << 32);
        map
    }

    /// A new object of type `t` with `size` bytes: its untagged address.
    pub(super) fn object(&mut self, t: u16, size: u64) -> u64 {
        let at = self.next;
        self.next += size.max(16).next_multiple_of(8);
        let map = self.map(t);
        self.heap.set(at + self.layout.map, map + 1);
        at
    }

    pub(super) fn set(&mut self, addr: u64, word: u64) {
        self.heap.set(addr, word);
    }

    pub(super) fn set_length(&mut self, string: u64, length: i32) {
        // The length is the upper half of the word at 8 (offset 12).
        self.set(string + 8, u64::from(length.cast_unsigned()) << 32);
    }

    /// A function whose shared info is named by `name` (a tagged string).
    pub(super) fn shared_named(&mut self, name: u64) -> u64 {
        let shared = self.object(self.layout.types.shared_function_info, 48);
        self.set(shared + self.layout.sfi_name_or_scope_info, name);
        // No script, no function data: Smi 0.
        self.set(shared + self.layout.sfi_script, 0);
        self.set(shared + self.layout.sfi_function_data, 0);
        shared
    }

    pub(super) fn namer(self) -> JsNamer {
        JsNamer::with_memory(0, self.layout, Box::new(self.heap), LIMITS)
    }
}

/// Names a frame whose shared info the kernel side read; with the reads and bytes it took.
fn name_with(namer: &mut JsNamer, shared: u64) -> (Option<String>, u64, u64) {
    namer.memory.start_sample(Instant::now());
    let slots = FrameSlots {
        function: HEAP + 1,
        bytecode_array: None,
        bytecode_offset: None,
        receiver: None,
        captured: Some(CapturedFrame {
            fp: SP,
            shared: shared + 1,
            receiver_map: 0,
        }),
        pc: 0,
        is_return: false,
        leaf_return: None,
    };
    let ids = namer.name_frame(&slots);
    let used = namer.memory_used();
    let name = ids
        .last()
        .and_then(|&id| namer.frame(id))
        .map(|f| f.name.to_string());
    (name, used.sample_reads, used.sample_bytes)
}

#[test]
fn a_string_that_claims_gigabytes_is_read_as_far_as_a_name_goes() {
    let mut b = Builder::new();
    let seq = b.object(8, 1 << 20); // one-byte sequential
    b.set_length(seq, i32::MAX);
    for i in 0..(1 << 17) {
        b.set(seq + 16 + 8 * i, u64::from_le_bytes(*b"abcdefgh"));
    }
    // A slice far into it: only the slice is read, not what comes before.
    let sliced = b.object(11, 32);
    b.set_length(sliced, 1_000_000);
    b.set(sliced + 16, seq + 1);
    b.set(sliced + 24, 900_004 << 32);
    for string in [seq, sliced] {
        let shared = b.shared_named(string + 1);
        let mut namer = Builder {
            heap: FakeHeap {
                words: b.heap.words.clone(),
                random: None,
            },
            layout: layout(),
            next: b.next,
        }
        .namer();
        let (name, reads, bytes) = name_with(&mut namer, shared);
        let name = name.expect("named");
        assert_eq!(name.len(), super::heap::MAX_NAME);
        let expected = if string == seq { "abcd" } else { "efgh" };
        assert!(name.starts_with(expected), "{name}");
        assert!(reads < 32 && bytes < 1024, "{reads} reads, {bytes} bytes");
    }
}

#[test]
fn cons_strings_that_loop_or_share_parts_are_bounded() {
    // A cons string that is its own first part, and one of 40 levels each using the next
    // level twice (2^40 leaves in 40 objects).
    let mut b = Builder::new();
    let looped = b.object(9, 32);
    b.set_length(looped, 10);
    b.set(looped + 16, looped + 1);
    b.set(looped + 24, looped + 1);
    let leaf = b.object(8, 32);
    b.set_length(leaf, 0);
    let mut level = leaf;
    for _ in 0..40 {
        let cons = b.object(9, 32);
        b.set_length(cons, 5);
        b.set(cons + 16, level + 1);
        b.set(cons + 24, level + 1);
        level = cons;
    }
    let shared_looped = b.shared_named(looped + 1);
    let shared_shared = b.shared_named(level + 1);
    let mut namer = b.namer();
    for shared in [shared_looped, shared_shared] {
        let ((name, reads, _), peak) = measure(|| name_with(&mut namer, shared));
        assert_eq!(name, None, "not named from a string that cannot be read");
        assert!(reads <= 4 * 1024, "{reads} reads");
        assert!(peak < 1 << 20, "{peak} bytes");
    }
}

#[test]
fn maps_that_are_their_own_back_pointers_end_the_walk() {
    let mut b = Builder::new();
    let name = b.object(8, 32);
    b.set_length(name, 1);
    b.set(name + 16, u64::from(b'f'));
    let shared = b.shared_named(name + 1);
    // A receiver of a map whose back pointer is itself, and of one in a two-map loop.
    let map_type = b.layout.types.map;
    let (self_map, a, other) = (
        b.object(map_type, 64),
        b.object(map_type, 64),
        b.object(map_type, 64),
    );
    b.set(self_map + 32, self_map + 1);
    b.set(a + 32, other + 1);
    b.set(other + 32, a + 1);
    for map in [self_map, a] {
        b.set(map + 8, 1 << 16); // new_target_is_base (bit_field2, offset 10)
    }
    let receiver = b.object(1000, 32);
    let mut namer = b.namer();
    for map in [self_map, a] {
        namer.memory.start_sample(Instant::now());
        assert_eq!(namer.receiver_type(receiver + 1, map), None);
        assert!(namer.memory_used().sample_reads <= 2 * 1024 + 16);
    }
    // The function is still named, without a class.
    assert_eq!(name_with(&mut namer, shared).0.as_deref(), Some("f"));
}

#[test]
fn a_spent_budget_leaves_frames_unnamed_and_is_counted() {
    let mut b = Builder::new();
    let name = b.object(8, 32);
    b.set_length(name, 3);
    b.set(name + 16, u64::from_le_bytes(*b"run\0\0\0\0\0"));
    let shared = b.shared_named(name + 1);
    let mut namer = JsNamer::with_memory(
        0,
        layout(),
        Box::new(b.heap),
        Limits {
            sample_reads: 2,
            ..LIMITS
        },
    );
    let sample = one_frame_sample(shared);
    assert!(namer.js_frames(&sample, &[]).is_empty());
    assert_eq!(namer.limits_hit().budget_exceeded, 1);
    assert!(namer.functions.len() == 0, "nothing read short is cached");
    namer.memory = crate::target::budget::BudgetedMemory::new(
        Box::new(FakeHeap {
            words: HashMap::new(),
            random: None,
        }),
        LIMITS,
    );
    assert_eq!(
        namer.limits_hit().budget_exceeded,
        1,
        "counted once per sample"
    );
}

/// A sample of one JS frame whose shared info the kernel side read as `shared`.
pub(super) fn one_frame_sample(shared: u64) -> StackSample {
    let mut sample = random_sample(&mut Rng::new(1), 1);
    sample.captured = vec![CapturedFrame {
        fp: sample.regs[2],
        shared: shared + 1,
        receiver_map: 0,
    }];
    // The frame's context must look like a heap object for it to be a JS frame.
    let fp_at = usize::try_from(sample.regs[2] - (SP - RED_ZONE)).unwrap();
    sample.stack[fp_at - 8..fp_at].copy_from_slice(&(HEAP + 1).to_le_bytes());
    sample.stack[fp_at - 16..fp_at - 8].copy_from_slice(&(HEAP + 1).to_le_bytes());
    sample
}

/// A position as V8 writes it: the script offset and the inlining id, each plus one.
fn raw_position(offset: i64, inlining: Option<i64>) -> i64 {
    (inlining.map_or(0, |id| id + 1) << 31) | ((offset + 1) << 1)
}

/// V8's variable-length numbers.
fn vlq(out: &mut Vec<u8>, mut u: u64) {
    loop {
        let byte = (u & 0x7f) as u8;
        u >>= 7;
        if u == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

impl Builder {
    /// A string object holding `name` (one byte a character).
    pub(super) fn string(&mut self, name: &str) -> u64 {
        let string = self.object(8, 16 + name.len() as u64);
        self.set_length(string, i32::try_from(name.len()).unwrap());
        for (i, chunk) in name.as_bytes().chunks(8).enumerate() {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.set(string + 16 + 8 * i as u64, u64::from_le_bytes(word));
        }
        string + 1
    }

    /// An array of `t` holding `words`.
    fn array(&mut self, t: u16, words: &[u64]) -> u64 {
        let array = self.object(t, 16 + 8 * words.len() as u64);
        self.set(array + 8, (words.len() as u64) << 32);
        for (i, &w) in words.iter().enumerate() {
            self.set(array + 16 + 8 * i as u64, w);
        }
        array + 1
    }

    /// A byte array holding `bytes`.
    fn bytes(&mut self, bytes: &[u8]) -> u64 {
        let array = self.object(220, 16 + bytes.len() as u64);
        self.set(array + 8, (bytes.len() as u64) << 32);
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.set(array + 16 + 8 * i as u64, u64::from_le_bytes(word));
        }
        array + 1
    }

    /// Optimized code of `own` (what its deoptimization data names) whose pc is at script
    /// offset 5 of inlining id `at`; `inlined` are the inlining positions (caller's id,
    /// literal index) and `literals` the functions inlined. Returns the pc.
    fn optimized_code(
        &mut self,
        own: u64,
        at: Option<i64>,
        inlined: &[(Option<i64>, i32)],
        literals: &[u64],
    ) -> u64 {
        // Code space before the code: readable, no header in it.
        let filler = self.object(1000, 8192);
        let meta = self.map(self.layout.types.map);
        let header_map = self.map(290);
        self.set(header_map, meta + 1);
        let mut positions = Vec::new();
        for &(caller, function) in inlined {
            positions.extend(raw_position(7, caller).to_le_bytes());
            positions.extend(function.to_le_bytes());
            positions.extend([0; 4]);
        }
        let positions = self.bytes(&positions);
        let count = (literals.len() as u64) << 32;
        let literals: Vec<u64> = literals.iter().map(|l| l + 1).collect();
        let literals = self.array(230, &literals);
        let deopt = self.array(
            230,
            &[0, count, literals, 0, 0, 0, own + 1, positions, 1000 << 32],
        );
        // One entry: code offset 0 (a statement), the position.
        let mut table = Vec::new();
        vlq(&mut table, 2);
        let raw = raw_position(5, at);
        vlq(&mut table, ((raw << 1) ^ (raw >> 63)).cast_unsigned());
        let table = self.bytes(&table);
        let code = self.object(300, 64);
        let stream = self.object(290, 32 + 256);
        let start = stream + 32;
        self.set(code + 8, deopt);
        self.set(code + 16, table);
        self.set(code + 32, stream + 1);
        self.set(code + 40, start);
        self.set(code + 48, (256 << 32) + 12); // size 256, kind TurboFan
        self.set(stream + 8, code + 1);
        for addr in (filler..self.next).step_by(8) {
            self.heap.words.entry(addr).or_insert(0);
        }
        start + 16
    }
}

/// The names of a frame of `shared` whose code runs at `pc`, leaf first.
fn names_at(namer: &mut JsNamer, shared: u64, pc: u64) -> Vec<String> {
    namer.memory.start_sample(Instant::now());
    let slots = FrameSlots {
        function: HEAP + 1,
        bytecode_array: None,
        bytecode_offset: None,
        receiver: None,
        captured: Some(CapturedFrame {
            fp: SP,
            shared: shared + 1,
            receiver_map: 0,
        }),
        pc,
        is_return: false,
        leaf_return: None,
    };
    let ids = namer.name_frame(&slots);
    ids.iter()
        .map(|&id| namer.frame(id).unwrap().name.to_string())
        .collect()
}

#[test]
fn inlined_functions_are_named_only_when_their_chain_checks_out() {
    let chain = |at: Option<i64>, inlined: &[(Option<i64>, i32)], named_by_code: bool| {
        let mut b = Builder::new();
        let strings = ["outer", "price", "weigh"].map(|n| b.string(n));
        let [outer, price, weigh] = strings.map(|n| b.shared_named(n));
        let own = if named_by_code { outer } else { price };
        let pc = b.optimized_code(own, at, inlined, &[weigh, price]);
        let mut namer = b.namer();
        names_at(&mut namer, outer, pc)
    };
    // `weigh` (id 1) inlined into `price` (id 0) inlined into `outer`.
    let good = [(None, 1), (Some(0), 0)];
    assert_eq!(chain(Some(1), &good, true), ["weigh", "price", "outer"]);
    assert_eq!(chain(None, &good, true), ["outer"], "not inlined");
    // What does not check out leaves the frame as it was, named by its function alone.
    assert_eq!(chain(Some(1), &good, false), ["outer"], "another's code");
    let looping = [(Some(1), 1), (Some(0), 0)];
    assert_eq!(chain(Some(1), &looping, true), ["outer"], "a loop");
    let out_of_range = [(None, 1), (Some(0), 7)];
    assert_eq!(chain(Some(1), &out_of_range, true), ["outer"]);
    assert_eq!(chain(Some(9), &good, true), ["outer"], "no such inlining");
}
