//! `/etc/vzdump.conf`: node-wide vzdump defaults.
//!
//! Compatibility target: `PVE::VZDump::read_vzdump_defaults` (pve-manager 14a22df) on top of
//! `PVE::JSONSchema::parse_config` (pve-common 9.2.1).
//!
//! Format: one `key: value` per line; leading/trailing whitespace is ignored, as are empty
//! lines and lines starting with `#`. Other lines are warned about (`ignore config line: L`).
//! Boolean keys accept `1|on|yes|true` / `0|off|no|false` (any case); `exclude-path` may be
//! given on several lines and each line is further split like a shell command line
//! (`split_args`, for old configs with several paths on one line); `mailto` is a list split
//! at `,` `;` and whitespace. A later line for any other key replaces an earlier one.
//!
//! Schema errors never fail the parse: the key is dropped with the warning
//! `parse error in '<file>' - '<key>': <reason>`. Keys not present get the schema defaults.
//! If both `storage` and `dumpdir` are set, `dumpdir` is dropped with a warning.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use regex::Regex;

use crate::options::{JobOptions, is_array_key, is_boolean_key};
use vzkit_storage::prune::parse_boolean;

/// Default location of the file.
pub const VZDUMP_CONF: &str = "/etc/vzdump.conf";

static LINE_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^([^ \t\n\r\x0B\x0C]+?):[ \t\n\r\x0B\x0C]*(.*)$").expect("static regex")
});

fn is_perl_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0B' | '\x0C')
}

/// `read_vzdump_defaults`: the defaults from the file's text (`None` if the file does not
/// exist: schema defaults only) and the warnings PVE prints.
pub fn read_defaults(text: Option<&str>, filename: &str) -> (JobOptions, Vec<String>) {
    match text {
        Some(t) => parse_vzdump_conf(t, filename),
        None => (JobOptions::schema_defaults(), Vec::new()),
    }
}

/// Parse the text of `/etc/vzdump.conf` (`filename` only appears in warnings) and fill the
/// schema defaults for keys not set. Never fails.
pub fn parse_vzdump_conf(text: &str, filename: &str) -> (JobOptions, Vec<String>) {
    let (opts, _explicit, warnings) = parse_vzdump_conf_explicit(text, filename);
    (opts, warnings)
}

/// As [`parse_vzdump_conf`], and also the options the file sets itself (before the schema
/// defaults are filled in), so that callers can tell "set to the default" from "not set".
pub fn parse_vzdump_conf_explicit(
    text: &str,
    filename: &str,
) -> (JobOptions, JobOptions, Vec<String>) {
    let mut warnings = Vec::new();
    let mut scalars: BTreeMap<String, String> = BTreeMap::new();
    let mut arrays: BTreeMap<String, Vec<String>> = BTreeMap::new();

    for raw_line in text.split('\n') {
        let line = raw_line.trim_matches(is_perl_space);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some(c) = LINE_RE.captures(line) else {
            warnings.push(format!("ignore config line: {line}"));
            continue;
        };
        let key = c[1].to_string();
        let mut value = c[2].to_string();
        if is_boolean_key(&key)
            && let Some(b) = parse_boolean(&value)
        {
            value = if b { "1" } else { "0" }.to_string();
        }
        if is_array_key(&key) {
            arrays.entry(key).or_default().push(value);
        } else {
            scalars.insert(key, value);
        }
    }

    let mut opts = JobOptions::default();
    let mut errors: BTreeMap<String, String> = BTreeMap::new();
    for (key, value) in &scalars {
        if let Err(e) = opts.set(key, value) {
            errors.insert(key.clone(), e.message());
        }
    }
    for (key, values) in &arrays {
        // `exclude-path` entries are re-split like a shell command line
        let list: Vec<String> = values.iter().flat_map(|v| split_args(v)).collect();
        opts.exclude_path = Some(list);
        debug_assert_eq!(key, "exclude-path");
    }
    for (key, message) in &errors {
        warnings.push(format!("parse error in '{filename}' - '{key}': {message}"));
    }

    let explicit = opts.clone();
    fill_schema_defaults(&mut opts);

    if opts.storage.is_some() && opts.dumpdir.is_some() {
        warnings.push(format!(
            "both 'storage' and 'dumpdir' defined in '{filename}' - ignoring 'dumpdir'"
        ));
        opts.dumpdir = None;
    }
    (opts, explicit, warnings)
}

fn fill_schema_defaults(o: &mut JobOptions) {
    let d = JobOptions::schema_defaults();
    macro_rules! fill {
        ($($f:ident),*) => { $( if o.$f.is_none() { o.$f = d.$f.clone(); } )* };
    }
    fill!(
        all,
        stdexcludes,
        compress,
        pigz,
        zstd,
        mode,
        quiet,
        mailnotification,
        notification_mode,
        stop,
        bwlimit,
        ionice,
        lockwait,
        stopwait,
        prune_backups,
        remove,
        performance,
        fleecing
    );
}

/// `PVE::Tools::split_args` = `Text::ParseWords::shellwords`: split at whitespace, honouring
/// `'...'` (literal), `"..."` and backslash escapes (outside single quotes a backslash
/// escapes any character). An unbalanced quote yields no words at all; so do `""` and `"0"`
/// (Perl-false input).
pub fn split_args(s: &str) -> Vec<String> {
    if s.is_empty() || s == "0" {
        return Vec::new();
    }
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.trim_start_matches(is_perl_space).chars();
    while let Some(c) = chars.next() {
        match c {
            c if is_perl_space(c) => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\\' => {
                in_word = true;
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(n) => cur.push(n),
                        None => return Vec::new(),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(n) => cur.push(n),
                            None => return Vec::new(),
                        },
                        Some(n) => cur.push(n),
                        None => return Vec::new(),
                    }
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::Performance;

    const SHIPPED: &str = "# vzdump default settings

#tmpdir: DIR
#dumpdir: DIR
#storage: STORAGE_ID
#mode: snapshot|suspend|stop
#bwlimit: KBPS
#performance: [max-workers=N][,pbs-entries-max=N]
#ionice: PRI
#lockwait: MINUTES
#stopwait: MINUTES
#stdexcludes: BOOLEAN
#mailto: ADDRESSLIST
#prune-backups: keep-INTERVAL=N[,...]
#script: FILENAME
#exclude-path: PATHLIST
#pigz: N
#notes-template: {{guestname}}
#pbs-change-detection-mode: legacy|data|metadata
#fleecing: enabled=BOOLEAN,storage=STORAGE_ID
";

    #[test]
    fn shipped_file_is_all_defaults() {
        let (o, w) = parse_vzdump_conf(SHIPPED, VZDUMP_CONF);
        assert!(w.is_empty());
        assert_eq!(o, JobOptions::schema_defaults());
        assert_eq!(read_defaults(None, VZDUMP_CONF).0, o);
    }

    #[test]
    fn values_and_warnings() {
        let text = "  mode: stop  \n\
                    stdexcludes: No\n\
                    exclude-path: /a \"/b c\" '/d e'\n\
                    exclude-path: /f\\ g\n\
                    mailto: a@example.com, root\n\
                    ionice: 9\n\
                    bogus: 1\n\
                    no colon here\n\
                    performance: max-workers=2\n\
                    bwlimit: 10\n\
                    bwlimit: 20\n\
                    storage: local\n\
                    dumpdir: /mnt\n\
                    prune-backups: keep-all=1,keep-last=2\n";
        let (o, w) = parse_vzdump_conf(text, "/etc/vzdump.conf");
        assert_eq!(
            w,
            [
                "ignore config line: no colon here",
                "parse error in '/etc/vzdump.conf' - 'bogus': property is not defined in schema and the schema does not allow additional properties",
                "parse error in '/etc/vzdump.conf' - 'ionice': value must have a maximum value of 8",
                "parse error in '/etc/vzdump.conf' - 'prune-backups': invalid format - keep-all cannot be set together with other options.",
                "both 'storage' and 'dumpdir' defined in '/etc/vzdump.conf' - ignoring 'dumpdir'",
            ]
        );
        assert_eq!(o.mode.as_deref(), Some("stop"));
        assert_eq!(o.stdexcludes, Some(false));
        assert_eq!(
            o.exclude_path,
            Some(vec![
                "/a".into(),
                "/b c".into(),
                "/d e".into(),
                "/f g".into()
            ])
        );
        assert_eq!(o.mailto, Some(vec!["a@example.com".into(), "root".into()]));
        assert_eq!(o.ionice, Some(7)); // dropped, default
        assert_eq!(o.bwlimit, Some(20));
        assert_eq!(
            o.performance,
            Some(Performance {
                max_workers: Some(2),
                pbs_entries_max: None
            })
        );
        assert_eq!(o.storage.as_deref(), Some("local"));
        assert_eq!(o.dumpdir, None);
        assert_eq!(o.prune_backups.unwrap().to_string(), "keep-all=1");
    }

    #[test]
    fn shell_words() {
        assert_eq!(split_args("/a  /b"), ["/a", "/b"]);
        assert_eq!(split_args("  'x y'z \"q\\\"r\""), ["x yz", "q\"r"]);
        assert_eq!(split_args("a\\ b"), ["a b"]);
        assert!(split_args("'unbalanced").is_empty());
        assert!(split_args("0").is_empty());
        assert!(split_args("").is_empty());
        assert_eq!(split_args("''"), [""]);
    }
}
