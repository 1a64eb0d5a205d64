//! The readers of `/proc` text (stat, status, statm, environ, syscall, maps, cgroup) on
//! mutated real text and random bytes: never a panic, and bounded time and allocation.

use std::time::{Duration, Instant};

use super::{
    budget::peak::{Rng, measure},
    container::Placement,
    maps::parse_maps,
    proc::{Stat, Status, TaskSyscall, environ_var, mapped_pages, rss_pages},
};

/// Bytes that mean something to these parsers.
const SPECIAL: &[u8] = b"()-:/ \n\t0x=\0rwxps.scopepodkubepods-";

/// `seed` text mutated: bytes flipped, special bytes put in, parts repeated or cut.
pub(crate) fn mutate(rng: &mut Rng, seed: &[u8], max_len: usize) -> Vec<u8> {
    let mut out = seed.to_vec();
    for _ in 0..=rng.below(8) {
        let at = if out.is_empty() {
            0
        } else {
            rng.below(out.len() as u64) as usize
        };
        match rng.below(6) {
            0 if !out.is_empty() => out[at] = rng.next() as u8,
            1 => out.insert(at, SPECIAL[rng.below(SPECIAL.len() as u64) as usize]),
            2 => out.truncate(at),
            3 => {
                let end = (at + 1 + rng.below(64) as usize).min(out.len());
                let part = out[at..end].to_vec();
                for _ in 0..rng.below(64) {
                    out.splice(at..at, part.iter().copied());
                }
            }
            4 => {
                out.splice(at..at, b"99999999999999999999999".iter().copied());
            }
            _ => {
                let n = rng.below(32);
                out.extend((0..n).map(|_| rng.next() as u8));
            }
        }
        out.truncate(max_len);
    }
    out
}

/// Runs `case` on mutations of each seed for at most 1 s (or `cases` cases), each case
/// asserted to allocate at most `max_alloc` bytes.
pub(crate) fn fuzz(seeds: &[Vec<u8>], cases: u64, max_alloc: usize, case: impl Fn(&[u8])) {
    let started = Instant::now();
    let mut rng = Rng::new(14);
    for n in 0..cases {
        if started.elapsed() > Duration::from_secs(1) {
            assert!(n >= 100, "only {n} cases in 1 s");
            return;
        }
        let seed = &seeds[rng.below(seeds.len() as u64) as usize];
        let input = if rng.below(8) == 0 {
            (0..rng.below(512)).map(|_| rng.next() as u8).collect()
        } else {
            mutate(&mut rng, seed, 1 << 16)
        };
        let ((), peak) = measure(|| case(&input));
        assert!(peak <= max_alloc, "{peak} bytes for {input:?}");
    }
}

fn real(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn proc_text_parsers_take_any_text() {
    let seeds = [
        real("/proc/self/stat"),
        real("/proc/self/status"),
        real("/proc/self/statm"),
        real("/proc/self/syscall"),
        b"1 (a) b (c)) R 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20".to_vec(),
        b"7 0x1 0x2 0x3 0x4 0x5 0x6 0x7ffc 0x7f00\n".to_vec(),
    ];
    // Each parser returns at most a few small values: what it allocates is the text's size.
    fuzz(&seeds, 20_000, 4 << 16, |input| {
        let text = String::from_utf8_lossy(input);
        let _ = Stat::parse(&text);
        let _ = Status::parse(&text);
        let _ = rss_pages(&text);
        let _ = mapped_pages(&text);
        let _ = TaskSyscall::parse(&text);
        let _ = environ_var(input, "HOSTNAME");
    });
}

#[test]
fn maps_and_cgroups_take_any_text() {
    let seeds = [
        real("/proc/self/maps"),
        real("/proc/self/cgroup"),
        b"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_5678.slice/\
          cri-containerd-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef.scope\n"
            .to_vec(),
        b"7f00-7f10 r-xp 00001000 08:01 1234 /usr/bin/node (deleted)\n".to_vec(),
    ];
    // A maps entry per line of at most 64 KiB of text, each a few hundred bytes.
    fuzz(&seeds, 20_000, 64 << 16, |input| {
        let text = String::from_utf8_lossy(input);
        let maps = parse_maps(&text);
        assert!(maps.len() <= text.lines().count());
        let placement = Placement::from_cgroup(&text);
        assert!(placement.container.len() <= 12);
    });
}
