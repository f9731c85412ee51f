//! Verification: re-hash every chunk a snapshot references.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};
use crate::snapshot::{self, SnapshotRef, VerifyState};
use crate::store::{Store, hex, now_ns};

/// A chunk that failed verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadChunk {
    /// Its digest (hex).
    pub digest: String,
    /// What is wrong.
    pub error: String,
    /// Members whose data uses it.
    pub files: Vec<String>,
}

/// What a verification found.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    /// The snapshot.
    pub snapshot: Option<SnapshotRef>,
    /// Chunk references.
    pub chunks: u64,
    /// Distinct chunks read and hashed.
    pub chunks_checked: u64,
    /// Bytes (uncompressed) hashed.
    pub bytes: u64,
    /// Damaged manifest parts.
    pub bad_parts: Vec<String>,
    /// Damaged or missing chunks.
    pub bad_chunks: Vec<BadChunk>,
}

impl VerifyReport {
    /// Nothing wrong found.
    #[must_use]
    pub fn ok(&self) -> bool {
        self.bad_parts.is_empty() && self.bad_chunks.is_empty()
    }
}

/// Check mismatches listed one by one.
const SHOWN: usize = 10;

/// Count a reference whose recorded check differs from `check`, the check
/// of its chunk's data; the first [`SHOWN`] become bad parts.
fn mismatch(
    r: &mut VerifyReport,
    mismatched: &mut usize,
    c: &crate::catalog::ChunkRef,
    check: u64,
    m: &crate::catalog::Member,
) {
    if c.check == 0 || c.check == check {
        return;
    }
    *mismatched += 1;
    if *mismatched <= SHOWN {
        r.bad_parts.push(format!(
            "catalog: the check of chunk {} for '{}' does not match its data",
            hex(&c.digest),
            m.name_lossy()
        ));
    }
}

/// Verify one snapshot: the manifest's part hashes, then every chunk
/// (decompress, blake3, compare with its name) and the check each
/// reference records for it (see [`crate::catalog::check_of`]; a mismatch
/// is a bad part: the chunk is intact, the catalog is not). Damaged chunks
/// are renamed to `<digest>.bad`, so that the next backup writes them
/// again; the result is recorded as `verify-state` in the snapshot's
/// manifest. `good` carries chunks already found intact, with their checks
/// (verifying several snapshots).
///
/// # Errors
/// Missing snapshot, I/O errors on the store (damage is reported, not an error).
pub fn verify(
    store: &Store,
    snap: &SnapshotRef,
    good: &mut HashMap<[u8; 32], u64>,
) -> Result<VerifyReport> {
    let mut r = VerifyReport {
        snapshot: Some(*snap),
        ..VerifyReport::default()
    };
    let mut bad: BTreeMap<[u8; 32], BadChunk> = BTreeMap::new();
    match snapshot::check_manifest(store, snap) {
        Ok(_) => {}
        Err(e @ Error::Corrupt { .. }) => r.bad_parts.push(e.to_string()),
        Err(e) => return Err(e),
    }
    let mut mismatched = 0;
    if r.bad_parts.is_empty() {
        for m in snapshot::catalog(store, snap)? {
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    r.bad_parts.push(e.to_string());
                    break;
                }
            };
            for c in &m.chunks {
                r.chunks += 1;
                if let Some(&check) = good.get(&c.digest) {
                    mismatch(&mut r, &mut mismatched, c, check, &m);
                    continue;
                }
                if let Some(b) = bad.get_mut(&c.digest) {
                    let name = m.name_lossy();
                    if b.files.last() != Some(&name) {
                        b.files.push(name);
                    }
                    continue;
                }
                r.chunks_checked += 1;
                match store.read_chunk(&c.digest, c.len) {
                    Ok(data) => {
                        r.bytes += u64::from(c.len);
                        let check = crate::catalog::check_of(&data);
                        mismatch(&mut r, &mut mismatched, c, check, &m);
                        // Bounded memory: forgetting only costs checking again.
                        if good.len() >= crate::MEMO_MAX {
                            good.clear();
                        }
                        good.insert(c.digest, check);
                    }
                    Err(e) => {
                        bad.insert(
                            c.digest,
                            BadChunk {
                                digest: hex(&c.digest),
                                error: match e {
                                    Error::BadChunk { message, .. } => message,
                                    e => e.to_string(),
                                },
                                files: vec![m.name_lossy()],
                            },
                        );
                    }
                }
            }
        }
    }
    if mismatched > SHOWN {
        r.bad_parts.push(format!(
            "catalog: {} more chunk references whose check does not match",
            mismatched - SHOWN
        ));
    }
    // Recorded before the chunks are moved away: a backup reusing a chunk
    // of its base unseen checks these first (see `crate::gc`).
    store.add_bad_chunks(&bad.keys().copied().collect::<Vec<_>>())?;
    for d in bad.keys() {
        let p = store.chunk_path(d);
        if p.exists() {
            let to = p.with_extension("bad");
            std::fs::rename(&p, &to).map_err(|e| Error::io("rename", &p, e))?;
        }
    }
    r.bad_chunks = bad.into_values().collect();
    let state = VerifyState {
        state: if r.ok() { "ok" } else { "failed" }.into(),
        time: now_ns() / 1_000_000_000,
        bad_chunks: r.bad_chunks.iter().map(|b| b.digest.clone()).collect(),
    };
    snapshot::write_verify_state(store, snap, &state)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{Backup, BackupOptions};
    use crate::catalog::CatalogWriter;
    use crate::snapshot::{CATALOG, MANIFEST};
    use vzkit_archive::ExcludeSet;

    #[test]
    fn a_recorded_check_that_does_not_match_its_chunk_fails_verify() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(src.join("a"), &data).unwrap();
        std::fs::write(src.join("b"), b"small").unwrap();
        std::fs::create_dir(dir.path().join("store")).unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let mut b = Backup::start(&store, BackupOptions::new(100)).unwrap();
        b.add_tree(&src, "./", &ExcludeSet::new(), true).unwrap();
        let snap = b.finish().unwrap().snapshot;
        let mut good = HashMap::new();
        assert!(verify(&store, &snap, &mut good).unwrap().ok());
        // The state is recorded in the manifest, which still checks.
        let sdir = snap.path(&store);
        let text = std::fs::read_to_string(sdir.join(MANIFEST)).unwrap();
        assert!(text.contains("\"verify-state\""), "{text}");
        assert_eq!(snapshot::verify_state(&store, &snap).unwrap().state, "ok");
        snapshot::check_manifest(&store, &snap).unwrap();

        // The catalog records another check for a's chunk (and the manifest the new
        // catalog): the chunk is intact, the catalog is not.
        let members: Vec<_> = snapshot::catalog(&store, &snap)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut w = CatalogWriter::create(&sdir.join(CATALOG)).unwrap();
        for mut m in members {
            if m.name == b"./a" {
                m.chunks[0].check ^= 1;
            }
            w.push(&m).unwrap();
        }
        w.finish().unwrap();
        let cat = std::fs::read(sdir.join(CATALOG)).unwrap();
        let mp = sdir.join(MANIFEST);
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
        for f in v["files"].as_array_mut().unwrap() {
            if f["filename"] == CATALOG {
                f["size"] = cat.len().into();
                f["blake3"] = blake3::hash(&cat).to_hex().to_string().into();
            }
        }
        std::fs::write(&mp, serde_json::to_vec(&v).unwrap()).unwrap();
        // Found both with the chunk read and with it remembered as intact.
        for mut good in [HashMap::new(), good] {
            let r = verify(&store, &snap, &mut good).unwrap();
            assert!(r.bad_chunks.is_empty(), "{:?}", r.bad_chunks);
            assert_eq!(r.bad_parts.len(), 1, "{:?}", r.bad_parts);
            assert!(
                r.bad_parts[0].contains("for './a' does not match its data"),
                "{:?}",
                r.bad_parts
            );
            assert_eq!(
                snapshot::verify_state(&store, &snap).unwrap().state,
                "failed"
            );
        }

        // Verified by an older version: the state in a file beside the manifest, read
        // until the next verification records it in the manifest.
        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
        v.as_object_mut().unwrap().remove("verify-state");
        std::fs::write(&mp, serde_json::to_vec(&v).unwrap()).unwrap();
        let old = sdir.join(snapshot::VERIFY_STATE);
        std::fs::write(&old, r#"{"state":"ok","time":5,"bad-chunks":[]}"#).unwrap();
        assert_eq!(snapshot::verify_state(&store, &snap).unwrap().time, 5);
        verify(&store, &snap, &mut HashMap::new()).unwrap();
        assert!(!old.exists());
        assert_eq!(
            snapshot::verify_state(&store, &snap).unwrap().state,
            "failed"
        );

        // A damaged manifest is reported, left as it is, and the state goes beside it.
        std::fs::write(&mp, b"{ damaged").unwrap();
        let r = verify(&store, &snap, &mut HashMap::new()).unwrap();
        assert!(
            r.bad_parts[0].contains("corrupt manifest"),
            "{:?}",
            r.bad_parts
        );
        assert_eq!(std::fs::read(&mp).unwrap(), b"{ damaged");
        assert!(old.exists());
        assert_eq!(
            snapshot::verify_state(&store, &snap).unwrap().state,
            "failed"
        );
    }
}
