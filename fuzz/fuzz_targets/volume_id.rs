#![no_main]
//! Volume ids and volume names: no panics; `VolumeId` display re-parses to itself; the
//! parse_volname variants and archive_info accept arbitrary input.

use vzkit_storage::{backup, prune, volid};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = volid::VolumeId::parse(text) {
        assert_eq!(id.to_string(), text);
        assert_eq!(volid::VolumeId::parse(&id.to_string()), Ok(id));
    }
    let _ = volid::parse_volname_dir(text);
    let _ = volid::parse_volname_lvmthin(text);
    let _ = volid::parse_volname_zfspool(text);
    let _ = volid::parse_volname_rbd(text);
    let _ = backup::archive_info(text);
    if let Ok(p) = prune::PruneOptions::parse(text) {
        assert_eq!(prune::PruneOptions::parse(&p.to_string()), Ok(p));
    }
});
