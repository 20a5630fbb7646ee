//! Prometheus metrics (`--metrics ADDR`): a run's counts as counters, labelled by process, in the
//! text exposition format a Prometheus server scrapes.
use std::collections::{BTreeMap, HashMap};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::engine::correlate::Counts;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProcessLabels {
    pid: u32,
    comm: String,
}

/// What a scrape reads; counters only ever grow, so each update adds what is new.
pub struct Metrics {
    registry: Registry,
    windows: Family<ProcessLabels, Counter>,
    lookups: Family<ProcessLabels, Counter>,
    misses: Family<ProcessLabels, Counter>,
    lost: Counter,
    watched: Gauge,
    /// What each process's counters already hold: (windows, lookups, misses).
    exported: HashMap<u32, (u64, u64, u64)>,
    lost_exported: u64,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("racewatch");
        let windows = Family::<ProcessLabels, Counter>::default();
        let lookups = Family::<ProcessLabels, Counter>::default();
        let misses = Family::<ProcessLabels, Counter>::default();
        let lost = Counter::default();
        let watched = Gauge::default();
        registry.register(
            "windows",
            "Windows seen: an object emptied and not yet refilled",
            windows.clone(),
        );
        registry.register(
            "lookups_in_window",
            "Lookups by another thread while the object's window was open",
            lookups.clone(),
        );
        registry.register(
            "misses_in_window",
            "Lookups in a window that missed (Python: KeyErrors whose key the refill brought back)",
            misses.clone(),
        );
        registry.register(
            "events_lost",
            "Events the kernel could not deliver (ring buffer full); the counts are then lower bounds",
            lost.clone(),
        );
        registry.register(
            "processes_watched",
            "Processes racewatch watches now",
            watched.clone(),
        );
        Metrics {
            registry,
            windows,
            lookups,
            misses,
            lost,
            watched,
            exported: HashMap::new(),
            lost_exported: 0,
        }
    }
}

impl Metrics {
    /// Brings the metrics up to the run's counts; `comm` names a process.
    pub fn update(
        &mut self,
        per_process: &BTreeMap<u32, Counts>,
        comm: impl Fn(u32) -> String,
        lost: u64,
        watched: usize,
    ) {
        for (&pid, c) in per_process {
            let now = (c.windows, c.lookups_in_window, c.misses_in_window);
            let before = self.exported.insert(pid, now).unwrap_or_default();
            if now == before {
                continue;
            }
            let labels = ProcessLabels {
                pid,
                comm: comm(pid),
            };
            self.windows
                .get_or_create(&labels)
                .inc_by(now.0.saturating_sub(before.0));
            self.lookups
                .get_or_create(&labels)
                .inc_by(now.1.saturating_sub(before.1));
            self.misses
                .get_or_create(&labels)
                .inc_by(now.2.saturating_sub(before.2));
        }
        self.lost.inc_by(lost.saturating_sub(self.lost_exported));
        self.lost_exported = self.lost_exported.max(lost);
        self.watched.set(i64::try_from(watched).unwrap_or(i64::MAX));
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_follow_the_counts_and_carry_the_process() {
        let mut m = Metrics::default();
        let mut per = BTreeMap::new();
        let counts = |w, l, x| Counts {
            windows: w,
            lookups_in_window: l,
            misses_in_window: x,
            ..Counts::default()
        };
        per.insert(7, counts(2, 5, 4));
        m.update(&per, |_| "worker".into(), 1, 3);
        per.insert(7, counts(3, 9, 8));
        m.update(&per, |_| "worker".into(), 1, 3);
        let text = m.render();
        for line in [
            "racewatch_windows_total{pid=\"7\",comm=\"worker\"} 3",
            "racewatch_lookups_in_window_total{pid=\"7\",comm=\"worker\"} 9",
            "racewatch_misses_in_window_total{pid=\"7\",comm=\"worker\"} 8",
            "racewatch_events_lost_total 1",
            "racewatch_processes_watched 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }
}
