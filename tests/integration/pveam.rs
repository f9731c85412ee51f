//! End-to-end tests: `pveam` against an appliance index and templates served over HTTP on
//! 127.0.0.1 by a small server the test starts (and stops) itself; `pct create` from the
//! downloaded template.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use vzkit_tests::{TestRoot, is_root};

use crate::common;

/// A one-thread HTTP/1.0 server of fixed paths; stopped on drop.
struct Server {
    port: u16,
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(files: BTreeMap<String, Vec<u8>>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let (s, h) = (Arc::clone(&stop), Arc::clone(&hits));
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    let mut hdr = String::new();
                    if reader.read_line(&mut hdr).unwrap_or(0) == 0 || hdr == "\r\n" {
                        break;
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let resp = match files.get(&path) {
                    Some(body) => {
                        let mut r = format!(
                            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(body);
                        r
                    }
                    None => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                };
                let _ = conn.write_all(&resp);
            }
        });
        Server {
            port,
            stop,
            hits,
            thread: Some(thread),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sha512_hex(data: &[u8]) -> String {
    let out = common::run_with_input(&mut Command::new("sha512sum"), data);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn md5_hex(data: &[u8]) -> String {
    let out = common::run_with_input(&mut Command::new("md5sum"), data);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

const GOOD: &str = "debian-12-standard_12.7-1_amd64.tar.gz";
const MD5ONLY: &str = "alpine-3.20-default_20240908_amd64.tar.gz";
const BAD: &str = "broken-1.0_amd64.tar.gz";

#[test]
#[ignore = "needs root: loop devices, ext4 images, mounts (pct create)"]
fn update_available_download_list_create_remove() {
    assert!(is_root(), "needs root");
    let scratch = common::Scratch::new();
    let src = scratch.subdir("tmpl");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/debian_version"), b"12.7\n").unwrap();
    std::fs::write(src.join("etc/hostname"), b"tmpl\n").unwrap();
    let mut c = Command::new("tar");
    c.arg("czpf")
        .arg("-")
        .args(common::COMMON_TAR_FLAGS)
        .arg("-C")
        .arg(&src)
        .arg(".");
    let good = common::run(&mut c);
    let alpine = b"not even a tar: only checksummed".to_vec();
    let index = format!(
        "Package: debian-12-standard\nVersion: 12.7-1\nType: lxc\nOS: debian-12\nSection: system\nLocation: system/{GOOD}\nmd5sum: {}\nsha512sum: {}\nDescription: Debian 12 Bookworm (standard)\n A small Debian Bookworm system including all standard packages.\n\nPackage: alpine-3.20-default\nSection: system\nLocation: system/{MD5ONLY}\nmd5sum: {}\n\nPackage: broken\nSection: turnkeylinux\nLocation: tk/{BAD}\nsha512sum: {}\n",
        md5_hex(&good),
        sha512_hex(&good),
        md5_hex(&alpine),
        sha512_hex(b"something else"),
    );
    let mut files = BTreeMap::new();
    files.insert("/images/aplinfo.dat".to_string(), index.into_bytes());
    files.insert(format!("/images/system/{GOOD}"), good.clone());
    files.insert(format!("/images/system/{MD5ONLY}"), alpine.clone());
    files.insert(format!("/images/tk/{BAD}"), b"tampered".to_vec());
    let server = Server::start(files);
    let tr = TestRoot::new();
    tr.write(
        "/etc/vzkit/pveam.cfg",
        &format!(
            "index-url: http://127.0.0.1:{}/images/aplinfo.dat\n",
            server.port
        ),
    );

    let err = tr.fails("pveam", &["available"]);
    assert!(err.contains("run 'pveam update' first"), "{err}");
    assert_eq!(tr.ok("pveam", &["update"]), "update successful\n");
    assert_eq!(
        tr.ok("pveam", &["available"]),
        format!("system          {MD5ONLY}\nsystem          {GOOD}\nturnkeylinux    {BAD}\n")
    );
    assert_eq!(
        tr.ok("pveam", &["available", "--section", "turnkeylinux"]),
        format!("turnkeylinux    {BAD}\n")
    );

    let cache = tr.join("/var/lib/vz/template/cache");
    let out = tr.ok("pveam", &["download", "local", GOOD]);
    assert!(out.contains("checksum verified"), "{out}");
    assert_eq!(std::fs::read(cache.join(GOOD)).unwrap(), good);
    let hits = server.hits.load(Ordering::SeqCst);
    let out = tr.ok("pveam", &["download", "local", GOOD]);
    assert!(out.contains("no need to download"), "{out}");
    assert_eq!(server.hits.load(Ordering::SeqCst), hits, "downloaded again");
    tr.ok("pveam", &["download", "local", MD5ONLY]);
    assert_eq!(std::fs::read(cache.join(MD5ONLY)).unwrap(), alpine);

    // A checksum mismatch fails and leaves nothing behind.
    let err = tr.fails("pveam", &["download", "local", BAD]);
    assert!(
        err.contains("checksum verification failed (sha512)"),
        "{err}"
    );
    let mut names: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [MD5ONLY, GOOD]);
    let err = tr.fails("pveam", &["download", "local", "nope.tar.gz"]);
    assert!(err.contains("no such template 'nope.tar.gz'"), "{err}");

    let list = tr.ok("pveam", &["list", "local"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "SIZE"]
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("local:vztmpl/{GOOD} "))),
        "{list}"
    );

    // The downloaded template creates a container; its OS type is detected.
    tr.ok(
        "pct",
        &[
            "create",
            "200",
            &format!("local:vztmpl/{GOOD}"),
            "--rootfs",
            "local:0.1",
        ],
    );
    let conf = tr.read("/etc/pve/lxc/200.conf");
    assert!(conf.contains("ostype: debian\n"), "{conf}");

    tr.ok("pveam", &["remove", &format!("local:vztmpl/{GOOD}")]);
    assert!(!cache.join(GOOD).exists());
    let err = tr.fails("pveam", &["remove", "local:200/vm-200-disk-0.raw"]);
    assert!(err.contains("not a container template"), "{err}");
    drop(server);
}
