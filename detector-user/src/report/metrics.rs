//! Prometheus metrics (`--metrics ADDR`): a run's counts as counters, labelled by process (and
//! again by the run's window, for a run of several), in the text exposition format a Prometheus
//! server scrapes. Ended processes whose counts the run no
//! longer keeps apart leave their series for one labelled `pid="0"`, `comm="(ended)"`, so the
//! series stay bounded in a run left on for days and their sum stays the run's total.
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WindowLabels {
    window: String,
}

/// What a scrape reads; counters only ever grow, so each update adds what is new.
pub struct Metrics {
    registry: Registry,
    windows: Family<ProcessLabels, Counter>,
    lookups: Family<ProcessLabels, Counter>,
    misses: Family<ProcessLabels, Counter>,
    /// The same counts by window (its name).
    by_window: [Family<WindowLabels, Counter>; 3],
    lost: Counter,
    watched: Gauge,
    /// What each process's counters already hold: (windows, lookups, misses), with its labels.
    exported: HashMap<u32, (ProcessLabels, (u64, u64, u64))>,
    /// What each window's counters already hold, by window number.
    window_exported: HashMap<u32, (WindowLabels, (u64, u64, u64))>,
    /// What the series of ended processes no longer kept apart holds.
    ended_exported: (u64, u64, u64),
    lost_exported: u64,
}

/// The series that holds the counts of ended processes no longer kept apart.
fn ended_labels() -> ProcessLabels {
    ProcessLabels {
        pid: 0,
        comm: "(ended)".into(),
    }
}

fn triple(c: &Counts) -> (u64, u64, u64) {
    (c.windows, c.lookups_in_window, c.misses_in_window)
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("racewatch");
        let windows = Family::<ProcessLabels, Counter>::default();
        let lookups = Family::<ProcessLabels, Counter>::default();
        let misses = Family::<ProcessLabels, Counter>::default();
        let by_window: [Family<WindowLabels, Counter>; 3] = Default::default();
        for (family, (name, help)) in by_window.iter().zip([
            ("window_windows", "Windows seen, by the run's window"),
            (
                "window_lookups_in_window",
                "Lookups by another thread in a window, by the run's window",
            ),
            (
                "window_misses_in_window",
                "Lookups in a window that missed, by the run's window",
            ),
        ]) {
            registry.register(name, help, family.clone());
        }
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
            by_window,
            lost,
            watched,
            exported: HashMap::new(),
            window_exported: HashMap::new(),
            ended_exported: (0, 0, 0),
            lost_exported: 0,
        }
    }
}

impl Metrics {
    /// Adds `now - before` to the three counters of `labels`.
    fn add(&self, labels: &ProcessLabels, now: (u64, u64, u64), before: (u64, u64, u64)) {
        self.windows
            .get_or_create(labels)
            .inc_by(now.0.saturating_sub(before.0));
        self.lookups
            .get_or_create(labels)
            .inc_by(now.1.saturating_sub(before.1));
        self.misses
            .get_or_create(labels)
            .inc_by(now.2.saturating_sub(before.2));
    }

    /// Brings the metrics up to the run's counts (`totals`, and each kept process's); `comm`
    /// names a process.
    pub fn update(
        &mut self,
        per_process: &BTreeMap<u32, Counts>,
        totals: &Counts,
        comm: impl Fn(u32) -> String,
        lost: u64,
        watched: usize,
    ) {
        for (&pid, c) in per_process {
            let now = triple(c);
            let labels = match self.exported.get(&pid) {
                Some((_, before)) if *before == now => continue,
                Some((labels, _)) => labels.clone(),
                None => ProcessLabels {
                    pid,
                    comm: comm(pid),
                },
            };
            let before = self.exported.get(&pid).map_or((0, 0, 0), |e| e.1);
            self.add(&labels, now, before);
            self.exported.insert(pid, (labels, now));
        }
        // Processes no longer kept apart: their series go, their counts join the ended ones'.
        let gone: Vec<u32> = self
            .exported
            .keys()
            .filter(|pid| !per_process.contains_key(pid))
            .copied()
            .collect();
        for pid in gone {
            if let Some((labels, _)) = self.exported.remove(&pid) {
                self.windows.remove(&labels);
                self.lookups.remove(&labels);
                self.misses.remove(&labels);
            }
        }
        let kept = per_process.values().fold((0, 0, 0), |a, c| {
            let t = triple(c);
            (a.0 + t.0, a.1 + t.1, a.2 + t.2)
        });
        let all = triple(totals);
        let ended = (
            all.0.saturating_sub(kept.0),
            all.1.saturating_sub(kept.1),
            all.2.saturating_sub(kept.2),
        );
        if ended != self.ended_exported {
            self.add(&ended_labels(), ended, self.ended_exported);
            self.ended_exported = ended;
        }
        self.lost.inc_by(lost.saturating_sub(self.lost_exported));
        self.lost_exported = self.lost_exported.max(lost);
        self.watched.set(i64::try_from(watched).unwrap_or(i64::MAX));
    }

    /// Brings the by-window series up to each window's counts; `name` names a window.
    pub fn update_windows(
        &mut self,
        per_window: &BTreeMap<u32, Counts>,
        name: impl Fn(u32) -> String,
    ) {
        for (&window, c) in per_window {
            let now = triple(c);
            let (labels, before) = match self.window_exported.get(&window) {
                Some((_, before)) if *before == now => continue,
                Some((labels, before)) => (labels.clone(), *before),
                None => (
                    WindowLabels {
                        window: name(window),
                    },
                    (0, 0, 0),
                ),
            };
            let [windows, lookups, misses] = &self.by_window;
            windows
                .get_or_create(&labels)
                .inc_by(now.0.saturating_sub(before.0));
            lookups
                .get_or_create(&labels)
                .inc_by(now.1.saturating_sub(before.1));
            misses
                .get_or_create(&labels)
                .inc_by(now.2.saturating_sub(before.2));
            self.window_exported.insert(window, (labels, now));
        }
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

    fn counts(windows: u64, lookups: u64, misses: u64) -> Counts {
        Counts {
            windows,
            lookups_in_window: lookups,
            misses_in_window: misses,
            ..Counts::default()
        }
    }

    #[test]
    fn counters_follow_the_counts_and_carry_the_process() {
        let mut m = Metrics::default();
        let mut per = BTreeMap::new();
        per.insert(7, counts(2, 5, 4));
        m.update(&per, &counts(2, 5, 4), |_| "worker".into(), 1, 3);
        per.insert(7, counts(3, 9, 8));
        m.update(&per, &counts(3, 9, 8), |_| "worker".into(), 1, 3);
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

    #[test]
    fn each_window_has_its_series() {
        let mut m = Metrics::default();
        let mut per = BTreeMap::new();
        per.insert(0, counts(2, 5, 4));
        per.insert(1, counts(3, 0, 0));
        let names = |w: u32| ["prices", "rates"][w as usize].to_string();
        m.update_windows(&per, names);
        per.insert(0, counts(4, 7, 6));
        m.update_windows(&per, names);
        let text = m.render();
        for line in [
            "racewatch_window_windows_total{window=\"prices\"} 4",
            "racewatch_window_misses_in_window_total{window=\"prices\"} 6",
            "racewatch_window_windows_total{window=\"rates\"} 3",
            "racewatch_window_misses_in_window_total{window=\"rates\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }

    #[test]
    fn a_process_no_longer_kept_apart_joins_the_ended_series() {
        let mut m = Metrics::default();
        let mut per = BTreeMap::new();
        per.insert(7, counts(2, 5, 4));
        per.insert(8, counts(1, 1, 1));
        m.update(&per, &counts(3, 6, 5), |p| format!("w{p}"), 0, 2);
        // 7 ended and was dropped, after one more window it had not been scraped for.
        per.remove(&7);
        m.update(&per, &counts(4, 6, 5), |p| format!("w{p}"), 0, 1);
        let text = m.render();
        assert!(!text.contains("pid=\"7\""), "{text}");
        for line in [
            "racewatch_windows_total{pid=\"0\",comm=\"(ended)\"} 3",
            "racewatch_misses_in_window_total{pid=\"0\",comm=\"(ended)\"} 4",
            "racewatch_misses_in_window_total{pid=\"8\",comm=\"w8\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in:\n{text}");
        }
    }
}
