#![no_main]
//! /etc/vzdump.conf: arbitrary UTF-8 must parse without panicking (there is no printer);
//! the shell-word splitter used for `exclude-path` must not panic either.

use vzkit_vzdump::conf::{parse_vzdump_conf, split_args};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (opts, _warnings) = parse_vzdump_conf(text, "fuzz.conf");
    assert!(opts.prune_backups.is_some());
    let _ = split_args(text);
});
