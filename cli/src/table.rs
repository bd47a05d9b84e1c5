//! What `--output table` prints: aligned columns, key/value details, human
//! times ("3m ago").

use std::io::{self, Write};
use std::time::SystemTime;

use crate::view::system_time;

/// Columns under an upper-case header, aligned by padding with spaces
/// (two between columns; the last column is not padded).
#[derive(Debug)]
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column names.
    pub fn new(header: &[&'static str]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (as many cells as the header).
    pub fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.header.len());
        self.rows.push(cells);
    }

    /// Writes the header and the rows.
    pub fn write(&self, out: &mut impl Write) -> io::Result<()> {
        let width = |i: usize| {
            self.rows
                .iter()
                .map(|r| r[i].chars().count())
                .chain([self.header[i].chars().count()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..self.header.len()).map(width).collect();
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            writeln!(out, "{}", line.trim_end())?;
        }
        Ok(())
    }
}

/// `Key:  value` lines with the values aligned; for one object's details.
pub fn details(out: &mut impl Write, fields: &[(&str, String)]) -> io::Result<()> {
    let w = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in fields {
        let key = format!("{k}:");
        writeln!(out, "{key:<w$}  {v}")?;
    }
    Ok(())
}

/// How long ago `t` was, in the largest whole unit: "just now", "42s ago",
/// "3m ago", "5h ago", "2d ago"; "-" when unknown. A time slightly ahead of
/// `now` (clocks differ) is "just now"; further ahead, "in 3m".
pub fn ago(t: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    let Some(t) = system_time(t) else {
        return "-".into();
    };
    match now.duration_since(t) {
        Ok(d) if d.as_secs() == 0 => "just now".into(),
        Ok(d) => format!("{} ago", short(d.as_secs())),
        Err(e) if e.duration().as_secs() < 5 => "just now".into(),
        Err(e) => format!("in {}", short(e.duration().as_secs())),
    }
}

fn short(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m", s / 60),
        s if s < 48 * 3600 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// An absolute time with how long ago it was, for details:
/// `2026-11-27T21:09:38Z (3m ago)`; "-" when unknown.
pub fn when(t: Option<&prost_types::Timestamp>, now: SystemTime) -> String {
    match system_time(t) {
        Some(st) => format!(
            "{} ({})",
            humantime::format_rfc3339_seconds(st),
            ago(t, now)
        ),
        None => "-".into(),
    }
}

/// `s`, or "-" when empty (tables never show blank cells).
pub fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

/// A number, or "-" when 0 (ids GitHub never uses).
pub fn id_or_dash(n: u64) -> String {
    if n == 0 { "-".into() } else { n.to_string() }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ts(secs: i64) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: secs,
            nanos: 0,
        }
    }

    #[test]
    fn times_are_shown_in_their_largest_whole_unit() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |ago_s: i64| ago(Some(&ts(1_000_000 - ago_s)), now);
        assert_eq!(at(0), "just now");
        assert_eq!(at(42), "42s ago");
        assert_eq!(at(3 * 60 + 59), "3m ago");
        assert_eq!(at(5 * 3600), "5h ago");
        assert_eq!(at(3 * 86400), "3d ago");
        assert_eq!(at(-2), "just now");
        assert_eq!(at(-180), "in 3m");
        assert_eq!(ago(None, now), "-");
    }

    #[test]
    fn columns_are_aligned_and_lines_not_padded_at_the_end() {
        let mut t = Table::new(&["NAME", "STATE", "REASON"]);
        t.row(vec!["grs-1".into(), "running".into(), "-".into()]);
        t.row(vec![
            "grs-12345".into(),
            "pending_delete".into(),
            "x".into(),
        ]);
        let mut out = Vec::new();
        t.write(&mut out).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "NAME       STATE           REASON\n\
             grs-1      running         -\n\
             grs-12345  pending_delete  x\n"
        );
    }
}
