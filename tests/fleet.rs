//! Fleet mode tests (being written).
