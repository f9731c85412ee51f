//! End-to-end tests: btrfs.
