//! Where findings go: human lines or NDJSON, behind one trait; a null sink for tests.
use std::io::{self, Write};

use serde::Serialize;
use serde_json::json;

use crate::{
    calibrate::{Costs, Traps, added_ns},
    correlate::{Alert, Counts},
    dedup::Pair,
    hazard::Hazard,
    stack::Frame,
};

/// Everything the last line of a run reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub counts: CountsJson,
    /// Events the kernel could not deliver (ring buffer full), all kinds.
    pub lost_events: u64,
    /// Lookups the kernel found in a window, delivered or lost: `lookups_in_window` plus
    /// `lost_by_kind.lookup` (watch runs; Python's KeyErrors are counted apart).
    pub kernel_lookups_in_window: u64,
    pub lost_by_kind: LostByKind,
    /// Window or in-flight state the kernel could not store (map full).
    pub map_full: u64,
    /// KeyErrors whose key the kernel could not keep for judging (counted as window misses).
    pub pending_full: u64,
    /// Ring-buffer records userspace could not decode (a racewatch bug if ever non-zero).
    pub decode_errors: u64,
    /// Times each probe fired in the target.
    pub probe_hits: ProbeHits,
    /// What `--provoke` did (all zero without it).
    pub provoke: ProvokeJson,
    /// racewatch's estimate of the time its probes added to the target.
    pub self_cost: Option<SelfCost>,
    /// Each distinct (reader stack, writer stack) pair, with how often it raced.
    pub pairs: Vec<PairJson>,
    pub duration_s: f64,
    /// How the run ended: "target exited", "interrupted", "duration elapsed".
    pub ended: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct CountsJson {
    pub windows: u64,
    pub lookups_in_window: u64,
    pub misses_in_window: u64,
    pub absent_keys_in_window: u64,
    pub caches: u64,
    pub max_window_ns: u64,
}

impl From<&Counts> for CountsJson {
    fn from(c: &Counts) -> Self {
        CountsJson {
            windows: c.windows,
            lookups_in_window: c.lookups_in_window,
            misses_in_window: c.misses_in_window,
            absent_keys_in_window: c.absent_keys_in_window,
            caches: c.caches,
            max_window_ns: c.max_window_ns,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProvokeJson {
    /// Windows held open longer.
    pub windows: u64,
    /// Time added to them, in total.
    pub added_ns: u64,
    /// Windows left alone because the budget was spent.
    pub over_budget: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PairJson {
    pub reader_name: String,
    pub writer_name: Option<String>,
    pub lookups: u64,
    pub misses: u64,
    pub reader_stack: Option<Vec<Frame>>,
    pub writer_stack: Option<Vec<Frame>>,
}

impl From<&Pair> for PairJson {
    fn from(p: &Pair) -> Self {
        PairJson {
            reader_name: p.reader_name.clone(),
            writer_name: p.writer_name.clone(),
            lookups: p.lookups,
            misses: p.misses,
            reader_stack: p.reader_stack.as_deref().map(<[Frame]>::to_vec),
            writer_stack: p.writer_stack.as_deref().map(<[Frame]>::to_vec),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LostByKind {
    pub window_open: u64,
    pub window_close: u64,
    pub lookup: u64,
    pub keyerror: u64,
    pub key_verdict: u64,
    pub near: u64,
    pub native_stack: u64,
    pub py_frames: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProbeHits {
    pub clear: u64,
    pub refill_entry: u64,
    pub refill_return: u64,
    pub lookup_entry: u64,
    pub lookup_return: u64,
    pub lookup_miss: u64,
    /// The lookup's entry during sampling bursts (hazard report).
    pub lookup_sample: u64,
    pub keyerror: u64,
}

/// The time racewatch's probes added to the target: each probe's hits times what one hit costs on
/// this machine, measured on racewatch's own functions when the run ends.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SelfCost {
    pub added_ns: u64,
    /// The target's CPU time during the run, where known.
    pub target_cpu_ns: Option<u64>,
    /// `added_ns` over `target_cpu_ns`.
    pub added_share: Option<f64>,
    pub per_hit_ns: Costs,
}

impl SelfCost {
    pub fn new(costs: Costs, traps: &Traps, hits: &ProbeHits, target_cpu_ns: Option<u64>) -> Self {
        let added_ns = added_ns(&costs, traps, hits).round() as u64;
        SelfCost {
            added_ns,
            target_cpu_ns,
            added_share: target_cpu_ns
                .filter(|&cpu| cpu > 0)
                .map(|cpu| added_ns as f64 / cpu as f64),
            per_hit_ns: costs,
        }
    }

    fn human(&self) -> String {
        let share = match (self.added_share, self.target_cpu_ns) {
            (Some(share), Some(cpu)) => {
                format!(
                    " ({:.2}% of its {} of CPU time)",
                    share * 100.0,
                    fmt_ns(cpu)
                )
            }
            _ => String::new(),
        };
        let c = &self.per_hit_ns;
        format!(
            "racewatch: its probes added ~{} to the target{share}; one hit costs {} (emulated \
             instruction), {} (single-stepped), {} more with the return probed",
            fmt_ns(self.added_ns),
            fmt_ns(c.emulated_ns as u64),
            fmt_ns(c.single_stepped_ns as u64),
            fmt_ns(c.return_ns as u64),
        )
    }
}

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

fn fmt_ns(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// `function file:line`, control characters escaped.
fn frame_text(f: &Frame) -> String {
    let at = match (&f.file, f.line) {
        (Some(file), Some(line)) => format!(" {}:{line}", escape(file)),
        (Some(file), None) => format!(" {}", escape(file)),
        _ => String::new(),
    };
    format!("{}{at}", escape(&f.function))
}

/// A stack the way sanitizers print one: `#N function file:line`, innermost first.
fn write_stack(out: &mut impl Write, stack: Option<&[Frame]>) -> io::Result<()> {
    match stack {
        Some([]) => writeln!(out, "    (no frame could be unwound)"),
        Some(frames) => {
            for (i, f) in frames.iter().enumerate() {
                writeln!(out, "    #{i} {}", frame_text(f))?;
            }
            Ok(())
        }
        None => writeln!(out, "    (stack not captured)"),
    }
}

/// The innermost frame of a stack, for the summary's one line per pair.
fn top(stack: Option<&[Frame]>) -> String {
    stack
        .and_then(|s| s.first())
        .map(frame_text)
        .unwrap_or_else(|| "?".into())
}

pub struct HumanSink<W: Write> {
    out: W,
}

impl<W: Write> HumanSink<W> {
    pub fn new(out: W) -> Self {
        HumanSink { out }
    }
}

impl<W: Write> Sink for HumanSink<W> {
    fn alert(&mut self, a: &Alert, pair: usize) -> io::Result<()> {
        let writer = a
            .writer_name
            .as_deref()
            .map(escape)
            .unwrap_or_else(|| "?".into());
        let outcome = match a.miss {
            Some(true) => "MISSED",
            Some(false) => "found",
            None => "result not probed",
        };
        let key = a
            .key
            .as_deref()
            .map(|k| format!(" key {}", escape(k)))
            .unwrap_or_default();
        writeln!(
            self.out,
            "RACE cache {:#x}: reader {} ({}) looked up{} while writer {} ({}) had emptied it {} earlier: {}",
            a.cache,
            a.reader_tid,
            escape(&a.reader_name),
            key,
            a.writer_tid,
            writer,
            fmt_ns(a.open_for_ns()),
            outcome
        )?;
        if a.reader_stack.is_some() || a.writer_stack.is_some() {
            writeln!(
                self.out,
                "  reader {} ({}) looked up the cache here:",
                a.reader_tid,
                escape(&a.reader_name)
            )?;
            write_stack(&mut self.out, a.reader_stack.as_deref())?;
            writeln!(
                self.out,
                "  writer {} ({writer}) had emptied it here:",
                a.writer_tid
            )?;
            write_stack(&mut self.out, a.writer_stack.as_deref())?;
            writeln!(
                self.out,
                "  (stack pair #{pair}: its further races are counted in the summary)"
            )?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn hazard(&mut self, h: &Hazard) -> io::Result<()> {
        let sampled = if h.sampled_fraction < 1.0 {
            format!(
                " (lookups sampled {:.1}% of the time)",
                h.sampled_fraction * 100.0
            )
        } else {
            String::new()
        };
        writeln!(
            self.out,
            "HAZARD cache {:#x}: {} windows ({:.1}/s), width p50 {} p99 {} max {}, empty {:.4}% of \
             the time; expect {:.1} collisions/hour{sampled}",
            h.cache,
            h.windows,
            h.windows_per_s,
            fmt_ns(h.window_p50_ns),
            fmt_ns(h.window_p99_ns),
            fmt_ns(h.window_max_ns),
            h.time_in_window * 100.0,
            h.expected_collisions_per_hour,
        )?;
        if h.readers.is_empty() {
            writeln!(self.out, "  no reader's lookups were counted")?;
        }
        let far = |d: Option<u64>| d.map_or_else(|| "never seen".to_string(), fmt_ns);
        for r in &h.readers {
            writeln!(
                self.out,
                "  reader {} ({}): {:.0} lookups/s, closest {} before a window and {} after one",
                r.tid,
                escape(&r.comm),
                r.lookups_per_s,
                far(r.closest_before_ns),
                far(r.closest_after_ns),
            )?;
        }
        self.out.flush()
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        // Before the summary line, which stays the last.
        if let Some(cost) = &s.self_cost {
            writeln!(self.out, "{}", cost.human())?;
        }
        let c = &s.counts;
        // Only Python runs judge keys; a watch run has nothing to say here.
        let absent = match c.absent_keys_in_window {
            0 => String::new(),
            n => format!(" ({n} more KeyErrors in a window were for keys absent after it too)"),
        };
        let windows = match c.windows {
            0 => "no cache was emptied (0 windows)".to_string(),
            n => format!(
                "{n} windows in {} caches (widest {})",
                c.caches,
                fmt_ns(c.max_window_ns)
            ),
        };
        writeln!(
            self.out,
            "racewatch: {windows}, {} lookups in a window, {} of them missed{absent}; {} events lost; \
             {:.1} s, {}",
            c.lookups_in_window, c.misses_in_window, s.lost_events, s.duration_s, s.ended
        )?;
        let p = &s.provoke;
        if p.windows > 0 || p.over_budget > 0 {
            writeln!(
                self.out,
                "racewatch: provoked {} windows, adding {} in all ({} more left alone: budget spent)",
                p.windows,
                fmt_ns(p.added_ns),
                p.over_budget
            )?;
        }
        if s.lost_events > 0 {
            let l = &s.lost_by_kind;
            writeln!(
                self.out,
                "racewatch: warning: the ring buffer overflowed and {} events were lost (window \
                 opens {}, closes {}, lookups {} of {} in a window, KeyErrors {}, key verdicts {}, near \
                 misses {}, native stacks {}, Python frames {}): the counts above are lower bounds",
                s.lost_events,
                l.window_open,
                l.window_close,
                l.lookup,
                s.kernel_lookups_in_window,
                l.keyerror,
                l.key_verdict,
                l.near,
                l.native_stack,
                l.py_frames
            )?;
        }
        for (i, p) in s.pairs.iter().enumerate() {
            writeln!(
                self.out,
                "racewatch: pair #{}: {} lookups in a window, {} missed: reader {} at {}; writer {} at {}",
                i + 1,
                p.lookups,
                p.misses,
                escape(&p.reader_name),
                top(p.reader_stack.as_deref()),
                p.writer_name
                    .as_deref()
                    .map(escape)
                    .unwrap_or_else(|| "?".into()),
                top(p.writer_stack.as_deref()),
            )?;
        }
        if s.map_full > 0 || s.decode_errors > 0 {
            writeln!(
                self.out,
                "racewatch: warning: {} window states did not fit in the kernel's maps, {} events could not be decoded",
                s.map_full, s.decode_errors
            )?;
        }
        self.out.flush()
    }
}

pub struct JsonSink<W: Write> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        JsonSink { out }
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn alert(&mut self, a: &Alert, pair: usize) -> io::Result<()> {
        let line = json!({
            "type": "alert",
            "cache": format!("{:#x}", a.cache),
            "reader_tid": a.reader_tid,
            "reader_name": a.reader_name,
            "writer_tid": a.writer_tid,
            "writer_name": a.writer_name,
            "window_open_ns": a.window_open_ns,
            "lookup_ns": a.lookup_ns,
            "open_for_ns": a.open_for_ns(),
            "miss": a.miss,
            "key": a.key,
            "pair": pair,
            "reader_stack": a.reader_stack.as_deref(),
            "writer_stack": a.writer_stack.as_deref(),
        });
        writeln!(self.out, "{line}")
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn hazard(&mut self, h: &Hazard) -> io::Result<()> {
        let readers: Vec<_> = h
            .readers
            .iter()
            .map(|r| {
                json!({
                    "tid": r.tid,
                    "comm": r.comm,
                    "lookups": r.lookups,
                    "lookups_per_s": r.lookups_per_s,
                    "closest_before_ns": r.closest_before_ns,
                    "closest_after_ns": r.closest_after_ns,
                    "expected_collisions_per_hour": r.expected_collisions_per_hour,
                })
            })
            .collect();
        let line = json!({
            "type": "hazard",
            "cache": format!("{:#x}", h.cache),
            "windows": h.windows,
            "windows_per_s": h.windows_per_s,
            "window_p50_ns": h.window_p50_ns,
            "window_p99_ns": h.window_p99_ns,
            "window_max_ns": h.window_max_ns,
            "time_in_window": h.time_in_window,
            "readers": readers,
            "expected_collisions_per_hour": h.expected_collisions_per_hour,
            "sampled_fraction": h.sampled_fraction,
            "elapsed_s": h.elapsed_s,
        });
        writeln!(self.out, "{line}")?;
        self.out.flush()
    }

    fn summary(&mut self, s: &Summary) -> io::Result<()> {
        let mut line = serde_json::Map::new();
        line.insert("type".into(), "summary".into());
        if let serde_json::Value::Object(fields) =
            serde_json::to_value(s).map_err(io::Error::other)?
        {
            line.extend(fields);
        }
        writeln!(self.out, "{}", serde_json::Value::Object(line))?;
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::comm_str;

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
