//! Feeds arbitrary UTF-8 to the `pct.conf` parser; whatever parses must write and re-parse
//! to the same config, and the written form must be a fixed point.
#![no_main]

use vzkit_runtime::conf::CtConfig;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok((conf, _warnings)) = CtConfig::parse(100, text) else {
        return;
    };
    // Values PVE would refuse to write (e.g. a newline smuggled in) are not a round-trip
    // failure.
    let Ok(written) = conf.write() else {
        return;
    };
    let (back, _) = CtConfig::parse(100, &written).expect("written config must parse");
    // The writer leaves out unusedN entries still in use, so compare written forms.
    let rewritten = back.write().expect("re-parsed config must write");
    assert_eq!(rewritten, written, "writer output is not a fixed point");
    assert_eq!(back.main.lxc, conf.main.lxc);
    assert_eq!(back.snapshots.len(), conf.snapshots.len());
});
