//! The CPU time the watched processes used since racewatch first saw each: what the cost budget
//! is a share of.
use std::{collections::HashMap, time::Duration};

use crate::process::proc_cpu;

#[derive(Default)]
pub struct CpuMeter {
    /// Each live process's CPU time when first seen, and at the last reading.
    live: HashMap<u32, (Duration, Duration)>,
    /// What ended processes used while watched.
    ended: Duration,
}

impl CpuMeter {
    /// Reads the CPU time of each of `pids` that still runs.
    pub fn update(&mut self, pids: impl IntoIterator<Item = u32>) {
        for pid in pids {
            if let Some(now) = proc_cpu(pid) {
                self.live
                    .entry(pid)
                    .and_modify(|(_, last)| *last = now)
                    .or_insert((now, now));
            }
        }
    }

    /// Process `pid` ended: what it used up to its last reading stays counted, and its pid may
    /// be reused by a process that starts afresh.
    pub fn exited(&mut self, pid: u32) {
        if let Some((first, last)) = self.live.remove(&pid) {
            self.ended += last.saturating_sub(first);
        }
    }

    pub fn total(&self) -> Duration {
        self.ended
            + self
                .live
                .values()
                .map(|(first, last)| last.saturating_sub(*first))
                .sum::<Duration>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_what_a_process_used_since_first_seen() {
        let me = std::process::id();
        let mut m = CpuMeter::default();
        m.update([me, u32::MAX]);
        assert_eq!(m.total(), Duration::ZERO, "nothing used since first seen");
        let spin = std::time::Instant::now();
        while spin.elapsed() < Duration::from_millis(60) {}
        m.update([me]);
        let used = m.total();
        assert!(used >= Duration::from_millis(30), "{used:?}");
        m.exited(me);
        assert_eq!(m.total(), used, "kept once ended");
    }
}
