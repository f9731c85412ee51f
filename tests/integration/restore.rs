//! End-to-end tests: restore.
