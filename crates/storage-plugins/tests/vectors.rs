//! Table-driven tests: upstream pve-storage vectors (see `data/PROVENANCE.md`) and the prune
//! and archive-name cases derived from the algorithms (upstream ran them with `TZ=UTC`; here
//! the time zone is passed explicitly, so the result does not depend on the environment).

use std::collections::BTreeMap;

use serde_json::Value;
use vzkit_storage::config::StorageConfig;
use vzkit_storage::volid::{self, VolumeType};

fn load(name: &str) -> Value {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn tests(v: &Value) -> &Vec<Value> {
    v["tests"].as_array().unwrap()
}

/// Perl scalars in the vectors: numbers may be strings or numbers, `undef` is null.
fn opt_u32(v: &Value) -> Option<u32> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.parse().unwrap()),
        Value::Number(n) => Some(u32::try_from(n.as_u64().unwrap()).unwrap()),
        other => panic!("unexpected {other}"),
    }
}

fn opt_str(v: &Value) -> Option<&str> {
    v.as_str()
}

fn error_text(v: &Value) -> &str {
    v.as_str().unwrap().trim_end_matches('\n')
}

fn scfg_parts(scfg: &Value) -> (Option<String>, BTreeMap<String, String>) {
    let path = scfg.get("path").and_then(Value::as_str).map(str::to_string);
    let dirs = scfg
        .get("content-dirs")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default();
    (path, dirs)
}

#[test]
fn upstream_parse_volname() {
    let data = load("parse_volname.json");
    let mut n = 0;
    for t in tests(&data) {
        let volname = t["volname"].as_str().unwrap();
        let desc = t["description"].as_str().unwrap();
        let res = volid::parse_volname_dir(volname);
        if let Some(err) = t.get("expected_error") {
            assert_eq!(res.unwrap_err().to_string(), error_text(err), "{desc}");
        } else {
            let e = t["expected"].as_array().unwrap();
            let p = res.unwrap_or_else(|err| panic!("{desc}: {err}"));
            assert_eq!(p.vtype.as_str(), e[0].as_str().unwrap(), "{desc}");
            assert_eq!(p.name, e[1].as_str().unwrap(), "{desc}");
            assert_eq!(p.vmid, opt_u32(&e[2]), "{desc}");
            assert_eq!(p.basename.as_deref(), opt_str(&e[3]), "{desc}");
            assert_eq!(p.basevmid, opt_u32(&e[4]), "{desc}");
            assert_eq!(p.is_base, opt_str(&e[5]) == Some("base-"), "{desc}");
            assert_eq!(p.format, e[6].as_str().unwrap(), "{desc}");
        }
        n += 1;
    }
    assert_eq!(n, 52);
}

#[test]
fn upstream_get_subdir() {
    let data = load("get_subdir.json");
    let mut n = 0;
    for t in tests(&data) {
        let (path, dirs) = scfg_parts(&t["scfg"]);
        let vtype = t["vtype"].as_str().unwrap();
        let res = volid::get_subdir(path.as_deref(), &dirs, vtype);
        match t.get("expected_error") {
            Some(err) => assert_eq!(res.unwrap_err().to_string(), error_text(err), "{t}"),
            None => assert_eq!(res.unwrap(), t["expected"].as_str().unwrap(), "{t}"),
        }
        n += 1;
    }
    assert_eq!(n, 16);
}

#[test]
fn upstream_filesystem_path() {
    let data = load("filesystem_path.json");
    let mut n = 0;
    for t in tests(&data) {
        let (path, dirs) = scfg_parts(&t["scfg"]);
        let res = volid::filesystem_path(
            path.as_deref(),
            &dirs,
            t["volname"].as_str().unwrap(),
            t["snapname"].as_str(),
        );
        match t.get("expected_error") {
            Some(err) => assert_eq!(res.unwrap_err().to_string(), error_text(err), "{t}"),
            None => {
                let e = t["expected"].as_array().unwrap();
                let r = res.unwrap();
                assert_eq!(r.path.to_str().unwrap(), e[0].as_str().unwrap(), "{t}");
                assert_eq!(r.owner, opt_u32(&e[1]), "{t}");
                assert_eq!(r.vtype.as_str(), e[2].as_str().unwrap(), "{t}");
            }
        }
        n += 1;
    }
    assert_eq!(n, 6);
}

#[test]
fn upstream_path_to_volume_id() {
    let data = load("path_to_volume_id.json");
    let dir = "/srv/vzkit-test/storage";
    let local = &data["storage_cfg"]["ids"]["local"];
    let content: Vec<&str> = local["content"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let text = format!(
        "dir: local\n\tpath {dir}\n\tcontent {}\n\tshared 0\n",
        content.join(",")
    );
    let (cfg, warnings) = StorageConfig::parse(&text, "storage.cfg");
    assert!(warnings.is_empty(), "{warnings:?}");
    let mut n = 0;
    for t in tests(&data) {
        let path = t["volname"].as_str().unwrap().replace("{STORAGE_DIR}", dir);
        let desc = t["description"].as_str().unwrap();
        let e = t["expected"].as_array().unwrap();
        let res = volid::path_to_volume_id(&cfg, &path).unwrap();
        if e.len() == 1 {
            assert_eq!(e[0], "", "{desc}");
            assert_eq!(res, None, "{desc}: {path}");
        } else {
            let (vtype, volid) = res.unwrap_or_else(|| panic!("{desc}: {path}"));
            assert_eq!(vtype.as_str(), e[0].as_str().unwrap(), "{desc}");
            assert_eq!(volid, e[1].as_str().unwrap(), "{desc}");
            // a volid maps to itself
            assert_eq!(
                volid::path_to_volume_id(&cfg, &volid).unwrap(),
                Some((vtype, volid.clone())),
                "{desc}"
            );
        }
        n += 1;
    }
    assert_eq!(n, 29);
    // volids on unknown or path-less storages do not map
    assert_eq!(
        volid::path_to_volume_id(&cfg, "other:backup/x.tar").unwrap(),
        None
    );
    assert!(volid::path_to_volume_id(&cfg, "local:bogus").is_err());
    assert_eq!(
        volid::path_to_volume_id(&cfg, &format!("{dir}/private/101")).unwrap(),
        Some((VolumeType::Rootdir, "local:rootdir/101".to_string()))
    );
}

mod prune {
    use jiff::tz::TimeZone;
    use vzkit_storage::backup::archive_info_in;
    use vzkit_storage::prune::{
        BackupEntry, PruneEntry, PruneMark, PruneOptions, prune_mark_backup_group_in, prune_mark_in,
    };

    use PruneMark::{Keep, Protected, Remove, Renamed};

    fn utc() -> TimeZone {
        TimeZone::UTC
    }

    /// `local:backup/vzdump-<ty>-<vmid>-<time>.tar.zst` with ctime from the name.
    fn b(ty: &str, vmid: u32, time: &str) -> BackupEntry {
        bz(ty, vmid, time, &utc())
    }

    fn bz(ty: &str, vmid: u32, time: &str, tz: &TimeZone) -> BackupEntry {
        let name = format!("vzdump-{ty}-{vmid}-{time}.tar.zst");
        let ctime = archive_info_in(&name, tz).unwrap().ctime.unwrap();
        BackupEntry {
            volid: format!("local:backup/{name}"),
            ctime,
            protected: false,
            vmid: Some(vmid),
        }
    }

    fn protected(mut e: BackupEntry) -> BackupEntry {
        e.protected = true;
        e
    }

    fn opts(s: &str) -> PruneOptions {
        PruneOptions::parse(s).unwrap()
    }

    fn marks(list: &[PruneEntry]) -> Vec<PruneMark> {
        list.iter().map(|e| e.mark.unwrap()).collect()
    }

    #[test]
    fn keep_last() {
        // input deliberately not sorted: the result keeps input order
        let list = [
            b("lxc", 100, "2022_06_13-10_00_00"),
            b("lxc", 100, "2022_06_15-10_00_00"),
            b("lxc", 100, "2022_06_11-10_00_00"),
            b("lxc", 100, "2022_06_14-10_00_00"),
            b("lxc", 100, "2022_06_12-10_00_00"),
        ];
        let r = prune_mark_in(&list, &opts("keep-last=3"), None, None, &utc());
        assert_eq!(marks(&r), [Keep, Keep, Remove, Keep, Remove]);
        let r = prune_mark_in(&list, &opts("keep-last=10"), None, None, &utc());
        assert_eq!(marks(&r), [Keep; 5]);
    }

    #[test]
    fn daily_skips_periods_covered_by_keep_last() {
        let list = [
            b("lxc", 100, "2022_06_15-10_00_00"),
            b("lxc", 100, "2022_06_15-08_00_00"),
            b("lxc", 100, "2022_06_14-10_00_00"),
            b("lxc", 100, "2022_06_14-08_00_00"),
            b("lxc", 100, "2022_06_13-10_00_00"),
            b("lxc", 100, "2022_06_12-10_00_00"),
        ];
        let r = prune_mark_in(&list, &opts("keep-last=1,keep-daily=2"), None, None, &utc());
        assert_eq!(marks(&r), [Keep, Remove, Keep, Remove, Keep, Remove]);
    }

    #[test]
    fn hourly_across_midnight() {
        let list = [
            b("lxc", 100, "2022_06_15-00_10_00"),
            b("lxc", 100, "2022_06_15-00_05_00"),
            b("lxc", 100, "2022_06_14-23_59_59"),
            b("lxc", 100, "2022_06_14-23_00_00"),
            b("lxc", 100, "2022_06_14-22_30_00"),
        ];
        let r = prune_mark_in(&list, &opts("keep-hourly=3"), None, None, &utc());
        assert_eq!(marks(&r), [Keep, Remove, Keep, Remove, Keep]);
    }

    #[test]
    fn weekly_uses_iso_week_and_iso_year() {
        // 2021-01-04 is week 1/2021; 2021-01-03, 2020-12-31, 2020-12-28 are week 53/2020;
        // 2020-12-27 is week 52/2020.
        let list = [
            b("lxc", 100, "2021_01_04-12_00_00"),
            b("lxc", 100, "2021_01_03-12_00_00"),
            b("lxc", 100, "2020_12_31-12_00_00"),
            b("lxc", 100, "2020_12_28-12_00_00"),
            b("lxc", 100, "2020_12_27-12_00_00"),
        ];
        let r = prune_mark_in(&list, &opts("keep-weekly=3"), None, None, &utc());
        assert_eq!(marks(&r), [Keep, Keep, Remove, Remove, Keep]);
        // 2020-01-05 and 2019-12-30 are both week 1/2020; 2019-12-29 is week 52/2019.
        let list = [
            b("lxc", 100, "2020_01_05-12_00_00"),
            b("lxc", 100, "2019_12_30-12_00_00"),
            b("lxc", 100, "2019_12_29-12_00_00"),
        ];
        let r = prune_mark_in(&list, &opts("keep-weekly=2"), None, None, &utc());
        assert_eq!(marks(&r), [Keep, Remove, Keep]);
        // monthly distinguishes calendar months where weekly does not
        let r = prune_mark_in(&list, &opts("keep-monthly=2"), None, None, &utc());
        assert_eq!(marks(&r), [Keep, Keep, Remove]);
    }

    #[test]
    fn all_options_mixed() {
        let list = [
            b("lxc", 100, "2022_06_15-10_00_00"),
            b("lxc", 100, "2022_06_15-09_00_00"),
            b("lxc", 100, "2022_06_14-12_00_00"),
            b("lxc", 100, "2022_06_01-12_00_00"),
            b("lxc", 100, "2022_05_20-12_00_00"),
            b("lxc", 100, "2021_12_31-12_00_00"),
            b("lxc", 100, "2021_06_01-12_00_00"),
        ];
        let keep = opts(
            "keep-last=1,keep-hourly=1,keep-daily=1,keep-weekly=1,keep-monthly=1,keep-yearly=1",
        );
        let r = prune_mark_in(&list, &keep, None, None, &utc());
        assert_eq!(marks(&r), [Keep, Keep, Keep, Keep, Keep, Keep, Remove]);
    }

    #[test]
    fn yearly_1970_2070() {
        let list = [
            b("qemu", 100, "2070_05_01-00_00_00"),
            b("qemu", 100, "2069_01_01-00_00_00"),
            b("qemu", 100, "1970_01_01-00_00_00"),
        ];
        assert_eq!(list[2].ctime, 0);
        let r = prune_mark_in(&list, &opts("keep-yearly=2"), None, None, &utc());
        assert_eq!(marks(&r), [Keep, Keep, Remove]);
    }

    #[test]
    fn protected_neither_counts_nor_is_removed() {
        let list = [
            protected(b("lxc", 100, "2022_06_15-10_00_00")),
            b("lxc", 100, "2022_06_14-10_00_00"),
            b("lxc", 100, "2022_06_13-10_00_00"),
            protected(b("lxc", 100, "2022_06_12-10_00_00")),
        ];
        let r = prune_mark_in(&list, &opts("keep-last=1"), None, None, &utc());
        assert_eq!(marks(&r), [Protected, Keep, Remove, Protected]);
        let r = prune_mark_in(&list, &opts("keep-all=1"), None, None, &utc());
        assert_eq!(marks(&r), [Protected, Keep, Keep, Protected]);
    }

    #[test]
    fn renamed_and_unknown() {
        let renamed = BackupEntry {
            volid: "local:backup/vzdump-lxc-100-mybackup.tar.zst".into(),
            ctime: 1_700_000_000,
            protected: false,
            vmid: Some(100),
        };
        let foreign = BackupEntry {
            volid: "local:backup/other.tar".into(),
            ctime: 1_600_000_000,
            protected: false,
            vmid: None,
        };
        let list = [
            renamed.clone(),
            b("lxc", 100, "2022_06_15-10_00_00"),
            b("lxc", 100, "2022_06_14-10_00_00"),
            foreign.clone(),
            protected(renamed),
        ];
        let r = prune_mark_in(&list, &opts("keep-last=1"), None, None, &utc());
        assert_eq!(marks(&r), [Renamed, Keep, Remove, Renamed, Protected]);
        assert_eq!(r[0].ctime, 1_700_000_000);
        assert_eq!(r[0].guest_type, "lxc");
        assert_eq!(r[3].guest_type, "unknown");
        assert_eq!(r[3].vmid, None);
        let r = prune_mark_in(&list, &opts("keep-all=1"), None, None, &utc());
        assert_eq!(marks(&r), [Renamed, Keep, Keep, Renamed, Protected]);
        // type filter 'unknown' selects only the foreign file
        let r = prune_mark_in(&list, &opts("keep-last=1"), None, Some("unknown"), &utc());
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].volid, foreign.volid);
    }

    #[test]
    fn groups_by_type_and_vmid_and_filters() {
        let list = [
            b("lxc", 100, "2022_06_15-10_00_00"),
            b("qemu", 100, "2022_06_15-11_00_00"),
            b("lxc", 101, "2022_06_15-12_00_00"),
            b("lxc", 100, "2022_06_14-10_00_00"),
            b("qemu", 100, "2022_06_14-11_00_00"),
            b("lxc", 101, "2022_06_14-12_00_00"),
            b("openvz", 100, "2022_06_13-12_00_00"),
        ];
        let keep = opts("keep-last=1");
        let r = prune_mark_in(&list, &keep, None, None, &utc());
        assert_eq!(marks(&r), [Keep, Keep, Keep, Remove, Remove, Remove, Keep]);
        let r = prune_mark_in(&list, &keep, Some(100), None, &utc());
        assert_eq!(r.len(), 5);
        assert_eq!(marks(&r), [Keep, Keep, Remove, Remove, Keep]);
        let r = prune_mark_in(&list, &keep, Some(100), Some("qemu"), &utc());
        assert_eq!(
            r.iter().map(|e| e.volid.as_str()).collect::<Vec<_>>(),
            [
                "local:backup/vzdump-qemu-100-2022_06_15-11_00_00.tar.zst",
                "local:backup/vzdump-qemu-100-2022_06_14-11_00_00.tar.zst"
            ]
        );
        assert_eq!(marks(&r), [Keep, Remove]);
    }

    #[test]
    fn keep_all_and_all_zero() {
        let list = [
            b("lxc", 100, "2022_06_15-10_00_00"),
            b("lxc", 100, "2022_06_14-10_00_00"),
        ];
        for keep in [
            opts("keep-all=1"),
            PruneOptions {
                keep_last: Some(0),
                keep_daily: Some(0),
                ..PruneOptions::default()
            },
            PruneOptions::default(),
        ] {
            let r = prune_mark_in(&list, &keep, None, None, &utc());
            assert_eq!(marks(&r), [Keep, Keep], "{keep:?}");
        }
    }

    #[test]
    fn group_marking_keeps_existing_marks() {
        let mut group: Vec<PruneEntry> = ["2022_06_15-10_00_00", "2022_06_14-10_00_00"]
            .iter()
            .map(|t| {
                let e = b("lxc", 100, t);
                PruneEntry {
                    volid: e.volid,
                    ctime: e.ctime,
                    mark: None,
                    guest_type: "lxc".into(),
                    vmid: Some(100),
                }
            })
            .collect();
        group[0].mark = Some(Protected);
        prune_mark_backup_group_in(&mut group, &opts("keep-last=1"), &utc());
        assert_eq!(marks(&group), [Protected, Keep]);
    }

    #[test]
    fn periods_are_local_time() {
        // CET (UTC+1 in January): 00:30 and 23:30 local are different days, though both are
        // on 2022-01-09 in UTC.
        let tz = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").unwrap();
        let list = [
            bz("lxc", 100, "2022_01_10-00_30_00", &tz),
            bz("lxc", 100, "2022_01_09-23_30_00", &tz),
            bz("lxc", 100, "2022_01_09-22_00_00", &tz),
        ];
        let r = prune_mark_in(&list, &opts("keep-daily=2"), None, None, &tz);
        assert_eq!(marks(&r), [Keep, Keep, Remove]);
        // the same ctimes grouped in UTC: one day
        let r: Vec<PruneEntry> = {
            let mut g: Vec<PruneEntry> = list
                .iter()
                .map(|e| PruneEntry {
                    volid: e.volid.clone(),
                    ctime: e.ctime,
                    mark: None,
                    guest_type: "lxc".into(),
                    vmid: Some(100),
                })
                .collect();
            prune_mark_backup_group_in(&mut g, &opts("keep-daily=2"), &utc());
            g
        };
        assert_eq!(marks(&r), [Keep, Remove, Remove]);
    }

    #[test]
    fn json_like_pvesm_dry_run() {
        let list = [
            b("lxc", 100, "2020_03_30-21_12_40"),
            BackupEntry {
                volid: "local:backup/custom.tar".into(),
                ctime: 5,
                protected: false,
                vmid: None,
            },
        ];
        let r = prune_mark_in(&list, &opts("keep-last=1"), None, None, &utc());
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!([
                {"volid": "local:backup/vzdump-lxc-100-2020_03_30-21_12_40.tar.zst",
                 "ctime": 1_585_602_760, "mark": "keep", "type": "lxc", "vmid": 100},
                {"volid": "local:backup/custom.tar", "ctime": 5, "mark": "renamed", "type": "unknown"}
            ])
        );
    }
}
