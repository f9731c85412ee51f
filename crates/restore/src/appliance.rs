//! The appliance (container template) index behind `pveam` (PVE's `PVE::APLInfo`).
//!
//! Index format (`aplinfo.dat`): paragraphs separated by blank lines, each a list of
//! `Key: value` fields (keys case-insensitive); a line starting with white space continues
//! the previous field (used by `Description`). Fields vzkit uses: `Package`, `Version`,
//! `Type`, `Os`, `Section`, `Location` (relative to the index URL's directory, or an absolute
//! URL), `sha512sum`/`md5sum`, `Headline`, `Description`. A record without `Location` is
//! skipped; the template name is the last component of `Location`.
//!
//! The index URL comes from `VZKIT_PVEAM_INDEX_URL`, else from `index-url: URL` in
//! `/etc/vzkit/pveam.cfg` below the root, else PVE's public index. `pveam update` stores
//! the index at `/var/lib/pve-manager/apl-info/aplinfo.dat`. Downloads are written to a
//! temporary file beside the target and renamed into place only after the checksum the
//! index gives (sha512, else md5) matched. The index signature (PVE checks a GPG signature)
//! is not verified.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use md5::Md5;
use sha2::{Digest, Sha512};
use vzkit_host::paths::Layout;

use crate::error::{RestoreError, Result};

/// PVE's public appliance index.
pub const DEFAULT_INDEX_URL: &str = "http://download.proxmox.com/images/aplinfo-pve-8.dat";
/// Environment variable overriding the index URL.
pub const INDEX_URL_ENV: &str = "VZKIT_PVEAM_INDEX_URL";

/// One record of the index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Appliance {
    /// All fields, keys lower-cased.
    pub fields: BTreeMap<String, String>,
    /// File name (last component of `Location`).
    pub template: String,
    /// Download URL.
    pub url: String,
}

impl Appliance {
    /// A field by lower-case key.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// `Section` (empty if missing).
    #[must_use]
    pub fn section(&self) -> &str {
        self.get("section").unwrap_or("")
    }
}

/// The URL directory `location`s are relative to.
fn base_of(index_url: &str) -> &str {
    match index_url.rfind('/') {
        Some(i) if i > index_url.find("://").map_or(0, |p| p + 2) => &index_url[..=i],
        _ => index_url,
    }
}

/// Parses an index; records are returned sorted by section, then template.
///
/// # Errors
/// A line that is neither a field, a continuation nor blank.
pub fn parse_index(text: &str, index_url: &str) -> Result<Vec<Appliance>> {
    let mut out = Vec::new();
    let mut cur: BTreeMap<String, String> = BTreeMap::new();
    let mut last: Option<String> = None;
    let finish = |cur: &mut BTreeMap<String, String>, out: &mut Vec<Appliance>| {
        let fields = std::mem::take(cur);
        let Some(loc) = fields.get("location").cloned() else {
            return;
        };
        let template = loc.rsplit('/').next().unwrap_or(&loc).to_string();
        if template.is_empty() {
            return;
        }
        let url = if loc.contains("://") {
            loc.clone()
        } else {
            format!("{}{}", base_of(index_url), loc.trim_start_matches('/'))
        };
        out.push(Appliance {
            fields,
            template,
            url,
        });
    };
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            finish(&mut cur, &mut out);
            last = None;
        } else if line.starts_with([' ', '\t']) {
            let Some(k) = &last else {
                return Err(RestoreError::Invalid(format!(
                    "appliance index line {}: continuation without a field",
                    n + 1
                )));
            };
            let v = cur.entry(k.clone()).or_default();
            let t = line.trim();
            v.push('\n');
            v.push_str(if t == "." { "" } else { t });
        } else if let Some((k, v)) = line.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            cur.insert(k.clone(), v.trim().to_string());
            last = Some(k);
        } else {
            return Err(RestoreError::Invalid(format!(
                "appliance index line {}: unable to parse '{line}'",
                n + 1
            )));
        }
    }
    finish(&mut cur, &mut out);
    out.sort_by(|a, b| {
        a.section()
            .cmp(b.section())
            .then_with(|| a.template.cmp(&b.template))
    });
    Ok(out)
}

/// The configured index URL.
#[must_use]
pub fn index_url(layout: &Layout) -> String {
    if let Ok(u) = std::env::var(INDEX_URL_ENV)
        && !u.is_empty()
    {
        return u;
    }
    if let Ok(text) = std::fs::read_to_string(layout.join("/etc/vzkit/pveam.cfg")) {
        for line in text.lines() {
            if let Some(v) = line.trim().strip_prefix("index-url:") {
                return v.trim().to_string();
            }
        }
    }
    DEFAULT_INDEX_URL.to_string()
}

/// Where `pveam update` keeps the index.
#[must_use]
pub fn index_path(layout: &Layout) -> PathBuf {
    layout.join("/var/lib/pve-manager/apl-info/aplinfo.dat")
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(std::time::Duration::from_secs(600)))
        .build()
        .new_agent()
}

fn fetch_err(url: &str, e: impl std::fmt::Display) -> RestoreError {
    RestoreError::Failed(format!("download of '{url}' failed: {e}"))
}

/// Streams `url` into `out`, returning the byte count.
fn fetch_into(url: &str, out: &mut dyn Write, hashers: &mut Hashers) -> Result<u64> {
    let resp = agent().get(url).call().map_err(|e| fetch_err(url, e))?;
    let mut body = resp.into_body().into_reader();
    let mut buf = vec![0u8; 256 * 1024];
    let mut n = 0u64;
    loop {
        let k = body.read(&mut buf).map_err(|e| fetch_err(url, e))?;
        if k == 0 {
            break;
        }
        hashers.update(&buf[..k]);
        out.write_all(&buf[..k])
            .map_err(|e| RestoreError::Failed(format!("write failed: {e}")))?;
        n += k as u64;
    }
    Ok(n)
}

#[derive(Default)]
struct Hashers {
    sha512: Sha512,
    md5: Md5,
}

impl Hashers {
    fn update(&mut self, b: &[u8]) {
        self.sha512.update(b);
        self.md5.update(b);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The checksum the index gives for `app`: (algorithm, lower-case hex).
///
/// # Errors
/// A record with neither `sha512sum` nor `md5sum`.
pub fn expected_checksum(app: &Appliance) -> Result<(&'static str, String)> {
    if let Some(s) = app.get("sha512sum") {
        return Ok(("sha512", s.to_ascii_lowercase()));
    }
    if let Some(s) = app.get("md5sum") {
        return Ok(("md5", s.to_ascii_lowercase()));
    }
    Err(RestoreError::Invalid(format!(
        "appliance index has no checksum for '{}'",
        app.template
    )))
}

/// `pveam update`: downloads the index, checks that it parses, stores it. Returns the
/// number of records.
///
/// # Errors
/// Download, parse and write errors (the stored index is then unchanged).
pub fn update(layout: &Layout) -> Result<usize> {
    let url = index_url(layout);
    let mut body = Vec::new();
    fetch_into(&url, &mut body, &mut Hashers::default())?;
    let text = String::from_utf8(body)
        .map_err(|_| RestoreError::Invalid(format!("index '{url}' is not UTF-8 text")))?;
    let n = parse_index(&text, &url)?.len();
    let path = index_path(layout);
    let dir = path.parent().expect("index path has a parent");
    std::fs::create_dir_all(dir)
        .map_err(|e| RestoreError::Failed(format!("mkdir '{}': {e}", dir.display())))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    // The URL is stored on the first line as a comment so `available` resolves locations.
    std::fs::write(&tmp, format!("# url: {url}\n{text}"))
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            RestoreError::Failed(format!("unable to write '{}': {e}", path.display()))
        })?;
    Ok(n)
}

/// The stored index (after `pveam update`).
///
/// # Errors
/// "no appliance index - run 'pveam update' first", parse errors.
pub fn load_index(layout: &Layout) -> Result<Vec<Appliance>> {
    let path = index_path(layout);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RestoreError::NotFound(
                "no appliance index - run 'pveam update' first".into(),
            ));
        }
        Err(e) => {
            return Err(RestoreError::Failed(format!(
                "unable to read '{}': {e}",
                path.display()
            )));
        }
    };
    let (url, body) = match text.split_once('\n') {
        Some((first, rest)) if first.starts_with("# url: ") => {
            (first.trim_start_matches("# url: ").to_string(), rest)
        }
        _ => (index_url(layout), text.as_str()),
    };
    parse_index(body, &url)
}

/// Checksums a file.
fn file_checksum(path: &Path, algo: &str) -> Result<String> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| RestoreError::Failed(format!("open '{}': {e}", path.display())))?;
    let mut h = Hashers::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let k = f
            .read(&mut buf)
            .map_err(|e| RestoreError::Failed(format!("read '{}': {e}", path.display())))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
    }
    Ok(if algo == "sha512" {
        hex(&h.sha512.finalize())
    } else {
        hex(&h.md5.finalize())
    })
}

/// Result of a download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Downloaded {
    /// Fetched and verified.
    Fetched {
        /// Bytes.
        size: u64,
    },
    /// Already there with the right checksum.
    AlreadyThere,
}

/// `pveam download`: fetches `app` to `dest`, verifying the index's checksum.
///
/// # Errors
/// Download errors, "checksum verification failed: expected X, got Y" (nothing is left
/// behind then).
pub fn download(app: &Appliance, dest: &Path) -> Result<Downloaded> {
    let (algo, want) = expected_checksum(app)?;
    if dest.is_file() && file_checksum(dest, algo)? == want {
        return Ok(Downloaded::AlreadyThere);
    }
    let dir = dest.parent().expect("template path has a parent");
    std::fs::create_dir_all(dir)
        .map_err(|e| RestoreError::Failed(format!("mkdir '{}': {e}", dir.display())))?;
    let tmp = dir.join(format!(".{}.tmp.{}", app.template, std::process::id()));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)
            .map_err(|e| RestoreError::Failed(format!("create '{}': {e}", tmp.display())))?;
        let mut h = Hashers::default();
        let size = fetch_into(&app.url, &mut f, &mut h)?;
        f.sync_all()
            .map_err(|e| RestoreError::Failed(format!("fsync '{}': {e}", tmp.display())))?;
        let got = if algo == "sha512" {
            hex(&h.sha512.finalize())
        } else {
            hex(&h.md5.finalize())
        };
        if got != want {
            return Err(RestoreError::Failed(format!(
                "checksum verification failed ({algo}): expected {want}, got {got}"
            )));
        }
        std::fs::rename(&tmp, dest)
            .map_err(|e| RestoreError::Failed(format!("rename to '{}': {e}", dest.display())))?;
        Ok(Downloaded::Fetched { size })
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    const INDEX: &str = "Package: debian-12-standard
Version: 12.7-1
Type: lxc
OS: debian-12
Section: system
Location: system/debian-12-standard_12.7-1_amd64.tar.zst
md5sum: 0b6959720ebd506b5ddb2fbf8780ca6c
sha512sum: ABCDEF
Description: Debian 12 Bookworm (standard)
 A small Debian Bookworm system.
 .
 Second paragraph.

Package: turnkey-wordpress
Section: turnkeylinux
Location: https://mirror.example/tk/turnkey-wordpress_18.0-1_amd64.tar.gz
md5sum: 11

Package: alpine-3.20-default
Section: system
Location: system/alpine-3.20-default_20240908_amd64.tar.xz
md5sum: 22

Package: broken-without-location
Section: system
";

    #[test]
    fn index_is_parsed_and_sorted() {
        let list = parse_index(INDEX, "http://h:1/images/aplinfo.dat").unwrap();
        let names: Vec<(&str, &str)> = list
            .iter()
            .map(|a| (a.section(), a.template.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("system", "alpine-3.20-default_20240908_amd64.tar.xz"),
                ("system", "debian-12-standard_12.7-1_amd64.tar.zst"),
                ("turnkeylinux", "turnkey-wordpress_18.0-1_amd64.tar.gz"),
            ]
        );
        assert_eq!(
            list[1].url,
            "http://h:1/images/system/debian-12-standard_12.7-1_amd64.tar.zst"
        );
        assert_eq!(
            list[1].get("description"),
            Some(
                "Debian 12 Bookworm (standard)\nA small Debian Bookworm system.\n\nSecond paragraph."
            )
        );
        assert_eq!(list[1].get("os"), Some("debian-12"));
        assert_eq!(
            expected_checksum(&list[1]).unwrap(),
            ("sha512", "abcdef".to_string())
        );
        assert_eq!(expected_checksum(&list[0]).unwrap().0, "md5");
        assert_eq!(
            list[2].url,
            "https://mirror.example/tk/turnkey-wordpress_18.0-1_amd64.tar.gz"
        );
        assert!(parse_index(" cont\n", "http://x/").is_err());
        assert!(parse_index("garbage line\n", "http://x/").is_err());
    }
}
