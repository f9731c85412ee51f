//! PVE-compatible command-line conventions on top of clap.
//!
//! PVE's CLI accepts `--opt value` and `-opt value`, and booleans as a bare `--opt` or with an
//! explicit `--opt 1` / `--opt 0` (also `yes/no/on/off/true/false`). clap knows neither
//! single-dash long options nor optional boolean values that are only consumed when they look
//! boolean, so [`normalize`] rewrites the argument vector first: `-opt` becomes `--opt`, and a
//! boolean option not followed by a boolean literal gets an explicit `1`. Boolean options are
//! then declared in clap as taking exactly one value parsed by [`parse_bool`].

/// Whether `s` is one of PVE's boolean literals.
#[must_use]
pub fn is_bool_literal(s: &str) -> bool {
    parse_bool(s).is_ok()
}

/// Parses PVE's boolean literals (`1|on|yes|true`, `0|off|no|false`, case-insensitive).
///
/// # Errors
/// A message naming the value otherwise.
pub fn parse_bool(s: &str) -> Result<bool, String> {
    vzkit_host::schema::parse_boolean(s)
        .ok_or_else(|| format!("type check ('boolean') failed - got '{s}'"))
}

/// Rewrites PVE-style arguments into clap-style ones. `bool_opts` names the boolean options
/// (without dashes) of the command being parsed. Everything after a bare `--` is left alone.
#[must_use]
pub fn normalize(args: Vec<String>, bool_opts: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len() + 4);
    let mut iter = args.into_iter().peekable();
    if let Some(prog) = iter.next() {
        out.push(prog);
    }
    while let Some(arg) = iter.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(iter);
            break;
        }
        let long = if arg.len() > 2
            && arg.starts_with('-')
            && !arg.starts_with("--")
            && !arg[1..].starts_with(|c: char| c.is_ascii_digit())
        {
            format!("-{arg}")
        } else {
            arg
        };
        if let Some(name) = long.strip_prefix("--")
            && !name.contains('=')
            && bool_opts.contains(&name)
        {
            out.push(long);
            if !iter.peek().is_some_and(|next| is_bool_literal(next)) {
                out.push("1".into());
            }
            continue;
        }
        out.push(long);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn single_dash_long_options_become_double_dash() {
        assert_eq!(
            normalize(v("pvesm list -content backup"), &[]),
            v("pvesm list --content backup")
        );
        assert_eq!(normalize(v("pct set 100 -x 1"), &[]), v("pct set 100 -x 1"));
    }

    #[test]
    fn bare_booleans_get_an_explicit_one() {
        let b = &["force", "dry-run"];
        assert_eq!(
            normalize(v("pct restore --force 101 a.tar"), b),
            v("pct restore --force 1 101 a.tar")
        );
        assert_eq!(
            normalize(v("pct restore -force 0 101"), b),
            v("pct restore --force 0 101")
        );
        assert_eq!(
            normalize(v("pvesm prune --dry-run"), b),
            v("pvesm prune --dry-run 1")
        );
        assert_eq!(normalize(v("x --force yes"), b), v("x --force yes"));
    }

    #[test]
    fn arguments_after_double_dash_are_untouched() {
        assert_eq!(
            normalize(v("pct exec 100 -- -force"), &["force"]),
            v("pct exec 100 -- -force")
        );
    }

    #[test]
    fn parses_boolean_literals() {
        assert_eq!(parse_bool("ON"), Ok(true));
        assert_eq!(parse_bool("0"), Ok(false));
        assert!(parse_bool("2").is_err());
    }
}
