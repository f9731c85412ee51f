//! Value checks of PVE's JSON schema that every layer shares.

/// `PVE::JSONSchema::parse_boolean`: `1|on|yes|true` / `0|off|no|false`, case-insensitive;
/// `None` for anything else.
#[must_use]
pub fn parse_boolean(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "on" | "yes" | "true" => Some(true),
        "0" | "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_pve_spellings_only() {
        for t in ["1", "on", "YES", "True"] {
            assert_eq!(parse_boolean(t), Some(true), "{t}");
        }
        for f in ["0", "OFF", "no", "false"] {
            assert_eq!(parse_boolean(f), Some(false), "{f}");
        }
        for x in ["", "2", "y", "enable"] {
            assert_eq!(parse_boolean(x), None, "{x}");
        }
    }
}
