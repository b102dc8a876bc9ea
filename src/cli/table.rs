//! kubectl-style tables and the cell formats they use (times, expiries, lists).

use k8s_openapi::jiff::Timestamp;

/// Columns separated by three spaces, left-aligned, headers in capitals, as
/// `kubectl get` prints them.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; control characters in cells are replaced so that a cell
    /// cannot break the layout or drive the terminal.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells.iter().map(|c| clean(c)).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(&self.rows) {
            let mut line = String::new();
            for (i, width) in widths.iter().enumerate() {
                let cell = row.get(i).map_or("", String::as_str);
                line.push_str(cell);
                if i + 1 < columns {
                    let pad = width.saturating_sub(cell.chars().count()) + 3;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn clean(cell: &str) -> String {
    cell.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Shortens a cell to `max` characters, marking the cut with `…`.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `-` for an absent value.
pub fn or_dash(value: Option<&str>) -> String {
    match value {
        Some(v) if !v.is_empty() => v.to_owned(),
        _ => "-".to_owned(),
    }
}

/// A comma-separated list, `-` when empty.
pub fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(",")
    }
}

/// UTC, whole seconds: `2030-01-01T18:00:00Z`.
pub fn time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// An optional time, `-` when absent.
pub fn opt_time(t: Option<Timestamp>) -> String {
    t.map_or_else(|| "-".to_owned(), time)
}

/// A span in its two largest units, as kubectl prints ages: `45s`, `4m10s`,
/// `7h59m`, `2d3h`.
pub fn span(seconds: i64) -> String {
    let s = seconds.unsigned_abs();
    let (d, h, m, sec) = (s / 86_400, (s % 86_400) / 3600, (s % 3600) / 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) if sec == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{sec}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d{h}h"),
    }
}

/// When a grant ends, absolute and relative to `now`: `2030-01-01T18:00:00Z
/// (in 7h59m)`, `… (3m ago)`, or `never`. `known` is false while the
/// controller has not evaluated the grant yet (no effective expiry to show).
pub fn expiry(expires_at: Option<Timestamp>, now: Timestamp, known: bool) -> String {
    match expires_at {
        None if known => "never".to_owned(),
        None => "-".to_owned(),
        Some(at) => {
            let left = at.as_second() - now.as_second();
            if left > 0 {
                format!("{} (in {})", time(at), span(left))
            } else {
                format!("{} ({} ago)", time(at), span(left))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_aligned_columns_without_trailing_space() {
        let mut t = Table::new(&["GRANT", "SECRET", "KEYS"]);
        t.row(vec!["bot-db".into(), "db".into(), "url,key".into()]);
        t.row(vec!["x".into(), "a-long-secret".into(), "-".into()]);
        assert_eq!(
            t.render(),
            "GRANT    SECRET          KEYS\n\
             bot-db   db              url,key\n\
             x        a-long-secret   -\n"
        );
    }

    #[test]
    fn control_characters_cannot_break_rows() {
        let mut t = Table::new(&["NOTE"]);
        t.row(vec!["a\nb\x1b[31m".into()]);
        assert_eq!(t.render(), "NOTE\na b [31m\n");
    }

    #[test]
    fn spans_use_two_units() {
        assert_eq!(span(0), "0s");
        assert_eq!(span(45), "45s");
        assert_eq!(span(250), "4m10s");
        assert_eq!(span(300), "5m");
        assert_eq!(span(3600), "1h");
        assert_eq!(span(28_740), "7h59m");
        assert_eq!(span(-180), "3m");
        assert_eq!(span(86_400 * 2 + 3 * 3600 + 59), "2d3h");
        assert_eq!(span(86_400), "1d");
    }

    #[test]
    fn expiry_is_absolute_and_relative() {
        let now = Timestamp::from_second(1_900_000_000).unwrap();
        let later = Timestamp::from_second(1_900_000_000 + 8 * 3600).unwrap();
        let earlier = Timestamp::from_second(1_900_000_000 - 180).unwrap();
        assert_eq!(
            expiry(Some(later), now, true),
            "2030-03-18T01:46:40Z (in 8h)"
        );
        assert_eq!(
            expiry(Some(earlier), now, true),
            "2030-03-17T17:43:40Z (3m ago)"
        );
        assert_eq!(expiry(None, now, true), "never");
        assert_eq!(expiry(None, now, false), "-");
    }

    #[test]
    fn truncates_on_characters() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("äöü", 3), "äöü");
    }
}
