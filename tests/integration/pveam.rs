//! End-to-end tests: pveam.
