//! The tracepoints: thread exits, execs and context switches. The context-switch program runs
//! for every switch of the host: it is a BTF tracepoint where the kernel's has `prev_state`
//! (no trace record is made for it), the classic tracepoint before that.

use aya::programs::{BtfTracePoint, TracePoint};

use super::{ProbeError, Probes, program};

/// Tracepoint programs and where they attach: thread exits and execs. No syscall tracepoint:
/// enabling one sends every syscall of every process on the host down the kernel's slow path.
const TRACEPOINTS: [(&str, &str, &str); 2] = [
    ("thread_exit", "sched", "sched_process_exit"),
    ("process_exec", "sched", "sched_process_exec"),
];
/// Context switches (a loop thread falling asleep in its poll wait, or waking there): every
/// switch of the host runs this program, a BTF tracepoint (no trace record is made for it).
const SWITCH: &str = "on_switch";
/// The same on the classic tracepoint, for kernels whose `sched_switch` has no `prev_state`
/// argument (before 5.18).
const SWITCH_RECORD: &str = "on_switch_record";

impl Probes {
    /// Attaches the thread-exit, exec and context-switch tracepoints, which only act on targets.
    pub fn attach_tracepoints(&mut self) -> Result<(), ProbeError> {
        for (program, category, tracepoint) in TRACEPOINTS {
            self.attach_tracepoint(program, category, tracepoint)?;
        }
        let btf = self.btf.take();
        let by_btf = btf.as_ref().map(|btf| {
            let program: &mut BtfTracePoint = program(&mut self.ebpf, SWITCH)?;
            program
                .load("sched_switch", btf)
                .map_err(|error| ProbeError::Program {
                    name: SWITCH,
                    error,
                })?;
            program.attach().map_err(|error| ProbeError::Tracepoint {
                category: "sched",
                name: "sched_switch",
                error,
            })
        });
        if let Some(Ok(_)) = by_btf {
            return Ok(());
        }
        // The kernel's reason is a verifier log: the fallback is what the user needs to know.
        if let Some(Err(_)) = by_btf {
            note!(
                "this kernel's BTF sched_switch tracepoint has no prev_state (Linux 5.18 adds it): context switches are watched through the classic tracepoint, which costs every switch on the host more"
            );
        }
        self.attach_tracepoint(SWITCH_RECORD, "sched", "sched_switch")
    }

    fn attach_tracepoint(
        &mut self,
        name: &'static str,
        category: &'static str,
        tracepoint: &'static str,
    ) -> Result<(), ProbeError> {
        let program: &mut TracePoint = program(&mut self.ebpf, name)?;
        program
            .load()
            .map_err(|error| ProbeError::Program { name, error })?;
        program
            .attach(category, tracepoint)
            .map_err(|error| ProbeError::Tracepoint {
                category,
                name: tracepoint,
                error,
            })?;
        Ok(())
    }
}
