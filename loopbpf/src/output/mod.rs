//! Outputs, the only code that prints or writes results: text and JSON lines ([`report`], the
//! entry point, with [`text`], [`tree`] and the JSON schema in [`json`]), flame graphs
//! ([`flame`]), Prometheus metrics ([`metrics`]) and evidence bundles ([`record`]), with the
//! clock and duration formats they share ([`clock`]).

pub mod clock;
pub mod flame;
#[cfg(test)]
pub(crate) mod golden;
pub mod json;
pub mod metrics;
pub mod record;
pub mod report;
mod text;
mod tree;

use crate::{aggregate::Record, naming::stacks::BlockProfile};

/// The named stacks of a block or of one still going on: the one place the outputs read them
/// from a record.
fn profile(record: &Record) -> Option<&BlockProfile> {
    match record {
        Record::Block { profile, .. } | Record::Ongoing { profile, .. } => profile.as_ref(),
        Record::Interval { .. } | Record::Leak { .. } | Record::Summary { .. } => None,
    }
}
