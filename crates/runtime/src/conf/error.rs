//! Errors of the container-config formats.
//!
//! Rules: one variant per situation a caller may branch on (`Locked`, `TooManyUnused`,
//! `UnknownSetting`); every message is PVE's wording (without Perl's trailing newline), so
//! users can search for it; parse warnings that PVE only `warn`s are returned as strings
//! by the lenient parser and as [`ConfError::Parse`] by the strict one.

use std::collections::BTreeMap;
use std::fmt;

/// An error of a container-config format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfError {
    /// A property-string key given twice (or two bare default-key values).
    #[error("duplicate key in comma-separated list property: {0}")]
    DuplicateKey(String),
    /// Another split-phase property-string error (missing key, no default key).
    #[error("{0}")]
    PropertyString(String),
    /// Schema-check failures of a property string, one message per key.
    #[error("{}", FormatErrors(.0))]
    Format(BTreeMap<String, String>),
    /// A `size=` value that is not a PVE disk size.
    #[error("invalid size: {0}")]
    InvalidSize(String),
    /// A property-string value that would need quoting.
    #[error("illegal value with commas for {0}")]
    CommaInValue(String),
    /// A config key that the container schema does not know.
    #[error("unknown setting '{0}'")]
    UnknownSetting(String),
    /// A known config key with a value of the wrong type, range or format.
    #[error("{key}: {message}")]
    InvalidValue {
        /// The config key.
        key: String,
        /// PVE's message for the check that failed.
        message: String,
    },
    /// A value that contains a newline and can therefore not be written.
    #[error("detected invalid newline inside property '{0}'")]
    Newline(String),
    /// A config-file line the strict parser refuses (`vm N - ...`).
    #[error("{0}")]
    Parse(String),
    /// The config carries a lock.
    #[error("CT is locked ({0})")]
    Locked(String),
    /// All `unusedN` slots are taken.
    #[error("Too many unused volumes - please delete them first.")]
    TooManyUnused,
    /// An `lxc.idmap` entry that does not parse or overlaps another.
    #[error("{0}")]
    IdMap(String),
    /// Any other value error, with PVE's message.
    #[error("{0}")]
    Invalid(String),
}

struct FormatErrors<'a>(&'a BTreeMap<String, String>);

impl fmt::Display for FormatErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("format error")?;
        for (k, v) in self.0 {
            write!(f, "\n{k}: {v}")?;
        }
        Ok(())
    }
}
