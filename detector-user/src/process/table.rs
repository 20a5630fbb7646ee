//! The processes a run watches: the target, and each process the kernel reports forked from a
//! watched one. Each is named (its comm) and given its pid inside its container while it still
//! runs, so the summary can name it after it has gone.
use std::collections::BTreeMap;

use detector_common::ProcessEvent;

use crate::{
    process::container::{HOST, Identity},
    text::comm_str,
};

/// One watched process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    /// Its pid in its own pid namespace and its container, where it has them.
    pub identity: Identity,
    pub comm: String,
    /// The watched process it was forked from (None: the target itself).
    pub parent: Option<u32>,
    /// Whether `comm` was read after the process's first event, and so after any exec: a
    /// launched command is named before its exec, a fork after its parent.
    named_at_event: bool,
    /// Whether it ended (kept for the summary: it had a window).
    ended: bool,
}

/// Processes ended without a window are forgotten; at most this many others are kept.
const KEPT: usize = 65_536;

#[derive(Default)]
pub struct Processes {
    known: BTreeMap<u32, Process>,
}

fn comm_of(pid: u32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end_matches('\n').to_string())
}

impl Processes {
    /// A process watched from the start: the target (no parent), or one of the workers it had
    /// already forked.
    pub fn watched(&mut self, pid: u32, parent: Option<u32>) {
        self.insert(Process {
            pid,
            identity: Identity::of(pid),
            comm: comm_of(pid).unwrap_or_default(),
            parent,
            named_at_event: false,
            ended: false,
        });
    }

    /// A process forked from a watched one: named while it still runs.
    pub fn forked(&mut self, e: &ProcessEvent) {
        self.insert(Process {
            pid: e.tgid,
            identity: Identity::of(e.tgid),
            comm: comm_str(&e.comm),
            parent: Some(e.parent),
            named_at_event: false,
            ended: false,
        });
    }

    /// A process seen in an event (a system-wide run learns its processes so): named at its
    /// first event, when it runs the program probed.
    pub fn seen(&mut self, pid: u32) {
        match self.known.get_mut(&pid) {
            None => self.watched(pid, None),
            Some(p) if !p.named_at_event => {
                if let Some(comm) = comm_of(pid) {
                    p.comm = comm;
                }
                p.named_at_event = true;
            }
            Some(_) => {}
        }
    }

    /// A watched process ended; `had_window`: whether the run has counts for it (kept for the
    /// summary).
    pub fn exited(&mut self, pid: u32, had_window: bool) {
        if had_window {
            if let Some(p) = self.known.get_mut(&pid) {
                p.ended = true;
            }
        } else {
            self.known.remove(&pid);
        }
    }

    /// Forgets process `pid`, ended, whose counts the run no longer keeps apart.
    pub fn forget(&mut self, pid: u32) {
        self.known.remove(&pid);
    }

    /// The processes known to be running.
    pub fn running(&self) -> impl Iterator<Item = u32> + '_ {
        self.known.values().filter(|p| !p.ended).map(|p| p.pid)
    }

    pub fn get(&self, pid: u32) -> Option<&Process> {
        self.known.get(&pid)
    }

    /// Process `pid`'s identity in its container (the host's for a process not known).
    pub fn identity(&self, pid: u32) -> &Identity {
        self.known.get(&pid).map_or(&HOST, |p| &p.identity)
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
        assert_eq!(t.running().count(), 0, "an ended process is not running");
        let kept = t.get(2_000_000_002).expect("kept");
        assert_eq!(
            (kept.parent, kept.comm.as_str()),
            (Some(1), "wwwwwwwwwwwwwwww")
        );
    }

    #[test]
    fn a_process_is_renamed_at_its_first_event() {
        // Named "w…" at its fork, as its parent was; by its first event it has exec'd.
        let me = std::process::id();
        let mut t = Processes::default();
        t.forked(&ProcessEvent {
            kind: detector_common::EventKind::Fork as u32,
            tgid: me,
            parent: 1,
            _pad: 0,
            ns: 0,
            comm: [b'w'; detector_common::COMM_LEN],
        });
        t.seen(me);
        assert_eq!(t.get(me).map(|p| p.comm.clone()), comm_of(me));
    }
}
