//! Durations as Kubernetes users write them (`8h`, `90m`, `1h30m`, `45s`).
//!
//! A subset of Go's `time.ParseDuration`: whole numbers with the units `h`, `m`
//! and `s`. Sub-second grants make no sense and days are ambiguous around
//! daylight-saving changes, so neither is accepted.

use std::time::Duration;

/// The OpenAPI pattern the API server enforces for duration fields; [`parse`]
/// accepts exactly the strings this pattern accepts.
pub const DURATION_PATTERN: &str = "^([0-9]{1,9}[hms])+$";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("duration is empty")]
    Empty,
    #[error("duration {0:?} must be whole numbers with units h, m or s, such as 8h or 1h30m")]
    Malformed(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses a duration such as `1h30m`.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    let malformed = || DurationError::Malformed(text.to_owned());
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit: u64 = match c {
            'h' => 3600,
            'm' => 60,
            's' => 1,
            _ => return Err(malformed()),
        };
        if digits.is_empty() || digits.len() > 9 {
            return Err(malformed());
        }
        let value: u64 = digits.parse().map_err(|_| malformed())?;
        digits.clear();
        total = value
            .checked_mul(unit)
            .and_then(|secs| total.checked_add(secs))
            .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
    }
    if !digits.is_empty() {
        return Err(malformed());
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration the way [`parse`] reads it, largest units first.
pub fn format(duration: Duration) -> String {
    let secs = duration.as_secs();
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        assert_eq!(parse("8h"), Ok(Duration::from_secs(8 * 3600)));
        assert_eq!(parse("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("1h30m15s"), Ok(Duration::from_secs(5415)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        for bad in [
            "",
            "h",
            "8",
            "8d",
            "1.5h",
            "-1h",
            "8 h",
            "8H",
            "1234567890s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn format_round_trips() {
        for secs in [0, 1, 59, 60, 3599, 3600, 5415, 86400] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse(&format(d)), Ok(d));
        }
    }
}
