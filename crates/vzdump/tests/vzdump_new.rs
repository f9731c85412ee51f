//! Upstream `vzdump_new_test.pl` vectors (see `data/PROVENANCE.md`): option precedence in
//! `VZDump->new`, replayed through `JobOptions::from_params` + `verify_vzdump_parameters` +
//! `parse_vzdump_conf` + `resolve`.

use serde_json::{Value, json};
use vzkit_storage::config::StorageConfig;
use vzkit_vzdump::conf::parse_vzdump_conf;
use vzkit_vzdump::options::{JobOptions, resolve, verify_vzdump_parameters};

fn run(t: &Value) -> Result<Value, String> {
    let obj = |k: &str| {
        t.get(k)
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default()
    };
    let mut storage_cfg = String::from("dir: local\n\tcontent backup\n\tpath /var/lib/vz\n");
    for (k, v) in obj("storage_param") {
        storage_cfg.push_str(&format!("\t{k} {}\n", v.as_str().unwrap()));
    }
    let (storage, _warnings) = StorageConfig::parse(&storage_cfg, "/etc/pve/storage.cfg");

    let mut conf = String::new();
    for (k, v) in obj("vzdump_param") {
        conf.push_str(&format!("{k}: {}\n", v.as_str().unwrap()));
    }
    let (defaults, _warnings) = parse_vzdump_conf(&conf, "/etc/vzdump.conf");

    let mut params: Vec<(String, String)> = obj("cli_param")
        .into_iter()
        .map(|(k, v)| (k, v.as_str().unwrap().to_string()))
        .collect();
    params.push(("vmid".into(), "100".into()));
    params.push(("storage".into(), "local".into()));
    let mut cli = JobOptions::from_params(&params).map_err(|e| e.to_string())?;
    verify_vzdump_parameters(&mut cli, true).map_err(|e| e.to_string())?;
    let resolved = resolve(cli, &defaults, &storage).map_err(|e| e.to_string())?;

    let all = serde_json::to_value(&resolved.options).unwrap();
    let mut out = serde_json::Map::new();
    for key in t["tested_options"].as_array().unwrap() {
        let key = key.as_str().unwrap();
        if let Some(v) = all.get(key) {
            // Perl booleans are 0/1
            let v = match v {
                Value::Bool(b) => json!(u8::from(*b)),
                other => other.clone(),
            };
            out.insert(key.to_string(), v);
        }
    }
    Ok(Value::Object(out))
}

#[test]
fn upstream_vzdump_new() {
    let path = format!("{}/tests/data/vzdump_new.json", env!("CARGO_MANIFEST_DIR"));
    let data: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let tests = data["tests"].as_array().unwrap();
    for t in tests {
        let desc = t["description"].as_str().unwrap();
        let got = run(t);
        match &t["expected"] {
            Value::String(err) => {
                assert_eq!(got.unwrap_err(), err.trim_end_matches('\n'), "{desc}")
            }
            expected => assert_eq!(
                &got.unwrap_or_else(|e| panic!("{desc}: {e}")),
                expected,
                "{desc}"
            ),
        }
    }
    assert_eq!(tests.len(), 32);
}
