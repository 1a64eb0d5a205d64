//! A whole BPF hash map read in one system call per [`CHUNK`] entries (`BPF_MAP_LOOKUP_BATCH`,
//! Linux 5.6), where a walk key by key takes two per entry (`get_next_key`, then the lookup):
//! the state poll reads every loop thread's state, with 50 processes a hundred entries or more.
//! aya 0.14 has no batch lookup.

use std::{
    io,
    mem::MaybeUninit,
    os::fd::{AsFd, AsRawFd},
};

use aya::{Pod, maps::MapData};

/// Entries asked for in one call. A hash map's batch is whole buckets, so a bucket with more
/// entries than this fails with `ENOSPC` (the caller then walks the map).
const CHUNK: usize = 128;

/// `enum bpf_cmd`'s `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every entry of hash map `map`, whose keys are `K` and values `V`; an error where the kernel
/// has no batch lookup for the map (`EINVAL`) or a bucket is too full (`ENOSPC`).
pub(super) fn lookup_all<K: Pod, V: Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![MaybeUninit::<K>::uninit(); CHUNK];
    let mut values = vec![MaybeUninit::<V>::uninit(); CHUNK];
    // Where the next call goes on: the kernel's cursor, a bucket index for hash maps (4 bytes;
    // 8 reserved).
    let mut cursor = 0u64;
    let mut next = 0u64;
    let mut entries = Vec::new();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            // None: from the start.
            in_batch: if first { 0 } else { (&raw const cursor) as u64 },
            out_batch: (&raw mut next) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: CHUNK as u32,
            map_fd: fd.cast_unsigned(),
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid batch attribute of its own size; the kernel writes at most
        // `count` keys and values into buffers that hold `CHUNK` of each, 4 bytes of the cursor
        // into `next` (8 bytes), and the number of entries written back into `attr.count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                size_of::<BatchAttr>(),
            )
        };
        let error = (rc < 0).then(io::Error::last_os_error);
        let written = (attr.count as usize).min(CHUNK);
        for (key, value) in keys.iter().zip(&values).take(written) {
            // SAFETY: the kernel wrote the first `written` keys and values, and any bytes are a
            // valid `K` and `V` (`Pod`).
            entries.push(unsafe { (key.assume_init(), value.assume_init()) });
        }
        match error {
            None => {
                cursor = next;
                first = false;
            }
            // The end of the map: what it holds is all read.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Some(e) => return Err(e),
        }
        if written == 0 {
            return Ok(entries); // no progress: never loop for ever
        }
    }
}

#[cfg(test)]
mod tests {
    use aya::maps::{HashMap, IterableMap};

    use super::*;
    use crate::abi::ThreadState;

    #[test]
    fn a_batch_reads_what_a_walk_reads() {
        // Creating a map needs root (or CAP_BPF): the unit tests run as root, like the others.
        let mut map = HashMap::<MapData, u32, ThreadState>::create(4096, 0)
            .expect("creating a BPF hash map (run the tests as root)");
        assert!(
            lookup_all::<u32, ThreadState>(map.map())
                .unwrap()
                .is_empty()
        );
        // More than one call's worth, each value telling its key.
        for tid in 1..=3 * CHUNK as u32 + 7 {
            let state = ThreadState {
                pid: tid * 3,
                idle_ns: u64::from(tid) << 20,
                ..ThreadState::default()
            };
            map.insert(tid, state, 0).unwrap();
        }
        let mut batch = lookup_all::<u32, ThreadState>(map.map()).unwrap();
        let mut walk: Vec<(u32, ThreadState)> = map.iter().map(Result::unwrap).collect();
        batch.sort_by_key(|(tid, _)| *tid);
        walk.sort_by_key(|(tid, _)| *tid);
        assert_eq!(batch.len(), 3 * CHUNK + 7);
        for ((tid, state), (walk_tid, walk_state)) in batch.iter().zip(&walk) {
            assert_eq!(tid, walk_tid);
            assert_eq!((state.pid, state.idle_ns), (tid * 3, u64::from(*tid) << 20));
            assert_eq!(
                (walk_state.pid, walk_state.idle_ns),
                (state.pid, state.idle_ns)
            );
        }
    }
}
