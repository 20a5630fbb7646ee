//! Property: the kernel keeps only the last window per cache, yet flags exactly the lookups whose
//! execution overlaps some window of another thread, for any interleaving of threads.
use detector_common::Window;
use proptest::prelude::*;

#[derive(Clone, Copy, Debug)]
enum Op {
    /// clear() then update() on a cache: two calls, each with an entry and a return.
    Refresh(u64),
    Lookup(u64),
}

/// A thread's progress through its current operation.
#[derive(Clone, Copy, Default)]
struct Progress {
    op: usize,
    /// Steps taken in the current op: Refresh has 4 (clear entry/return, update entry/return),
    /// Lookup has 2.
    step: u32,
    entry_ns: u64,
}

fn ops() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u64..2).prop_map(Op::Refresh),
        (0u64..2).prop_map(Op::Lookup)
    ]
}

proptest! {
    #[test]
    fn last_window_state_flags_exactly_the_overlapping_lookups(
        threads in prop::collection::vec(prop::collection::vec(ops(), 1..8), 2..4),
        schedule in prop::collection::vec(0usize..4, 1..200),
    ) {
        let mut state: std::collections::HashMap<u64, Window> = Default::default();
        // Every window as an interval, for the reference: (cache, writer, open, close).
        let mut intervals: Vec<(u64, u32, u64, Option<u64>)> = Vec::new();
        let mut refilling: std::collections::HashMap<u32, u64> = Default::default();
        let mut progress = vec![Progress::default(); threads.len()];
        let mut lookups = Vec::new(); // (cache, tid, entry, exit, flagged by the kernel model)
        for (now, pick) in schedule.iter().enumerate() {
            let now = now as u64 + 1;
            let t = pick % threads.len();
            let tid = t as u32 + 1;
            let p = &mut progress[t];
            let Some(op) = threads[t].get(p.op).copied() else { continue };
            match (op, p.step) {
                (Op::Refresh(c), 0) => {
                    if let Some(w) = Window::on_clear(state.get(&c), tid, now) {
                        state.insert(c, w);
                        intervals.push((c, tid, now, None));
                    }
                }
                (Op::Refresh(c), 2) if state.get(&c).is_some_and(|w| w.closes_on_refill(tid)) => {
                    refilling.insert(tid, c);
                }
                (Op::Refresh(_), 3) => {
                    if let Some(c) = refilling.remove(&tid)
                        && let Some(w) = state.get(&c).filter(|w| w.closes_on_refill(tid)).copied()
                    {
                        state.insert(c, w.closed(now));
                        let open = intervals.iter_mut().rev().find(|i| i.0 == c && i.3.is_none()).unwrap();
                        open.3 = Some(now);
                    }
                }
                (Op::Lookup(_), 0) => p.entry_ns = now,
                (Op::Lookup(c), 1) => {
                    let flagged = state.get(&c).is_some_and(|w| w.overlaps(tid, Some(p.entry_ns)));
                    lookups.push((c, tid, p.entry_ns, now, flagged));
                }
                _ => {}
            }
            p.step += 1;
            let steps = match op { Op::Refresh(_) => 4, Op::Lookup(_) => 2 };
            if p.step == steps {
                *p = Progress { op: p.op + 1, ..Progress::default() };
            }
        }
        for (c, tid, entry, exit, flagged) in lookups {
            let overlaps = intervals.iter().any(|&(wc, writer, open, close)| {
                wc == c && writer != tid && open <= exit && close.is_none_or(|close| close >= entry)
            });
            prop_assert_eq!(flagged, overlaps, "lookup of cache {} by {} over [{}, {}]; windows {:?}", c, tid, entry, exit, intervals);
        }
    }
}
