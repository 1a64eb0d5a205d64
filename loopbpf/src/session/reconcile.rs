//! Loop threads whose end the session did not hear of: an exit event lost to a full ring buffer
//! (the `threads` map still has the thread, its exit time set), or a thread gone from `/proc`
//! with no exit seen at all. Either way the thread's busy interval ends and the aggregator marks
//! it exited, so no block of a thread that is gone is reported as ongoing.
//!
//! A thread can leave no trace only if it exited before its entry in the `threads` map was
//! made (as the probes were attached): one found in `/proc` after that has its exit seen by
//! the kernel side. So `/proc` is asked once a thread, not once a second.

use std::collections::HashSet;

use super::{End, Session, fleet::ProcessTable};
use crate::{abi::ThreadState, decode::Event, session::fleet::Proc};

impl Session<'_> {
    /// Ends loop threads whose exit event was lost, from what the `threads` map kept of them
    /// (the event, if it was only late, is ignored when it comes); with `look_in_proc`, also
    /// those gone from `/proc` without a word, which are taken out of `threads`. Their blocks
    /// that ended with the exit are reported.
    pub(super) fn reconcile_threads(
        &mut self,
        threads: &mut Vec<(u32, ThreadState)>,
        now_ns: u64,
        look_in_proc: bool,
    ) -> Result<(), End> {
        let mut records = Vec::new();
        let mut gone = Vec::new();
        for &(tid, state) in threads.iter() {
            if state.exited_ns != 0 {
                if !state.is_reported_loop() || self.aggregator.has_exited(tid) {
                    continue;
                }
                self.probes.stop_sampling(tid);
                self.aggregator.update_state(tid, &state);
                let exit = Event::LoopExit {
                    pid: state.pid,
                    tid,
                    busy_since_ns: (state.busy_since_ns != 0).then_some(state.busy_since_ns),
                    at_ns: state.exited_ns,
                    before_attach: state.busy_before_attach != 0,
                    waited_ns: state.waited_ns,
                };
                records.extend(self.aggregator.on_event(&exit));
            } else if !look_in_proc || self.poll.in_proc.get(&tid) == Some(&state.discovered_ns) {
                // Found in /proc after its entry was made: its exit is the kernel side's.
            } else if Proc.thread_exists(state.pid, tid) {
                self.poll.in_proc.insert(tid, state.discovered_ns);
            } else {
                // Ended without any trace of it (it exited as the probes were attached).
                self.probes.forget_thread(tid);
                self.probes.stop_sampling(tid);
                self.aggregator.thread_gone(tid, now_ns);
                gone.push(tid);
            }
        }
        if look_in_proc {
            let live: HashSet<u32> = threads.iter().map(|&(tid, _)| tid).collect();
            self.poll.in_proc.retain(|tid, _| live.contains(tid));
        }
        threads.retain(|(tid, _)| !gone.contains(tid));
        for tid in self.aggregator.take_exited_tids() {
            self.probes.forget_thread(tid);
        }
        self.report_all(records)
    }
}
