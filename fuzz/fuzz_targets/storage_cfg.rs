#![no_main]
//! storage.cfg: arbitrary UTF-8 must parse without panicking, and the printed result must be
//! a fixed point: print(parse(print(parse(x)))) == print(parse(x)), with no warnings.

use vzkit_storage::config::StorageConfig;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (cfg, _warnings) = StorageConfig::parse(text, "fuzz.cfg");
    let printed = cfg.print();
    let (again, warnings) = StorageConfig::parse(&printed, "fuzz.cfg");
    assert!(warnings.is_empty(), "{warnings:?}\n{printed}");
    assert_eq!(again, cfg, "{printed}");
    assert_eq!(again.print(), printed);
});
