//! What ran during a block: the stacks sampled in one busy interval, kept as addresses while
//! the interval lasts, then weighted and named once it turns out to be a block.
//!
//! On-CPU samples share the block's on-CPU time (its duration minus the time it slept);
//! off-CPU stacks weigh exactly the time the thread slept there.

use std::collections::HashMap;

use serde::Serialize;

use super::{
    frame::Frame,
    request::{Request, RequestWeights},
    symbolize::{NamedJs, Symbolizer},
    v8::{JsFrameRef, JsNamer},
};
use crate::decode::{SampleOf, StackSample};

/// Most distinct stacks kept for one busy interval (a loop hung for minutes stays bounded).
const MAX_DISTINCT_STACKS: usize = 4096;

/// A stack sample once unwound, its JS frames found on the stack (named only if it turns out to
/// belong to a block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub of: SampleOf,
    /// User frames, leaf first.
    pub user: Vec<u64>,
    pub kernel: Vec<u64>,
    /// The JS frames among `user`.
    pub js: Vec<JsFrameRef>,
    /// The HTTP request its JS frames ran for, when one was found.
    pub request: Option<Request>,
}

impl Sample {
    /// A sample with the kernel's frame-pointer walk only (nothing to unwind or name it with).
    pub fn unwound_by_kernel(raw: StackSample) -> Self {
        Self {
            of: raw.of,
            user: raw.user,
            kernel: raw.kernel,
            js: Vec::new(),
            request: None,
        }
    }

    pub fn with_frames(
        raw: &StackSample,
        user: Vec<u64>,
        js: Vec<JsFrameRef>,
        request: Option<Request>,
    ) -> Self {
        Self {
            of: raw.of,
            user,
            kernel: raw.kernel.clone(),
            js,
            request,
        }
    }
}

/// A stack as captured: user and kernel addresses, leaf first.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StackKey {
    pub on_cpu: bool,
    pub user: Vec<u64>,
    pub kernel: Vec<u64>,
    /// The JS frames among `user` that V8's heap named.
    pub js: Vec<JsFrameRef>,
}

/// The stacks of one busy interval, not yet named.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawStacks {
    /// Distinct stacks: on-CPU sampling periods, or off-CPU nanoseconds.
    pub stacks: HashMap<StackKey, u64>,
    /// The sampling periods the on-CPU samples stand for, together.
    pub on_cpu_samples: u64,
    pub off_cpu_ns: u64,
    /// The requests the samples ran for.
    pub requests: RequestWeights,
}

impl RawStacks {
    pub fn add(&mut self, sample: Sample) {
        let periods = sample.of.periods.max(1);
        if let Some(request) = sample.request {
            self.requests.add(request, sample.of.off_cpu_ns, periods);
        }
        let key = StackKey {
            on_cpu: sample.of.off_cpu_ns.is_none(),
            user: sample.user,
            kernel: sample.kernel,
            js: sample.js,
        };
        let weight = match sample.of.off_cpu_ns {
            None => {
                self.on_cpu_samples += periods;
                periods
            }
            Some(ns) => {
                self.off_cpu_ns += ns;
                ns
            }
        };
        if self.stacks.len() < MAX_DISTINCT_STACKS || self.stacks.contains_key(&key) {
            *self.stacks.entry(key).or_insert(0) += weight;
        }
    }
}

/// One named stack of a block and how much of the block it accounts for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NamedStack {
    pub weight_ns: u64,
    pub on_cpu: bool,
    /// Leaf first: user frames, then (for off-CPU stacks) the kernel frames above them first.
    pub frames: Vec<Frame>,
}

/// What ran during a block.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BlockProfile {
    pub on_cpu_ns: u64,
    pub off_cpu_ns: u64,
    /// Heaviest first.
    pub stacks: Vec<NamedStack>,
    /// The HTTP request the block ran for, when one was found on its stacks.
    pub request: Option<Request>,
}

/// Weights and names the stacks of a block of `duration_ns`; JS frames by `js_namer` when
/// V8's heap named them. The on-CPU stacks share the time the thread was not asleep, its
/// waits for a CPU included: the code they show was under way then (a wall-clock profile).
pub fn profile(
    raw: &RawStacks,
    duration_ns: u64,
    symbolizer: &mut Symbolizer,
    js_namer: Option<&JsNamer>,
) -> BlockProfile {
    let off_cpu_ns = raw.off_cpu_ns.min(duration_ns);
    let on_cpu_ns = duration_ns - off_cpu_ns;
    let mut named: HashMap<(bool, Vec<Frame>), u64> = HashMap::new();
    for (key, &weight) in &raw.stacks {
        let weight_ns = if key.on_cpu {
            // u128: a hang of hours times thousands of samples overflows u64.
            (u128::from(on_cpu_ns) * u128::from(weight) / u128::from(raw.on_cpu_samples.max(1)))
                as u64
        } else {
            weight.min(duration_ns)
        };
        let mut frames = symbolizer.kernel(&key.kernel);
        let mut js: Vec<NamedJs> = Vec::with_capacity(key.js.len());
        for r in &key.js {
            match js_namer.and_then(|namer| namer.frame(r.id)) {
                Some(frame) => js.push(NamedJs {
                    pc: r.pc,
                    ends_frame: r.ends_frame,
                    frame,
                }),
                // An unnamed function still ends its physical frame.
                None if r.ends_frame => {
                    if let Some(last) = js.last_mut().filter(|last| last.pc == r.pc) {
                        last.ends_frame = true;
                    }
                }
                None => {}
            }
        }
        frames.extend(symbolizer.user(&key.user, &js));
        *named.entry((key.on_cpu, frames)).or_insert(0) += weight_ns;
    }
    let mut stacks: Vec<NamedStack> = named
        .into_iter()
        .map(|((on_cpu, frames), weight_ns)| NamedStack {
            weight_ns,
            on_cpu,
            frames,
        })
        .collect();
    stacks.sort_by(|a, b| {
        b.weight_ns
            .cmp(&a.weight_ns)
            .then(a.frames.len().cmp(&b.frames.len()))
    });
    BlockProfile {
        on_cpu_ns,
        off_cpu_ns,
        stacks,
        request: raw.requests.heaviest(on_cpu_ns, raw.on_cpu_samples),
    }
}

/// Frames from the root up to and including the loop's own `uv_run` are the runtime's plumbing
/// (main, `node::Start`, `node::SpinEventLoop`, a worker's thread entry): the loop itself, the
/// same under every block. Returns the frames above it, leaf first. The private loop that
/// `execSync` runs (a `uv_run` called by node's synchronous process runner) is kept: it is part
/// of what blocked, even when the stack is too deep to reach the outer loop.
pub fn above_the_loop(frames: &[Frame]) -> &[Frame] {
    let is_loop = |i: usize| {
        &*frames[i].name == "uv_run"
            && !frames
                .get(i + 1)
                .is_some_and(|caller| caller.name.contains("SyncProcessRunner"))
    };
    match (1..frames.len()).rev().find(|&i| is_loop(i)) {
        Some(outermost) => &frames[..outermost],
        None => frames,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::frame::FrameKind;

    fn frame(name: &str) -> Frame {
        Frame {
            name: name.into(),
            module: "node".into(),
            file: None,
            line: None,
            column: None,
            original: None,
            kind: FrameKind::Native,
        }
    }

    fn sample(off_cpu_ns: Option<u64>, user: &[u64]) -> Sample {
        Sample {
            of: SampleOf {
                pid: 1,
                tid: 1,
                busy_since_ns: 1,
                at_ns: 2,
                off_cpu_ns,
                periods: 1,
            },
            user: user.to_vec(),
            kernel: Vec::new(),
            js: Vec::new(),
            request: None,
        }
    }

    #[test]
    fn samples_of_a_busy_interval_are_counted_per_distinct_stack() {
        let mut raw = RawStacks::default();
        raw.add(sample(None, &[1, 2]));
        raw.add(sample(None, &[1, 2]));
        raw.add(sample(None, &[3]));
        raw.add(sample(Some(40), &[4]));
        raw.add(sample(Some(60), &[4]));
        assert_eq!(raw.on_cpu_samples, 3);
        assert_eq!(raw.off_cpu_ns, 100);
        assert_eq!(raw.stacks.len(), 3);
        let off = StackKey {
            on_cpu: false,
            user: vec![4],
            kernel: vec![],
            js: vec![],
        };
        assert_eq!(raw.stacks[&off], 100);
    }

    #[test]
    fn a_sample_weighs_the_sampling_periods_it_stands_for() {
        // A young interval's stack stands for 10 periods, an older one's for 5: the block's
        // 30 ms on the CPU are shared 2:1, as the time was spent, not as the stacks were taken.
        let mut raw = RawStacks::default();
        // Two functions of this test binary, so that the two stacks have two names.
        let first = above_the_loop as fn(&[Frame]) -> &[Frame] as usize as u64;
        let second = frame as fn(&str) -> Frame as usize as u64;
        let mut young = sample(None, &[first]);
        young.of.periods = 10;
        raw.add(young);
        let mut old = sample(None, &[second]);
        old.of.periods = 5;
        raw.add(old);
        assert_eq!(raw.on_cpu_samples, 15);
        let mut symbolizer = Symbolizer::new(std::process::id());
        let profile = profile(&raw, 30_000_000, &mut symbolizer, None);
        let weights: Vec<u64> = profile.stacks.iter().map(|s| s.weight_ns).collect();
        assert_eq!(weights, [20_000_000, 10_000_000]);
    }

    #[test]
    fn plumbing_below_the_outermost_uv_run_is_folded() {
        let stack: Vec<Frame> = [
            "leaf",
            "uv_run",
            "node::SyncProcessRunner::TryInitializeAndRunLoop",
            "handler",
            "uv_run",
            "node::Start",
            "main",
        ]
        .map(frame)
        .to_vec();
        let names: Vec<&str> = above_the_loop(&stack)
            .iter()
            .map(|f| f.name.as_ref())
            .collect();
        assert_eq!(
            names,
            [
                "leaf",
                "uv_run",
                "node::SyncProcessRunner::TryInitializeAndRunLoop",
                "handler"
            ]
        );
        // Too deep to reach the outer loop: the private loop is not taken for it.
        let truncated = &stack[..4];
        assert_eq!(above_the_loop(truncated).len(), 4);
        let no_loop = [frame("a"), frame("main")];
        assert_eq!(above_the_loop(&no_loop).len(), 2);
    }
}
