//! The provocation budget: how long racewatch may hold a writer inside its windows, shared so the
//! kernel enforces exactly the rule the host tests check.

/// Longest hold of one window (`--provoke` refuses more): a BPF program cannot sleep, so the
/// hold is a bounded busy-wait on the writer's CPU.
pub const PROVOKE_MAX_NS: u64 = 50_000_000;
/// Share of the wall time since attach that holds may add up to, in percent.
pub const PROVOKE_BUDGET_PCT: u64 = 10;

/// Provocation counters, in the kernel's per-CPU `PROVOKE` array (one entry): each CPU accounts
/// the holds it ran, with no atomics (the BPF target has none Rust can emit here).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProvokeState {
    /// Time writers were held, in total.
    pub held_ns: u64,
    /// Windows held open.
    pub windows: u64,
    /// Windows left alone because the budget was spent.
    pub refused: u64,
    /// CPython: the longest switch interval read at a window's open, in µs.
    pub switch_interval_us: u64,
    /// CPython: windows held in which no reader asked for the GIL before the wait ended.
    pub unanswered: u64,
    /// CPython: windows left alone because a reader asks for the GIL only after waiting longer
    /// than a hold may last.
    pub beyond_reach: u64,
}

/// A CPython writer armed to hand the GIL over inside its window (`python --provoke`), by thread,
/// in the kernel's `GIL_HOLDS` map: from its `dict_clear` until it takes the GIL back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GilHold {
    /// The dict whose window is open.
    pub cache: crate::ObjKey,
    /// Until when the writer waits, holding the GIL, for a reader to ask for it; once one has,
    /// until when the writer is kept from taking it back.
    pub deadline_ns: u64,
    /// How long the writer is kept from the GIL once it handed it over (`--provoke`).
    pub hold_ns: u64,
    /// The word in the target's memory where a waiter asks for the GIL, and its bits that ask.
    pub drop_request: u64,
    pub drop_mask: u64,
}

/// How long a CPython writer holding the GIL in its window waits for a reader to ask for it, given
/// the interpreter's switch interval: a waiting thread asks only once it has waited a whole
/// interval, so the wait is twice the interval (a reader that starts waiting up to an interval
/// after the window opened asks in time too), at least `hold_ns`, at most [`PROVOKE_MAX_NS`]; None
/// when an interval that long is beyond any hold's reach.
pub fn request_wait_ns(switch_interval_us: u64, hold_ns: u64) -> Option<u64> {
    // Compared before multiplying: the BPF target has no 128-bit multiply to check one with.
    (switch_interval_us < PROVOKE_MAX_NS / 1_000).then(|| {
        let interval = switch_interval_us * 1_000;
        (2 * interval).max(hold_ns).min(PROVOKE_MAX_NS)
    })
}

/// Whether one CPU, having held writers `held_ns` in all, may hold one `hold_ns` more at
/// `now_ns`: each of the `cpus` CPUs gets an equal share of [`PROVOKE_BUDGET_PCT`] of the time
/// since `start_ns`, so all holds together never exceed that percentage.
pub fn within_budget(start_ns: u64, now_ns: u64, held_ns: u64, hold_ns: u64, cpus: u32) -> bool {
    // No overflowing multiplications: the BPF target has no 128-bit multiply to check them with.
    let allowed = now_ns.saturating_sub(start_ns).min(u64::MAX / 100) * PROVOKE_BUDGET_PCT;
    let need = held_ns.saturating_add(hold_ns);
    let cpus = u64::from(cpus.max(1));
    need <= u64::MAX / 100 / cpus && need * 100 * cpus <= allowed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_accrues_with_wall_time() {
        // One CPU: 2 ms holds need 20 ms of wall time each at 10%.
        assert!(!within_budget(1_000, 1_000 + 19_999_999, 0, 2_000_000, 1));
        assert!(within_budget(1_000, 1_000 + 20_000_000, 0, 2_000_000, 1));
        assert!(!within_budget(0, 40_000_000, 2_000_000, 2_000_001, 1));
        assert!(within_budget(0, 40_000_000, 2_000_000, 2_000_000, 1));
    }

    #[test]
    fn each_cpu_gets_its_share() {
        // Two CPUs: 5% each, so together at most 10%.
        assert!(!within_budget(0, 39_999_999, 0, 2_000_000, 2));
        assert!(within_budget(0, 40_000_000, 0, 2_000_000, 2));
        // Zero CPUs (a bad count) is treated as one, never a division by zero.
        assert!(within_budget(0, 20_000_000, 0, 2_000_000, 0));
    }

    #[test]
    fn clock_before_start_or_huge_values_never_pass() {
        assert!(!within_budget(500, 100, 0, 1, 1));
        assert!(!within_budget(0, u64::MAX, u64::MAX, 1, 1));
        assert!(!within_budget(0, u64::MAX, u64::MAX / 200, 0, 4));
    }

    #[test]
    fn writers_wait_twice_the_switch_interval() {
        // CPython's default 5 ms interval and `--provoke 1ms`: a reader asks after 5 ms.
        assert_eq!(request_wait_ns(5_000, 1_000_000), Some(10_000_000));
        // A short interval: the hold itself is the longest wait.
        assert_eq!(request_wait_ns(100, 5_000_000), Some(5_000_000));
        assert_eq!(request_wait_ns(3_000, 5_000_000), Some(6_000_000));
        // Within reach but longer than a hold may last: the cap.
        assert_eq!(request_wait_ns(40_000, 1_000_000), Some(PROVOKE_MAX_NS));
        // Beyond reach, and absurd values never overflow.
        assert_eq!(request_wait_ns(50_000, 1_000_000), None);
        assert_eq!(request_wait_ns(u64::MAX, 1_000_000), None);
    }

    proptest::proptest! {
        /// However the holds come, the total a CPU is allowed never exceeds its share.
        #[test]
        fn sum_of_allowed_holds_stays_within_share(
            holds in proptest::collection::vec((1u64..10_000_000, 0u64..50_000_000), 1..200),
            cpus in 1u32..8,
        ) {
            let (mut now, mut held) = (0u64, 0u64);
            for (hold, gap) in holds {
                now += gap;
                if within_budget(0, now, held, hold, cpus) {
                    held += hold;
                    now += hold;
                }
                proptest::prop_assert!(held as u128 * 100 * cpus as u128 <= now as u128 * 10);
            }
        }
    }
}
