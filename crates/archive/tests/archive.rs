//! Integration tests of vzkit-archive, with GNU tar and the compression
//! CLIs as oracles. Must run as root; needs `tar acl attr lzop zstd gzip`.

mod common;

#[path = "archive/compression.rs"]
mod compression;
#[path = "archive/direct.rs"]
mod direct;
#[path = "archive/hostile.rs"]
mod hostile;
#[path = "archive/idshift.rs"]
mod idshift;
#[path = "archive/oracle.rs"]
mod oracle;
