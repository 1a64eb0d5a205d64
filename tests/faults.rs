//! Bad input and faults: one clear line and a non-zero exit, and a target that is never harmed.
