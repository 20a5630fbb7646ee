//! One report per pair of stacks: the first alert of each (reader stack, writer stack) pair is
//! printed, the others only counted. Pure: no I/O.
use std::collections::HashMap;

use crate::engine::{correlate::Alert, stack::Stack};

/// A distinct (reader stack, writer stack) pair and how often it raced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
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
}

type Key = (Option<Stack>, Option<Stack>);

/// A stack's identity for the fast path: the resolver hands out one allocation per distinct
/// stack, so most alerts of a pair share their stacks' addresses.
type Ptrs = (usize, usize);

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
}

impl Pairs {
    /// Counts `alert` in its pair; returns the pair's number (from 1) when the alert is the
    /// pair's first, the one to print.
    pub fn observe(&mut self, alert: &Alert) -> Option<usize> {
        let ptrs = (ptr(&alert.reader_stack), ptr(&alert.writer_stack));
        if let Some(&i) = self.by_ptr.get(&ptrs) {
            self.count(i, alert);
            return None;
        }
        let key = (alert.reader_stack.clone(), alert.writer_stack.clone());
        let (i, first) = match self.index.get(&key) {
            Some(&i) => (i, false),
            None => {
                self.pairs.push(Pair {
                    reader_stack: key.0.clone(),
                    writer_stack: key.1.clone(),
                    reader_name: alert.reader_name.clone(),
                    writer_name: alert.writer_name.clone(),
                    lookups: 0,
                    misses: 0,
                    first_ns: alert.lookup_ns,
                    last_ns: alert.lookup_ns,
                });
                self.index.insert(key, self.pairs.len() - 1);
                (self.pairs.len() - 1, true)
            }
        };
        let p = &self.pairs[i];
        // Only when the alert's stacks are the pair's own allocations, which the pair keeps alive.
        if ptrs == (ptr(&p.reader_stack), ptr(&p.writer_stack)) {
            self.by_ptr.insert(ptrs, i);
        }
        self.count(i, alert);
        first.then_some(i + 1)
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
            reader_stack: reader,
            writer_stack: writer,
        }
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
