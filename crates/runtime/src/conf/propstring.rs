//! PVE property strings (`key=value,key=value`, one bare default-key value), the format of
//! `rootfs`, `mpN`, `netN`, `devN`, `unusedN` and `features`.
//!
//! Compatibility target: `PVE::JSONSchema::parse_property_string` and `print_property_string`
//! (pve-common 9.2.1) for the schema features vzkit's formats use: a default key, booleans,
//! integers with bounds, numbers, enums, anchored patterns and named formats (verifier
//! functions). Parsing is two-phase as in PVE: the split phase fails fast with a single
//! message; the schema check collects one message per key and fails with
//! `format error` plus `key: message` lines (sorted by key, where PVE uses hash order).

use std::collections::BTreeMap;

use regex::Regex;

use super::error::ConfError;

/// Value type of one property.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PropType {
    Bool,
    Int { min: Option<i64>, max: Option<i64> },
    Number { min: Option<f64>, max: Option<f64> },
    Str,
}

/// A verifier for a named format (`pve-lxc-mp-string`, `pve-volume-id`, ...): returns the
/// message PVE's verifier dies with.
pub(crate) type FormatCheck = fn(&str) -> Result<(), String>;

/// One property of a property-string schema.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PropDesc {
    pub key: &'static str,
    pub ty: PropType,
    pub optional: bool,
    pub default_key: bool,
    pub enumeration: Option<&'static [&'static str]>,
    /// Regex source; PVE anchors it as `^(?:pattern)$`.
    pub pattern: Option<&'static str>,
    pub format: Option<FormatCheck>,
}

impl PropDesc {
    pub(crate) const fn new(key: &'static str, ty: PropType) -> Self {
        Self {
            key,
            ty,
            optional: true,
            default_key: false,
            enumeration: None,
            pattern: None,
            format: None,
        }
    }
    pub(crate) const fn required(mut self) -> Self {
        self.optional = false;
        self
    }
    pub(crate) const fn default_key(mut self) -> Self {
        self.default_key = true;
        self
    }
    pub(crate) const fn enumeration(mut self, values: &'static [&'static str]) -> Self {
        self.enumeration = Some(values);
        self
    }
    pub(crate) const fn pattern(mut self, re: &'static str) -> Self {
        self.pattern = Some(re);
        self
    }
    pub(crate) const fn format(mut self, check: FormatCheck) -> Self {
        self.format = Some(check);
        self
    }
}

/// Perl truthiness of a string: `""` and `"0"` are false.
pub(crate) fn perl_true(s: &str) -> bool {
    !(s.is_empty() || s == "0")
}

pub(crate) use vzkit_host::schema::parse_boolean;

fn anchored_match(pattern: &str, value: &str) -> bool {
    // Patterns are compile-time constants of this crate; a broken one is a bug that the
    // unit tests exercise, so treating it as "no match" cannot hide bad input.
    Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|re| re.is_match(value))
}

fn is_integer(v: &str) -> bool {
    let digits = v.strip_prefix('-').unwrap_or(v);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// PVE's number check: `^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$` (Perl `looks_like_number`
/// restricted to plain decimal notation).
fn is_number(v: &str) -> bool {
    anchored_match(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", v)
}

/// Checks one value against its property description, as JSONSchema's `check_prop`.
pub(crate) fn check_value(desc: &PropDesc, value: &str) -> Result<(), String> {
    match desc.ty {
        PropType::Bool => {
            if value != "0" && value != "1" {
                return Err(format!("type check ('boolean') failed - got '{value}'"));
            }
        }
        PropType::Int { min, max } => {
            if !is_integer(value) {
                return Err(format!("type check ('integer') failed - got '{value}'"));
            }
            // Text beyond i128 is certainly beyond any bound declared here.
            let n: i128 = value.parse().unwrap_or(if value.starts_with('-') {
                i128::MIN
            } else {
                i128::MAX
            });
            if let Some(min) = min
                && n < i128::from(min)
            {
                return Err(format!("value must have a minimum value of {min}"));
            }
            if let Some(max) = max
                && n > i128::from(max)
            {
                return Err(format!("value must have a maximum value of {max}"));
            }
        }
        PropType::Number { min, max } => {
            if !is_number(value) {
                return Err(format!("type check ('number') failed - got '{value}'"));
            }
            if let Ok(n) = value.parse::<f64>() {
                if let Some(min) = min.filter(|m| n < *m) {
                    return Err(format!("value must have a minimum value of {min}"));
                }
                if let Some(max) = max.filter(|m| n > *m) {
                    return Err(format!("value must have a maximum value of {max}"));
                }
            }
        }
        PropType::Str => {}
    }
    if let Some(values) = desc.enumeration
        && !values.contains(&value)
    {
        return Err(format!(
            "value '{value}' does not have a value in the enumeration '{}'",
            values.join(", ")
        ));
    }
    if let Some(pattern) = desc.pattern
        && !anchored_match(pattern, value)
    {
        return Err("value does not match the regex pattern".to_string());
    }
    if let Some(check) = desc.format {
        check(value)?;
    }
    Ok(())
}

/// Parses a property string against `schema`: PVE's split phase, boolean normalisation to
/// `1`/`0`, then the schema check.
///
/// # Errors
/// The split-phase messages (`duplicate key in comma-separated list property: k`,
/// `missing key in comma-separated list property`, `value without key, but schema does not
/// define a default key`) or [`ConfError::Format`] with one message per offending key.
pub(crate) fn parse(
    schema: &[PropDesc],
    data: &str,
) -> Result<BTreeMap<String, String>, ConfError> {
    let mut res: BTreeMap<String, String> = BTreeMap::new();
    let mut default_key: Option<&'static str> = None;
    for part in data.split(',') {
        if part.chars().all(char::is_whitespace) {
            continue;
        }
        // Perl: /^([^=]+)=(.+)$/ — key without '=', value non-empty (may contain '=').
        let kv = part
            .split_once('=')
            .filter(|(k, v)| !k.is_empty() && !v.is_empty());
        if let Some((k, v)) = kv {
            if res.contains_key(k) {
                return Err(ConfError::DuplicateKey(k.to_string()));
            }
            let mut v = v.to_string();
            let is_bool = schema
                .iter()
                .any(|d| d.key == k && matches!(d.ty, PropType::Bool));
            if is_bool && let Some(b) = parse_boolean(&v) {
                v = if b { "1" } else { "0" }.to_string();
            }
            res.insert(k.to_string(), v);
        } else if !part.contains('=') {
            if let Some(dk) = default_key {
                return Err(ConfError::DuplicateKey(dk.to_string()));
            }
            let Some(desc) = schema.iter().find(|d| d.default_key) else {
                return Err(ConfError::PropertyString(
                    "value without key, but schema does not define a default key".to_string(),
                ));
            };
            default_key = Some(desc.key);
            // Perl tests `!$res->{$default_key}`: a stored "0" or "" is overwritten.
            if res.get(desc.key).is_some_and(|v| perl_true(v)) {
                return Err(ConfError::DuplicateKey(desc.key.to_string()));
            }
            res.insert(desc.key.to_string(), part.to_string());
        } else {
            return Err(ConfError::PropertyString(
                "missing key in comma-separated list property".to_string(),
            ));
        }
    }
    check_object(schema, &res)?;
    Ok(res)
}

/// JSONSchema's `check_object` for a property-string schema without additional properties.
pub(crate) fn check_object(
    schema: &[PropDesc],
    data: &BTreeMap<String, String>,
) -> Result<(), ConfError> {
    let mut errors = BTreeMap::new();
    for desc in schema {
        match data.get(desc.key) {
            None if !desc.optional => {
                errors.insert(
                    desc.key.to_string(),
                    "property is missing and it is not optional".to_string(),
                );
            }
            None => {}
            Some(v) => {
                if let Err(msg) = check_value(desc, v) {
                    errors.insert(desc.key.to_string(), msg);
                }
            }
        }
    }
    for k in data.keys() {
        if !schema.iter().any(|d| d.key == k) {
            errors.insert(
                k.clone(),
                "property is not defined in schema and the schema does not allow additional \
                 properties"
                    .to_string(),
            );
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ConfError::Format(errors))
    }
}

/// Prints `data` as PVE's `print_property_string`: the default key's value bare, then the
/// required keys, then all others sorted by key.
///
/// # Errors
/// [`ConfError::CommaInValue`] for a value containing `,`.
pub(crate) fn print(
    schema: &[PropDesc],
    data: &BTreeMap<String, String>,
) -> Result<String, ConfError> {
    let default = schema.iter().find(|d| d.default_key).map(|d| d.key);
    let is_required = |k: &str| schema.iter().any(|d| d.key == k && !d.optional);
    let mut order: Vec<(&str, bool)> = Vec::with_capacity(data.len());
    if let Some(dk) = default.filter(|dk| data.contains_key(*dk)) {
        order.push((dk, true));
    }
    for k in data.keys().map(String::as_str) {
        if Some(k) != default && is_required(k) {
            order.push((k, false));
        }
    }
    for k in data.keys().map(String::as_str) {
        if Some(k) != default && !is_required(k) {
            order.push((k, false));
        }
    }
    let mut parts = Vec::with_capacity(order.len());
    for (key, bare) in order {
        let value = &data[key];
        if value.contains(',') {
            return Err(ConfError::CommaInValue(key.to_string()));
        }
        parts.push(if bare {
            value.clone()
        } else {
            format!("{key}={value}")
        });
    }
    Ok(parts.join(","))
}
