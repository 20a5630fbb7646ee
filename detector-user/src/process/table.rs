//! The processes a run watches: the target, and each process the kernel reports forked from a
//! watched one. Each is named (its comm) and given its pid inside its own pid namespace (a
//! container's view) while it still runs, so the summary can name it after it has gone.
use std::collections::BTreeMap;

use detector_common::ProcessEvent;

use crate::text::comm_str;

/// One watched process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// Its pid in its own pid namespace, where that differs from the host's or is known.
    pub ns_pid: Option<u32>,
    pub comm: String,
    /// The watched process it was forked from (None: the target itself).
    pub parent: Option<u32>,
}

/// Processes ended without a window are forgotten; at most this many others are kept.
const KEPT: usize = 65_536;

#[derive(Default)]
pub struct Processes {
    known: BTreeMap<u32, Process>,
}

/// `/proc/PID/status`'s `NSpid`: the pid in each namespace from the host's down; the last is the
/// process's own view.
pub fn ns_pid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_ns_pid(&status)
}

fn parse_ns_pid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

fn comm_of(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_string())
}

impl Processes {
    /// A process watched from the start: the target (no parent), or one of the workers it had
    /// already forked.
    pub fn watched(&mut self, pid: u32, parent: Option<u32>) {
        let comm = comm_of(pid).unwrap_or_default();
        self.insert(Process {
            pid,
            ns_pid: ns_pid(pid),
            comm,
            parent,
        });
    }

    /// A process forked from a watched one: named while it still runs.
    pub fn forked(&mut self, e: &ProcessEvent) {
        self.insert(Process {
            pid: e.tgid,
            ns_pid: ns_pid(e.tgid),
            comm: comm_str(&e.comm),
            parent: Some(e.parent),
        });
    }

    /// A process seen in an event (a system-wide run learns its processes so): named at its
    /// first event.
    pub fn seen(&mut self, pid: u32) {
        if !self.known.contains_key(&pid) {
            self.watched(pid, None);
        }
    }

    /// A watched process ended; `had_window`: whether the run has counts for it (kept for the
    /// summary).
    pub fn exited(&mut self, pid: u32, had_window: bool) {
        if !had_window {
            self.known.remove(&pid);
        }
    }

    /// Refreshes the name of a process still running (an exec renames it).
    pub fn refresh(&mut self, pid: u32) {
        if let (Some(p), Some(comm)) = (self.known.get_mut(&pid), comm_of(pid)) {
            p.comm = comm;
        }
    }

    pub fn get(&self, pid: u32) -> Option<&Process> {
        self.known.get(&pid)
    }

    fn insert(&mut self, p: Process) {
        if self.known.len() >= KEPT && !self.known.contains_key(&p.pid) {
            return;
        }
        self.known.insert(p.pid, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ns_pid_is_the_innermost() {
        let status = "Name:\tpython3\nNSpid:\t4242\t7\nNSsid:\t1\n";
        assert_eq!(parse_ns_pid(status), Some(7));
        assert_eq!(parse_ns_pid("NSpid:\t99\n"), Some(99));
        assert_eq!(parse_ns_pid("Name:\tx\n"), None);
    }

    #[test]
    fn a_process_ended_without_a_window_is_forgotten() {
        let mut t = Processes::default();
        let fork = |tgid| ProcessEvent {
            kind: detector_common::EventKind::Fork as u32,
            tgid,
            parent: 1,
            _pad: 0,
            ns: 0,
            comm: [b'w'; detector_common::COMM_LEN],
        };
        t.forked(&fork(2_000_000_001));
        t.forked(&fork(2_000_000_002));
        t.exited(2_000_000_001, false);
        t.exited(2_000_000_002, true);
        assert!(t.get(2_000_000_001).is_none());
        let kept = t.get(2_000_000_002).expect("kept");
        assert_eq!(
            (kept.parent, kept.comm.as_str()),
            (Some(1), "wwwwwwwwwwwwwwww")
        );
    }
}
