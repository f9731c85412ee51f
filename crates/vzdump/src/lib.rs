//! vzdump for containers: job options, `/etc/vzdump.conf` and (later) the backup driver.

pub mod conf;
pub mod options;
