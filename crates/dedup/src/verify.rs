//! Verification: re-hash every chunk a snapshot references.

use std::collections::{BTreeMap, HashSet};

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

/// Verify one snapshot: the manifest's part hashes, then every chunk
/// (decompress, blake3, compare with its name). Damaged chunks are renamed
/// to `<digest>.bad`, so that the next backup writes them again; the
/// result is recorded in the snapshot's `verify-state`. `good` carries
/// chunks already found intact (verifying several snapshots).
///
/// # Errors
/// Missing snapshot, I/O errors on the store (damage is reported, not an error).
pub fn verify(
    store: &Store,
    snap: &SnapshotRef,
    good: &mut HashSet<[u8; 32]>,
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
                if good.contains(&c.digest) {
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
                    Ok(_) => {
                        r.bytes += u64::from(c.len);
                        // Bounded memory: forgetting only costs checking again.
                        if good.len() >= crate::MEMO_MAX {
                            good.clear();
                        }
                        good.insert(c.digest);
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
