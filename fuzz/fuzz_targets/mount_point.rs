//! Feeds arbitrary UTF-8 to the mount point parsers; whatever parses must print and parse
//! back to the same value.
#![no_main]

use vzkit_runtime::conf::{parse_mp, parse_rootfs};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(mp) = parse_mp(text) {
        let printed = mp.print(false).expect("parsed mount point must print");
        assert_eq!(
            parse_mp(&printed).expect("printed mount point must parse"),
            mp
        );
    }
    if let Ok(rootfs) = parse_rootfs(text) {
        let printed = rootfs.print(true).expect("parsed rootfs must print");
        assert_eq!(
            parse_rootfs(&printed).expect("printed rootfs must parse"),
            rootfs
        );
    }
});
