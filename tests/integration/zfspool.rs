//! End-to-end tests: zfspool.
