//! Writing results: tables for people, JSON or YAML for scripts. In JSON and
//! YAML modes stdout carries only the document; hints go to stderr.

use std::io::Write as _;

use kube::Resource;
use serde::Serialize;

use super::CliError;
use super::args::OutputFormat;

/// Encodes `value` as a JSON or YAML document (newline-terminated).
pub fn document<T: Serialize>(format: OutputFormat, value: &T) -> Result<String, CliError> {
    match format {
        OutputFormat::Yaml => Ok(serde_yaml::to_string(value)?),
        OutputFormat::Json | OutputFormat::Table => {
            let mut text = serde_json::to_string_pretty(value)?;
            text.push('\n');
            Ok(text)
        }
    }
}

/// Writes to stdout. A closed pipe (`| head`) ends the output quietly.
pub fn print(text: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// A line for people: on stdout with tables, on stderr when stdout carries a
/// JSON or YAML document.
pub fn say(format: OutputFormat, line: &str) -> Result<(), CliError> {
    if format == OutputFormat::Table {
        print(&format!("{line}\n"))
    } else {
        note(line);
        Ok(())
    }
}

/// A line on stderr (warnings, hints). Failing to write it is not an error.
pub fn note(line: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// An object as kubectl shows it with `-o yaml`: without managedFields.
pub fn without_managed_fields<K: Resource + Clone>(object: &K) -> K {
    let mut copy = object.clone();
    copy.meta_mut().managed_fields = None;
    copy
}
