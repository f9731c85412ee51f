//! Each compression both ways against the CLI tools.

use std::io::{Read, Write};
use std::process::Command;

use vzkit_archive::{Compression, compressor, decompressor, decompressor_auto};

use crate::common::{noise, run_with_input};

fn sample() -> Vec<u8> {
    // Compressible and incompressible parts, > several lzop blocks.
    let mut v: Vec<u8> = (0..2_000_000u32).map(|i| (i / 1000) as u8).collect();
    v.extend(noise(700_000, 3));
    v
}

const TOOLS: &[(Compression, &str, &[&str])] = &[
    (Compression::Gzip, "gzip", &["-c"]),
    (Compression::Lzo, "lzop", &["-c"]),
    (Compression::Zstd, "zstd", &["-q", "-c", "--threads=2"]),
];

#[test]
fn our_output_decompresses_with_the_cli() {
    let data = sample();
    for &(c, tool, _) in TOOLS {
        for threads in [1, 2] {
            let mut enc = compressor(Vec::new(), c, threads, None).unwrap();
            enc.write_all(&data).unwrap();
            let compressed = enc.finish().unwrap();
            let out = run_with_input(Command::new(tool).args(["-d", "-c"]), &compressed);
            assert!(out == data, "{tool} -dc of our {c:?} output differs");
        }
    }
}

#[test]
fn cli_output_decompresses_with_us() {
    let data = sample();
    for &(c, tool, args) in TOOLS {
        let compressed = run_with_input(Command::new(tool).args(args), &data);
        assert_eq!(Compression::detect(&compressed), c, "{tool}");
        let mut back = Vec::new();
        decompressor(&compressed[..], c)
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data, "our {c:?} decoder differs on {tool} output");
        let (sniffed, mut dec) = decompressor_auto(&compressed[..]).unwrap();
        assert_eq!(sniffed, c);
        let mut back = Vec::new();
        dec.read_to_end(&mut back).unwrap();
        assert!(back == data);
    }
    // zstd --long=31 needs window_log_max(31); lzop -9 and -1 are other methods.
    for (tool, args) in [
        ("zstd", &["-q", "-c", "--long=31"][..]),
        ("lzop", &["-c", "-9"]),
        ("lzop", &["-c", "-1"]),
    ] {
        let compressed = run_with_input(Command::new(tool).args(args), &data);
        let (_, mut dec) = decompressor_auto(&compressed[..]).unwrap();
        let mut back = Vec::new();
        dec.read_to_end(&mut back).unwrap();
        assert!(back == data, "{tool} {args:?}");
    }
}

#[test]
fn corrupt_compressed_streams_fail() {
    let data = sample();
    for &(c, tool, args) in TOOLS {
        let mut compressed = run_with_input(Command::new(tool).args(args), &data);
        let n = compressed.len();
        compressed.truncate(n / 2);
        let mut back = Vec::new();
        let res = decompressor(&compressed[..], c).and_then(|mut d| d.read_to_end(&mut back));
        assert!(res.is_err(), "{tool}: truncated stream must fail");
    }
}
