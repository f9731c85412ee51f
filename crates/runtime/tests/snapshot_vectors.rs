//! PVE's snapshot flow tests (`pve-container/src/test/snapshot-test.pm`, expanded to
//! `snapshot_cases.json`): every case copies its input config into a scratch root, runs the
//! phase through the real config store, and compares the config file byte for byte and the
//! error message. The storage and container side effects are the upstream test's: each
//! volume operation succeeds only for the volume ids listed in `vol_flags`, freeze and stop
//! succeed as `mock_state` says, and the successful volume calls are compared with the
//! case's `expected_vol_*`.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use serde_json::Value;
use vzkit_host::paths::Layout;
use vzkit_runtime::conf::ConfigSection;
use vzkit_runtime::error::{Result, RuntimeError};
use vzkit_runtime::snapshot::{
    SnapshotOps, commit, prepare, snapshot_create, snapshot_delete, snapshot_rollback,
};
use vzkit_runtime::store::CtStore;
use vzkit_storage::plugin::Feature;

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/pve-container")
}

/// The upstream test's storage and life cycle behaviour for one case.
struct VectorOps {
    flags: Value,
    state: Value,
    running: Cell<bool>,
    calls: RefCell<BTreeMap<&'static str, BTreeMap<String, Vec<String>>>>,
}

impl VectorOps {
    fn flag(&self, set: &str, volid: &str) -> bool {
        self.flags[set][volid].as_i64() == Some(1)
    }
    fn state(&self, key: &str) -> bool {
        self.state[key].as_i64() == Some(1)
    }
    fn record(&self, op: &'static str, volid: &str, snap: &str) {
        self.calls
            .borrow_mut()
            .entry(op)
            .or_default()
            .entry(volid.to_string())
            .or_default()
            .push(snap.to_string());
    }
    fn vol_op(
        &self,
        op: &'static str,
        set: &str,
        msg: &str,
        volid: &str,
        snap: &str,
    ) -> Result<()> {
        if self.flag(set, volid) {
            self.record(op, volid, snap);
            Ok(())
        } else {
            Err(RuntimeError::Failed(msg.to_string()))
        }
    }
}

#[async_trait(?Send)]
impl SnapshotOps for VectorOps {
    fn now(&self) -> i64 {
        1_234_567_890
    }
    fn has_feature(&self, _: Feature, _: &ConfigSection, _: Option<&str>, _: bool) -> bool {
        self.state("snapshot_possible")
    }
    async fn activate_storages(&self, _: &[String]) -> Result<()> {
        if self.state("activate_storage_possible") {
            Ok(())
        } else {
            Err(RuntimeError::Failed("storage activation failed".into()))
        }
    }
    async fn is_running(&self, _: u32) -> Result<bool> {
        Ok(self.running.get())
    }
    async fn freeze(&self, _: u32) -> Result<()> {
        if self.state("freeze_possible") {
            Ok(())
        } else {
            Err(RuntimeError::Failed("freeze disabled".into()))
        }
    }
    async fn thaw(&self, _: u32) -> Result<()> {
        if self.state("freeze_possible") {
            Ok(())
        } else {
            Err(RuntimeError::Failed("thaw disabled".into()))
        }
    }
    async fn stop(&self, _: u32) -> Result<()> {
        if self.state("kill_possible") {
            self.running.set(false);
            Ok(())
        } else {
            Err(RuntimeError::Failed("vm_stop failed".into()))
        }
    }
    async fn volume_snapshot(&self, volid: &str, snap: &str) -> Result<()> {
        let msg = "volume snapshot disabled";
        self.vol_op("snapshot", "vol_snapshot_possible", msg, volid, snap)
    }
    async fn volume_snapshot_delete(&self, volid: &str, snap: &str) -> Result<()> {
        let msg = "volume snapshot delete disabled";
        self.vol_op("delete", "vol_snapshot_delete_possible", msg, volid, snap)
    }
    async fn volume_rollback_is_possible(&self, volid: &str, _: &str) -> Result<()> {
        if self.flag("vol_snapshot_rollback_possible", volid) {
            Ok(())
        } else {
            Err(RuntimeError::Failed(
                "volume_rollback_is_possible failed".into(),
            ))
        }
    }
    async fn volume_snapshot_rollback(&self, volid: &str, snap: &str) -> Result<()> {
        let msg = "volume snapshot rollback disabled";
        self.vol_op(
            "rollback",
            "vol_snapshot_rollback_enabled",
            msg,
            volid,
            snap,
        )
    }
}

fn expected_calls(case: &Value, key: &str) -> BTreeMap<String, Vec<String>> {
    case[key]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let snaps = v.as_str().unwrap().split(',').map(str::to_string);
                    (k.clone(), snaps.collect())
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn upstream_snapshot_cases() {
    let text = std::fs::read_to_string(data().join("snapshot_cases.json")).unwrap();
    let all: Value = serde_json::from_str(&text).unwrap();
    let cases = all["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 42);
    let mut failures = Vec::new();
    for case in cases {
        let phase = case["phase"].as_str().unwrap();
        let vmid: u32 = case["vmid"].as_str().unwrap().parse().unwrap();
        let snap = case["snapname"].as_str().unwrap();
        let label = format!("{phase}/{vmid}");
        let root = tempfile::tempdir().unwrap();
        let store = CtStore::new(Layout::new(root.path()));
        let input =
            std::fs::read_to_string(data().join(case["input_conf"].as_str().unwrap())).unwrap();
        let conf_path = store.conf_path(vmid);
        std::fs::create_dir_all(conf_path.parent().unwrap()).unwrap();
        std::fs::write(&conf_path, &input).unwrap();
        let ops = VectorOps {
            flags: all["vol_flags"].clone(),
            state: case["mock_state"].clone(),
            running: Cell::new(case["mock_state"]["running"].as_i64() == Some(1)),
            calls: RefCell::default(),
        };
        let comment = case["comment"].as_str();
        let force = case["force"].as_i64() == Some(1);
        let mut warnings = Vec::new();
        let mut warn = |w: String| warnings.push(w);
        let res = match phase {
            "prepare" => {
                let vmstate = case["save_vmstate"].as_i64() == Some(1) && ops.running.get();
                store.update(vmid, |c| {
                    prepare(c, snap, comment, ops.now(), vmstate, |_| {
                        ops.state("snapshot_possible")
                    })
                    .map(drop)
                })
            }
            "commit" => store.update(vmid, |c| commit(c, snap)),
            "create" => snapshot_create(&store, &ops, vmid, snap, comment, false, &mut warn).await,
            "delete" => snapshot_delete(&store, &ops, vmid, snap, force, &mut warn).await,
            "rollback" => snapshot_rollback(&store, &ops, vmid, snap).await,
            other => panic!("unknown phase {other}"),
        };
        let got_err = res.err().map(|e| e.to_string()).unwrap_or_default();
        let want_err = case["expected_error"].as_str().unwrap().trim_end();
        if got_err != want_err {
            failures.push(format!("{label}: error {got_err:?}, expected {want_err:?}"));
        }
        let got = std::fs::read_to_string(&conf_path).unwrap();
        let want =
            std::fs::read_to_string(data().join(case["expected_conf"].as_str().unwrap())).unwrap();
        if got != want {
            failures.push(format!(
                "{label}: config differs\n--- got\n{got}--- expected\n{want}"
            ));
        }
        let calls = ops.calls.borrow();
        for (op, key) in [
            ("snapshot", "expected_vol_snapshot"),
            ("delete", "expected_vol_snapshot_delete"),
            ("rollback", "expected_vol_snapshot_rollback"),
        ] {
            if case.get(key).is_none() {
                continue;
            }
            let got = calls.get(op).cloned().unwrap_or_default();
            let want = expected_calls(case, key);
            if got != want {
                failures.push(format!("{label}: {op} calls {got:?}, expected {want:?}"));
            }
        }
        if phase == "create" && want_err.is_empty() {
            assert!(warnings.is_empty(), "{label}: {warnings:?}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
