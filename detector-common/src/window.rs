//! The window state machine, shared so that the kernel applies exactly the rules the unit and
//! property tests check on the host.
//!
//! A window opens when `clear` is entered and closes when the refill (`update`) called by the same
//! thread returns. A lookup by another thread overlaps it when the window was open at some point
//! between the lookup's entry and its return.

use crate::NO_GIL;

/// State of one cache, stored in the kernel's `WINDOWS` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Window {
    /// Thread that emptied the cache.
    pub writer_tid: u32,
    /// 1 while the cache is empty-and-not-yet-refilled.
    pub open: u32,
    /// When `clear` was entered (CLOCK_MONOTONIC ns).
    pub open_ns: u64,
    /// When the refill returned; 0 while open.
    pub close_ns: u64,
    /// A CPython window's: where the GIL's `switch_number` is in the writer's process, 0 when
    /// no GIL serialises the window, and its value when the window opened.
    pub gil_switch_at: u64,
    pub gil_switch: u64,
    /// A lock-guarded cache's: when the writer's clear last released the lock (0: not since
    /// the refill took it), and the spans from such a release to the refill's lock so far.
    pub unlocked_ns: u64,
    pub reach_ns: u64,
    pub reach_pairs: u32,
    pub _pad: u32,
}

impl Window {
    /// `clear` entered by `tid` at `now`. A second clear while the window is open keeps the first
    /// opening: the cache has been empty since then.
    pub fn on_clear(prev: Option<&Window>, tid: u32, now: u64) -> Option<Window> {
        match prev {
            Some(w) if w.open != 0 => None,
            _ => Some(Window {
                writer_tid: tid,
                open: 1,
                open_ns: now,
                close_ns: 0,
                gil_switch_at: 0,
                gil_switch: 0,
                unlocked_ns: 0,
                reach_ns: 0,
                reach_pairs: 0,
                _pad: 0,
            }),
        }
    }

    /// Is a refill by `tid` one that closes this window?
    pub fn closes_on_refill(&self, tid: u32) -> bool {
        self.open != 0 && self.writer_tid == tid
    }

    pub fn closed(&self, now: u64) -> Window {
        Window {
            open: 0,
            close_ns: now,
            ..*self
        }
    }

    /// The window's GIL switches ([`crate::WindowEvent::gil_switches`]) when `switch_number` reads
    /// `now` at its close: [`NO_GIL`] without a GIL, or when it could not be read.
    pub fn gil_switches(&self, now: Option<u64>) -> u64 {
        match now {
            Some(n) if self.gil_switch_at != 0 => n.wrapping_sub(self.gil_switch).min(NO_GIL - 1),
            _ => NO_GIL,
        }
    }

    /// The writer `tid` released the cache's lock in its clear at `now`: readers can get in.
    pub fn on_unlock(&mut self, tid: u32, now: u64) -> bool {
        if !self.closes_on_refill(tid) {
            return false;
        }
        self.unlocked_ns = now;
        true
    }

    /// The writer `tid`'s refill took the cache's lock at `now`: readers are kept out again.
    pub fn on_locked(&mut self, tid: u32, now: u64) -> bool {
        if !self.closes_on_refill(tid) || self.unlocked_ns == 0 {
            return false;
        }
        self.reach_ns += now.saturating_sub(self.unlocked_ns);
        self.reach_pairs += 1;
        self.unlocked_ns = 0;
        true
    }

    /// Did a lookup by `tid` overlap this window? `entry_ns` is when the lookup began, or `None`
    /// when only its entry is probed (then the window must be open now).
    pub fn overlaps(&self, tid: u32, entry_ns: Option<u64>) -> bool {
        if self.writer_tid == tid {
            return false;
        }
        self.open != 0 || entry_ns.is_some_and(|start| self.close_ns >= start)
    }
}

/// Where a writer was when it opened a window, in the kernel's `WRITERS` map: what a reader that
/// lands in the window needs to copy the writer's stack then. While the window is open the writer
/// is still inside the function that called `clear`, so the frames above `rsp` are as they were;
/// only the return address at `rsp` has since been replaced by the refill's, and is kept here.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriterAt {
    /// The window's opening, to tell a later window on the same cache apart.
    pub open_ns: u64,
    pub rip: u64,
    pub rsp: u64,
    pub rbp: u64,
    /// The word at `rsp` when `clear` was entered: its return address.
    pub return_address: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reach_spans_run_from_the_clear_unlock_to_the_refill_lock() {
        let mut w = Window::on_clear(None, 1, 100).unwrap();
        assert!(!w.on_locked(1, 150), "no unlock seen yet");
        assert!(
            !w.on_unlock(2, 160),
            "another thread's unlock is not the clear's"
        );
        assert!(w.on_unlock(1, 200));
        assert!(
            !w.on_locked(2, 250),
            "another thread's lock is not the refill's"
        );
        assert!(w.on_locked(1, 260));
        assert!(w.on_unlock(1, 300));
        assert!(w.on_locked(1, 340));
        assert_eq!((w.reach_ns, w.reach_pairs, w.unlocked_ns), (100, 2, 0));
        let mut closed = w.closed(400);
        assert!(!closed.on_unlock(1, 410), "a closed window has no reach");
    }

    #[test]
    fn gil_switches_count_from_the_opening() {
        let mut w = Window::on_clear(None, 1, 100).unwrap();
        assert_eq!(w.gil_switches(Some(7)), NO_GIL, "no GIL: not known");
        w.gil_switch_at = 0x1000;
        w.gil_switch = 5;
        assert_eq!(w.gil_switches(Some(5)), 0);
        assert_eq!(w.gil_switches(Some(7)), 2);
        assert_eq!(w.gil_switches(None), NO_GIL, "unreadable: not known");
    }

    #[test]
    fn reader_inside_open_window_overlaps() {
        let w = Window::on_clear(None, 1, 100).unwrap();
        assert!(w.overlaps(2, None));
        assert!(w.overlaps(2, Some(50)));
        assert!(
            !w.overlaps(1, None),
            "the writer's own lookups are not races"
        );
    }

    #[test]
    fn window_closed_before_lookup_began_does_not_overlap() {
        let w = Window::on_clear(None, 1, 100).unwrap().closed(200);
        assert!(!w.overlaps(2, Some(201)));
        assert!(
            w.overlaps(2, Some(150)),
            "lookup in flight while the window closed"
        );
        assert!(!w.overlaps(2, None));
    }

    #[test]
    fn second_clear_keeps_first_opening() {
        let w = Window::on_clear(None, 1, 100).unwrap();
        assert_eq!(Window::on_clear(Some(&w), 1, 150), None);
        let reopened = Window::on_clear(Some(&w.closed(200)), 3, 300).unwrap();
        assert_eq!(reopened.writer_tid, 3);
        assert_eq!(reopened.open_ns, 300);
    }

    #[test]
    fn only_the_writer_refill_closes() {
        let w = Window::on_clear(None, 1, 100).unwrap();
        assert!(w.closes_on_refill(1));
        assert!(!w.closes_on_refill(2));
        assert!(!w.closed(150).closes_on_refill(1));
    }
}
