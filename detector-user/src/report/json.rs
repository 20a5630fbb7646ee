//! NDJSON: one object a line, for pipelines (jq, journald, Vector).
use std::io::{self, Write};

use serde_json::json;

use crate::{
    engine::{
        correlate::Alert,
        hazard::Hazard,
        summary::{PairJson, Summary},
    },
    process::container::Identity,
    report::Sink,
};

pub struct JsonSink<W: Write> {
    out: W,
}

impl<W: Write> JsonSink<W> {
    pub fn new(out: W) -> Self {
        JsonSink { out }
    }
}

impl<W: Write> Sink for JsonSink<W> {
    fn alert(&mut self, a: &Alert, pair: usize, who: &Identity, window: &str) -> io::Result<()> {
        let line = json!({
            "type": "alert",
            "window": window,
            "cache": format!("{:#x}", a.cache),
            "pid": a.pid,
            "ns_pid": who.ns_pid,
            "container": who.container,
            "reader_tid": a.reader_tid,
            "reader_name": a.reader_name,
            "writer_tid": a.writer_tid,
            "writer_name": a.writer_name,
            "window_open_ns": a.window_open_ns,
            "lookup_ns": a.lookup_ns,
            "open_for_ns": a.open_for_ns(),
            "miss": a.miss,
            "key": a.key,
            "form": a.form,
            "pair": pair,
            "reader_stack": a.reader_stack.as_deref(),
            "writer_stack": a.writer_stack.as_deref(),
        });
        writeln!(self.out, "{line}")
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn hazard(&mut self, h: &Hazard, who: &Identity, window: &str) -> io::Result<()> {
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
            "window": window,
            "cache": format!("{:#x}", h.cache),
            "pid": h.pid,
            "ns_pid": who.ns_pid,
            "container": who.container,
            "windows": h.windows,
            "windows_per_s": h.windows_per_s,
            "window_p50_ns": h.window_p50_ns,
            "window_p99_ns": h.window_p99_ns,
            "window_max_ns": h.window_max_ns,
            "time_in_window": h.time_in_window,
            // A CPython cache's windows, and those in which the GIL went to another thread (the
            // only ones a reader can get into); null for a native cache.
            "gil": h.gil.map(|g| json!({
                "windows": g.windows,
                "handed_over": g.handed_over,
            })),
            // A lock-guarded native cache's windows whose lock racewatch saw released and taken
            // again, and how long it was free in each on average: the only span a reader can
            // get into. Null where racewatch does not see the lock.
            "lock": h.lock.map(|l| json!({
                "windows": l.windows,
                "released_ns": l.released_ns,
            })),
            "readers": readers,
            // null, not 0, when no reader's lookups were counted: no forecast.
            "expected_collisions_per_hour": (!h.readers.is_empty()).then_some(h.expected_collisions_per_hour),
            // The 95% interval of the measurement (null for an unbounded end), and how long a
            // run would need for a collision at 95% odds.
            "expected_interval_per_hour": (!h.readers.is_empty()).then(|| {
                let (low, high) = h.interval_per_hour;
                [Some(low), high.is_finite().then_some(high)]
            }),
            "confirm_s": h.confirm_s,
            "sampled_fraction": h.sampled_fraction,
            "elapsed_s": h.elapsed_s,
        });
        writeln!(self.out, "{line}")?;
        self.out.flush()
    }

    fn pair(&mut self, number: usize, pair: &PairJson, new: u64) -> io::Result<()> {
        let mut line = serde_json::Map::new();
        line.insert("type".into(), "pair".into());
        line.insert("pair".into(), number.into());
        line.insert("new_lookups".into(), new.into());
        if let serde_json::Value::Object(fields) =
            serde_json::to_value(pair).map_err(io::Error::other)?
        {
            line.extend(fields);
        }
        writeln!(self.out, "{}", serde_json::Value::Object(line))?;
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
