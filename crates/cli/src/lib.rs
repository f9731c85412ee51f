//! CLI front ends.
