//! The hazard report: for each cache that has empty windows, how often and how long it is empty,
//! who reads it and how close they came, and how many collisions to expect per hour, whether or
//! not a lookup has hit a window yet. Pure: fed kernel events and the kernel's reader counts, no
//! I/O, no clock. The estimate and its limits are in docs/HAZARD.md.
use std::collections::{HashMap, HashSet, VecDeque};

use detector_common::{Event, NO_GIL, NearEvent, ObjKey, ReaderKey, ReaderState, WindowEvent};

use crate::{engine::histogram::Histogram, text::comm_str};

/// Ended processes whose caches the report keeps.
const ENDED_KEPT: usize = 1024;

/// Window openings kept per cache to find the first one after a reader's lookup: a reader with
/// more windows than this between two of its lookups gets its "before" distance from the oldest
/// one kept (an overestimate, on a reader that far from the windows anyway).
const RECENT_OPENS: usize = 4096;

/// One reader of a cache in the report.
#[derive(Clone, Debug, PartialEq)]
pub struct ReaderHazard {
    pub tid: u32,
    pub comm: String,
    /// Lookups counted (in the sampled time only, for a sampled run).
    pub lookups: u64,
    pub lookups_per_s: f64,
    /// Shortest time from one of its lookups to the next window's opening.
    pub closest_before_ns: Option<u64>,
    /// Shortest time from a window's close to its next lookup.
    pub closest_after_ns: Option<u64>,
    pub expected_collisions_per_hour: f64,
}

/// One cache's hazard line.
#[derive(Clone, Debug, PartialEq)]
pub struct Hazard {
    pub cache: u64,
    /// The process the cache belongs to.
    pub pid: u32,
    /// Which of the run's windows the cache is watched as.
    pub window: u32,
    /// Windows that closed while racewatch watched.
    pub windows: u64,
    pub windows_per_s: f64,
    pub window_p50_ns: u64,
    pub window_p99_ns: u64,
    pub window_max_ns: u64,
    /// Share of the watched time the cache spent empty.
    pub time_in_window: f64,
    /// A CPython cache's: in how many of its windows the GIL went to another thread. Only those
    /// let a reader in, and the forecast rests on them alone.
    pub gil: Option<GilReach>,
    /// A lock-guarded native cache's: how long its lock was free in each window, between the
    /// clear's unlock and the refill's lock. Only then can a reader get in, and the forecast
    /// rests on that span.
    pub lock: Option<LockReach>,
    pub readers: Vec<ReaderHazard>,
    pub expected_collisions_per_hour: f64,
    /// The forecast's 95% interval from the counts it rests on (windows and lookups seen).
    pub interval_per_hour: (f64, f64),
    /// How long a run would need for a collision to happen at 95%, at the forecast rate.
    pub confirm_s: Option<f64>,
    /// Share of the watched time in which lookups were counted (1 when every lookup is probed).
    pub sampled_fraction: f64,
    pub elapsed_s: f64,
}

/// What the GIL let through: of `windows` whose switches were counted, `handed_over` saw the GIL
/// go to another thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GilReach {
    pub windows: u64,
    pub handed_over: u64,
}

/// What the cache's lock let through: in `windows` windows where racewatch saw it released and
/// taken again, it was free `released_ns` a window on average (racewatch's own traps taken out).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LockReach {
    pub windows: u64,
    pub released_ns: f64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Closest {
    before: Option<u64>,
    after: Option<u64>,
}

fn keep_min(slot: &mut Option<u64>, v: u64) {
    *slot = Some(slot.map_or(v, |old| old.min(v)));
}

#[derive(Default)]
struct CacheWindows {
    widths: Histogram,
    /// The summed widths of the windows a reader could get into: those in which the GIL went to
    /// another thread, and those neither a GIL nor a lock racewatch sees serialises.
    reachable_ns: u64,
    /// Windows whose GIL switches were counted, and those in which the GIL went to another
    /// thread.
    gil_windows: u64,
    handed_over: u64,
    /// Windows whose lock spans were measured, the spans' count and their summed time, with
    /// racewatch's traps in.
    lock_windows: u64,
    lock_spans: u64,
    lock_ns: u64,
    recent_opens: VecDeque<u64>,
    writers: HashSet<u32>,
    closest: HashMap<u32, Closest>,
}

impl CacheWindows {
    fn on_near(&mut self, n: &NearEvent, burst_start_ns: u64) {
        let c = self.closest.entry(n.reader_tid).or_default();
        if n.prev_lookup_ns < burst_start_ns {
            // The previous lookup counted came from an earlier burst: the reader's lookups in
            // between were not seen, so the distances would be made up.
            return;
        }
        // The first window that opened after the reader's previous lookup: later ones are
        // farther from that lookup.
        let first = self
            .recent_opens
            .partition_point(|&o| o <= n.prev_lookup_ns);
        if let Some(&open) = self.recent_opens.get(first).filter(|&&o| o <= n.lookup_ns) {
            keep_min(&mut c.before, open - n.prev_lookup_ns);
        }
        if n.close_ns != 0 {
            keep_min(&mut c.after, n.lookup_ns.saturating_sub(n.close_ns));
        }
    }
}

#[derive(Default)]
pub struct HazardTracker {
    /// What racewatch's own traps add to each lock span measured (`Costs::lock_edges_ns`).
    lock_edges_ns: f64,
    caches: HashMap<ObjKey, CacheWindows>,
    /// Processes that ended, oldest first.
    ended: VecDeque<u32>,
    /// When the running sampling burst began (0 when every lookup is counted).
    burst_start_ns: u64,
}

impl HazardTracker {
    /// `lock_edges_ns`: what racewatch's traps add to each lock span it measures.
    pub fn new(lock_edges_ns: f64) -> HazardTracker {
        HazardTracker {
            lock_edges_ns,
            ..HazardTracker::default()
        }
    }

    pub fn on_event(&mut self, event: &Event) {
        match event {
            Event::WindowOpen(w) => self.on_open(w),
            Event::WindowClose(w) => {
                let c = self.caches.entry(w.obj()).or_default();
                c.writers.insert(w.writer_tid);
                let width = w.close_ns.saturating_sub(w.open_ns);
                c.widths.record(width);
                if w.gil_switches != NO_GIL {
                    c.gil_windows += 1;
                    if w.gil_switches > 0 {
                        c.handed_over += 1;
                        c.reachable_ns += width;
                    }
                } else if w.reach_pairs > 0 {
                    c.lock_windows += 1;
                    c.lock_spans += u64::from(w.reach_pairs);
                    c.lock_ns += w.reach_ns;
                } else {
                    c.reachable_ns += width;
                }
            }
            Event::Near(n) => self
                .caches
                .entry(n.obj())
                .or_default()
                .on_near(n, self.burst_start_ns),
            Event::Lookup(_)
            | Event::KeyError(_)
            | Event::KeyVerdict(_)
            | Event::NativeStack(_)
            | Event::PyFrames(_)
            | Event::Fork(_)
            | Event::Exit(_) => {}
        }
    }

    /// Process `tgid` ended. Its caches stay in the report (the run's last one included: a
    /// launched command ends before it), but only those of the last [`ENDED_KEPT`] ended
    /// processes, so that a run left on for days stays bounded.
    pub fn on_exit(&mut self, tgid: u32) {
        self.ended.push_back(tgid);
        while self.ended.len() > ENDED_KEPT
            && let Some(old) = self.ended.pop_front()
        {
            self.caches.retain(|obj, _| obj.tgid != old);
        }
    }

    /// A sampling burst began at `now_ns` (kernel clock): a reader's distance to a window counts
    /// only between two lookups of the same burst.
    pub fn on_burst(&mut self, now_ns: u64) {
        self.burst_start_ns = now_ns;
    }

    fn on_open(&mut self, w: &WindowEvent) {
        let c = self.caches.entry(w.obj()).or_default();
        c.writers.insert(w.writer_tid);
        if c.recent_opens.len() == RECENT_OPENS {
            c.recent_opens.pop_front();
        }
        c.recent_opens.push_back(w.open_ns);
    }

    /// One hazard per cache that had a window, sorted by expected collisions (highest first).
    /// `readers` is the kernel's count per (cache, thread); `elapsed_s` the watched time, of
    /// which lookups were counted during `sampled_s`.
    pub fn report(
        &self,
        readers: &[(ReaderKey, ReaderState)],
        elapsed_s: f64,
        sampled_s: f64,
    ) -> Vec<Hazard> {
        let mut out: Vec<Hazard> = self
            .caches
            .iter()
            .filter(|(_, c)| c.widths.count() > 0)
            .map(|(&obj, c)| {
                cache_hazard(obj, c, readers, elapsed_s, sampled_s, self.lock_edges_ns)
            })
            .collect();
        out.sort_by(|a, b| {
            b.expected_collisions_per_hour
                .total_cmp(&a.expected_collisions_per_hour)
                .then(a.pid.cmp(&b.pid))
                .then(a.cache.cmp(&b.cache))
        });
        out
    }
}

fn rate(n: f64, secs: f64) -> f64 {
    if secs > 0.0 { n / secs } else { 0.0 }
}

/// Expected collisions per hour of one reader: its lookup rate times the share of time the cache
/// is empty where a reader can get in, times 3600 (lookups assumed to fall independently of
/// those windows: docs/HAZARD.md).
pub fn collisions_per_hour(lookups_per_s: f64, time_in_window: f64) -> f64 {
    lookups_per_s * time_in_window * 3600.0
}

/// The 95% interval of a forecast resting on `windows` windows and `lookups` lookups seen: each
/// count is taken as Poisson (its relative error 1/sqrt(n)), the two errors combined on the log
/// scale. It covers the measurement, not the model (docs/HAZARD.md, "Where it does not").
/// `windows` 0 with a forecast of none: `if_all` is the forecast had every window let a reader
/// in, and the upper end that of 3 windows in `of` doing so (the rule of three: none seen in
/// `of` bounds the share below 3/`of` at 95%).
pub fn interval(
    per_hour: f64,
    windows: u64,
    lookups: u64,
    none_of: Option<(u64, f64)>,
) -> (f64, f64) {
    if windows == 0
        && let Some((of, if_all)) = none_of.filter(|(of, _)| *of > 0)
    {
        return (0.0, if_all * (CONFIRMING / of as f64).min(1.0));
    }
    if windows == 0 || lookups == 0 {
        return (0.0, f64::INFINITY);
    }
    let spread = (1.0 / windows as f64 + 1.0 / lookups as f64).sqrt() * Z_95;
    (per_hour * (-spread).exp(), per_hour * spread.exp())
}

/// The two-sided 95% point of the normal distribution.
const Z_95: f64 = 1.96;

/// How long a run takes for a collision to happen with 95% odds at `per_hour`: 3 expected
/// (a Poisson count is 0 with odds e^-3, 5%). None for no collisions at all.
pub fn confirm_seconds(per_hour: f64) -> Option<f64> {
    (per_hour > 0.0).then(|| CONFIRMING / per_hour * 3600.0)
}

/// Expected collisions that make one happen with 95% odds: -ln(0.05).
const CONFIRMING: f64 = 3.0;

fn cache_hazard(
    obj: ObjKey,
    c: &CacheWindows,
    readers: &[(ReaderKey, ReaderState)],
    elapsed_s: f64,
    sampled_s: f64,
    lock_edges_ns: f64,
) -> Hazard {
    let time_in_window = rate(c.widths.sum() as f64 / 1e9, elapsed_s).min(1.0);
    let gil = (c.gil_windows > 0).then_some(GilReach {
        windows: c.gil_windows,
        handed_over: c.handed_over,
    });
    // A lock span's time less racewatch's two traps in it, summed, never below none.
    let lock_free_ns = (c.lock_ns as f64 - c.lock_spans as f64 * lock_edges_ns).max(0.0);
    let lock = (c.lock_windows > 0).then(|| LockReach {
        windows: c.lock_windows,
        released_ns: lock_free_ns / c.lock_windows as f64,
    });
    let reachable = rate((c.reachable_ns as f64 + lock_free_ns) / 1e9, elapsed_s).min(1.0);
    let mut rs: Vec<ReaderHazard> = readers
        .iter()
        .filter(|(k, _)| k.obj == obj && !c.writers.contains(&k.tid))
        .map(|(k, s)| {
            let closest = c.closest.get(&k.tid).copied().unwrap_or_default();
            let lookups_per_s = rate(s.lookups as f64, sampled_s);
            ReaderHazard {
                tid: k.tid,
                comm: comm_str(&s.comm),
                lookups: s.lookups,
                lookups_per_s,
                closest_before_ns: closest.before,
                closest_after_ns: closest.after,
                expected_collisions_per_hour: collisions_per_hour(lookups_per_s, reachable),
            }
        })
        .collect();
    rs.sort_by(|a, b| b.lookups.cmp(&a.lookups).then(a.tid.cmp(&b.tid)));
    // A fold from +0: `sum` of no reader would be -0, printed "-0.0".
    let expected = rs
        .iter()
        .map(|r| r.expected_collisions_per_hour)
        .fold(0.0, |a, b| a + b);
    let lookups = rs.iter().map(|r| r.lookups).sum();
    let lookups_per_s: f64 = rs.iter().map(|r| r.lookups_per_s).sum();
    // The windows the forecast rests on, and for none reachable, what bounds it.
    let (counted, none_of) = match gil {
        Some(g) => (
            g.handed_over,
            Some((
                g.windows,
                collisions_per_hour(lookups_per_s, time_in_window),
            )),
        ),
        None => (c.widths.count(), None),
    };
    Hazard {
        cache: obj.object,
        pid: obj.tgid,
        window: obj.window,
        windows: c.widths.count(),
        windows_per_s: rate(c.widths.count() as f64, elapsed_s),
        window_p50_ns: c.widths.quantile(0.5),
        window_p99_ns: c.widths.quantile(0.99),
        window_max_ns: c.widths.max(),
        time_in_window,
        gil,
        lock,
        expected_collisions_per_hour: expected,
        interval_per_hour: interval(expected, counted, lookups, none_of),
        confirm_s: confirm_seconds(expected),
        readers: rs,
        sampled_fraction: rate(sampled_s, elapsed_s).min(1.0),
        elapsed_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use detector_common::{COMM_LEN, EventKind};

    const CACHE: u64 = 0xcace;
    const PID: u32 = 100;
    const OBJ: ObjKey = ObjKey {
        object: CACHE,
        tgid: PID,
        window: 0,
    };
    const WRITER: u32 = 1;

    fn window(kind: EventKind, open_ns: u64, close_ns: u64) -> Event {
        let w = WindowEvent {
            kind: kind as u32,
            writer_tid: WRITER,
            tgid: PID,
            window: 0,
            cache: CACHE,
            open_ns,
            close_ns,
            gil_switches: NO_GIL,
            reach_ns: 0,
            reach_pairs: 0,
            _pad: 0,
            writer_comm: [0; COMM_LEN],
        };
        match kind {
            EventKind::WindowOpen => Event::WindowOpen(w),
            _ => Event::WindowClose(w),
        }
    }

    /// Windows [open, open + width) for each open.
    fn windows(t: &mut HazardTracker, opens: &[u64], width: u64) {
        for &o in opens {
            t.on_event(&window(EventKind::WindowOpen, o, 0));
            t.on_event(&window(EventKind::WindowClose, o, o + width));
        }
    }

    fn near(tid: u32, prev: u64, now: u64, close_ns: u64) -> Event {
        Event::Near(NearEvent {
            kind: EventKind::Near as u32,
            reader_tid: tid,
            tgid: PID,
            window: 0,
            cache: CACHE,
            prev_lookup_ns: prev,
            lookup_ns: now,
            close_ns,
        })
    }

    fn reader(tid: u32, lookups: u64) -> (ReaderKey, ReaderState) {
        let mut comm = [0; COMM_LEN];
        comm[..6].copy_from_slice(b"reader");
        (
            ReaderKey {
                obj: OBJ,
                tid,
                _pad: 0,
            },
            ReaderState {
                lookups,
                last_ns: 0,
                comm,
            },
        )
    }

    #[test]
    fn estimate_is_rate_times_share_of_time_empty() {
        let mut t = HazardTracker::default();
        // 10 windows of 5 µs in 1 s: empty 5e-5 of the time.
        windows(
            &mut t,
            &(0..10).map(|i| i * 100_000_000).collect::<Vec<_>>(),
            5_000,
        );
        let h = &t.report(&[reader(2, 1_000), reader(WRITER, 50)], 1.0, 1.0)[0];
        assert_eq!(h.windows, 10);
        assert_eq!(h.windows_per_s, 10.0);
        assert_eq!(
            (h.window_p50_ns, h.window_p99_ns, h.window_max_ns),
            (5_000, 5_000, 5_000)
        );
        assert!((h.time_in_window - 5e-5).abs() < 1e-12);
        assert_eq!(
            h.readers.len(),
            1,
            "the writer is not a reader of its own window"
        );
        let r = &h.readers[0];
        assert_eq!(
            (r.tid, r.comm.as_str(), r.lookups_per_s),
            (2, "reader", 1_000.0)
        );
        // 1000 lookups/s × 5e-5 × 3600 s = 180 per hour.
        assert!((h.expected_collisions_per_hour - 180.0).abs() < 1e-6);
        assert_eq!(h.sampled_fraction, 1.0);
        // From 10 windows and 1000 lookups: 180 × e^(±1.96 × sqrt(1/10 + 1/1000)).
        let spread = (0.101f64).sqrt() * 1.96;
        let (low, high) = h.interval_per_hour;
        assert!((low - 180.0 * (-spread).exp()).abs() < 1e-9, "{low}");
        assert!((high - 180.0 * spread.exp()).abs() < 1e-9, "{high}");
        // Three collisions expected in a minute: one happens with 95% odds.
        assert_eq!(h.confirm_s, Some(60.0));
    }

    #[test]
    fn the_interval_narrows_with_the_counts_and_a_forecast_of_none_confirms_nothing() {
        let (l1, h1) = interval(100.0, 4, 100, None);
        let (l2, h2) = interval(100.0, 400, 10_000, None);
        assert!(l1 < l2 && l2 < 100.0 && 100.0 < h2 && h2 < h1);
        // Nothing seen: the measurement bounds nothing.
        assert_eq!(interval(100.0, 0, 100, None), (0.0, f64::INFINITY));
        assert_eq!(confirm_seconds(0.0), None);
        assert_eq!(confirm_seconds(3.0), Some(3600.0));
    }

    /// Windows like [`windows`], each closing with `switches` GIL switches.
    fn gil_windows(t: &mut HazardTracker, opens: &[u64], width: u64, switches: u64) {
        for &o in opens {
            t.on_event(&window(EventKind::WindowOpen, o, 0));
            let Event::WindowClose(mut w) = window(EventKind::WindowClose, o, o + width) else {
                unreachable!()
            };
            w.gil_switches = switches;
            t.on_event(&Event::WindowClose(w));
        }
    }

    #[test]
    fn under_the_gil_only_windows_handed_over_let_a_reader_in() {
        let mut t = HazardTracker::default();
        // Ten 1 ms windows in 10 s; the GIL went to another thread in two of them.
        gil_windows(&mut t, &[0, 1, 2, 3, 4, 5, 6, 7], 1_000_000, 0);
        gil_windows(&mut t, &[8, 9], 1_000_000, 3);
        let h = &t.report(&[reader(2, 1000)], 10.0, 10.0)[0];
        assert_eq!(
            h.gil,
            Some(GilReach {
                windows: 10,
                handed_over: 2
            })
        );
        assert!((h.time_in_window - 0.001).abs() < 1e-12);
        // 100 lookups/s × (2 ms / 10 s) × 3600 = 72, on two windows' evidence.
        assert!((h.expected_collisions_per_hour - 72.0).abs() < 1e-9);
        let spread = (0.5f64 + 0.001).sqrt() * 1.96;
        assert!((h.interval_per_hour.1 - 72.0 * spread.exp()).abs() < 1e-9);
    }

    #[test]
    fn a_lock_guarded_cache_is_reachable_only_while_its_lock_is_free() {
        // Ten 1 ms windows in 10 s, each with one span of 1,500 ns measured from the clear's
        // unlock to the refill's lock, 1,000 ns of which are racewatch's traps.
        let mut t = HazardTracker::new(1_000.0);
        for o in 0..10 {
            t.on_event(&window(EventKind::WindowOpen, o, 0));
            let Event::WindowClose(mut w) = window(EventKind::WindowClose, o, o + 1_000_000) else {
                unreachable!()
            };
            (w.reach_ns, w.reach_pairs) = (1_500, 1);
            t.on_event(&Event::WindowClose(w));
        }
        let h = &t.report(&[reader(2, 1000)], 10.0, 10.0)[0];
        assert_eq!(
            h.lock,
            Some(LockReach {
                windows: 10,
                released_ns: 500.0
            })
        );
        // 100 lookups/s × (10 × 500 ns / 10 s) × 3600 = 0.18, not the 360 of whole windows.
        assert!(
            (h.expected_collisions_per_hour - 0.18).abs() < 1e-9,
            "{h:?}"
        );
    }

    #[test]
    fn under_the_gil_no_window_handed_over_forecasts_none_bounded_by_the_windows_seen() {
        let mut t = HazardTracker::default();
        gil_windows(&mut t, &(0..10).collect::<Vec<_>>(), 1_000_000, 0);
        let h = &t.report(&[reader(2, 1000)], 10.0, 10.0)[0];
        assert_eq!(h.expected_collisions_per_hour, 0.0);
        assert_eq!(h.confirm_s, None);
        // Had every window let the reader in: 100/s × 1e-3 × 3600 = 360; none in 10 bounds the
        // share below 3/10 at 95%.
        let (low, high) = h.interval_per_hour;
        assert_eq!(low, 0.0);
        assert!((high - 108.0).abs() < 1e-9, "{high}");
    }

    #[test]
    fn sampled_counts_are_scaled_to_the_sampled_time() {
        let mut t = HazardTracker::default();
        windows(&mut t, &[0], 1_000_000);
        // 20 lookups counted in 0.1 s of sampling over a 10 s run: 200 lookups/s.
        let h = &t.report(&[reader(2, 20)], 10.0, 0.1)[0];
        assert_eq!(h.readers[0].lookups_per_s, 200.0);
        assert!((h.sampled_fraction - 0.01).abs() < 1e-12);
        // 200/s × (1 ms / 10 s) × 3600 = 72.
        assert!((h.expected_collisions_per_hour - 72.0).abs() < 1e-9);
    }

    #[test]
    fn closest_distances_come_from_the_nearest_windows() {
        let mut t = HazardTracker::default();
        windows(&mut t, &[1_000, 2_000, 3_000], 100);
        // Lookups at 900 then 3_500: the first window after 900 opened 100 ns later; the last
        // close before 3_500 was 3_100, 400 ns earlier.
        t.on_event(&near(2, 900, 3_500, 3_100));
        // Another reader: lookups at 1_950 and 2_180: 50 ns before, 80 ns after.
        t.on_event(&near(3, 1_950, 2_180, 2_100));
        // A lookup inside an open window has no "after" (close_ns 0).
        t.on_event(&near(3, 2_990, 3_050, 0));
        let h = &t.report(&[reader(2, 2), reader(3, 3)], 1.0, 1.0)[0];
        let by_tid = |tid| h.readers.iter().find(|r| r.tid == tid).unwrap();
        assert_eq!(by_tid(2).closest_before_ns, Some(100));
        assert_eq!(by_tid(2).closest_after_ns, Some(400));
        assert_eq!(by_tid(3).closest_before_ns, Some(10));
        assert_eq!(by_tid(3).closest_after_ns, Some(80));
    }

    #[test]
    fn distances_span_only_lookups_of_one_burst() {
        let mut t = HazardTracker::default();
        windows(&mut t, &[1_000, 5_000], 100);
        t.on_burst(4_000);
        // The previous lookup counted (900) was in an earlier burst: no distance from it.
        t.on_event(&near(2, 900, 4_500, 1_100));
        let h = &t.report(&[reader(2, 2)], 1.0, 1.0)[0];
        assert_eq!(h.readers[0].closest_before_ns, None);
        assert_eq!(h.readers[0].closest_after_ns, None);
        // Both lookups in this burst.
        t.on_event(&near(2, 4_900, 5_150, 5_100));
        let h = &t.report(&[reader(2, 3)], 1.0, 1.0)[0];
        assert_eq!(h.readers[0].closest_before_ns, Some(100));
        assert_eq!(h.readers[0].closest_after_ns, Some(50));
    }

    #[test]
    fn readers_without_near_lookups_have_no_distance() {
        let mut t = HazardTracker::default();
        windows(&mut t, &[1_000], 100);
        let h = &t.report(&[reader(2, 5)], 1.0, 1.0)[0];
        assert_eq!(h.readers[0].closest_before_ns, None);
        assert_eq!(h.readers[0].closest_after_ns, None);
    }

    #[test]
    fn no_window_no_hazard() {
        let mut t = HazardTracker::default();
        t.on_event(&near(2, 1, 2, 0));
        assert!(t.report(&[reader(2, 1_000)], 1.0, 1.0).is_empty());
        // A window still open at the report has no width yet.
        t.on_event(&window(EventKind::WindowOpen, 5, 0));
        assert!(t.report(&[reader(2, 1_000)], 1.0, 1.0).is_empty());
    }

    #[test]
    fn zero_elapsed_time_gives_zero_rates_not_nan() {
        let mut t = HazardTracker::default();
        windows(&mut t, &[0], 10);
        let h = &t.report(&[reader(2, 1)], 0.0, 0.0)[0];
        assert_eq!(h.windows_per_s, 0.0);
        assert_eq!(h.expected_collisions_per_hour, 0.0);
        assert_eq!(h.sampled_fraction, 0.0);
    }

    #[test]
    fn opens_are_bounded() {
        let mut t = HazardTracker::default();
        windows(
            &mut t,
            &(0..RECENT_OPENS as u64 + 10).collect::<Vec<_>>(),
            0,
        );
        assert_eq!(t.caches[&OBJ].recent_opens.len(), RECENT_OPENS);
        assert_eq!(t.caches[&OBJ].recent_opens[0], 10);
    }
}
