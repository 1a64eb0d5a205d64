//! Fleet mode (`--all`): processes come and go. One uprobe serves every process that runs a
//! libuv file, and comes off when the last of them is forgotten; processes that exec'd are
//! looked at for libuv, right away and a second later; watched processes are found gone (their
//! pid's start time changed) and forgotten after `--keep-exited`. Those decisions are functions
//! over the table of watched processes, tested here on a fake `/proc`.

use std::{
    collections::{HashMap, HashSet, hash_map::Entry},
    os::fd::{AsRawFd, OwnedFd},
};

use super::{
    Session,
    process::{Lifetime, Seed},
};
use crate::{
    discover::{self, LibuvCache, Target},
    target::{files::FileId, proc::Process, start_time},
};

/// How long after an exec fleet mode looks again for libuv in the new program: a shared libuv
/// is mapped by the dynamic loader, a moment after the exec.
const EXEC_SECOND_LOOK_NS: u64 = 1_000_000_000;

/// Fleet mode's discovery state.
#[derive(Default)]
pub(super) struct Fleet {
    pub(super) cache: LibuvCache,
    /// Files probed already, with their `libuvs` entry: one uprobe serves every process that
    /// runs the file. Their probes come off when the last of those processes is forgotten.
    pub(super) probed: HashMap<FileId, u32>,
    /// Files that could not be probed: not tried again.
    pub(super) unprobeable: HashSet<FileId>,
    /// Processes that exec'd, to look at for libuv.
    execs: Vec<ExecLook>,
    pub(super) attach_failures: u64,
    exits: Exits,
}

/// Each watched process's pidfd, readable once it has exited: one `poll` a tick says which
/// processes to look at, instead of a read of `/proc/PID/stat` for each.
#[derive(Default)]
struct Exits {
    pidfds: HashMap<u32, OwnedFd>,
}

impl Exits {
    /// Of the processes `alive` as far as the session knows, those that may be gone: their
    /// pidfd says they exited, or they have none (new ones, whose pid may have been taken by
    /// another process before the pidfd was opened, and any whose pidfd could not be opened:
    /// gone already, or no file descriptor left).
    fn may_be_gone(&mut self, alive: &HashSet<u32>) -> HashSet<u32> {
        self.pidfds.retain(|pid, _| alive.contains(pid));
        let mut maybe = HashSet::new();
        for &pid in alive {
            if let Entry::Vacant(entry) = self.pidfds.entry(pid) {
                if let Ok(fd) = super::wake::pidfd(pid) {
                    entry.insert(fd);
                }
                maybe.insert(pid);
            }
        }
        let (pids, mut polled): (Vec<u32>, Vec<libc::pollfd>) = self
            .pidfds
            .iter()
            .filter(|(pid, _)| !maybe.contains(pid))
            .map(|(pid, fd)| {
                let poll = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                (*pid, poll)
            })
            .unzip();
        // SAFETY: `polled` is a valid array of its length; a timeout of 0 does not block.
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, 0) };
        if ready < 0 {
            return alive.clone(); // every one is looked at, as without pidfds
        }
        maybe.extend(
            pids.iter()
                .zip(&polled)
                .filter(|(_, poll)| poll.revents != 0)
                .map(|(pid, _)| *pid),
        );
        maybe
    }
}

/// A process that exec'd, to look at for libuv.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExecLook {
    pid: u32,
    when_ns: u64,
    looks_left: u8,
}

impl Fleet {
    /// Looks at `pid` for libuv now and once more a second later.
    pub(super) fn exec_seen(&mut self, pid: u32, at_ns: u64) {
        self.execs.push(ExecLook {
            pid,
            when_ns: at_ns,
            looks_left: 2,
        });
    }

    /// When the next look at a process that exec'd is due, if one is.
    pub(super) fn next_exec_ns(&self) -> Option<u64> {
        self.execs.iter().map(|look| look.when_ns).min()
    }

    /// The processes due for a look at `now_ns`; each is kept for its next look, if any.
    fn due_execs(&mut self, now_ns: u64) -> Vec<u32> {
        let mut due = Vec::new();
        self.execs.retain_mut(|look| {
            if look.when_ns > now_ns {
                return true;
            }
            due.push(look.pid);
            look.looks_left -= 1;
            look.when_ns = now_ns + EXEC_SECOND_LOOK_NS;
            look.looks_left > 0
        });
        due
    }
}

/// What fleet mode asks of `/proc`: a fake one in the tests.
pub(super) trait ProcessTable {
    /// A process's start time, which names it together with its pid; `None` once it is gone.
    fn start_time(&self, pid: u32) -> Option<u64>;
    fn thread_exists(&self, pid: u32, tid: u32) -> bool;
}

/// The host's `/proc`.
pub(super) struct Proc;

impl ProcessTable for Proc {
    fn start_time(&self, pid: u32) -> Option<u64> {
        start_time(pid)
    }

    fn thread_exists(&self, pid: u32, tid: u32) -> bool {
        Process::new(pid).has_task(tid)
    }
}

/// Watched processes that are gone now: exited, or their pid taken by another process.
fn found_gone<'a>(
    watched: impl Iterator<Item = (u32, &'a Lifetime)>,
    table: &impl ProcessTable,
) -> Vec<u32> {
    watched
        .filter(|(pid, life)| {
            life.gone_ns.is_none()
                && (life.start_time.is_none() || table.start_time(*pid) != life.start_time)
        })
        .map(|(pid, _)| pid)
        .collect()
}

/// Gone processes kept for `keep_ns` already: to forget now.
fn expired<'a>(
    watched: impl Iterator<Item = (u32, &'a Lifetime)>,
    now_ns: u64,
    keep_ns: u64,
) -> Vec<u32> {
    watched
        .filter(|(_, life)| {
            life.gone_ns
                .is_some_and(|gone| now_ns.saturating_sub(gone) >= keep_ns)
        })
        .map(|(pid, _)| pid)
        .collect()
}

impl Session<'_> {
    /// Fleet mode: every libuv process running now.
    pub(super) fn watch_running_processes(&mut self) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        for target in discover::libuv_processes(&mut fleet.cache) {
            self.watch_in_fleet(target, Seed::Running);
        }
    }

    /// Fleet mode: probes the process's libuv unless its file is probed already, then watches.
    pub(super) fn watch_in_fleet(&mut self, target: Target, seed: Seed) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        if self.processes.contains_key(&target.pid)
            || fleet.unprobeable.contains(&target.libuv_file)
        {
            return;
        }
        if !fleet.probed.contains_key(&target.libuv_file) {
            let which = match self.probes.attach_uprobe(&target.libuv, None) {
                Ok(which) => which,
                Err(e) => {
                    warning!("pid {} ({}) is not watched: {e}", target.pid, target.comm);
                    fleet.attach_failures += 1;
                    fleet.unprobeable.insert(target.libuv_file);
                    return;
                }
            };
            fleet.probed.insert(target.libuv_file.clone(), which);
            self.attach_gc(&target, None, which);
        }
        let (pid, comm, file) = (target.pid, target.comm.clone(), target.libuv_file.clone());
        if let Err(e) = self.watch(target, seed) {
            // One that exited meanwhile is no failure.
            if Proc.start_time(pid).is_some() {
                warning!("pid {pid} ({comm}) is not fully watched: {e:#}");
                if let Some(fleet) = self.fleet.as_mut() {
                    fleet.attach_failures += 1;
                }
            }
            self.release_if_unused(&file);
        }
    }

    /// Fleet mode: takes the probes off a libuv file no watched process runs (one started
    /// later has them put back).
    pub(super) fn release_if_unused(&mut self, file: &FileId) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        if self
            .processes
            .values()
            .any(|p| &p.target.libuv_file == file)
        {
            return;
        }
        if let Some(which) = fleet.probed.remove(file) {
            self.probes.release_libuv(which);
        }
    }

    /// Fleet mode: looks at processes that exec'd for libuv, once right away and once a
    /// second later.
    pub(super) fn look_at_execs(&mut self, now_ns: u64) {
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        for pid in fleet.due_execs(now_ns) {
            let Some(fleet) = self.fleet.as_mut() else {
                return;
            };
            if self
                .processes
                .get(&pid)
                .is_some_and(|p| p.life.gone_ns.is_none())
            {
                continue; // its probe found it first
            }
            if let Ok(target) = discover::find_target(pid, &mut fleet.cache) {
                // The program it ran before is gone for good.
                self.forget_process(pid);
                self.watch_in_fleet(target, Seed::Fresh);
            }
        }
    }

    /// Fleet mode, once a second: finds processes that are gone, and forgets those gone for
    /// longer than `--keep-exited` (threads that are gone: `reconcile`, in every mode).
    pub(super) fn tend_fleet(&mut self, now_ns: u64) {
        if self.fleet.is_none() {
            return;
        }
        let alive: HashSet<u32> = self
            .processes
            .iter()
            .filter(|(_, p)| p.life.gone_ns.is_none())
            .map(|(pid, _)| *pid)
            .collect();
        let Some(fleet) = self.fleet.as_mut() else {
            return;
        };
        let maybe = fleet.exits.may_be_gone(&alive);
        let watched = self
            .processes
            .iter()
            .filter(|(pid, _)| maybe.contains(pid))
            .map(|(pid, p)| (*pid, &p.life));
        for pid in found_gone(watched, &Proc) {
            self.process_gone(pid, now_ns);
        }
        let keep_ns = self.args.keep_exited.as_nanos() as u64;
        let watched = self.processes.iter().map(|(pid, p)| (*pid, &p.life));
        for pid in expired(watched, now_ns, keep_ns) {
            self.forget_process(pid);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const S: u64 = 1_000_000_000;

    /// `/proc` as a map from pid to start time.
    struct FakeProc(HashMap<u32, u64>);

    impl ProcessTable for FakeProc {
        fn start_time(&self, pid: u32) -> Option<u64> {
            self.0.get(&pid).copied()
        }

        fn thread_exists(&self, pid: u32, _tid: u32) -> bool {
            self.0.contains_key(&pid)
        }
    }

    fn alive(start_time: u64) -> Lifetime {
        Lifetime {
            start_time: Some(start_time),
            gone_ns: None,
        }
    }

    #[test]
    fn gone_are_the_exited_the_reused_and_the_unnamed() {
        let watched = BTreeMap::from([
            (10, alive(100)), // still there
            (11, alive(100)), // exited
            (12, alive(100)), // its pid now another process's
            // exited while being attached: its start time was never read
            (
                13,
                Lifetime {
                    start_time: None,
                    gone_ns: None,
                },
            ),
            // found gone before: not again
            (
                14,
                Lifetime {
                    start_time: Some(100),
                    gone_ns: Some(5),
                },
            ),
        ]);
        let host = FakeProc(HashMap::from([(10, 100), (12, 250), (13, 300)]));
        let gone = found_gone(watched.iter().map(|(pid, l)| (*pid, l)), &host);
        assert_eq!(gone, [11, 12, 13]);
    }

    #[test]
    fn gone_processes_are_forgotten_after_keep_exited() {
        let gone_at = |ns| Lifetime {
            start_time: Some(1),
            gone_ns: Some(ns),
        };
        let watched = BTreeMap::from([(1, gone_at(0)), (2, gone_at(30 * S)), (3, alive(1))]);
        let iter = || watched.iter().map(|(pid, l)| (*pid, l));
        assert_eq!(expired(iter(), 60 * S, 60 * S), [1]);
        assert_eq!(expired(iter(), 90 * S, 60 * S), [1, 2]);
        assert!(expired(iter(), 59 * S, 60 * S).is_empty());
    }

    #[test]
    fn a_process_is_looked_at_when_new_and_once_it_has_exited() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("running sleep");
        let pid = child.id();
        let mut exits = Exits::default();
        let alive = HashSet::from([pid]);
        // New: looked at once (its pid may be another process's by now).
        assert_eq!(exits.may_be_gone(&alive), alive);
        assert!(exits.may_be_gone(&alive).is_empty());
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(exits.may_be_gone(&alive), alive);
        // Found gone: no longer alive, its pidfd is closed.
        assert!(exits.may_be_gone(&HashSet::new()).is_empty());
        assert!(exits.pidfds.is_empty());
    }

    #[test]
    fn an_exec_is_looked_at_now_and_a_second_later() {
        let mut fleet = Fleet::default();
        fleet.exec_seen(7, 10 * S);
        assert!(fleet.due_execs(10 * S - 1).is_empty());
        assert_eq!(fleet.due_execs(10 * S), [7]);
        // The second look, a second after the first.
        assert!(fleet.due_execs(10 * S + S / 2).is_empty());
        assert_eq!(fleet.due_execs(11 * S), [7]);
        assert!(fleet.due_execs(20 * S).is_empty());
        assert!(fleet.execs.is_empty());
    }
}
