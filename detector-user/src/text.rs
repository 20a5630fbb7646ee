//! Text helpers every layer uses: escaping what a target controls, and durations for people.

/// Text a target controls (thread names, keys, symbol names, paths) with control characters
/// escaped, so it cannot rewrite the terminal or forge lines. Bidirectional overrides count as
/// control characters too: they reorder what the terminal shows.
pub fn escape(s: &str) -> String {
    escape_but(s, None)
}

/// [`escape`] for a message racewatch itself laid out on several lines: its own newlines stay.
pub fn escape_lines(s: &str) -> String {
    escape_but(s, Some('\n'))
}

fn escape_but(s: &str, keep: Option<char>) -> String {
    let unsafe_char =
        |c: char| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    s.chars()
        .flat_map(|c| {
            if unsafe_char(c) && Some(c) != keep {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// A span of `secs` seconds as a person says it: seconds, minutes, hours or days.
pub fn fmt_span(secs: f64) -> String {
    match secs {
        s if s < 90.0 => format!("{:.0} s", s.max(1.0)),
        s if s < 90.0 * 60.0 => format!("{:.0} min", s / 60.0),
        s if s < 48.0 * 3600.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.0} days", s / 86400.0),
    }
}

/// A thread name as the kernel stores it: NUL-padded bytes, not always UTF-8.
pub fn comm_str(comm: &[u8; detector_common::COMM_LEN]) -> String {
    let end = comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(detector_common::COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

/// An error and each of its causes once, `: `-separated (a cause whose text the error already
/// quotes is left out).
pub fn error_chain(error: &anyhow::Error) -> String {
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}
