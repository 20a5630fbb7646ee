//! Turns kernel events into findings. Pure: no aya, no I/O, no clock, so every rule is unit- and
//! property-tested on hand-written event sequences.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use detector_common::{
    Event, FORM_NAMES, KEY_ABSENT, KeyErrorEvent, KeyVerdict, LookupEvent, ObjKey, WindowEvent,
};

use crate::{engine::stack::Stack, text::comm_str};

/// A lookup that fell inside another thread's empty-cache window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    /// The run's window it fell in (each window its own functions).
    pub window: u32,
    pub cache: u64,
    /// The process the cache belongs to (host pid).
    pub pid: u32,
    pub reader_tid: u32,
    pub reader_name: String,
    pub writer_tid: u32,
    /// The writer's name as seen when it opened the window; `None` if racewatch did not see it
    /// open (it opened before the probes were attached).
    pub writer_name: Option<String>,
    pub window_open_ns: u64,
    pub lookup_ns: u64,
    /// Whether the lookup missed; `None` when its result is not observed (no `--miss-ret`).
    pub miss: Option<bool>,
    /// The missing key, rendered (Python).
    pub key: Option<String>,
    /// How a Python lookup missed: "subscript" (`d[k]` raised KeyError), "get", "contains".
    pub form: Option<&'static str>,
    /// Where the reader looked up, innermost frame first; `None` when no stack was captured.
    pub reader_stack: Option<Stack>,
    /// Where the writer opened the window, innermost frame first.
    pub writer_stack: Option<Stack>,
}

impl Alert {
    fn obj(&self) -> ObjKey {
        ObjKey {
            object: self.cache,
            tgid: self.pid,
            window: self.window,
        }
    }

    /// How long the cache had been empty when the lookup began.
    pub fn open_for_ns(&self) -> u64 {
        self.lookup_ns.saturating_sub(self.window_open_ns)
    }
}

/// What a run found, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Windows seen opening (plus those seen only closing: opened before attach).
    pub windows: u64,
    pub lookups_in_window: u64,
    pub misses_in_window: u64,
    /// Windows in which at least one lookup missed.
    pub windows_with_misses: u64,
    /// KeyErrors in a window for keys the refill did not bring back either: not the window's.
    pub absent_keys_in_window: u64,
    /// KeyErrors still awaiting a verdict at the end, in windows no refill closed while
    /// racewatch watched (a dict emptied and not refilled by the refill racewatch knows, one freed
    /// and its address given to a new dict, a writer that ended inside its window): nothing tells
    /// whether a refill would have brought their keys back, so they are not counted as misses.
    pub unrefilled_keyerrors: u64,
    /// Caches that had at least one window.
    pub caches: u64,
    /// Widest window seen closing, in ns.
    pub max_window_ns: u64,
}

/// Renders a key object's bytes, for Python KeyErrors.
pub type KeyRenderer = Box<dyn Fn(&KeyErrorEvent) -> Option<String>>;

/// A window seen opening.
struct Opened {
    open_ns: u64,
    writer_name: String,
    writer_stack: Option<Stack>,
}

/// Windows remembered per cache.
const OPENED_KEPT: usize = 8;

/// The value a lookup returns when it does not find its key, and how many of the return
/// register's low bytes the function sets (a `bool` only `al`: the rest is whatever was there).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MissValue {
    pub value: i64,
    pub bytes: u8,
}

impl MissValue {
    /// Does the returned register mean "not found"?
    pub fn is(&self, ret: i64) -> bool {
        let mask = if self.bytes >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * u32::from(self.bytes))) - 1
        };
        (ret as u64 ^ self.value as u64) & mask == 0
    }
}

pub struct Correlator {
    /// By window: the lookup's return value that means "not found", when the return is probed.
    miss_ret: Vec<Option<MissValue>>,
    render_key: Option<KeyRenderer>,
    /// The last windows seen opening, by cache, newest last. Kept after they close: a lookup
    /// that overlapped one can arrive after its close, even after the next one opened (the
    /// kernel copies the reader's stack between reading the window and sending the lookup).
    last: HashMap<ObjKey, VecDeque<Opened>>,
    /// The last stack of each thread (with its process), with the time of the event it belongs
    /// to: the kernel sends a stack just before that event, so the thread's next event claims it.
    stacks: HashMap<u32, (u32, u64, Stack)>,
    /// Each reader's stack (with its process) in the last window it was flagged in, by the
    /// window's opening time: the kernel sends a reader's stack with its first flagged lookup of a
    /// window only, and CPython frames with a KeyError only when they differ from the last ones
    /// the thread sent in the window.
    reader_stacks: HashMap<u32, (u32, u64, Stack)>,
    /// Native windows whose writer's stack is still to come, by (writer, opening time): the
    /// kernel sends it with the first reader that lands in the window, not at its opening.
    writer_due: HashMap<(u32, u64), ObjKey>,
    caches: HashSet<ObjKey>,
    /// The last windows of each cache in which a lookup missed, by opening time: a window is
    /// counted once in `windows_with_misses`, however many lookups missed in it.
    missed: HashMap<ObjKey, VecDeque<u64>>,
    /// KeyError alerts awaiting their key's verdict, by (dict, key address, key hash).
    held: HashMap<(ObjKey, u64, i64), Vec<Alert>>,
    /// Python: the misses in a window by the form of the lookup, for each form watched.
    by_form: Option<BTreeMap<&'static str, u64>>,
    counts: Counts,
    /// The same counts, per process that had a window.
    per_process: BTreeMap<u32, Counts>,
    /// And per window of the run that had one.
    per_window: BTreeMap<u32, Counts>,
    /// Processes that ended with a window, oldest first: past [`PROCESSES_KEPT`], the oldest
    /// leave `per_process` (their counts stay in the totals).
    ended: VecDeque<u32>,
    processes_dropped: u64,
    /// Processes dropped from `per_process` since [`Correlator::take_dropped`] last ran, for
    /// what keeps more about them (their names) to forget them too.
    dropped: Vec<u32>,
}

/// Processes whose own counts are kept for the summary, at most (a run left on for days sees
/// many come and go).
pub const PROCESSES_KEPT: usize = 4096;

impl Correlator {
    /// `miss_ret`, by window: the lookup return value that means "not found", when the return
    /// is probed.
    pub fn new(miss_ret: Vec<Option<MissValue>>, render_key: Option<KeyRenderer>) -> Correlator {
        Correlator {
            miss_ret,
            render_key,
            last: HashMap::new(),
            stacks: HashMap::new(),
            reader_stacks: HashMap::new(),
            writer_due: HashMap::new(),
            caches: HashSet::new(),
            missed: HashMap::new(),
            held: HashMap::new(),
            by_form: None,
            counts: Counts::default(),
            per_process: BTreeMap::new(),
            per_window: BTreeMap::new(),
            ended: VecDeque::new(),
            processes_dropped: 0,
            dropped: Vec::new(),
        }
    }

    /// Counts the misses in a window by form (Python), for each of `forms` (the summary shows a
    /// form racewatch watched with none as 0, and one it did not watch not at all).
    pub fn counting_forms(mut self, forms: &[&'static str]) -> Correlator {
        self.by_form = Some(forms.iter().map(|f| (*f, 0)).collect());
        self
    }

    /// The misses in a window by form, where forms are counted.
    pub fn misses_by_form(&self) -> Option<&BTreeMap<&'static str, u64>> {
        self.by_form.as_ref()
    }

    /// Processes that ended with a window and whose own counts were dropped to bound memory.
    pub fn processes_dropped(&self) -> u64 {
        self.processes_dropped
    }

    /// Process `tgid` ended: what was kept for its objects and threads goes (its counts stay);
    /// its KeyErrors still awaiting a verdict are settled as at the end of a run.
    pub fn on_exit(&mut self, tgid: u32) {
        self.last.retain(|obj, _| obj.tgid != tgid);
        self.caches.retain(|obj| obj.tgid != tgid);
        self.stacks.retain(|_, (pid, _, _)| *pid != tgid);
        self.reader_stacks.retain(|_, (pid, _, _)| *pid != tgid);
        self.writer_due.retain(|_, obj| obj.tgid != tgid);
        let keys: Vec<_> = self
            .held
            .keys()
            .filter(|(obj, _, _)| obj.tgid == tgid)
            .copied()
            .collect();
        for k in keys {
            if let Some(held) = self.held.remove(&k) {
                self.unrefilled(k.0, held.len());
            }
        }
        self.missed.retain(|obj, _| obj.tgid != tgid);
        if self.per_process.contains_key(&tgid) {
            self.ended.push_back(tgid);
        }
        while self.ended.len() > PROCESSES_KEPT
            && let Some(old) = self.ended.pop_front()
        {
            self.per_process.remove(&old);
            self.processes_dropped += 1;
            self.dropped.push(old);
        }
    }

    /// The processes whose own counts were dropped since the last call.
    pub fn take_dropped(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.dropped)
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// The counts of each process that had a window, by pid.
    pub fn per_process(&self) -> &BTreeMap<u32, Counts> {
        &self.per_process
    }

    /// The counts of each window of the run that had one, by window.
    pub fn per_window(&self) -> &BTreeMap<u32, Counts> {
        &self.per_window
    }

    /// Applies `f` to the run's counts and to those of `obj`'s process and window.
    fn count(&mut self, obj: ObjKey, f: impl Fn(&mut Counts)) {
        f(&mut self.counts);
        f(self.per_process.entry(obj.tgid).or_default());
        f(self.per_window.entry(obj.window).or_default());
    }

    /// A window seen on `obj`, counted once per cache.
    fn count_window(&mut self, obj: ObjKey) {
        let new_cache = u64::from(self.caches.insert(obj));
        self.count(obj, |c| {
            c.windows += 1;
            c.caches += new_cache;
        });
    }

    /// The stack of thread `tid` of process `tgid` for its event stamped `ns`, which follows,
    /// or for the window it opened at `ns`, which came before.
    pub fn on_stack(&mut self, tgid: u32, tid: u32, ns: u64, stack: Stack) {
        if let Some(obj) = self.writer_due.remove(&(tid, ns)) {
            if let Some(o) = self
                .last
                .get_mut(&obj)
                .and_then(|opened| opened.iter_mut().rev().find(|o| o.open_ns == ns))
            {
                o.writer_stack = Some(stack);
            }
            return;
        }
        self.stacks.insert(tid, (tgid, ns, stack));
    }

    fn take_stack(&mut self, tid: u32, ns: u64) -> Option<Stack> {
        match self.stacks.remove(&tid) {
            Some((_, at, stack)) if at == ns => Some(stack),
            _ => None,
        }
    }

    /// Feeds one event; returns the alerts it raises.
    pub fn on_event(&mut self, event: &Event) -> Vec<Alert> {
        match event {
            Event::WindowOpen(w) => self.on_open(w),
            Event::WindowClose(w) => self.on_close(w),
            Event::Lookup(l) => return self.on_lookup(l).into_iter().collect(),
            Event::KeyError(k) => self.on_keyerror(k),
            Event::KeyVerdict(v) => return self.on_verdict(v),
            // For the hazard report only.
            Event::Near(_) => {}
            // For the process table.
            Event::Fork(_) | Event::Exit(_) => {}
            // Resolved by the collector and fed through `on_stack`.
            Event::NativeStack(_) | Event::PyFrames(_) => {}
        }
        Vec::new()
    }

    /// At the end of a run: KeyErrors still awaiting a verdict were in windows no refill closed
    /// while racewatch watched. Whether one would have brought their keys back is unknown: they
    /// are counted apart, never as misses.
    pub fn finish(&mut self) {
        for ((obj, _, _), held) in std::mem::take(&mut self.held) {
            self.unrefilled(obj, held.len());
        }
    }

    fn unrefilled(&mut self, obj: ObjKey, n: usize) {
        self.count(obj, |c| c.unrefilled_keyerrors += n as u64);
    }

    /// A lookup that missed in a window (a KeyError judged or never judged).
    fn count_miss(&mut self, a: &Alert) {
        self.count(a.obj(), |c| {
            c.lookups_in_window += 1;
            c.misses_in_window += 1;
        });
        if let (Some(forms), Some(form)) = (&mut self.by_form, a.form) {
            *forms.entry(form).or_default() += 1;
        }
        self.count_window_missed(a.obj(), a.window_open_ns);
    }

    /// A lookup missed in `obj`'s window opened at `open_ns`: the window's first counts it.
    fn count_window_missed(&mut self, obj: ObjKey, open_ns: u64) {
        let missed = self.missed.entry(obj).or_default();
        if missed.contains(&open_ns) {
            return;
        }
        if missed.len() == OPENED_KEPT {
            missed.pop_front();
        }
        missed.push_back(open_ns);
        self.count(obj, |c| c.windows_with_misses += 1);
    }

    fn on_open(&mut self, w: &WindowEvent) {
        self.count_window(w.obj());
        let writer_stack = self.take_stack(w.writer_tid, w.open_ns);
        if writer_stack.is_none() {
            self.writer_due.insert((w.writer_tid, w.open_ns), w.obj());
        }
        let opened = self.last.entry(w.obj()).or_default();
        if opened.len() == OPENED_KEPT {
            opened.pop_front();
        }
        opened.push_back(Opened {
            open_ns: w.open_ns,
            writer_name: comm_str(&w.writer_comm),
            writer_stack,
        });
    }

    fn on_close(&mut self, w: &WindowEvent) {
        self.writer_due.remove(&(w.writer_tid, w.open_ns));
        let seen_open = self.opened(&w.obj(), w.open_ns).is_some();
        if !seen_open {
            // Opened before racewatch attached: it still was a window.
            self.count_window(w.obj());
        }
        let width = w.close_ns.saturating_sub(w.open_ns);
        self.count(w.obj(), |c| c.max_window_ns = c.max_window_ns.max(width));
    }

    fn opened(&self, cache: &ObjKey, open_ns: u64) -> Option<&Opened> {
        self.last
            .get(cache)?
            .iter()
            .rev()
            .find(|o| o.open_ns == open_ns)
    }

    /// The reader's stack for its event stamped `ns` in the window opened at `window_open_ns`:
    /// the event's own, or else the last one its thread sent earlier in the same window.
    fn reader_stack(&mut self, tgid: u32, tid: u32, ns: u64, window_open_ns: u64) -> Option<Stack> {
        match self.take_stack(tid, ns) {
            Some(stack) => {
                self.reader_stacks
                    .insert(tid, (tgid, window_open_ns, stack.clone()));
                Some(stack)
            }
            None => self
                .reader_stacks
                .get(&tid)
                .filter(|(_, open_ns, _)| *open_ns == window_open_ns)
                .map(|(_, _, stack)| stack.clone()),
        }
    }

    /// The writer's name and stack, if racewatch saw the window open.
    fn writer(&self, cache: &ObjKey, window_open_ns: u64) -> (Option<String>, Option<Stack>) {
        match self.opened(cache, window_open_ns) {
            Some(o) => (Some(o.writer_name.clone()), o.writer_stack.clone()),
            None => (None, None),
        }
    }

    fn on_lookup(&mut self, l: &LookupEvent) -> Option<Alert> {
        if l.reader_tid == l.writer_tid {
            self.stacks.remove(&l.reader_tid);
            return None;
        }
        let miss_ret = self.miss_ret.get(l.window as usize).copied().flatten();
        let miss = match (l.has_ret != 0, miss_ret) {
            (true, Some(m)) => Some(m.is(l.ret)),
            _ => None,
        };
        self.count(l.obj(), |c| {
            c.lookups_in_window += 1;
            c.misses_in_window += u64::from(miss == Some(true));
        });
        if miss == Some(true) {
            self.count_window_missed(l.obj(), l.window_open_ns);
        }
        let (writer_name, writer_stack) = self.writer(&l.obj(), l.window_open_ns);
        Some(Alert {
            window: l.window,
            cache: l.cache,
            pid: l.tgid,
            reader_tid: l.reader_tid,
            reader_name: comm_str(&l.reader_comm),
            writer_tid: l.writer_tid,
            writer_name,
            window_open_ns: l.window_open_ns,
            lookup_ns: l.lookup_ns,
            miss,
            key: None,
            form: None,
            reader_stack: self.reader_stack(l.tgid, l.reader_tid, l.lookup_ns, l.window_open_ns),
            writer_stack,
        })
    }

    /// Holds the alert until the kernel says whether the key is in the refilled dict.
    fn on_keyerror(&mut self, k: &KeyErrorEvent) {
        let reader_stack = self.reader_stack(k.tgid, k.reader_tid, k.raised_ns, k.window_open_ns);
        if k.reader_tid == k.writer_tid {
            return;
        }
        let (writer_name, writer_stack) = self.writer(&k.obj(), k.window_open_ns);
        let alert = Alert {
            window: k.window,
            cache: k.dict,
            pid: k.tgid,
            reader_tid: k.reader_tid,
            reader_name: comm_str(&k.reader_comm),
            writer_tid: k.writer_tid,
            writer_name,
            window_open_ns: k.window_open_ns,
            lookup_ns: k.raised_ns,
            miss: Some(true),
            key: self.render_key.as_ref().and_then(|r| r(k)),
            form: FORM_NAMES.get(k.form as usize).copied(),
            reader_stack,
            writer_stack,
        };
        self.held
            .entry((k.obj(), k.key, k.hash))
            .or_default()
            .push(alert);
    }

    fn on_verdict(&mut self, v: &KeyVerdict) -> Vec<Alert> {
        let alerts = self
            .held
            .remove(&(v.obj(), v.key, v.hash))
            .unwrap_or_default();
        if v.present == KEY_ABSENT {
            let n = alerts.len() as u64;
            if n > 0 {
                self.count(v.obj(), |c| c.absent_keys_in_window += n);
            }
            return Vec::new();
        }
        for a in &alerts {
            self.count_miss(a);
        }
        alerts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use detector_common::{
        COMM_LEN, EventKind, FORM_SUBSCRIPT, KEY_OBJ_LEN, KEY_PRESENT, KEY_UNKNOWN, TYPE_NAME_LEN,
        UNKNOWN_HASH,
    };

    /// A 64-bit miss value.
    fn miss(value: i64) -> Option<MissValue> {
        Some(MissValue { value, bytes: 8 })
    }

    use crate::engine::stack::Frame;

    /// A str key object with refcount 1 and cached hash `hash`.
    fn str_key(hash: i64) -> ([u8; TYPE_NAME_LEN], [u8; KEY_OBJ_LEN]) {
        let mut t = [0; TYPE_NAME_LEN];
        t[..3].copy_from_slice(b"str");
        let mut o = [0; KEY_OBJ_LEN];
        o[..8].copy_from_slice(&1i64.to_ne_bytes());
        o[24..32].copy_from_slice(&hash.to_ne_bytes());
        (t, o)
    }

    const PID: u32 = 100;
    const DICT: u64 = 0xd1c7;

    fn keyerror(key: u64, hash: i64, raised_ns: u64) -> Event {
        let (key_type, key_obj) = str_key(hash);
        Event::KeyError(KeyErrorEvent {
            kind: EventKind::KeyError as u32,
            reader_tid: 2,
            tgid: PID,
            window: 0,
            dict: DICT,
            raised_ns,
            window_open_ns: 100,
            writer_tid: 1,
            form: FORM_SUBSCRIPT,
            key,
            hash,
            reader_comm: [0; COMM_LEN],
            key_type,
            key_obj,
        })
    }

    fn verdict(key: u64, hash: i64, present: u32) -> Event {
        Event::KeyVerdict(KeyVerdict {
            kind: EventKind::KeyVerdict as u32,
            present,
            tgid: PID,
            window: 0,
            dict: DICT,
            key,
            hash,
        })
    }

    fn feed(c: &mut Correlator, events: &[Event]) -> Vec<u64> {
        events
            .iter()
            .flat_map(|e| c.on_event(e))
            .map(|a| a.lookup_ns)
            .collect()
    }

    #[test]
    fn keyerrors_wait_for_their_verdict() {
        let mut c = Correlator::new(Vec::new(), None);
        assert!(feed(&mut c, &[keyerror(7, 70, 110), keyerror(7, 70, 120)]).is_empty());
        assert_eq!(c.counts().misses_in_window, 0);
        assert_eq!(feed(&mut c, &[verdict(7, 70, KEY_PRESENT)]), [110, 120]);
        assert_eq!(c.counts().misses_in_window, 2);
        assert_eq!(c.counts().lookups_in_window, 2);
        c.finish();
        assert_eq!(c.counts().unrefilled_keyerrors, 0);
    }

    #[test]
    fn absent_keys_are_counted_apart() {
        let mut c = Correlator::new(Vec::new(), None);
        let events = [
            keyerror(7, 70, 110),
            keyerror(8, 80, 120),
            verdict(8, 80, KEY_ABSENT),
        ];
        assert!(feed(&mut c, &events).is_empty());
        assert_eq!(c.counts().absent_keys_in_window, 1);
        assert_eq!(c.counts().misses_in_window, 0);
        assert_eq!(feed(&mut c, &[verdict(7, 70, KEY_UNKNOWN)]), [110]);
        assert_eq!(c.counts().misses_in_window, 1);
        assert_eq!(c.counts().lookups_in_window, 1);
    }

    #[test]
    fn keys_that_shared_an_address_get_their_own_verdicts() {
        let mut c = Correlator::new(Vec::new(), None);
        let events = [
            keyerror(7, 70, 110),
            keyerror(7, 71, 120),
            verdict(7, 70, KEY_ABSENT),
        ];
        assert!(feed(&mut c, &events).is_empty());
        assert_eq!(feed(&mut c, &[verdict(7, 71, KEY_PRESENT)]), [120]);
        assert_eq!(c.counts().absent_keys_in_window, 1);
        assert_eq!(c.counts().misses_in_window, 1);
    }

    #[test]
    fn unhashable_keys_match_their_unknown_verdict() {
        let mut c = Correlator::new(Vec::new(), None);
        let Event::KeyError(mut k) = keyerror(7, 70, 110) else {
            unreachable!()
        };
        k.key_type = [0; TYPE_NAME_LEN];
        k.hash = UNKNOWN_HASH;
        let events = [Event::KeyError(k), verdict(7, UNKNOWN_HASH, KEY_UNKNOWN)];
        assert_eq!(feed(&mut c, &events), [110]);
        assert_eq!(c.counts().misses_in_window, 1);
    }

    #[test]
    fn verdict_without_keyerror_is_ignored() {
        let mut c = Correlator::new(Vec::new(), None);
        assert!(feed(&mut c, &[verdict(9, 90, KEY_PRESENT)]).is_empty());
        assert_eq!(c.counts(), &Counts::default());
    }

    /// No refill closed their window while racewatch watched: whether one would have brought
    /// their keys back is unknown, so they are counted apart, not as misses.
    #[test]
    fn keyerrors_still_unjudged_at_the_end_are_not_misses() {
        let mut c = Correlator::new(Vec::new(), None);
        feed(&mut c, &[keyerror(8, 80, 130), keyerror(7, 70, 110)]);
        c.finish();
        assert_eq!(c.counts().misses_in_window, 0);
        assert_eq!(c.counts().unrefilled_keyerrors, 2);
        c.finish();
        assert_eq!(c.counts().unrefilled_keyerrors, 2, "counted once");
    }

    fn window(kind: EventKind, open_ns: u64) -> Event {
        let w = WindowEvent {
            kind: kind as u32,
            writer_tid: 1,
            tgid: PID,
            window: 0,
            cache: DICT,
            open_ns,
            close_ns: 0,
            gil_switches: detector_common::NO_GIL,
            reach_ns: 0,
            reach_pairs: 0,
            _pad: 0,
            writer_comm: [0; COMM_LEN],
        };
        match kind {
            EventKind::WindowOpen => Event::WindowOpen(w),
            _ => Event::WindowClose(w),
        }
    }

    fn lookup(lookup_ns: u64, window_open_ns: u64) -> Event {
        Event::Lookup(LookupEvent {
            kind: EventKind::Lookup as u32,
            reader_tid: 2,
            tgid: PID,
            window: 0,
            cache: DICT,
            lookup_ns,
            window_open_ns,
            writer_tid: 1,
            has_ret: 0,
            ret: 0,
            reader_comm: [0; COMM_LEN],
        })
    }

    fn frames(name: &str) -> Stack {
        vec![Frame {
            function: name.into(),
            file: None,
            line: None,
        }]
        .into()
    }

    #[test]
    fn stacks_go_to_the_event_that_follows_them() {
        let mut c = Correlator::new(Vec::new(), None);
        c.on_stack(PID, 1, 100, frames("clear"));
        c.on_event(&window(EventKind::WindowOpen, 100));
        c.on_stack(PID, 2, 110, frames("lookup"));
        let a = c.on_event(&lookup(110, 100));
        assert_eq!(a[0].reader_stack.as_deref(), Some(&frames("lookup")[..]));
        assert_eq!(a[0].writer_stack.as_deref(), Some(&frames("clear")[..]));
        // The thread's further lookups in the window come without a stack: they get the first's.
        let a = c.on_event(&lookup(115, 100));
        assert_eq!(a[0].reader_stack.as_deref(), Some(&frames("lookup")[..]));
        // In the next window, a stack stamped for another event (its own event lost) is not
        // misattributed, nor is the last window's.
        c.on_stack(PID, 1, 200, frames("clear"));
        c.on_event(&window(EventKind::WindowOpen, 200));
        c.on_stack(PID, 2, 219, frames("other"));
        let a = c.on_event(&lookup(220, 200));
        assert_eq!(a[0].reader_stack, None);
        assert_eq!(a[0].writer_stack.as_deref(), Some(&frames("clear")[..]));
    }

    #[test]
    fn a_native_writers_stack_sent_by_its_first_reader_goes_to_its_window() {
        let mut c = Correlator::new(Vec::new(), None);
        c.on_event(&window(EventKind::WindowOpen, 100));
        // The first reader in the window sends the writer's stack (stamped with the window's
        // opening), then its own.
        c.on_stack(PID, 1, 100, frames("clear"));
        c.on_stack(PID, 2, 110, frames("lookup"));
        let a = c.on_event(&lookup(110, 100));
        assert_eq!(a[0].writer_stack.as_deref(), Some(&frames("clear")[..]));
        assert_eq!(a[0].reader_stack.as_deref(), Some(&frames("lookup")[..]));
        // A window no reader met: no stack came, and none is due after its close.
        c.on_event(&window(EventKind::WindowOpen, 200));
        c.on_event(&window(EventKind::WindowClose, 200));
        assert!(c.writer_due.is_empty());
        // The writer's own next stack is its own again.
        c.on_stack(PID, 1, 200, frames("late"));
        assert_eq!(c.take_stack(1, 200).as_deref(), Some(&frames("late")[..]));
    }

    #[test]
    fn keyerrors_without_frames_get_the_last_ones_of_their_window() {
        let mut c = Correlator::new(Vec::new(), None);
        c.on_event(&window(EventKind::WindowOpen, 100));
        c.on_stack(PID, 2, 110, frames("get"));
        c.on_event(&keyerror(7, 70, 110));
        c.on_event(&keyerror(7, 70, 120));
        // The frames changed: the kernel sends them again.
        c.on_stack(PID, 2, 130, frames("other"));
        c.on_event(&keyerror(7, 70, 130));
        c.on_event(&keyerror(7, 70, 140));
        let alerts = c.on_event(&verdict(7, 70, KEY_PRESENT));
        let stacks: Vec<_> = alerts
            .iter()
            .map(|a| a.reader_stack.as_ref().map(|s| s[0].function.clone()))
            .collect();
        let name = |n: &str| Some(n.to_string());
        assert_eq!(
            stacks,
            [name("get"), name("get"), name("other"), name("other")]
        );
    }

    #[test]
    fn a_lookup_of_an_older_window_still_gets_its_writer() {
        let mut c = Correlator::new(Vec::new(), None);
        c.on_stack(PID, 1, 100, frames("clear-a"));
        c.on_event(&window(EventKind::WindowOpen, 100));
        c.on_event(&window(EventKind::WindowClose, 100));
        c.on_stack(PID, 1, 200, frames("clear-b"));
        c.on_event(&window(EventKind::WindowOpen, 200));
        let a = c.on_event(&lookup(150, 100));
        assert_eq!(a[0].writer_name.as_deref(), Some(""));
        assert_eq!(a[0].writer_stack.as_deref(), Some(&frames("clear-a")[..]));
        assert_eq!(c.counts().windows, 2);
    }

    #[test]
    fn writer_own_keyerror_is_not_held() {
        let mut c = Correlator::new(Vec::new(), None);
        let Event::KeyError(mut k) = keyerror(7, 70, 110) else {
            unreachable!()
        };
        k.reader_tid = k.writer_tid;
        feed(&mut c, &[Event::KeyError(k), verdict(7, 70, KEY_PRESENT)]);
        c.finish();
        assert_eq!(c.counts().misses_in_window, 0);
        assert_eq!(c.counts().unrefilled_keyerrors, 0);
    }

    /// `e` moved to process `tgid`.
    fn in_process(mut e: Event, tgid: u32) -> Event {
        match &mut e {
            Event::WindowOpen(w) | Event::WindowClose(w) => w.tgid = tgid,
            Event::Lookup(l) => l.tgid = tgid,
            Event::KeyError(k) => k.tgid = tgid,
            Event::KeyVerdict(v) => v.tgid = tgid,
            _ => {}
        }
        e
    }

    #[test]
    fn forked_workers_sharing_an_address_are_counted_apart() {
        let mut c = Correlator::new(vec![miss(-1)], None);
        // Both workers' caches sit at DICT; only the second's window is open at its lookup.
        c.on_event(&in_process(window(EventKind::WindowOpen, 100), 7));
        c.on_event(&in_process(window(EventKind::WindowOpen, 100), 8));
        let Event::Lookup(mut missed) = in_process(lookup(110, 100), 8) else {
            unreachable!()
        };
        (missed.has_ret, missed.ret) = (1, -1);
        assert_eq!(c.on_event(&Event::Lookup(missed)).len(), 1);
        assert_eq!(c.per_process()[&7].lookups_in_window, 0);
        assert_eq!(c.per_process()[&8].lookups_in_window, 1);
        assert_eq!(c.per_process()[&8].misses_in_window, 1);
        assert_eq!(c.counts().caches, 2, "one cache in each process");
    }

    #[test]
    fn a_miss_is_compared_at_the_width_the_function_returns() {
        let bool_false = MissValue { value: 0, bytes: 1 };
        assert!(
            bool_false.is(0x7f3a_0000_1200),
            "al is 0, the rest left over"
        );
        assert!(!bool_false.is(0x7f3a_0000_1201));
        let int_minus_one = MissValue {
            value: -1,
            bytes: 4,
        };
        assert!(int_minus_one.is(0xffff_ffff));
        assert!(
            !MissValue {
                value: -1,
                bytes: 8
            }
            .is(0xffff_ffff)
        );
    }

    #[test]
    fn an_ended_process_leaves_its_counts_and_nothing_else() {
        let mut c = Correlator::new(Vec::new(), Some(Box::new(|_: &KeyErrorEvent| None)));
        let (key, hash) = (0x5000, 77);
        c.on_event(&in_process(window(EventKind::WindowOpen, 100), 9));
        c.on_event(&in_process(keyerror(key, hash, 120), 9));
        // The process dies inside its window: the KeyError awaits a verdict that never comes.
        c.on_exit(9);
        assert_eq!(c.per_process()[&9].misses_in_window, 0);
        assert_eq!(c.per_process()[&9].unrefilled_keyerrors, 1);
        assert!(c.last.is_empty() && c.held.is_empty() && c.caches.is_empty());
        // A later process with the same pid and address starts afresh: no writer name from the
        // dead one.
        let alerts = c.on_event(&in_process(lookup(300, 100), 9));
        assert_eq!(alerts[0].writer_name, None);
        assert_eq!(c.counts().misses_in_window, 0);
    }

    /// A dict emptied, then emptied again with no refill between (refilled by assignment, or
    /// freed and its address reused): the kernel judges its KeyErrors at the second clear
    /// against what was filled in since.
    #[test]
    fn keyerrors_judged_at_a_second_clear_count_like_those_judged_at_a_refill() {
        let mut c = Correlator::new(Vec::new(), None);
        c.on_event(&window(EventKind::WindowOpen, 100));
        feed(&mut c, &[keyerror(7, 70, 110), keyerror(8, 80, 120)]);
        // The second clear: key 7 was filled in since, key 8 was not.
        assert_eq!(
            feed(
                &mut c,
                &[verdict(7, 70, KEY_PRESENT), verdict(8, 80, KEY_ABSENT)]
            ),
            [110]
        );
        feed(&mut c, &[keyerror(9, 90, 130)]);
        c.finish();
        let counts = c.counts();
        assert_eq!(
            (
                counts.misses_in_window,
                counts.absent_keys_in_window,
                counts.unrefilled_keyerrors
            ),
            (1, 1, 1)
        );
    }

    /// `e` moved to window `window` of the run.
    fn in_window(mut e: Event, window: u32) -> Event {
        match &mut e {
            Event::WindowOpen(w) | Event::WindowClose(w) => w.window = window,
            Event::Lookup(l) => l.window = window,
            _ => {}
        }
        e
    }

    /// A lookup at `lookup_ns` in the window opened at `open_ns` that returned `ret`.
    fn returned(lookup_ns: u64, open_ns: u64, ret: i64) -> Event {
        let Event::Lookup(mut l) = lookup(lookup_ns, open_ns) else {
            unreachable!()
        };
        (l.has_ret, l.ret) = (1, ret);
        Event::Lookup(l)
    }

    #[test]
    fn each_window_has_its_counts_and_its_miss_value() {
        // Window 0 misses with -1, window 1 with 0.
        let mut c = Correlator::new(vec![miss(-1), miss(0)], None);
        for w in [0, 1] {
            c.on_event(&in_window(window(EventKind::WindowOpen, 100), w));
        }
        let alerts: Vec<Alert> = [(0, -1), (0, -1), (1, -1), (1, 7)]
            .into_iter()
            .flat_map(|(w, ret)| c.on_event(&in_window(returned(110, 100, ret), w)))
            .collect();
        let missed: Vec<(u32, Option<bool>)> = alerts.iter().map(|a| (a.window, a.miss)).collect();
        assert_eq!(
            missed,
            [
                (0, Some(true)),
                (0, Some(true)),
                (1, Some(false)),
                (1, Some(false))
            ]
        );
        let w = c.per_window();
        assert_eq!(
            (
                w[&0].windows,
                w[&0].lookups_in_window,
                w[&0].misses_in_window
            ),
            (1, 2, 2)
        );
        assert_eq!(
            (
                w[&1].windows,
                w[&1].lookups_in_window,
                w[&1].misses_in_window
            ),
            (1, 2, 0)
        );
        assert_eq!(
            c.counts().caches,
            2,
            "the same address in two windows: two objects"
        );
    }

    #[test]
    fn a_window_with_misses_is_counted_once() {
        let mut c = Correlator::new(vec![miss(-1)], None);
        c.on_event(&window(EventKind::WindowOpen, 100));
        c.on_event(&returned(110, 100, -1));
        c.on_event(&returned(120, 100, -1));
        c.on_event(&window(EventKind::WindowOpen, 200));
        c.on_event(&returned(210, 200, 5));
        // A late miss of the first window does not count it again.
        c.on_event(&returned(130, 100, -1));
        assert_eq!(c.counts().windows_with_misses, 1);
        c.on_event(&returned(220, 200, -1));
        assert_eq!(c.counts().windows_with_misses, 2);
        assert_eq!(c.per_window()[&0].windows_with_misses, 2);
        assert_eq!(c.counts().misses_in_window, 4);
        // KeyErrors judged at the close count their window too.
        let mut c = Correlator::new(Vec::new(), None);
        feed(&mut c, &[keyerror(7, 70, 110), keyerror(8, 80, 120)]);
        feed(
            &mut c,
            &[verdict(7, 70, KEY_PRESENT), verdict(8, 80, KEY_PRESENT)],
        );
        assert_eq!(c.counts().windows_with_misses, 1);
    }

    #[test]
    fn a_process_that_ends_without_a_window_gets_no_entry() {
        let mut c = Correlator::new(Vec::new(), None);
        c.on_exit(9);
        c.on_event(&verdict(7, 70, KEY_ABSENT));
        assert!(c.per_process().is_empty(), "{:?}", c.per_process());
    }
}
