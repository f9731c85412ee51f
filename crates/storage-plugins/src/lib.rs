//! vzkit crate.
