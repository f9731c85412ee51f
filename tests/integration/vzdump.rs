//! End-to-end tests: vzdump.
