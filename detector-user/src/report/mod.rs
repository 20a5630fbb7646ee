//! Where findings go: human lines or NDJSON, behind one trait.
use std::io;

use crate::{
    engine::{
        correlate::Alert,
        hazard::Hazard,
        summary::{PairJson, Summary},
    },
    process::container::Identity,
};

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
    /// the summary. `who`: the alert's process as its container knows it; `window`: the name of
    /// the window it fell in.
    fn alert(&mut self, alert: &Alert, pair: usize, who: &Identity, window: &str)
    -> io::Result<()>;
    fn hazard(&mut self, hazard: &Hazard, who: &Identity, window: &str) -> io::Result<()>;
    /// Stack pair number `number` raced `new` more times since the last periodic report (a long
    /// run's account of the alerts it no longer prints).
    fn pair(&mut self, number: usize, pair: &PairJson, new: u64) -> io::Result<()>;
    fn flush(&mut self) -> io::Result<()>;
    fn summary(&mut self, summary: &Summary) -> io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        engine::correlate::Alert,
        process::container::HOST,
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
            window: 0,
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
            form: Some("get"),
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
            HumanSink::new(&mut out)
                .alert(&alert(&name), 1, &HOST, "cache")
                .unwrap();
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
            JsonSink::new(&mut out)
                .alert(&alert(&name), 1, &HOST, "cache")
                .unwrap();
            let text = String::from_utf8(out).unwrap();
            assert_eq!(text.matches('\n').count(), 1, "one line: {text:?}");
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["reader_name"], name.as_str());
            assert_eq!(v["writer_name"], name.as_str());
            assert_eq!(v["key"], name.as_str());
            assert!(v["ns_pid"].is_null() && v["container"].is_null(), "{v}");
        }
    }

    #[test]
    fn an_alert_names_its_window() {
        let mut out = Vec::new();
        JsonSink::new(&mut out)
            .alert(&alert("r"), 1, &HOST, "prices")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["window"], "prices");
        for name in hostile() {
            let mut out = Vec::new();
            HumanSink::new(&mut out)
                .alert(&alert("r"), 1, &HOST, &name)
                .unwrap();
            let text = String::from_utf8(out).unwrap();
            assert_no_raw_control(text.trim_end());
            assert!(
                text.ends_with(&format!(" (window {})\n", escape(&name))),
                "{text}"
            );
        }
    }

    #[test]
    fn the_summary_has_a_line_per_window_when_there_are_several() {
        use crate::engine::summary::WindowJson;
        let counts = |windows: u64, misses: u64| WindowJson {
            windows,
            windows_with_misses: misses.min(windows),
            lookups_in_window: misses,
            misses_in_window: misses,
        };
        let mut s = Summary::default();
        s.windows_by_name.insert("one".into(), counts(3, 2));
        let lines = |s: &Summary| {
            let mut out = Vec::new();
            HumanSink::new(&mut out).summary(s).unwrap();
            String::from_utf8(out).unwrap()
        };
        assert!(!lines(&s).contains("window one"), "{}", lines(&s));
        s.windows_by_name.insert("two".into(), counts(5, 0));
        let text = lines(&s);
        assert!(
            text.contains(
                "racewatch: window one: 3 windows (2 with a miss), 2 lookups in a window, 2 of \
                 them missed\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("racewatch: window two: 5 windows (0 with a miss)"),
            "{text}"
        );
    }

    const INSIDE: Identity = Identity {
        ns_pid: Some(7),
        container: None,
    };

    fn in_container() -> Identity {
        Identity {
            ns_pid: Some(7),
            container: Some(
                "3f2a9c1be07d4c5f8a6b2e1d0c9f8e7d6c5b4a39281706f5e4d3c2b1a0f9e8d7".into(),
            ),
        }
    }

    #[test]
    fn an_alert_names_the_pid_inside_its_container() {
        let mut out = Vec::new();
        let mut human = HumanSink::new(&mut out);
        human
            .alert(&alert("r"), 1, &in_container(), "cache")
            .unwrap();
        human.alert(&alert("r"), 1, &INSIDE, "cache").unwrap();
        human.alert(&alert("r"), 1, &HOST, "cache").unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[0].starts_with("RACE cache 0x10 in pid 100 (pid 7 in container 3f2a9c1be07d): "),
            "{}",
            lines[0]
        );
        assert!(
            lines[1].starts_with("RACE cache 0x10 in pid 100 (pid 7 in its pid namespace): "),
            "{}",
            lines[1]
        );
        assert!(
            lines[2].starts_with("RACE cache 0x10 in pid 100: "),
            "{}",
            lines[2]
        );

        let mut out = Vec::new();
        JsonSink::new(&mut out)
            .alert(&alert("r"), 1, &in_container(), "cache")
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            (v["pid"].as_u64(), v["ns_pid"].as_u64()),
            (Some(100), Some(7))
        );
        assert_eq!(v["container"], in_container().container.unwrap().as_str());
    }

    #[test]
    fn a_container_without_its_own_pid_namespace_is_named_alone() {
        let who = Identity {
            ns_pid: None,
            ..in_container()
        };
        assert_eq!(
            human::pid_text(100, &who),
            "pid 100 (in container 3f2a9c1be07d)"
        );
    }
}
