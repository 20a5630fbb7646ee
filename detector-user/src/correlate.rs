//! Turns kernel events into findings. Pure: no aya, no I/O, no clock, so every rule is unit- and
//! property-tested on hand-written event sequences.
use std::collections::{HashMap, HashSet};

use detector_common::{COMM_LEN, Event, KeyErrorEvent, LookupEvent, WindowEvent};

/// A lookup that fell inside another thread's empty-cache window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub cache: u64,
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
}

impl Alert {
    /// How long the cache had been empty when the lookup began.
    pub fn open_for_ns(&self) -> u64 {
        self.lookup_ns.saturating_sub(self.window_open_ns)
    }
}

/// What a run found, for the summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Windows seen opening (plus those seen only closing: opened before attach).
    pub windows: u64,
    pub lookups_in_window: u64,
    pub misses_in_window: u64,
    /// Caches that had at least one window.
    pub caches: u64,
    /// Widest window seen closing, in ns.
    pub max_window_ns: u64,
}

/// Renders a key object's bytes, for Python KeyErrors.
pub type KeyRenderer = fn(&KeyErrorEvent) -> Option<String>;

pub struct Correlator {
    miss_ret: Option<i64>,
    render_key: Option<KeyRenderer>,
    /// The last window seen opening, by cache: when it opened and the writer's name. Kept after
    /// it closes: a lookup that overlapped it can arrive after its close.
    last: HashMap<u64, (u64, String)>,
    caches: HashSet<u64>,
    counts: Counts,
}

pub fn comm_str(comm: &[u8; COMM_LEN]) -> String {
    let end = comm.iter().position(|&b| b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&comm[..end]).into_owned()
}

impl Correlator {
    /// `miss_ret`: the lookup return value that means "not found", when the return is probed.
    pub fn new(miss_ret: Option<i64>, render_key: Option<KeyRenderer>) -> Correlator {
        Correlator {
            miss_ret,
            render_key,
            last: HashMap::new(),
            caches: HashSet::new(),
            counts: Counts::default(),
        }
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Feeds one event; returns the alert it raises, if any.
    pub fn on_event(&mut self, event: &Event) -> Option<Alert> {
        match event {
            Event::WindowOpen(w) => {
                self.on_open(w);
                None
            }
            Event::WindowClose(w) => {
                self.on_close(w);
                None
            }
            Event::Lookup(l) => self.on_lookup(l),
            Event::KeyError(k) => self.on_keyerror(k),
        }
    }

    fn on_open(&mut self, w: &WindowEvent) {
        self.counts.windows += 1;
        self.caches.insert(w.cache);
        self.counts.caches = self.caches.len() as u64;
        self.last
            .insert(w.cache, (w.open_ns, comm_str(&w.writer_comm)));
    }

    fn on_close(&mut self, w: &WindowEvent) {
        let seen_open = self
            .last
            .get(&w.cache)
            .is_some_and(|(open_ns, _)| *open_ns == w.open_ns);
        if !seen_open {
            // Opened before racewatch attached: it still was a window.
            self.counts.windows += 1;
            self.caches.insert(w.cache);
            self.counts.caches = self.caches.len() as u64;
        }
        self.counts.max_window_ns = self
            .counts
            .max_window_ns
            .max(w.close_ns.saturating_sub(w.open_ns));
    }

    fn writer_name(&self, cache: u64, window_open_ns: u64) -> Option<String> {
        self.last
            .get(&cache)
            .filter(|(open_ns, _)| *open_ns == window_open_ns)
            .map(|(_, name)| name.clone())
    }

    fn on_lookup(&mut self, l: &LookupEvent) -> Option<Alert> {
        if l.reader_tid == l.writer_tid {
            return None;
        }
        let miss = match (l.has_ret != 0, self.miss_ret) {
            (true, Some(m)) => Some(l.ret == m),
            _ => None,
        };
        self.counts.lookups_in_window += 1;
        if miss == Some(true) {
            self.counts.misses_in_window += 1;
        }
        Some(Alert {
            cache: l.cache,
            reader_tid: l.reader_tid,
            reader_name: comm_str(&l.reader_comm),
            writer_tid: l.writer_tid,
            writer_name: self.writer_name(l.cache, l.window_open_ns),
            window_open_ns: l.window_open_ns,
            lookup_ns: l.lookup_ns,
            miss,
            key: None,
        })
    }

    fn on_keyerror(&mut self, k: &KeyErrorEvent) -> Option<Alert> {
        if k.reader_tid == k.writer_tid {
            return None;
        }
        self.counts.lookups_in_window += 1;
        self.counts.misses_in_window += 1;
        Some(Alert {
            cache: k.dict,
            reader_tid: k.reader_tid,
            reader_name: comm_str(&k.reader_comm),
            writer_tid: k.writer_tid,
            writer_name: self.writer_name(k.dict, k.window_open_ns),
            window_open_ns: k.window_open_ns,
            lookup_ns: k.raised_ns,
            miss: Some(true),
            key: self.render_key.and_then(|r| r(k)),
        })
    }
}
