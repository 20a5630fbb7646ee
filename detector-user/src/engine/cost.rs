//! What racewatch's probes added to a target: hits times the per-hit cost of each kind of trap.
use serde::Serialize;

/// Nanoseconds one probe hit adds, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Costs {
    /// An entry probe on an instruction the kernel emulates (push, nop, direct branch).
    pub emulated_ns: f64,
    /// An entry probe on an instruction the kernel single-steps.
    pub single_stepped_ns: f64,
    /// What probing the return adds to the entry's trap.
    pub return_ns: f64,
}

/// How each probe of a run traps: true where the probed instruction is emulated.
#[derive(Clone, Copy, Debug, Default)]
pub struct Traps {
    pub clear: bool,
    pub refill: bool,
    /// The refill's end is probed at its exits (emulated), not through a return probe.
    pub refill_exits: bool,
    pub lookup_entry: bool,
    pub lookup_miss: bool,
    pub lookup_sample: bool,
    pub keyerror: bool,
}

/// The time racewatch's probes added to the target: each probe's hits times its cost.
pub fn added_ns(costs: &Costs, traps: &Traps, hits: &ProbeHits) -> f64 {
    let trap = |emulated: bool| {
        if emulated {
            costs.emulated_ns
        } else {
            costs.single_stepped_ns
        }
    };
    // A refill's entry probe and its return probe share one breakpoint at the entry.
    let refill_end = if traps.refill_exits {
        costs.emulated_ns
    } else {
        costs.return_ns
    };
    hits.clear as f64 * trap(traps.clear)
        + hits.refill_entry as f64 * trap(traps.refill)
        + hits.refill_return as f64 * refill_end
        + hits.lookup_entry as f64 * trap(traps.lookup_entry)
        + hits.lookup_return as f64 * costs.return_ns
        + hits.lookup_miss as f64 * trap(traps.lookup_miss)
        + hits.lookup_sample as f64 * trap(traps.lookup_sample)
        + hits.keyerror as f64 * trap(traps.keyerror)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_time_is_hits_times_cost_by_kind() {
        let costs = Costs {
            emulated_ns: 1000.0,
            single_stepped_ns: 10_000.0,
            return_ns: 2000.0,
        };
        let traps = Traps {
            clear: true,
            refill: false,
            refill_exits: false,
            lookup_entry: true,
            lookup_miss: true,
            lookup_sample: true,
            keyerror: true,
        };
        let hits = ProbeHits {
            clear: 10,
            refill_entry: 10,
            refill_return: 10,
            lookup_miss: 5,
            ..ProbeHits::default()
        };
        // 10 emulated clears, 10 single-stepped refill entries, 10 returns, 5 emulated misses.
        assert_eq!(
            added_ns(&costs, &traps, &hits),
            10_000.0 + 100_000.0 + 20_000.0 + 5_000.0
        );
    }
}
