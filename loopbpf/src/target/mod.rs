//! Everything read from a target process: `/proc` ([`proc`], its memory map in [`maps`], its
//! memory in [`memory`]), its files ([`files`]) and where it runs ([`container`]). Every value
//! here comes from a process loopbpf does not trust: every read is bounded, every parser total,
//! and the work it drives is within the budgets of [`budget`].

pub mod budget;
pub mod container;
pub mod files;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod maps;
pub mod memory;
pub mod proc;

pub use proc::start_time;

/// Who a process is, as every output labels it.
#[derive(Debug, Clone, Default)]
pub struct ProcessLabels {
    pub comm: String,
    pub container: String,
    pub pod: String,
}
