//! Where findings go: human lines or NDJSON, behind one trait.
use std::io;

use crate::engine::{correlate::Alert, hazard::Hazard, summary::Summary};

pub mod file;
pub mod human;
pub mod json;
pub mod metrics;

pub use human::HumanSink;
pub use json::JsonSink;

/// Alerts are written to a buffer and reach the output at each [`Sink::flush`] (once per drain
/// of the ring, so at most one poll interval late): a write per alert would make the output, not
/// the kernel, what limits how many events a second racewatch takes. The summary is flushed
/// at once.
pub trait Sink {
    /// The first alert of stack pair number `pair` (from 1); the pair's others are counted in
    /// the summary.
    fn alert(&mut self, alert: &Alert, pair: usize) -> io::Result<()>;
    fn hazard(&mut self, hazard: &Hazard) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
    fn summary(&mut self, summary: &Summary) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        engine::correlate::Alert,
        text::{comm_str, escape, escape_lines},
    };

    /// Names and keys a target can make: escape sequences, newlines, invalid UTF-8 (as the
    /// kernel hands it over, through the same decoding), quotes, C1 and bidi controls.
    fn hostile() -> Vec<String> {
        let raw: [&[u8]; 6] = [
            b"\x1b[2J\x1b[31mred",
            b"two\nlines\r",
            b"bad\xff\xfeutf8",
            b"\"quoted\" \\ 'x'",
            "c1\u{9b}31m".as_bytes(),
            "bidi\u{202e}txt.exe".as_bytes(),
        ];
        raw.iter()
            .map(|b| {
                let mut comm = [0u8; detector_common::COMM_LEN];
                comm[..b.len()].copy_from_slice(b);
                comm_str(&comm)
            })
            .collect()
    }

    fn alert(name: &str) -> Alert {
        Alert {
            cache: 0x10,
            pid: 100,
            reader_tid: 1,
            reader_name: name.to_string(),
            writer_tid: 2,
            writer_name: Some(name.to_string()),
            window_open_ns: 5,
            lookup_ns: 9,
            miss: Some(true),
            key: Some(name.to_string()),
            reader_stack: None,
            writer_stack: None,
        }
    }

    fn assert_no_raw_control(line: &str) {
        assert!(
            !line.chars().any(|c| c.is_control()
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')),
            "raw control character in {line:?}"
        );
    }

    #[test]
    fn human_lines_carry_no_raw_control_character() {
        for name in hostile() {
            let mut out = Vec::new();
            HumanSink::new(&mut out).alert(&alert(&name), 1).unwrap();
            let text = String::from_utf8(out).unwrap();
            let line = text.strip_suffix('\n').expect("one line");
            assert_no_raw_control(line);
            // Each name appears three times (reader, writer, key), escaped.
            assert_eq!(line.matches(&escape(&name)).count(), 3, "{line}");
        }
        assert_eq!(escape("\x1b[2J"), "\\u{1b}[2J");
        assert_eq!(escape("a\nb"), "a\\nb");
        assert_eq!(escape_lines("a\nb\x1b"), "a\nb\\u{1b}");
    }

    #[test]
    fn json_lines_parse_and_keep_the_text() {
        for name in hostile() {
            let mut out = Vec::new();
            JsonSink::new(&mut out).alert(&alert(&name), 1).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["reader_name"], name.as_str());
            assert_eq!(v["writer_name"], name.as_str());
            assert_eq!(v["key"], name.as_str());
        }
    }
}
