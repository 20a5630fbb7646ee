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
    /// What a lock-guarded cache's unlock and lock probes add to each span they measure
    /// between them (`WindowEvent::reach_ns`): the hazard report takes it out.
    pub lock_edges_ns: f64,
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
    /// `--quiet-misses`: CPython's `d.get` and `in`.
    pub quiet_lookup: bool,
}

impl Traps {
    /// How the probes of two plans trap together: emulated only where both are.
    pub fn and(self, o: Traps) -> Traps {
        Traps {
            clear: self.clear && o.clear,
            refill: self.refill && o.refill,
            refill_exits: self.refill_exits && o.refill_exits,
            lookup_entry: self.lookup_entry && o.lookup_entry,
            lookup_miss: self.lookup_miss && o.lookup_miss,
            lookup_sample: self.lookup_sample && o.lookup_sample,
            keyerror: self.keyerror && o.keyerror,
            quiet_lookup: self.quiet_lookup && o.quiet_lookup,
        }
    }
}

/// The cost of one hit of an entry-side probe.
fn trap(costs: &Costs, emulated: bool) -> f64 {
    if emulated {
        costs.emulated_ns
    } else {
        costs.single_stepped_ns
    }
}

/// The time racewatch's probes added to the target: each probe's hits times its cost.
pub fn added_ns(costs: &Costs, traps: &Traps, hits: &ProbeHits) -> f64 {
    required_ns(costs, traps, hits) + sampling_ns(costs, traps, hits)
}

/// What the probes that always run added: windows, lookups in them, misses, KeyErrors.
pub fn required_ns(costs: &Costs, traps: &Traps, hits: &ProbeHits) -> f64 {
    // A refill's entry probe and its return probe share one breakpoint at the entry.
    let refill_end = if traps.refill_exits {
        costs.emulated_ns
    } else {
        costs.return_ns
    };
    hits.clear as f64 * trap(costs, traps.clear)
        + hits.refill_entry as f64 * trap(costs, traps.refill)
        + hits.refill_return as f64 * refill_end
        + hits.lookup_entry as f64 * trap(costs, traps.lookup_entry)
        + hits.lookup_return as f64 * costs.return_ns
        + hits.lookup_miss as f64 * trap(costs, traps.lookup_miss)
        + hits.keyerror as f64 * trap(costs, traps.keyerror)
        + hits.quiet_lookup as f64 * trap(costs, traps.quiet_lookup)
        + hits.lock_edge as f64 * costs.emulated_ns
}

/// What the hazard report's lookup sampling added.
pub fn sampling_ns(costs: &Costs, traps: &Traps, hits: &ProbeHits) -> f64 {
    hits.lookup_sample as f64 * trap(costs, traps.lookup_sample)
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
    /// `--quiet-misses`: every `d.get` and `in` on a dict.
    pub quiet_lookup: u64,
    /// A lock-guarded cache's clear unlocks and refill locks (always emulated instructions).
    pub lock_edge: u64,
}

/// The time racewatch's probes added to the target: each probe's hits times what one hit costs on
/// this machine, measured on racewatch's own functions before the probes were attached.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SelfCost {
    pub added_ns: u64,
    /// The part the hazard report's lookup sampling added.
    pub sampling_ns: u64,
    /// The target's CPU time during the run, where known.
    pub target_cpu_ns: Option<u64>,
    /// `added_ns` over `target_cpu_ns`.
    pub added_share: Option<f64>,
    /// `--budget`, as a share.
    pub budget_share: f64,
    /// Whether the probes that always run (windows, misses, KeyErrors) alone added more than
    /// the budget, which then left nothing for sampling.
    pub required_over_budget: bool,
    pub per_hit_ns: Costs,
}

impl SelfCost {
    pub fn new(
        costs: Costs,
        traps: &Traps,
        hits: &ProbeHits,
        target_cpu_ns: Option<u64>,
        budget_share: f64,
    ) -> Self {
        let added_ns = added_ns(&costs, traps, hits).round() as u64;
        let required = required_ns(&costs, traps, hits);
        let cpu = target_cpu_ns.filter(|&cpu| cpu > 0);
        SelfCost {
            added_ns,
            sampling_ns: sampling_ns(&costs, traps, hits).round() as u64,
            target_cpu_ns,
            added_share: cpu.map(|cpu| added_ns as f64 / cpu as f64),
            budget_share,
            required_over_budget: cpu.is_some_and(|cpu| required > budget_share * cpu as f64),
            per_hit_ns: costs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const COSTS: Costs = Costs {
        emulated_ns: 1000.0,
        single_stepped_ns: 10_000.0,
        return_ns: 2000.0,
        lock_edges_ns: 1500.0,
    };

    #[test]
    fn added_time_is_hits_times_cost_by_kind() {
        let costs = COSTS;
        let traps = Traps {
            clear: true,
            refill: false,
            refill_exits: false,
            lookup_entry: true,
            lookup_miss: true,
            lookup_sample: true,
            keyerror: true,
            quiet_lookup: false,
        };
        let hits = ProbeHits {
            clear: 10,
            refill_entry: 10,
            refill_return: 10,
            lookup_miss: 5,
            quiet_lookup: 3,
            ..ProbeHits::default()
        };
        // 10 emulated clears, 10 single-stepped refill entries, 10 returns, 5 emulated misses,
        // 3 single-stepped quiet lookups.
        assert_eq!(
            added_ns(&costs, &traps, &hits),
            10_000.0 + 100_000.0 + 20_000.0 + 5_000.0 + 30_000.0
        );
    }

    #[test]
    fn the_required_probes_alone_can_exceed_the_budget() {
        let costs = COSTS;
        let traps = Traps {
            keyerror: true,
            lookup_sample: true,
            ..Traps::default()
        };
        let hits = ProbeHits {
            keyerror: 20,
            lookup_sample: 100,
            ..ProbeHits::default()
        };
        // 20 µs for KeyErrors and 100 µs of sampling, on 1 ms of CPU.
        let c = SelfCost::new(costs, &traps, &hits, Some(1_000_000), 0.01);
        assert_eq!((c.added_ns, c.sampling_ns), (120_000, 100_000));
        assert_eq!(c.added_share, Some(0.12));
        assert!(c.required_over_budget, "20 µs is over 1% of 1 ms");
        let c = SelfCost::new(costs, &traps, &hits, Some(1_000_000), 0.05);
        assert!(!c.required_over_budget);
    }
}
