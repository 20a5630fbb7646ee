//! Properties over adversarial interleavings of a Python program's threads on several dicts:
//! racewatch counts as window misses exactly the KeyErrors and quiet misses (`.get`, `in`,
//! `.pop`) that landed in another thread's window and whose key that window's refill brought
//! back, and sorts every other miss as a reference model does.
//!
//! A simulated program (threads stepping through `clear()`, `update()` and lookups one GIL hold
//! at a time) drives the kernel's rules as the eBPF programs apply them at each probe: a window
//! opens at a clear and closes at its writer's refill (`windows.rs`), a lookup that misses in
//! another thread's open window is reported with its key named by its hash and judged at the
//! close, or at a second clear, by that hash's presence in the dict (`python.rs`). Those programs
//! do not run on the host, so their glue is mirrored here (`Kernel`), while every decision is the
//! shared one (`Window`, `key_hash`, `str_hash`). The events go to the `Correlator`, whose counts
//! must equal the reference's. The reference knows which dict object each lookup really met and
//! what each refill put back, and nothing of windows' states, hashes or verdicts.
//!
//! Not generated, because the kernel's rules do not follow the reference there: a second writer
//! clearing a cache inside another's window (only the first writer's refill closes it); a freed
//! cache's address emptied again, which is taken for a second clear of the freed dict;
//! `d.setdefault(k)` (see `FORMS`).
use std::collections::{BTreeMap, BTreeSet, HashMap};

use detector_common::{
    COMM_LEN, Event, EventKind, FORM_CONTAINS, FORM_GET, FORM_NAMES, FORM_POP, FORM_SUBSCRIPT,
    HASHED_STR_MAX, KEY_ABSENT, KEY_OBJ_LEN, KEY_PRESENT, KEY_UNKNOWN, KeyErrorEvent, KeyVerdict,
    TYPE_NAME_LEN, UNKNOWN_HASH, Window, WindowEvent, key_hash, str_hash,
};
use detector_user::engine::correlate::{Correlator, Counts};
use proptest::{prelude::*, strategy::Union};

const PID: u32 = 4242;
/// Threads 1 to 4: thread 1 refreshes cache 0, and cache 1 too or leaves it to thread 2; all of
/// them look up every dict.
const THREADS: usize = 4;
/// Dicts 0 and 1 are caches, emptied and refilled by their writer; dict 2 is never emptied and
/// holds some of the caches' keys.
const CACHES: usize = 2;
const OTHER: usize = 2;
const DICTS: usize = 3;
const ADDRESS: [u64; DICTS] = [0x7f3a_0010_0000, 0x7f3a_0010_4000, 0x7f3a_0010_8000];
const OTHER_HOLDS: [usize; 3] = [0, 2, 4];
/// The interpreter's `_Py_HashSecret`.
const SECRET: (u64, u64) = (0xdc50_4fd3_68cd_90af, 0xb920_bb9f_fe99_e9c1);

#[derive(Clone, Copy, Debug)]
enum Key {
    Str(&'static str),
    Int(i64),
}

/// Strs of every length class `str_hash` treats apart, and ints of one and two digits (-1's hash
/// is -2).
const KEYS: [Key; 7] = [
    Key::Str("k0"),
    Key::Str("user:1042"),
    Key::Str("a key longer than sixteen bytes"),
    Key::Int(7),
    Key::Int(-1),
    Key::Int(3 << 40),
    Key::Int(-5 << 33),
];

/// The forms of lookup generated. `d.setdefault(k)` is left out: its miss inserts the key, which
/// the verdict then finds whether or not the refill brought it back.
const FORMS: [u32; 4] = [FORM_SUBSCRIPT, FORM_GET, FORM_CONTAINS, FORM_POP];

/// CPython's hash of a key, which its dict entry carries. A str's is `str_hash`, which
/// detector-common's verdict_props checks against SipHash-1-3 itself.
fn cpython_hash(key: Key) -> i64 {
    match key {
        Key::Str(s) => {
            let mut data = [0; HASHED_STR_MAX];
            data[..s.len()].copy_from_slice(s.as_bytes());
            str_hash(SECRET.0, SECRET.1, &data, s.len())
        }
        Key::Int(-1) => -2,
        Key::Int(v) => v,
    }
}

/// The key object's type name and first bytes as the kernel copies them: a str's length and
/// the hash CPython cached (-1: none yet); an int's size (3.11's signed digit count, or 3.12's
/// `lv_tag`) and its 30-bit digits.
fn key_object(
    key: Key,
    cached: bool,
    long_tagged: bool,
) -> ([u8; TYPE_NAME_LEN], [u8; KEY_OBJ_LEN]) {
    let (mut t, mut o) = ([0; TYPE_NAME_LEN], [0; KEY_OBJ_LEN]);
    o[..8].copy_from_slice(&1i64.to_ne_bytes());
    match key {
        Key::Str(s) => {
            t[..3].copy_from_slice(b"str");
            let hash = if cached {
                cpython_hash(key)
            } else {
                UNKNOWN_HASH
            };
            o[16..24].copy_from_slice(&(s.len() as i64).to_ne_bytes());
            o[24..32].copy_from_slice(&hash.to_ne_bytes());
        }
        Key::Int(v) => {
            t[..3].copy_from_slice(b"int");
            let m = v.unsigned_abs();
            let digits: i64 = if m >= 1 << 30 { 2 } else { i64::from(m != 0) };
            let size = if long_tagged {
                digits << 3 | [2, 1, 0][(v.signum() + 1) as usize]
            } else {
                digits * v.signum()
            };
            o[16..24].copy_from_slice(&size.to_ne_bytes());
            o[24..28].copy_from_slice(&((m & 0x3fff_ffff) as u32).to_ne_bytes());
            o[28..32].copy_from_slice(&((m >> 30) as u32).to_ne_bytes());
        }
    }
    (t, o)
}

/// One lookup: `dict[key]`, `dict.get(key)`, `key in dict` or `dict.pop(key, None)`.
#[derive(Clone, Copy, Debug)]
struct Lookup {
    dict: usize,
    key: usize,
    form: u32,
    /// The key object's address: distinct keys share some (a freed key's address is reused).
    at: u64,
    /// Whether CPython has cached the str's hash yet (a quiet lookup's; `d[k]` hashed it).
    cached: bool,
}

/// What a thread does while it holds the GIL.
#[derive(Clone, Debug)]
enum Step {
    Clear(usize),
    /// `update()` from its entry to its return: the window closes there.
    Update(usize, BTreeSet<usize>),
    Lookup(Lookup),
    /// The dict is freed and a new one, holding these keys, is made at its address: the old
    /// dict's window is never refilled.
    Reuse(usize, BTreeSet<usize>),
}

#[derive(Clone, Debug)]
struct Program {
    /// Each thread's steps, in order.
    threads: Vec<Vec<Step>>,
    /// Which thread holds the GIL next; the run ends when this does, wherever threads are.
    schedule: Vec<usize>,
    /// Ints keep their size in `lv_tag` (3.12+).
    long_tagged: bool,
}

/// The kernel's state and the events it sends, as the eBPF programs keep and send them.
#[derive(Default)]
struct Kernel {
    long_tagged: bool,
    /// Sends the writers' own misses in their windows too, as a kernel without the writer
    /// check would: the Correlator must drop them itself.
    send_own: bool,
    windows: HashMap<u64, Window>,
    /// The dict each thread is refilling (`REFILLS`).
    refills: HashMap<u32, u64>,
    /// Missed keys awaiting their verdict (`PENDING`): dict, key address, hash.
    pending: BTreeSet<(u64, u64, i64)>,
    events: Vec<Event>,
}

impl Kernel {
    fn window_event(&mut self, kind: EventKind, dict: u64, w: &Window, tid: u32) {
        let e = WindowEvent {
            kind: kind as u32,
            writer_tid: tid,
            tgid: PID,
            window: 0,
            cache: dict,
            open_ns: w.open_ns,
            close_ns: w.close_ns,
            gil_switches: detector_common::NO_GIL,
            reach_ns: 0,
            reach_pairs: 0,
            _pad: 0,
            writer_comm: [0; COMM_LEN],
        };
        self.events.push(match kind {
            EventKind::WindowOpen => Event::WindowOpen(e),
            _ => Event::WindowClose(e),
        });
    }

    /// `on_clear`: a second clear of a dict still open judges its pending keys by what it holds
    /// now, before it is emptied, unless it holds nothing (cleared twice): they wait for the
    /// close.
    fn clear(&mut self, tid: u32, dict: u64, now: u64, holds: &BTreeSet<i64>) {
        let prev = self.windows.get(&dict).copied();
        if prev.is_some_and(|w| w.open != 0) && !holds.is_empty() {
            self.judge(dict, holds);
        }
        if let Some(w) = Window::on_clear(prev.as_ref(), tid, now) {
            self.window_event(EventKind::WindowOpen, dict, &w, tid);
            self.windows.insert(dict, w);
        }
    }

    /// `on_refill`, at the refill's entry.
    fn refill_entry(&mut self, tid: u32, dict: u64) {
        if self
            .windows
            .get(&dict)
            .is_some_and(|w| w.closes_on_refill(tid))
        {
            self.refills.insert(tid, dict);
        }
    }

    /// `on_refill_return`: the window closes and its keys are judged by what the dict holds.
    fn refill_return(&mut self, tid: u32, now: u64, holds: &BTreeSet<i64>) {
        let Some(dict) = self.refills.remove(&tid) else {
            return;
        };
        if let Some(w) = self.windows.get(&dict).filter(|w| w.closes_on_refill(tid)) {
            let closed = w.closed(now);
            self.windows.insert(dict, closed);
            self.window_event(EventKind::WindowClose, dict, &closed, tid);
            self.judge(dict, holds);
        }
    }

    /// Another thread's window open on `dict` now (or the thread's own, with `send_own`).
    fn open_for(&self, tid: u32, dict: u64) -> Option<Window> {
        self.windows
            .get(&dict)
            .filter(|w| w.overlaps(tid, None) || (self.send_own && w.open != 0))
            .copied()
    }

    /// `on_keyerror`: `d[k]` raised KeyError, after CPython hashed the key.
    fn keyerror(&mut self, tid: u32, l: &Lookup, now: u64) {
        if let Some(w) = self.open_for(tid, ADDRESS[l.dict]) {
            let (t, o) = key_object(KEYS[l.key], true, self.long_tagged);
            let hash = key_hash(&t, &o, self.long_tagged);
            self.missed(tid, &w, l, hash, now);
        }
    }

    /// `quiet_lookup`: `.get`, `in` or `.pop` at its entry, in another thread's window: the key
    /// is hashed (its cached hash, else its bytes) and looked up by hash in the dict.
    fn quiet(&mut self, tid: u32, l: &Lookup, now: u64, holds: &BTreeSet<i64>) {
        let Some(w) = self.open_for(tid, ADDRESS[l.dict]) else {
            return;
        };
        let key = KEYS[l.key];
        let (t, o) = key_object(key, l.cached, self.long_tagged);
        let hash = match (key_hash(&t, &o, self.long_tagged), key) {
            (UNKNOWN_HASH, Key::Str(s)) => {
                // Past the str's bytes, whatever the per-CPU buffer held before.
                let mut data = [0xa5; HASHED_STR_MAX];
                data[..s.len()].copy_from_slice(s.as_bytes());
                str_hash(SECRET.0, SECRET.1, &data, s.len())
            }
            (hash, _) => hash,
        };
        if hash != UNKNOWN_HASH && !holds.contains(&hash) {
            self.missed(tid, &w, l, hash, now);
        }
    }

    /// `missed`: the miss is sent, then its key is kept to be judged (or judged unknown now).
    fn missed(&mut self, tid: u32, w: &Window, l: &Lookup, hash: i64, now: u64) {
        let (key_type, key_obj) = key_object(KEYS[l.key], l.cached, self.long_tagged);
        self.events.push(Event::KeyError(KeyErrorEvent {
            kind: EventKind::KeyError as u32,
            reader_tid: tid,
            tgid: PID,
            window: 0,
            dict: ADDRESS[l.dict],
            raised_ns: now,
            window_open_ns: w.open_ns,
            writer_tid: w.writer_tid,
            form: l.form,
            key: l.at,
            hash,
            reader_comm: [0; COMM_LEN],
            key_type,
            key_obj,
        }));
        if hash == UNKNOWN_HASH {
            self.verdict(ADDRESS[l.dict], l.at, hash, KEY_UNKNOWN);
        } else {
            self.pending.insert((ADDRESS[l.dict], l.at, hash));
        }
    }

    /// `judge_pending`: a verdict for each key pending on `dict`, by its hash's presence.
    fn judge(&mut self, dict: u64, holds: &BTreeSet<i64>) {
        let keys: Vec<_> = self
            .pending
            .range((dict, 0, i64::MIN)..=(dict, u64::MAX, i64::MAX))
            .copied()
            .collect();
        for (dict, key, hash) in keys {
            self.pending.remove(&(dict, key, hash));
            let present = if holds.contains(&hash) {
                KEY_PRESENT
            } else {
                KEY_ABSENT
            };
            self.verdict(dict, key, hash, present);
        }
    }

    fn verdict(&mut self, dict: u64, key: u64, hash: i64, present: u32) {
        self.events.push(Event::KeyVerdict(KeyVerdict {
            kind: EventKind::KeyVerdict as u32,
            present,
            tgid: PID,
            window: 0,
            dict,
            key,
            hash,
        }));
    }
}

/// A window in the reference: a dict object emptied by its writer, until that writer's refill.
#[derive(Debug)]
struct Emptied {
    dict: usize,
    writer: u32,
    open_ns: u64,
    /// When the refill returned, and the keys the dict held then.
    refilled: Option<(u64, BTreeSet<usize>)>,
    /// The other threads' misses on the emptied dict: key and form.
    misses: Vec<(usize, u32)>,
    /// Misses on the new dict made at its address after it was freed, by threads other than
    /// its writer: no free is probed, so they wait with this window for a verdict.
    after_free: u64,
}

/// What each miss was, from the program alone.
#[derive(Default, Debug)]
struct Reference {
    windows: Vec<Emptied>,
    /// The window open on the dict at each address.
    open: [Option<usize>; DICTS],
    /// The window of the dict freed at each address, never refilled.
    freed: [Option<usize>; DICTS],
    /// Misses by a writer in its own window: not a reader's.
    own: u64,
    /// Misses in the dict never emptied while a cache's window was open.
    elsewhere: u64,
    /// Clears of a cache already emptied by the same writer, inside its window.
    again: u64,
}

impl Reference {
    fn clear(&mut self, dict: usize, writer: u32, now: u64) {
        // Cleared again by its writer before the refill: the same window goes on.
        if self.open[dict].is_some_and(|w| self.windows[w].writer == writer) {
            self.again += 1;
            return;
        }
        assert!(
            self.open[dict].is_none(),
            "one writer per cache, one refresh at a time"
        );
        self.open[dict] = Some(self.windows.len());
        self.windows.push(Emptied {
            dict,
            writer,
            open_ns: now,
            refilled: None,
            misses: Vec::new(),
            after_free: 0,
        });
    }

    fn refill(&mut self, dict: usize, writer: u32, now: u64, holds: &BTreeSet<usize>) {
        if let Some(w) = self.open[dict].filter(|&w| self.windows[w].writer == writer) {
            self.windows[w].refilled = Some((now, holds.clone()));
            self.open[dict] = None;
        }
    }

    fn reuse(&mut self, dict: usize) {
        self.freed[dict] = self.open[dict].take();
    }

    /// `reader`'s lookup of `key` in `dict` missed.
    fn miss(&mut self, dict: usize, reader: u32, key: usize, form: u32) {
        let other = |w: &Option<usize>| w.filter(|&w| self.windows[w].writer != reader);
        if let Some(w) = other(&self.open[dict]) {
            self.windows[w].misses.push((key, form));
        } else if let Some(w) = other(&self.freed[dict]) {
            self.windows[w].after_free += 1;
        } else if self.open[dict].is_some() {
            self.own += 1;
        } else if dict == OTHER && self.open.iter().any(Option::is_some) {
            self.elsewhere += 1;
        }
    }

    /// Whether a key was missed in windows open at once on both caches (by one writer, when
    /// `one_writer`).
    fn missed_in_two_at_once(&self, one_writer: bool) -> bool {
        let end = |w: &Emptied| w.refilled.as_ref().map_or(u64::MAX, |(close, _)| *close);
        let keys = |w: &Emptied| w.misses.iter().map(|(k, _)| *k).collect::<BTreeSet<_>>();
        self.windows.iter().filter(|a| a.dict == 0).any(|a| {
            self.windows.iter().filter(|b| b.dict == 1).any(|b| {
                a.open_ns < end(b)
                    && b.open_ns < end(a)
                    && (a.writer == b.writer || !one_writer)
                    && !keys(a).is_disjoint(&keys(b))
            })
        })
    }

    /// The counts racewatch must give: a miss in another thread's window counts when the refill
    /// brought its key back, is absent when it did not, and unrefilled when no refill came.
    fn counts(&self) -> (Counts, BTreeMap<&'static str, u64>) {
        let mut c = Counts::default();
        let mut forms: BTreeMap<&'static str, u64> =
            FORMS.iter().map(|&f| (FORM_NAMES[f as usize], 0)).collect();
        let caches: BTreeSet<usize> = self.windows.iter().map(|w| w.dict).collect();
        c.caches = caches.len() as u64;
        for w in &self.windows {
            c.windows += 1;
            let Some((close_ns, holds)) = &w.refilled else {
                c.unrefilled_keyerrors += w.misses.len() as u64 + w.after_free;
                continue;
            };
            c.max_window_ns = c.max_window_ns.max(close_ns - w.open_ns);
            let back: Vec<_> = w.misses.iter().filter(|(k, _)| holds.contains(k)).collect();
            c.absent_keys_in_window += (w.misses.len() - back.len()) as u64;
            c.misses_in_window += back.len() as u64;
            c.windows_with_misses += u64::from(!back.is_empty());
            for (_, form) in back {
                *forms.entry(FORM_NAMES[*form as usize]).or_default() += 1;
            }
        }
        c.lookups_in_window = c.misses_in_window;
        (c, forms)
    }
}

/// What racewatch made of a program, and what the reference did.
struct Outcome {
    counts: Counts,
    by_form: BTreeMap<&'static str, u64>,
    /// Misses the kernel sent for a thread in its own window.
    own_sent: usize,
    reference: Reference,
}

/// Runs the program through the kernel's rules into a `Correlator`, and through the reference.
fn run(p: &Program, send_own: bool) -> Outcome {
    let mut kernel = Kernel {
        long_tagged: p.long_tagged,
        send_own,
        ..Kernel::default()
    };
    let mut reference = Reference::default();
    let mut dicts: [BTreeSet<usize>; DICTS] = Default::default();
    dicts[OTHER].extend(OTHER_HOLDS);
    let mut freed = [false; DICTS];
    let mut next = vec![0; p.threads.len()];
    let hashes = |keys: &BTreeSet<usize>| keys.iter().map(|&k| cpython_hash(KEYS[k])).collect();
    for (i, &t) in p.schedule.iter().enumerate() {
        let (now, tid) = (i as u64 + 1, t as u32 + 1);
        let Some(step) = p.threads[t].get(next[t]) else {
            continue;
        };
        next[t] += 1;
        match step {
            // The program stops refreshing a cache it freed: the new dict is only read.
            Step::Clear(d) | Step::Update(d, _) | Step::Reuse(d, _) if freed[*d] => {}
            Step::Clear(d) => {
                kernel.clear(tid, ADDRESS[*d], now, &hashes(&dicts[*d]));
                dicts[*d].clear();
                reference.clear(*d, tid, now);
            }
            Step::Update(d, refill) => {
                kernel.refill_entry(tid, ADDRESS[*d]);
                dicts[*d].extend(refill);
                kernel.refill_return(tid, now, &hashes(&dicts[*d]));
                reference.refill(*d, tid, now, &dicts[*d]);
            }
            Step::Reuse(d, fresh) => {
                dicts[*d] = fresh.clone();
                freed[*d] = true;
                reference.reuse(*d);
            }
            Step::Lookup(l) => {
                let found = dicts[l.dict].contains(&l.key);
                if !found {
                    reference.miss(l.dict, tid, l.key, l.form);
                }
                match l.form {
                    FORM_SUBSCRIPT if !found => kernel.keyerror(tid, l, now),
                    FORM_SUBSCRIPT => {}
                    _ => kernel.quiet(tid, l, now, &hashes(&dicts[l.dict])),
                }
                if l.form == FORM_POP {
                    dicts[l.dict].remove(&l.key);
                }
            }
        }
    }
    let forms: Vec<&'static str> = FORMS.iter().map(|&f| FORM_NAMES[f as usize]).collect();
    let mut c = Correlator::new(Vec::new(), None).counting_forms(&forms);
    for e in &kernel.events {
        c.on_event(e);
    }
    c.finish();
    let own_sent = kernel
        .events
        .iter()
        .filter(|e| matches!(e, Event::KeyError(k) if k.reader_tid == k.writer_tid))
        .count();
    Outcome {
        counts: c.counts().clone(),
        by_form: c.misses_by_form().cloned().unwrap_or_default(),
        own_sent,
        reference,
    }
}

/// How often each kind of step is generated: each property stresses its case.
#[derive(Clone, Copy)]
struct Mix {
    /// Whether thread 1 refreshes both caches (else thread 2 refreshes cache 1).
    one_writer: Option<bool>,
    /// Refreshes of both caches at once, among a writer's refreshes.
    both: u32,
    /// How likely a writer is to look a key up between its clears and its refills.
    peek: f64,
    /// Caches freed inside their window and their address reused.
    reuse: u32,
    /// Lookups of the dict never emptied.
    other: u32,
    /// How likely a writer is to clear its caches once more before refilling them.
    again: f64,
}

const PLAIN: Mix = Mix {
    one_writer: None,
    both: 1,
    peek: 0.25,
    reuse: 0,
    other: 1,
    again: 0.0,
};

/// A choice among `options` by weight, those of weight 0 left out.
fn weighted<T: std::fmt::Debug + 'static>(
    options: Vec<(u32, BoxedStrategy<T>)>,
) -> Union<BoxedStrategy<T>> {
    Union::new_weighted(options.into_iter().filter(|(w, _)| *w > 0).collect())
}

fn keys() -> impl Strategy<Value = BTreeSet<usize>> {
    prop::collection::btree_set(0..KEYS.len(), 0..=KEYS.len())
}

fn lookup(mix: Mix) -> impl Strategy<Value = Lookup> {
    let dict = weighted(vec![
        (4, (0..CACHES).boxed()),
        (mix.other, Just(OTHER).boxed()),
    ]);
    (
        dict,
        0..KEYS.len(),
        prop::sample::select(FORMS.to_vec()),
        0..3u64,
        any::<bool>(),
    )
        .prop_map(|(dict, key, form, at, cached)| Lookup {
            dict,
            key,
            form,
            at: 0x7f3a_2000_0000 + 0x40 * at,
            cached: cached || form == FORM_SUBSCRIPT,
        })
}

/// A writer's refresh of one or both of `owned`: clears, maybe a lookup of its own, then
/// refills in either order.
fn refresh(owned: Vec<usize>, mix: Mix) -> impl Strategy<Value = Vec<Step>> {
    let n = owned.len();
    let which = weighted(vec![
        (
            2,
            prop::sample::select(owned.clone())
                .prop_map(|d| vec![d])
                .boxed(),
        ),
        (
            mix.both * (n as u32 - 1),
            Just(owned).prop_shuffle().boxed(),
        ),
    ]);
    (
        which,
        [keys(), keys()],
        any::<bool>(),
        prop::option::weighted(mix.peek, lookup(mix)),
        prop::bool::weighted(mix.again),
    )
        .prop_map(|(which, refills, reversed, peek, again)| {
            let mut steps: Vec<Step> = which.iter().map(|&d| Step::Clear(d)).collect();
            steps.extend(peek.map(Step::Lookup));
            if again {
                steps.extend(which.iter().map(|&d| Step::Clear(d)));
            }
            let mut updates: Vec<Step> = which
                .iter()
                .map(|&d| Step::Update(d, refills[d].clone()))
                .collect();
            if reversed {
                updates.reverse();
            }
            steps.extend(updates);
            steps
        })
}

/// What a thread does: lookups, and refreshes and reuses of the caches it writes.
fn thread(owned: Vec<usize>, mix: Mix) -> BoxedStrategy<Vec<Step>> {
    let lookups = lookup(mix).prop_map(|l| vec![Step::Lookup(l)]);
    if owned.is_empty() {
        return prop::collection::vec(lookups, 1..12)
            .prop_map(|ops| ops.concat())
            .boxed();
    }
    let reuse = (prop::sample::select(owned.clone()), keys())
        .prop_map(|(d, fresh)| vec![Step::Clear(d), Step::Reuse(d, fresh)]);
    let op = weighted(vec![
        (3, lookups.boxed()),
        (3, refresh(owned, mix).boxed()),
        (mix.reuse, reuse.boxed()),
    ]);
    prop::collection::vec(op, 1..8)
        .prop_map(|ops| ops.concat())
        .boxed()
}

fn program(mix: Mix) -> impl Strategy<Value = Program> {
    let one_writer = match mix.one_writer {
        Some(one) => Just(one).boxed(),
        None => any::<bool>().boxed(),
    };
    one_writer.prop_flat_map(move |one_writer| {
        let owned = |tid: usize| -> Vec<usize> {
            (0..CACHES)
                .filter(|&d| tid == if d == 1 && !one_writer { 2 } else { 1 })
                .collect()
        };
        let threads: Vec<_> = (1..=THREADS).map(|tid| thread(owned(tid), mix)).collect();
        (
            threads,
            prop::collection::vec(0..THREADS, 1..160),
            any::<bool>(),
        )
            .prop_map(|(threads, schedule, long_tagged)| Program {
                threads,
                schedule,
                long_tagged,
            })
    })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        max_global_rejects: 4096,
        ..ProptestConfig::default()
    }
}

/// Runs `p` and checks racewatch's counts, by form too, against the reference's.
fn check(p: &Program) -> Result<Reference, TestCaseError> {
    let got = run(p, false);
    let (want, want_forms) = got.reference.counts();
    prop_assert_eq!(&got.counts, &want, "{:#?}", got.reference);
    prop_assert_eq!(got.by_form, want_forms);
    Ok(got.reference)
}

proptest! {
    #![proptest_config(config())]

    /// Windows open at once on both caches: a key missed in both is judged in each by that
    /// cache's own refill, which may bring it back in one and not in the other.
    #[test]
    fn a_key_missed_in_two_dicts_at_once_is_judged_by_each_dict_s_refill(
        p in program(Mix { both: 3, other: 0, ..PLAIN }),
    ) {
        let reference = check(&p)?;
        prop_assume!(reference.missed_in_two_at_once(false));
    }

    /// The dict never emptied holds some of the caches' keys: a miss there, even while a cache
    /// is in its window and even of a key that cache's refill brings back, is no window miss.
    #[test]
    fn misses_in_a_dict_never_emptied_are_not_window_misses(
        p in program(Mix { other: 4, ..PLAIN }),
    ) {
        let reference = check(&p)?;
        prop_assume!(reference.elsewhere > 0);
    }

    /// A cache emptied, then freed inside its window, and a new dict made at its address: no
    /// free is probed, so the new dict's misses wait with the old window, but no refill ever
    /// judges them, and none is a window miss.
    #[test]
    fn a_fresh_dict_at_a_freed_address_adds_no_window_misses(
        p in program(Mix { reuse: 3, ..PLAIN }),
    ) {
        let reference = check(&p)?;
        prop_assume!(reference.windows.iter().any(|w| w.after_free > 0));
    }

    /// One writer empties both caches before refilling either: each window closes at its own
    /// dict's refill, whichever comes first, and its misses are judged by that refill.
    #[test]
    fn one_writer_s_two_windows_are_judged_each_by_its_own_refill(
        p in program(Mix { one_writer: Some(true), both: 6, ..PLAIN }),
    ) {
        let reference = check(&p)?;
        prop_assume!(reference.missed_in_two_at_once(true));
    }

    /// A writer that looks a key up between its clear and its refill misses in its own window:
    /// not a reader's miss, whatever the refill brings back. Its lookups in the other writer's
    /// window are a reader's.
    #[test]
    fn a_writer_s_own_misses_in_its_window_are_not_window_misses(
        p in program(Mix { peek: 0.9, ..PLAIN }),
    ) {
        let reference = check(&p)?;
        prop_assume!(reference.own > 0);
        // Both sides check the writer: the kernel sends none of its misses...
        prop_assert_eq!(run(&p, false).own_sent, 0);
        // ...and the Correlator drops those a kernel would send.
        let all = run(&p, true);
        prop_assert!(all.own_sent > 0);
        prop_assert_eq!(all.counts, reference.counts().0);
    }

    /// A writer that empties a cache once more before refilling it (the dict still empty): the
    /// misses so far wait for the refill's verdict with the rest of the window's, not judged by
    /// the empty dict at the second clear.
    #[test]
    fn a_writer_that_clears_twice_keeps_one_window_and_its_misses(
        p in program(Mix { again: 0.8, ..PLAIN }),
    ) {
        let reference = check(&p)?;
        prop_assume!(reference.again > 0 && reference.counts().0.misses_in_window > 0);
    }

    /// A miss in a window counts only when the refill brings the key back: a key the refill
    /// leaves out was not the window's doing.
    #[test]
    fn a_key_the_refill_does_not_bring_back_is_not_a_window_miss(p in program(PLAIN)) {
        let reference = check(&p)?;
        prop_assume!(reference.counts().0.absent_keys_in_window > 0);
    }
}
