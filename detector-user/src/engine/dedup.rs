//! One report per pair of stacks: the first alert of each (reader stack, writer stack) pair, for
//! each form of lookup (a KeyError, `d.get`, `in`, ...), is printed, the others only counted, and reported again as counts in long runs. Bounded for
//! runs left on for days: at most [`PAIRS_KEPT`] pairs, and new pairs' alerts printed at most
//! [`ALERTS_PER_S`] a second; what either holds back is counted, never dropped silently. Pure:
//! no I/O, no clock (the rate limit runs on the alerts' kernel timestamps).
use std::collections::HashMap;

/// Distinct pairs kept, at most. The lookups of pairs beyond it are counted in
/// [`Pairs::unkept`], and their alerts not printed.
pub const PAIRS_KEPT: usize = 4096;
/// New pairs' alerts printed a second at most, on average over [`ALERTS_BURST`] of them: a run
/// that meets thousands of new stacks a second must not flood its output. A pair whose first
/// alert was held back is still counted, and reported with its counts.
pub const ALERTS_PER_S: f64 = 20.0;
pub const ALERTS_BURST: f64 = 100.0;

use crate::engine::{correlate::Alert, stack::Stack};

/// A distinct (reader stack, writer stack) pair and how often it raced, for one form of lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// The lookup's form (`racewatch python --quiet-misses`), so that each form's first miss is
    /// shown even where stacks could not be read and two forms share a pair of unknown stacks.
    pub form: Option<&'static str>,
    pub reader_stack: Option<Stack>,
    pub writer_stack: Option<Stack>,
    /// Thread names of the pair's first alert.
    pub reader_name: String,
    pub writer_name: Option<String>,
    /// Lookups of this pair in a window, and those of them that missed.
    pub lookups: u64,
    pub misses: u64,
    /// When its first and its latest lookup in a window were made (kernel clock, ns): a pair
    /// seen for hours is one finding, with its span, not thousands of lines.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Whether its first alert was printed (else the rate limit held it back).
    pub printed: bool,
    /// Its lookups at the last periodic report.
    reported: u64,
}

/// A token bucket on the alerts' timestamps.
#[derive(Debug)]
struct Limit {
    tokens: f64,
    last_ns: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            tokens: ALERTS_BURST,
            last_ns: 0,
        }
    }
}

impl Limit {
    fn allow(&mut self, ns: u64) -> bool {
        let elapsed = ns.saturating_sub(self.last_ns) as f64 / 1e9;
        self.last_ns = self.last_ns.max(ns);
        self.tokens = (self.tokens + elapsed * ALERTS_PER_S).min(ALERTS_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

type Key = (Option<&'static str>, Option<Stack>, Option<Stack>);

/// A stack's identity for the fast path: the resolver hands out one allocation per distinct
/// stack, so most alerts of a pair share their stacks' addresses.
type Ptrs = (Option<&'static str>, usize, usize);

fn ptr(stack: &Option<Stack>) -> usize {
    stack
        .as_ref()
        .map_or(0, |s| s.as_ptr() as *const u8 as usize)
}

#[derive(Default)]
pub struct Pairs {
    index: HashMap<Key, usize>,
    /// The same index by stack addresses, so a repeat costs no hashing of frames. Only
    /// addresses of stacks held in `pairs` are kept, so none can be reused by another stack.
    by_ptr: HashMap<Ptrs, usize>,
    pairs: Vec<Pair>,
    limit: Limit,
    /// Lookups of pairs beyond [`PAIRS_KEPT`].
    pub unkept: u64,
    /// Pairs whose first alert the rate limit held back.
    pub held_back: u64,
}

impl Pairs {
    /// Counts `alert` in its pair; returns the pair's number (from 1) when the alert is the
    /// pair's first and the rate limit lets it through: the one to print.
    pub fn observe(&mut self, alert: &Alert) -> Option<usize> {
        let ptrs = (
            alert.form,
            ptr(&alert.reader_stack),
            ptr(&alert.writer_stack),
        );
        if let Some(&i) = self.by_ptr.get(&ptrs) {
            self.count(i, alert);
            return None;
        }
        let key = (
            alert.form,
            alert.reader_stack.clone(),
            alert.writer_stack.clone(),
        );
        let (i, first) = match self.index.get(&key) {
            Some(&i) => (i, false),
            None if self.pairs.len() >= PAIRS_KEPT => {
                self.unkept += 1;
                return None;
            }
            None => {
                self.pairs.push(Pair {
                    form: key.0,
                    reader_stack: key.1.clone(),
                    writer_stack: key.2.clone(),
                    reader_name: alert.reader_name.clone(),
                    writer_name: alert.writer_name.clone(),
                    lookups: 0,
                    misses: 0,
                    first_ns: alert.lookup_ns,
                    last_ns: alert.lookup_ns,
                    printed: false,
                    reported: 0,
                });
                self.index.insert(key, self.pairs.len() - 1);
                (self.pairs.len() - 1, true)
            }
        };
        let p = &self.pairs[i];
        // Only when the alert's stacks are the pair's own allocations, which the pair keeps alive.
        if ptrs == (p.form, ptr(&p.reader_stack), ptr(&p.writer_stack)) {
            self.by_ptr.insert(ptrs, i);
        }
        self.count(i, alert);
        if !first {
            return None;
        }
        if !self.limit.allow(alert.lookup_ns) {
            self.held_back += 1;
            return None;
        }
        self.pairs[i].printed = true;
        Some(i + 1)
    }

    /// The pairs that raced since the last call, each with its number (from 1) and its lookups
    /// since then: a long run's periodic account of what it stopped printing.
    pub fn report(&mut self) -> Vec<(usize, &Pair, u64)> {
        self.pairs
            .iter_mut()
            .enumerate()
            .filter(|(_, p)| p.lookups > p.reported)
            .map(|(i, p)| {
                let new = p.lookups - p.reported;
                p.reported = p.lookups;
                (i + 1, &*p, new)
            })
            .collect()
    }

    fn count(&mut self, i: usize, alert: &Alert) {
        let pair = &mut self.pairs[i];
        pair.lookups += 1;
        pair.misses += u64::from(alert.miss == Some(true));
        pair.first_ns = pair.first_ns.min(alert.lookup_ns);
        pair.last_ns = pair.last_ns.max(alert.lookup_ns);
    }

    /// Every pair, in the order first seen.
    pub fn pairs(&self) -> &[Pair] {
        &self.pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::stack::Frame;
    use proptest::prelude::*;

    fn stack(names: &[&str]) -> Stack {
        names
            .iter()
            .map(|n| Frame {
                function: n.to_string(),
                file: Some("a.cpp".into()),
                line: Some(1),
            })
            .collect()
    }

    fn alert(reader: Option<Stack>, writer: Option<Stack>, miss: Option<bool>) -> Alert {
        Alert {
            window: 0,
            cache: 1,
            pid: 100,
            reader_tid: 2,
            reader_name: "reader".into(),
            writer_tid: 3,
            writer_name: Some("writer".into()),
            window_open_ns: 10,
            lookup_ns: 20,
            miss,
            key: None,
            form: None,
            reader_stack: reader,
            writer_stack: writer,
        }
    }

    #[test]
    fn each_form_of_lookup_is_a_pair_of_its_own_even_without_stacks() {
        let mut pairs = Pairs::default();
        let quiet = |form| Alert {
            form,
            ..alert(None, None, Some(true))
        };
        assert_eq!(pairs.observe(&quiet(Some("get"))), Some(1));
        assert_eq!(pairs.observe(&quiet(Some("get"))), None);
        assert_eq!(pairs.observe(&quiet(Some("pop"))), Some(2));
        assert_eq!(pairs.observe(&quiet(None)), Some(3));
        let misses: Vec<u64> = pairs.pairs().iter().map(|p| p.misses).collect();
        assert_eq!(misses, [2, 1, 1]);
    }

    #[test]
    fn one_report_per_pair_with_its_counts() {
        let (r1, r2, w) = (
            stack(&["lookup", "a"]),
            stack(&["lookup", "b"]),
            stack(&["clear"]),
        );
        let mut p = Pairs::default();
        let firsts: Vec<Option<usize>> = [
            alert(Some(r1.clone()), Some(w.clone()), Some(true)),
            alert(Some(r1.clone()), Some(w.clone()), Some(false)),
            alert(Some(r2.clone()), Some(w.clone()), Some(true)),
            // Equal content from another allocation is the same pair.
            alert(
                Some(stack(&["lookup", "a"])),
                Some(stack(&["clear"])),
                Some(true),
            ),
            alert(None, Some(w.clone()), None),
        ]
        .iter()
        .map(|a| p.observe(a))
        .collect();
        assert_eq!(firsts, [Some(1), None, Some(2), None, Some(3)]);
        let counts: Vec<(u64, u64)> = p.pairs().iter().map(|q| (q.lookups, q.misses)).collect();
        assert_eq!(counts, [(3, 2), (1, 1), (1, 0)]);
        assert_eq!(p.pairs()[0].reader_stack, Some(r1));
    }

    #[test]
    fn a_pair_spans_from_its_first_lookup_to_its_latest() {
        let (r, w) = (stack(&["lookup"]), stack(&["clear"]));
        let mut p = Pairs::default();
        for at in [50, 20, 90] {
            let mut a = alert(Some(r.clone()), Some(w.clone()), Some(true));
            a.lookup_ns = at;
            p.observe(&a);
        }
        let pair = &p.pairs()[0];
        assert_eq!((pair.first_ns, pair.last_ns, pair.lookups), (20, 90, 3));
    }

    #[test]
    fn same_reader_with_another_writer_is_another_pair() {
        let r = stack(&["lookup"]);
        let mut p = Pairs::default();
        assert_eq!(
            p.observe(&alert(Some(r.clone()), Some(stack(&["clear", "x"])), None)),
            Some(1)
        );
        assert_eq!(
            p.observe(&alert(Some(r), Some(stack(&["clear", "y"])), None)),
            Some(2)
        );
    }

    #[test]
    fn new_pairs_are_printed_at_the_rate_limit_and_the_rest_counted() {
        let mut p = Pairs::default();
        let w = stack(&["clear"]);
        let mut printed = 0;
        // 1,000 new pairs within one second: the burst, then ALERTS_PER_S a second.
        for i in 0..1000u64 {
            let mut a = alert(
                Some(stack(&[&format!("r{i}")])),
                Some(w.clone()),
                Some(true),
            );
            a.lookup_ns = i * 1_000_000;
            printed += usize::from(p.observe(&a).is_some());
        }
        assert_eq!(printed, ALERTS_BURST as usize + ALERTS_PER_S as usize - 1);
        assert_eq!(p.held_back as usize, 1000 - printed);
        assert_eq!(p.pairs().len(), 1000);
        assert_eq!(p.pairs().iter().filter(|q| q.printed).count(), printed);
        // Beyond what is kept, pairs are counted, not kept.
        for i in 1000..PAIRS_KEPT as u64 + 10 {
            p.observe(&alert(
                Some(stack(&[&format!("r{i}")])),
                Some(w.clone()),
                None,
            ));
        }
        assert_eq!((p.pairs().len(), p.unkept), (PAIRS_KEPT, 10));
    }

    #[test]
    fn the_periodic_report_gives_what_raced_since_the_last() {
        let (r1, r2, w) = (stack(&["a"]), stack(&["b"]), stack(&["clear"]));
        let mut p = Pairs::default();
        for r in [&r1, &r1, &r2] {
            p.observe(&alert(Some(r.clone()), Some(w.clone()), Some(true)));
        }
        let firsts: Vec<(usize, u64)> = p.report().iter().map(|(n, _, new)| (*n, *new)).collect();
        assert_eq!(firsts, [(1, 2), (2, 1)]);
        assert!(p.report().is_empty(), "nothing raced since");
        p.observe(&alert(Some(r2.clone()), Some(w.clone()), Some(true)));
        let again: Vec<(usize, u64)> = p.report().iter().map(|(n, _, new)| (*n, *new)).collect();
        assert_eq!(again, [(2, 1)]);
    }

    proptest! {
        /// Whatever the sequence, the counts add up to the alerts and one alert per pair is
        /// printed.
        #[test]
        fn counts_add_up(seq in prop::collection::vec((0..3usize, 0..3usize, any::<bool>()), 0..200)) {
            let readers = [stack(&["r0"]), stack(&["r1"]), stack(&["r2"])];
            let writers = [stack(&["w0"]), stack(&["w1"]), stack(&["w2"])];
            let mut p = Pairs::default();
            let mut printed = 0;
            for &(r, w, miss) in &seq {
                let a = alert(Some(readers[r].clone()), Some(writers[w].clone()), Some(miss));
                printed += usize::from(p.observe(&a).is_some());
            }
            let distinct: std::collections::HashSet<(usize, usize)> =
                seq.iter().map(|&(r, w, _)| (r, w)).collect();
            prop_assert_eq!(printed, distinct.len());
            prop_assert_eq!(p.pairs().len(), distinct.len());
            prop_assert_eq!(p.pairs().iter().map(|q| q.lookups).sum::<u64>(), seq.len() as u64);
            prop_assert_eq!(
                p.pairs().iter().map(|q| q.misses).sum::<u64>(),
                seq.iter().filter(|s| s.2).count() as u64
            );
        }
    }
}
