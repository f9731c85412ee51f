//! Fuzz the streaming tar reader: arbitrary bytes must parse to entries or
//! a clean error, never panic or loop. The first byte picks whether the
//! input is also decoded as lzop (the other untrusted parser of this crate).
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use vzkit_archive::{ArchiveReader, acl::Acl, lzop::LzopReader};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 1 {
        if let Ok(mut r) = LzopReader::new(rest) {
            let mut sink = Vec::new();
            let _ = r.read_to_end(&mut sink);
        }
        return;
    }
    let mut rd = ArchiveReader::new(rest);
    let mut buf = [0u8; 4096];
    for _ in 0..10_000 {
        match rd.next_entry() {
            Ok(Some(e)) => {
                if let Some(text) = &e.acl_access {
                    let _ = Acl::from_text(text);
                }
                // Read some content to exercise the data path.
                let _ = rd.read_data(&mut buf);
            }
            Ok(None) | Err(_) => break,
        }
    }
});
