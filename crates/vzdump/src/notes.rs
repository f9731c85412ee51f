//! `notes-template`: checked when the job is set up, expanded per backup.
//!
//! Compatibility target: pve-manager 14a22df `PVE/VZDump.pm` (`verify_notes_template`,
//! `$generate_notes`).
//!
//! A template is one line (`\n` refused) where a backslash escapes `n` (a line feed) or `\`
//! (a backslash) and nothing else, and `{{var}}` (`var` = `[^\s{}]+`) names one of
//! `cluster`, `guestname`, `node`, `vmid`. Problems are collected into one message:
//! `found unknown: escape sequence '\x' at char 3, variable 'foo' at char 10`.
//! Expansion first unescapes, then replaces the variables: `cluster` is the cluster name
//! (`standalone node` without a cluster), `guestname` the CT's hostname (or `CT<vmid>`),
//! `node` the node name, `vmid` the guest id.

use std::sync::LazyLock;

use regex::Regex;

/// The variables a template may use.
pub const VARIABLES: [&str; 4] = ["cluster", "guestname", "node", "vmid"];

static VAR_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{\{([^\s{}]+)\}\}").expect("static regex"));

/// What the variables expand to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotesVars {
    /// Cluster name, or `standalone node`.
    pub cluster: String,
    /// The guest's hostname, or `CT<vmid>`.
    pub guestname: String,
    /// The node name.
    pub node: String,
    /// The guest id.
    pub vmid: u32,
}

/// `verify_notes_template`.
///
/// # Errors
/// `contains a line feed`, or `found unknown: …` listing every bad escape and variable with
/// its position (escapes: index of the backslash; variables: PVE's `pos - length(var)`).
pub fn verify_notes_template(template: &str) -> Result<(), String> {
    if template.contains('\n') {
        return Err("contains a line feed".to_string());
    }
    let mut problems = Vec::new();
    let bytes = template.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            // Perl's /\\(.)/g: the next character (any but a newline) is consumed.
            if let Some(c) = template[i + 1..].chars().next() {
                if c != 'n' && c != '\\' {
                    problems.push(format!(
                        "escape sequence '\\{c}' at char {}",
                        template[..i].chars().count()
                    ));
                }
                i += 1 + c.len_utf8();
                continue;
            }
        }
        i += 1;
    }
    for c in VAR_RE.captures_iter(template) {
        let (var, end) = (&c[1], c.get(0).map_or(0, |m| m.end()));
        if !VARIABLES.contains(&var) {
            // Perl: pos() after the match minus the variable's length.
            problems.push(format!(
                "variable '{var}' at char {}",
                template[..end].chars().count() - var.chars().count()
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("found unknown: {}", problems.join(", ")))
    }
}

/// `$generate_notes`: unescape, then substitute the variables.
///
/// # Errors
/// An escape other than `\n`/`\\` (the template was not verified).
pub fn expand_notes_template(template: &str, vars: &NotesVars) -> Result<String, String> {
    let mut unescaped = String::with_capacity(template.len());
    let mut chars = template.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            unescaped.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => unescaped.push('\\'),
            Some('n') => unescaped.push('\n'),
            Some(other) => return Err(format!("unexpected escape character '{other}'")),
            None => unescaped.push('\\'),
        }
    }
    let out = VAR_RE.replace_all(&unescaped, |c: &regex::Captures<'_>| match &c[1] {
        "cluster" => vars.cluster.clone(),
        "guestname" => vars.guestname.clone(),
        "node" => vars.node.clone(),
        "vmid" => vars.vmid.to_string(),
        _ => c[0].to_string(),
    });
    Ok(out.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verification() {
        assert_eq!(verify_notes_template("{{guestname}} on {{node}}"), Ok(()));
        assert_eq!(verify_notes_template(r"a\nb\\c {{vmid}}"), Ok(()));
        assert_eq!(
            verify_notes_template("a\nb"),
            Err("contains a line feed".into())
        );
        assert_eq!(
            verify_notes_template(r"ab\x {{foo}} {{vmid}} \t"),
            Err(
                "found unknown: escape sequence '\\x' at char 2, escape sequence '\\t' at char 22, \
                 variable 'foo' at char 9"
                    .into()
            )
        );
        // `{{ a }}` (spaces) and `{{}}` are not variables, just text.
        assert_eq!(verify_notes_template("{{ a }} {{}}"), Ok(()));
    }

    #[test]
    fn expansion() {
        let vars = NotesVars {
            cluster: "standalone node".into(),
            guestname: "ct100".into(),
            node: "pve1".into(),
            vmid: 100,
        };
        assert_eq!(
            expand_notes_template(
                r"{{guestname}} ({{vmid}})\n{{node}}/{{cluster}} \\{{x}}",
                &vars
            )
            .unwrap(),
            "ct100 (100)\npve1/standalone node \\{{x}}"
        );
        // An escaped backslash before a variable still expands the variable.
        assert_eq!(
            expand_notes_template(r"\\{{vmid}}", &vars).unwrap(),
            "\\100"
        );
        assert!(expand_notes_template(r"\q", &vars).is_err());
    }
}
