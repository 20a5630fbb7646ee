//! What a run reports at its end: the counts, what was lost, what each probe cost. Plain data,
//! serialized as the NDJSON summary and rendered by each sink.
use std::collections::BTreeMap;

use serde::Serialize;

use crate::engine::{
    budget::SamplingJson,
    correlate::Counts,
    cost::{ProbeHits, SelfCost},
    dedup::Pair,
    stack::Frame,
};

/// Everything the last line of a run reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Summary {
    #[serde(flatten)]
    pub counts: Counts,
    /// Events the kernel could not deliver (ring buffer full), all kinds.
    pub lost_events: u64,
    /// Lookups the kernel found in a window, delivered or lost: `lookups_in_window` plus
    /// `lost_by_kind.lookup` (watch runs; Python's KeyErrors are counted apart).
    pub kernel_lookups_in_window: u64,
    pub lost_by_kind: LostByKind,
    /// Window or in-flight state the kernel could not store (map full).
    pub map_full: u64,
    /// KeyErrors whose key the kernel could not keep for judging (counted as window misses).
    pub pending_full: u64,
    /// KeyErrors whose key the kernel could not look up in the refilled dict (counted as window
    /// misses too).
    pub unjudged_keys: u64,
    /// KeyErrors raised while a window of their process was open whose dict the kernel could
    /// not find: each may be a miss the run did not see (listed in `unwatched` too).
    pub unplaced_keyerrors: u64,
    /// `--quiet-misses`: `d.get` and `in` in a window whose key the kernel could not hash or look
    /// up, so could not tell whether it missed (listed in `unwatched` too).
    pub unjudged_quiet_lookups: u64,
    /// Writers' stacks a reader landing in their window could not copy, the writer having left
    /// the window meanwhile: those alerts show no writer's stack.
    pub writer_stacks_unread: u64,
    /// Native stacks the kernel did not copy because the event ring was over half full (those
    /// alerts show no frames; their counts are whole).
    pub stacks_shed: u64,
    /// Ring-buffer records userspace could not decode (a racewatch bug if ever non-zero).
    pub decode_errors: u64,
    /// Times each probe fired in the target.
    pub probe_hits: ProbeHits,
    /// What `--provoke` did (all zero without it).
    pub provoke: ProvokeJson,
    /// racewatch's estimate of the time its probes added to the target.
    pub self_cost: Option<SelfCost>,
    /// The hazard report's lookup sampling under the budget (None when lookups are not
    /// sampled).
    pub sampling: Option<SamplingJson>,
    /// Each distinct (reader stack, writer stack) pair, with how often it raced.
    pub pairs: Vec<PairJson>,
    /// Pairs whose first alert the alert rate limit held back (each is in `pairs`).
    pub alerts_held_back: u64,
    /// Lookups in a window of pairs beyond the pairs racewatch keeps (counted in the totals,
    /// in no pair).
    pub unkept_pair_lookups: u64,
    /// Each process that had a window, with its share of the counts above.
    pub processes: Vec<ProcessJson>,
    /// Each window of the run by its name (a config's, the lookup's as given to `--lookup`, or
    /// the interpreter file's), with its share of the counts above.
    pub windows_by_name: BTreeMap<String, WindowJson>,
    /// Processes forked by watched ones after the start, and so watched too.
    pub forks: u64,
    /// Processes that ended with a window and left `processes` to bound racewatch's memory
    /// (their counts stay in the totals).
    pub processes_dropped: u64,
    /// Python: the misses in a window by how the lookup missed ("subscript": `d[k]` raised
    /// KeyError; "get": `d.get(k)` returned its default; "contains": `k in d` was false), for
    /// each form watched (`--quiet-misses` adds get and contains).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub misses_by_form: Option<BTreeMap<String, u64>>,
    /// What the run could not watch. A run with any entry here is no all-clear: racewatch exits 4
    /// instead of 0 when it also found no race.
    pub unwatched: Vec<String>,
    pub duration_s: f64,
    /// How the run ended: "target exited", "interrupted", "duration elapsed".
    pub ended: String,
}

/// One watched process's part of a run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProcessJson {
    pub pid: u32,
    /// Its pid inside its own pid namespace (a container's view), where that differs from the
    /// host's.
    pub ns_pid: Option<u32>,
    /// The id of the container it ran in (64 hex digits), where its cgroup path named one.
    pub container: Option<String>,
    pub comm: String,
    /// The watched process it was forked from; None for the target itself.
    pub parent: Option<u32>,
    pub windows: u64,
    pub lookups_in_window: u64,
    pub misses_in_window: u64,
}

/// One window's part of a run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct WindowJson {
    pub windows: u64,
    pub windows_with_misses: u64,
    pub lookups_in_window: u64,
    pub misses_in_window: u64,
}

impl From<&Counts> for WindowJson {
    fn from(c: &Counts) -> Self {
        WindowJson {
            windows: c.windows,
            windows_with_misses: c.windows_with_misses,
            lookups_in_window: c.lookups_in_window,
            misses_in_window: c.misses_in_window,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct ProvokeJson {
    /// Windows held open longer.
    pub windows: u64,
    /// Time added to them, in total.
    pub added_ns: u64,
    /// Windows left alone because the budget was spent.
    pub over_budget: u64,
    /// How long each window is held (`--provoke`; 0: not asked for).
    pub hold_ns: u64,
    /// CPython: the interpreter's switch interval (µs), the longest read, and how long a writer
    /// waits for a reader to ask for the GIL given it (None: no CPython window was provoked).
    pub switch_interval_us: Option<u64>,
    pub request_wait_ns: Option<u64>,
    /// CPython: windows held in which no reader asked for the GIL.
    pub unanswered: u64,
    /// CPython: windows left alone because the switch interval is longer than a hold may last.
    pub beyond_reach: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PairJson {
    /// How its lookups looked up (`racewatch python --quiet-misses`'s forms), where told.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub form: Option<&'static str>,
    pub reader_name: String,
    pub writer_name: Option<String>,
    pub lookups: u64,
    pub misses: u64,
    /// The pair's first and latest lookup in a window (kernel clock, ns).
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    /// Whether its first alert was printed (else the alert rate limit held it back).
    pub printed: bool,
    /// Its alerts not printed, counted here instead.
    pub alerts_suppressed: u64,
    pub reader_stack: Option<Vec<Frame>>,
    pub writer_stack: Option<Vec<Frame>>,
}

impl From<&Pair> for PairJson {
    fn from(p: &Pair) -> Self {
        PairJson {
            form: p.form,
            reader_name: p.reader_name.clone(),
            writer_name: p.writer_name.clone(),
            lookups: p.lookups,
            misses: p.misses,
            first_seen_ns: p.first_ns,
            last_seen_ns: p.last_ns,
            printed: p.printed,
            alerts_suppressed: p.lookups - u64::from(p.printed),
            reader_stack: p.reader_stack.as_deref().map(<[Frame]>::to_vec),
            writer_stack: p.writer_stack.as_deref().map(<[Frame]>::to_vec),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct LostByKind {
    pub window_open: u64,
    pub window_close: u64,
    pub lookup: u64,
    pub keyerror: u64,
    pub key_verdict: u64,
    pub near: u64,
    pub native_stack: u64,
    pub py_frames: u64,
    /// Forks and exits of watched processes.
    pub process: u64,
}
