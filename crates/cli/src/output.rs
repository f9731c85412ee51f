//! Output formatting shared by the front ends (`--output-format text|json|json-pretty`).

use clap::ValueEnum;
use serde::Serialize;

/// How to print results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum OutputFormat {
    /// Human-readable tables.
    #[default]
    Text,
    /// Compact JSON.
    Json,
    /// Indented JSON.
    JsonPretty,
}

/// Prints `value` as JSON in the requested style.
///
/// # Errors
/// When serialisation fails.
pub fn print_json<T: Serialize>(value: &T, format: OutputFormat) -> anyhow::Result<()> {
    let text = match format {
        OutputFormat::JsonPretty => serde_json::to_string_pretty(value)?,
        _ => serde_json::to_string(value)?,
    };
    println!("{text}");
    Ok(())
}

/// Renders rows as a left/right aligned text table. `right` marks right-aligned columns.
#[must_use]
pub fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let fmt_row = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if right.get(i).copied().unwrap_or(false) {
                    format!("{c:>w$}", w = widths[i])
                } else {
                    format!("{c:<w$}", w = widths[i])
                }
            })
            .collect();
        parts.join(" ").trim_end().to_string()
    };
    let mut out = fmt_row(headers.to_vec());
    out.push('\n');
    for row in rows {
        out.push_str(&fmt_row(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["Volid", "Size"],
            &[false, true],
            &[
                vec!["local:a".into(), "5".into()],
                vec!["l:b".into(), "1234".into()],
            ],
        );
        assert_eq!(t, "Volid   Size\nlocal:a    5\nl:b     1234\n");
    }
}
