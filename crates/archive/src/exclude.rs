//! Exclude patterns with GNU tar semantics, as vzdump passes them.
//!
//! vzdump (pve-manager `PVE/VZDump/LXC.pm`) calls
//! `tar … --no-anchored --exclude=PAT … --anchored --exclude=./PAT …`:
//! patterns not starting with `/` are *unanchored*, patterns starting with
//! `/` become anchored `.`-prefixed patterns. GNU tar then matches every
//! member name (`./var/tmp/x`, no trailing slash) with gnulib `exclude`:
//!
//! * wildcards are on and match `/` (`--wildcards --wildcards-match-slash`,
//!   tar's defaults for exclusion), `\` escapes, no special leading dot;
//! * `FNM_LEADING_DIR` (from `--recursion`): a pattern also matches a name
//!   that continues with `/…` after the matched part;
//! * unanchored: the pattern is tried against the whole name and against
//!   every suffix that follows a `/`.
//!
//! So `--no-anchored --exclude=bar` excludes `./bar`, `./var/bar`,
//! `./var/foo/bar` but not `./bar2`; `--anchored --exclude=./tmp/?*` excludes
//! everything below `./tmp` but not `./tmp` itself. A pattern with a trailing
//! `/` matches nothing (vzdump warns "tar does not match exclusion with a
//! trailing slash"). An excluded directory is not descended into.

/// One compiled pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    source: Vec<u8>,
    tokens: Vec<Token>,
    anchored: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Byte(u8),
    AnyByte,
    Star,
    Class {
        negated: bool,
        ranges: Vec<(u8, u8)>,
    },
}

/// A set of exclude patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExcludeSet {
    patterns: Vec<Pattern>,
}

impl ExcludeSet {
    /// An empty set (excludes nothing).
    #[must_use]
    pub fn new() -> Self {
        ExcludeSet::default()
    }

    /// Add a pattern matched against the whole member name
    /// (`--anchored --exclude=PAT`), e.g. `./dev/*`.
    pub fn add_anchored(&mut self, pattern: impl AsRef<[u8]>) -> &mut Self {
        self.push(pattern.as_ref(), true)
    }

    /// Add a pattern matched against any `/`-separated tail of the member
    /// name (`--no-anchored --exclude=PAT`), e.g. `lost+found`.
    pub fn add_unanchored(&mut self, pattern: impl AsRef<[u8]>) -> &mut Self {
        self.push(pattern.as_ref(), false)
    }

    fn push(&mut self, pattern: &[u8], anchored: bool) -> &mut Self {
        self.patterns.push(Pattern {
            source: pattern.to_vec(),
            tokens: compile(pattern),
            anchored,
        });
        self
    }

    /// Build the set from vzdump exclude paths (`exclude-path`,
    /// stdexcludes) the way vzdump turns them into tar options: `/x` →
    /// anchored `./x`, anything else unanchored. Returns the warnings
    /// vzdump logs for patterns with a trailing slash.
    #[must_use]
    pub fn from_vzdump_patterns<S: AsRef<str>>(patterns: &[S]) -> (ExcludeSet, Vec<String>) {
        let mut set = ExcludeSet::new();
        let mut warnings = Vec::new();
        for p in patterns {
            let p = p.as_ref();
            if p.ends_with('/') {
                warnings.push(format!(
                    "tar does not match exclusion with a trailing slash '{p}'"
                ));
            }
            if p.starts_with('/') {
                set.add_anchored(format!(".{p}"));
            } else {
                set.add_unanchored(p);
            }
        }
        (set, warnings)
    }

    /// What `pct restore` excludes: `--anchored --exclude ./dev/*`.
    #[must_use]
    pub fn pve_restore() -> ExcludeSet {
        let mut set = ExcludeSet::new();
        set.add_anchored("./dev/*");
        set
    }

    /// True if no pattern is in the set.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns as given, with `true` for anchored ones.
    pub fn patterns(&self) -> impl Iterator<Item = (&[u8], bool)> {
        self.patterns
            .iter()
            .map(|p| (p.source.as_slice(), p.anchored))
    }

    /// Whether a member name (`./var/tmp/x`, as stored, without trailing
    /// slash) is excluded.
    #[must_use]
    pub fn is_excluded(&self, name: &[u8]) -> bool {
        self.patterns.iter().any(|p| p.matches(name))
    }
}

impl Pattern {
    fn matches(&self, name: &[u8]) -> bool {
        if leading_dir_match(&self.tokens, name) {
            return true;
        }
        if self.anchored {
            return false;
        }
        // gnulib exclude_fnmatch: retry after every '/' not followed by '/'.
        (0..name.len())
            .filter(|&i| name[i] == b'/' && name.get(i + 1) != Some(&b'/'))
            .any(|i| leading_dir_match(&self.tokens, &name[i + 1..]))
    }
}

fn compile(p: &[u8]) -> Vec<Token> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'\\' if i + 1 < p.len() => {
                out.push(Token::Byte(p[i + 1]));
                i += 2;
            }
            b'*' => {
                if out.last() != Some(&Token::Star) {
                    out.push(Token::Star);
                }
                i += 1;
            }
            b'?' => {
                out.push(Token::AnyByte);
                i += 1;
            }
            b'[' => match compile_class(p, i + 1) {
                Some((tok, next)) => {
                    out.push(tok);
                    i = next;
                }
                None => {
                    out.push(Token::Byte(b'['));
                    i += 1;
                }
            },
            b => {
                out.push(Token::Byte(b));
                i += 1;
            }
        }
    }
    out
}

/// Parse a bracket expression starting after `[`; `None` if unterminated.
fn compile_class(p: &[u8], mut i: usize) -> Option<(Token, usize)> {
    let negated = matches!(p.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let mut c = *p.get(i)?;
        if c == b']' && !first {
            return Some((Token::Class { negated, ranges }, i + 1));
        }
        first = false;
        if c == b'\\' {
            i += 1;
            c = *p.get(i)?;
        }
        i += 1;
        if p.get(i) == Some(&b'-') && p.get(i + 1).is_some_and(|&n| n != b']') {
            let mut hi = p[i + 1];
            i += 2;
            if hi == b'\\' {
                hi = *p.get(i)?;
                i += 1;
            }
            ranges.push((c, hi));
        } else {
            ranges.push((c, c));
        }
    }
}

fn token_matches(t: &Token, b: u8) -> bool {
    match t {
        Token::Byte(x) => *x == b,
        Token::AnyByte => true,
        Token::Class { negated, ranges } => {
            ranges.iter().any(|&(lo, hi)| lo <= b && b <= hi) != *negated
        }
        Token::Star => unreachable!("stars are handled by the matcher"),
    }
}

/// Full-string match (fnmatch without FNM_PATHNAME/FNM_PERIOD), greedy with
/// single-star backtracking, linear in practice.
fn full_match(tokens: &[Token], s: &[u8]) -> bool {
    let (mut ti, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match tokens.get(ti) {
            Some(Token::Star) => {
                star = Some((ti, si));
                ti += 1;
            }
            Some(t) if token_matches(t, s[si]) => {
                ti += 1;
                si += 1;
            }
            _ => match star {
                Some((st, ss)) => {
                    ti = st + 1;
                    si = ss + 1;
                    star = Some((st, ss + 1));
                }
                None => return false,
            },
        }
    }
    tokens[ti..].iter().all(|t| *t == Token::Star)
}

/// fnmatch with FNM_LEADING_DIR: the pattern matches the name, or a prefix
/// of it that is followed by `/`.
fn leading_dir_match(tokens: &[Token], s: &[u8]) -> bool {
    full_match(tokens, s)
        || (0..s.len())
            .filter(|&k| s[k] == b'/')
            .any(|k| full_match(tokens, &s[..k]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vzdump_semantics_table() {
        let (set, warnings) = ExcludeSet::from_vzdump_patterns(&[
            "bar",
            "/tmp/?*",
            "/var/run/?*.pid",
            "*.log",
            "/home/u/cache/",
            "[ab]c",
        ]);
        assert_eq!(
            warnings,
            ["tar does not match exclusion with a trailing slash '/home/u/cache/'"]
        );
        let cases: &[(&str, bool)] = &[
            ("./bar", true),
            ("./var/bar", true),
            ("./var/foo/bar", true),
            ("./bar2", false),
            ("./bar/inside", true),
            ("./tmp", false),
            ("./tmp/x", true),
            ("./tmp/x/y", true),
            ("./srv/tmp/x", false),
            ("./var/run/a.pid", true),
            ("./var/run/sub/a.pid", true), // '*' matches '/' for exclusion
            ("./var/run/.pid", false),
            ("./x/y.log", true),
            ("./x.log.1", false),
            ("./home/u/cache", false),
            ("./home/u/cache/f", false),
            ("./ac", true),
            ("./d/bc", true),
            ("./cc", false),
        ];
        for &(name, want) in cases {
            assert_eq!(set.is_excluded(name.as_bytes()), want, "{name}");
        }
    }

    #[test]
    fn restore_excludes_dev_contents_only() {
        let set = ExcludeSet::pve_restore();
        assert!(set.is_excluded(b"./dev/null"));
        assert!(set.is_excluded(b"./dev/pts/0"));
        assert!(!set.is_excluded(b"./dev"));
        assert!(!set.is_excluded(b"./usr/dev/x"));
        assert!(!set.is_excluded(b"dev/null"));
    }

    #[test]
    fn fnmatch_details() {
        let cases: &[(&str, &str, bool)] = &[
            ("a\\*b", "a*b", true),
            ("a\\*b", "axb", false),
            ("[!a]", "b", true),
            ("[!a]", "a", false),
            ("[]x]", "]", true),
            ("[a-c]z", "bz", true),
            ("[a-c]z", "dz", false),
            ("[", "[", true),
            ("*a*b*c*", "xxaxxbxxc", true),
            ("*a*b*c*", "xxaxxcxxb", false),
            ("?", "", false),
            ("**", "", true),
        ];
        for &(p, s, want) in cases {
            assert_eq!(
                full_match(&compile(p.as_bytes()), s.as_bytes()),
                want,
                "{p} ~ {s}"
            );
        }
    }
}
