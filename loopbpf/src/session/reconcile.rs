//! Loop threads whose end the session did not hear of: an exit event lost to a full ring buffer
//! (the `threads` map still has the thread, its exit time set), or a thread gone from `/proc`
//! with no exit seen at all. Either way the thread's busy interval ends and the aggregator marks
//! it exited, so no block of a thread that is gone is reported as ongoing.

use super::{End, Session, fleet::ProcessTable};
use crate::{decode::Event, session::fleet::Proc};

impl Session<'_> {
    /// Ends loop threads whose exit event was lost, from what the `threads` map kept of them
    /// (the event, if it was only late, is ignored when it comes); with `look_in_proc`, also
    /// those gone from `/proc` without a word. Their blocks that ended with the exit are
    /// reported.
    pub(super) fn reconcile_threads(&mut self, now_ns: u64, look_in_proc: bool) -> Result<(), End> {
        let mut records = Vec::new();
        for (tid, state) in self.probes.threads() {
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
                };
                records.extend(self.aggregator.on_event(&exit));
            } else if look_in_proc && !Proc.thread_exists(state.pid, tid) {
                // Ended without any trace of it (it exited as the probes were attached).
                self.probes.forget_thread(tid);
                self.probes.stop_sampling(tid);
                self.aggregator.thread_gone(tid, now_ns);
            }
        }
        for tid in self.aggregator.take_exited_tids() {
            self.probes.forget_thread(tid);
        }
        self.report_all(records)
    }
}
