//! The cost budget: what racewatch may add to the processes it watches, as a share of their CPU
//! time. The window, miss and KeyError probes are what racewatch is for: they always run, and
//! the summary says when they alone exceed the budget. The hazard report's lookup sampling gets
//! what they leave: each burst is as long as the budget left pays for, at what the bursts so far
//! cost per second of burst.
use std::time::Duration;

use serde::Serialize;

/// The default budget: 1% of the watched processes' CPU time.
pub const DEFAULT_PERCENT: f64 = 1.0;
/// The longest burst (one runs each sampling period).
pub const BURST_MAX: Duration = Duration::from_millis(20);
/// The first burst, which measures what a burst costs, and the shortest worth attaching for.
pub const BURST_MIN: Duration = Duration::from_millis(1);
/// The share of what is left that a burst is planned to spend: a burst can cost more per second
/// than the ones before it (a reader that was idle then), and CPU time is counted in 10 ms
/// ticks.
const HEADROOM: f64 = 0.8;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// The share of the watched processes' CPU time racewatch may add, in (0, 1].
    pub share: f64,
}

/// What racewatch's probes added so far, and what the watched processes ran.
#[derive(Clone, Copy, Debug, Default)]
pub struct Spent {
    /// By the probes that always run (windows, misses, KeyErrors).
    pub required_ns: f64,
    /// By the lookup sampling's bursts.
    pub sampling_ns: f64,
    /// How long bursts ran.
    pub sampled: Duration,
    /// CPU time of the watched processes since racewatch attached.
    pub target_cpu: Duration,
}

impl Budget {
    /// How long the next burst may run: zero when what is left pays for less than
    /// [`BURST_MIN`].
    pub fn burst(&self, spent: &Spent) -> Duration {
        let allowed = self.share * spent.target_cpu.as_nanos() as f64;
        let left = HEADROOM * (allowed - spent.required_ns - spent.sampling_ns);
        if left <= 0.0 {
            return Duration::ZERO;
        }
        let burst = if spent.sampled.is_zero() {
            BURST_MIN
        } else {
            // Added time per second of burst (a burst that hit nothing costs nothing).
            let rate = spent.sampling_ns / spent.sampled.as_nanos() as f64;
            if rate <= 0.0 {
                BURST_MAX
            } else {
                Duration::from_secs_f64((left / rate / 1e9).min(BURST_MAX.as_secs_f64()))
            }
        };
        if burst < BURST_MIN {
            Duration::ZERO
        } else {
            burst
        }
    }

    /// Whether the probes that always run spent more than the whole budget.
    pub fn exceeded_by_required(&self, spent: &Spent) -> bool {
        spent.required_ns > self.share * spent.target_cpu.as_nanos() as f64
    }
}

/// The sampling's account, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SamplingJson {
    /// Bursts that ran.
    pub bursts: u64,
    /// Periods whose burst the budget left no room for.
    pub skipped: u64,
    /// Seconds lookups were counted.
    pub sampled_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: Budget = Budget { share: 0.01 };

    fn spent(required_ns: f64, sampling_ns: f64, sampled_ms: u64, cpu_ms: u64) -> Spent {
        Spent {
            required_ns,
            sampling_ns,
            sampled: Duration::from_millis(sampled_ms),
            target_cpu: Duration::from_millis(cpu_ms),
        }
    }

    #[test]
    fn the_first_burst_is_short_and_measures_the_rate() {
        assert_eq!(BUDGET.burst(&spent(0.0, 0.0, 0, 1000)), BURST_MIN);
        // Nothing run yet: nothing to spend.
        assert_eq!(BUDGET.burst(&spent(0.0, 0.0, 0, 0)), Duration::ZERO);
    }

    #[test]
    fn a_burst_lasts_what_is_left_pays_for() {
        // 1 s of CPU allows 10 ms; 2 ms spent on windows, 1 ms on a 1 ms burst (1 ns of cost
        // per ns of burst): 7 ms left, of which the burst plans to spend 80%.
        assert_eq!(
            BUDGET.burst(&spent(2e6, 1e6, 1, 1000)),
            Duration::from_micros(5600)
        );
        // At a tenth of that rate the burst would be 70 ms: capped.
        assert_eq!(BUDGET.burst(&spent(2e6, 1e5, 1, 1000)), BURST_MAX);
        // A burst that hit nothing costs nothing.
        assert_eq!(BUDGET.burst(&spent(2e6, 0.0, 1, 1000)), BURST_MAX);
    }

    #[test]
    fn no_burst_when_the_required_probes_take_it_all() {
        let s = spent(11e6, 0.0, 0, 1000);
        assert_eq!(BUDGET.burst(&s), Duration::ZERO);
        assert!(BUDGET.exceeded_by_required(&s));
        // Less than the shortest burst left: none.
        let s = spent(9.5e6, 0.0, 1, 1000);
        assert_eq!(BUDGET.burst(&s), BURST_MAX);
        let s = spent(9e6, 0.0, 2, 1000);
        assert_eq!(
            BUDGET.burst(&s),
            BURST_MAX,
            "a burst that hit nothing costs nothing"
        );
        let s = spent(8.5e6, 1e6, 1, 1000);
        assert_eq!(BUDGET.burst(&s), Duration::ZERO);
        assert!(!BUDGET.exceeded_by_required(&s));
    }

    #[test]
    fn spending_stays_within_the_budget_over_a_run() {
        // A target at one CPU, whose lookups make a burst cost 0.5 ns per ns, and windows that
        // cost 0.2% of its time: sampling fills the rest, never more.
        let mut s = Spent::default();
        for second in 1..=600u64 {
            s.target_cpu = Duration::from_secs(second);
            s.required_ns = 0.002 * s.target_cpu.as_nanos() as f64;
            let burst = BUDGET.burst(&s);
            s.sampled += burst;
            s.sampling_ns += 0.5 * burst.as_nanos() as f64;
            let total = s.required_ns + s.sampling_ns;
            assert!(
                total <= 0.01 * s.target_cpu.as_nanos() as f64 + 1.0,
                "at {second} s"
            );
        }
        let share = (s.required_ns + s.sampling_ns) / s.target_cpu.as_nanos() as f64;
        assert!(share > 0.009, "the budget goes unused: {share}");
    }
}
