//! Outputs, the only code that prints or writes results: text and JSON lines ([`report`], the
//! entry point, with [`text`], [`tree`], the JSON schema in [`json`] and [`safe_json`], which
//! writes every JSON output), flame graphs ([`flame`]), Prometheus metrics ([`metrics`]), OpenTelemetry spans ([`otlp`]) and
//! evidence bundles ([`record`]), with the clock and duration formats they share ([`clock`]).

pub mod clock;
pub mod flame;
pub(crate) mod fold;
#[cfg(test)]
pub(crate) mod golden;
pub mod json;
pub mod metrics;
pub mod otlp;
pub mod record;
pub mod report;
mod safe_json;
mod text;
mod tree;

use crate::{aggregate::Record, naming::stacks::BlockProfile};

/// A record as the outputs take it: with its block's stacks, weighted and named by the naming
/// stage (blocks and ongoing blocks; `None` for the other records or with `--no-stacks`).
#[derive(Debug, Clone, Copy)]
pub struct Named<'a> {
    pub record: &'a Record,
    pub profile: Option<&'a BlockProfile>,
    /// Its stacks were not named in time (naming was slow): reported without them.
    pub naming_timed_out: bool,
}

impl<'a> Named<'a> {
    /// A record without named stacks.
    pub fn bare(record: &'a Record) -> Self {
        Self {
            record,
            profile: None,
            naming_timed_out: false,
        }
    }
}
