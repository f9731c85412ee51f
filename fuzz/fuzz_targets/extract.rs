//! Fuzz the safe extractor: arbitrary archives extracted into a fresh directory must end in
//! entries or a clean error, never panic, and never create, change or follow anything outside
//! the target. The target sits inside a per-iteration sandbox next to a sentinel file; after
//! each run the sandbox must hold exactly the target and the unchanged sentinel. The first
//! byte picks the options (ignore unpack errors, id-mapped unprivileged restore, skip old
//! files), so those paths are exercised too.
#![no_main]

use std::fs;

use libfuzzer_sys::fuzz_target;
use vzkit_archive::{ExtractOptions, IdMap, extract};

const SENTINEL: &[u8] = b"outside the target root";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let sandbox = tempfile::tempdir().expect("sandbox");
    let target = sandbox.path().join("root");
    fs::create_dir(&target).expect("target");
    let sentinel = sandbox.path().join("sentinel");
    fs::write(&sentinel, SENTINEL).expect("sentinel");

    let id_map = (mode & 2 == 2).then(IdMap::pve_default_unprivileged);
    let mut opts = ExtractOptions::pve_restore(id_map, mode & 1 == 1);
    opts.skip_old_files = mode & 4 == 4;
    let _ = extract(rest, &target, &opts);

    let mut names: Vec<_> = fs::read_dir(sandbox.path())
        .expect("read sandbox")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["root", "sentinel"], "extraction created something outside the root");
    let meta = fs::symlink_metadata(&sentinel).expect("sentinel metadata");
    assert!(meta.file_type().is_file(), "sentinel replaced");
    assert_eq!(fs::read(&sentinel).expect("sentinel"), SENTINEL, "sentinel changed");
});
