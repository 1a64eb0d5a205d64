//! Outputs, the only code that prints or writes results: text and JSON lines ([`report`]),
//! flame graphs ([`flame`]), Prometheus metrics ([`metrics`]) and evidence bundles ([`record`]),
//! with the clock and duration formats they share ([`clock`]).

pub mod clock;
pub mod flame;
#[cfg(test)]
pub(crate) mod golden;
pub mod metrics;
pub mod record;
pub mod report;
