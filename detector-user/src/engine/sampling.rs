//! Lookup sampling. Where probing every lookup would slow the target (`python`, whose dict
//! lookups run millions of times a second; `watch --miss-ret`, which probes misses alone), the
//! lookup-counting probe is attached for a short burst once a period, and the hazard report
//! scales the counts by the time it was attached. The target pays the probe's cost during one
//! burst a [`PERIOD`], as long as the cost budget allows (`engine::budget`), and nothing
//! otherwise.
use std::time::{Duration, Instant};

use crate::engine::budget::SamplingJson;

pub const PERIOD: Duration = Duration::from_secs(1);

/// When bursts start and stop, and how long lookups were counted.
#[derive(Debug)]
pub struct Sampler {
    /// When the running burst's probe was attached.
    on_since: Option<Instant>,
    /// When the next burst starts (or the running one stops); None: never.
    due: Option<Instant>,
    sampled: Duration,
    /// The probe stays attached once started (every lookup counted).
    always: bool,
    bursts: u64,
    skipped: u64,
}

impl Sampler {
    /// The first burst is due at `now`; with `always`, it never ends.
    pub fn new(now: Instant, always: bool) -> Sampler {
        Sampler {
            on_since: None,
            due: Some(now),
            sampled: Duration::ZERO,
            always,
            bursts: 0,
            skipped: 0,
        }
    }

    /// Whether the probe stays attached once started, whatever the budget.
    pub fn always(&self) -> bool {
        self.always
    }

    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    pub fn is_on(&self) -> bool {
        self.on_since.is_some()
    }

    /// The probe was attached at `now` (after the attach returned: the time counted is never
    /// more than the probe was live), for `burst`.
    pub fn started(&mut self, now: Instant, burst: Duration) {
        self.on_since = Some(now);
        self.due = (!self.always).then(|| now + burst);
        self.bursts += 1;
    }

    /// The budget left no room for a burst at `now`: the next one is due a period later.
    pub fn skipped(&mut self, now: Instant) {
        self.due = Some(now + PERIOD);
        self.skipped += 1;
    }

    /// The probe is about to be detached at `now`.
    pub fn stopped(&mut self, now: Instant) {
        if let Some(since) = self.on_since.take() {
            self.sampled += now.saturating_duration_since(since);
            self.due = Some(since + PERIOD);
        }
    }

    /// No more bursts (the probe could not be attached).
    pub fn halt(&mut self) {
        self.on_since = None;
        self.due = None;
    }

    /// The bursts' account at `now`, for the summary.
    pub fn account(&self, now: Instant) -> SamplingJson {
        SamplingJson {
            bursts: self.bursts,
            skipped: self.skipped,
            sampled_s: self.sampled(now).as_secs_f64(),
        }
    }

    /// Time lookups were counted, the running burst included.
    pub fn sampled(&self, now: Instant) -> Duration {
        self.sampled
            + self
                .on_since
                .map_or(Duration::ZERO, |since| now.saturating_duration_since(since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_repeat_each_period_and_their_time_adds_up() {
        let t0 = Instant::now();
        let mut s = Sampler::new(t0, false);
        assert_eq!(s.due(), Some(t0));
        assert!(!s.is_on());
        s.started(t0 + Duration::from_millis(1), Duration::from_millis(20));
        assert!(s.is_on());
        assert_eq!(s.due(), Some(t0 + Duration::from_millis(21)));
        assert_eq!(
            s.sampled(t0 + Duration::from_millis(11)),
            Duration::from_millis(10)
        );
        s.stopped(t0 + Duration::from_millis(23));
        assert!(!s.is_on());
        assert_eq!(s.due(), Some(t0 + Duration::from_millis(1001)));
        s.started(t0 + Duration::from_millis(1002), Duration::from_millis(5));
        assert_eq!(s.due(), Some(t0 + Duration::from_millis(1007)));
        s.stopped(t0 + Duration::from_millis(1007));
        s.skipped(t0 + Duration::from_millis(2002));
        assert_eq!(s.due(), Some(t0 + Duration::from_millis(3002)));
        assert_eq!(
            s.account(t0 + Duration::from_secs(5)),
            SamplingJson {
                bursts: 2,
                skipped: 1,
                sampled_s: 0.027
            }
        );
    }

    #[test]
    fn halted_sampler_is_never_due_again() {
        let t0 = Instant::now();
        let mut s = Sampler::new(t0, false);
        s.halt();
        assert!(!s.is_on());
        assert_eq!(s.due(), None);
    }

    #[test]
    fn stopping_without_a_burst_changes_nothing() {
        let t0 = Instant::now();
        let mut s = Sampler::new(t0, false);
        s.stopped(t0 + Duration::from_secs(1));
        assert_eq!(s.sampled(t0 + Duration::from_secs(2)), Duration::ZERO);
        assert_eq!(s.due(), Some(t0));
    }
}
