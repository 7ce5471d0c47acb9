//! What the commands print with: errors (worded by the host runtime as virsh words them, printed
//! as `error: <category>: <detail>` on stderr by `main`), JSON, tables in virsh's layout, times
//! and progress bars.

/// Everything a command can fail with: the host runtime's errors, worded as virsh words them
/// ([`vbackup_host::Error::message`]).
pub use vbackup_host::Error as CliError;

/// Prints a `--json` answer on one line, in the one JSON style
/// ([`vbackup_host::views::camel_case`]).
pub fn print_json(value: serde_json::Value) {
    println!("{}", vbackup_host::views::camel_case(value));
}

/// A table in virsh's layout: a header, a dashed rule, one-space indented columns.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            s.push(' ');
            s.push_str(c);
            if i + 1 < cells.len() {
                let pad = widths[i] - c.chars().count() + 2;
                s.push_str(&" ".repeat(pad));
            }
        }
        s.trim_end().to_owned()
    };
    let mut out = line(headers.to_vec());
    out.push('\n');
    let total: usize = widths.iter().sum::<usize>() + 3 * widths.len();
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

pub use vbackup_host::units::{format_time, human_bytes, virsh_bytes};

/// A progress bar of `total` bytes on stderr, after `prefix` when one is given.
pub fn progress_bar(total: u64, prefix: Option<String>) -> indicatif::ProgressBar {
    let template =
        "{spinner} [{elapsed_precise}] [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})";
    let template = match &prefix {
        Some(_) => format!("{{prefix}} {template}"),
        None => template.to_owned(),
    };
    let style = indicatif::ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let bar = indicatif::ProgressBar::new(total).with_style(style);
    match prefix {
        Some(prefix) => bar.with_prefix(prefix),
        None => bar,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns_under_a_rule() {
        let t = table(&["Name", "Creation Time"], &[vec!["c1".into(), "x".into()]]);
        assert_eq!(
            t,
            " Name   Creation Time\n-----------------------\n c1     x\n"
        );
    }
}
