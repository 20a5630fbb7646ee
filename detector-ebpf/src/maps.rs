//! Every map the programs keep state in or share with userspace, each under the name userspace
//! finds it by.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use detector_common::{
    EVENTS_BYTES_DEFAULT, GilHold, HASHED_STR_MAX, Inflight, MAX_CACHES, MAX_INFLIGHT, MAX_PENDING,
    MAX_PROBES, MAX_READERS, MAX_WATCHED, MAX_WINDOWS, ObjKey, PendingKey, ProbeConfig,
    ProvokeState, PyLayout, ReaderKey, ReaderState, STACK_SLOTS, Stat, Window, WriterAt,
};

/// What each attachment does, indexed by its attach cookie (filled before any attach).
#[map(name = "PROBES")]
pub(crate) static PROBES: Array<ProbeConfig> = Array::with_max_entries(MAX_PROBES, 0);
/// Where each window's CPython interpreter keeps a thread's frames, by window (filled before
/// the window's probes are attached; `racewatch python` only).
#[map(name = "PY_LAYOUTS")]
pub(crate) static PY_LAYOUTS: Array<PyLayout> = Array::with_max_entries(MAX_WINDOWS, 0);
/// The watched processes (tgid to 1): the launched command or the `-p` process, and every process
/// forked from one.
#[map(name = "WATCHED")]
pub(crate) static WATCHED: HashMap<u32, u8> = HashMap::with_max_entries(MAX_WATCHED, 0);

/// What crosses to userspace: window boundaries, flagged lookups, KeyErrors and their verdicts,
/// and the stacks that go with them.
#[map(name = "EVENTS")]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES_DEFAULT, 0);
/// Each cache's window, keyed by the cache in its process.
#[map(name = "WINDOWS")]
pub(crate) static WINDOWS: LruHashMap<ObjKey, Window> = LruHashMap::with_max_entries(MAX_CACHES, 0);
/// Where each cache's writer was when it opened its window (`racewatch watch`): the first reader
/// that lands in the window copies the writer's stack from there, so windows no reader meets cost
/// the writer no copy.
#[map(name = "WRITERS")]
pub(crate) static WRITERS: LruHashMap<ObjKey, WriterAt> =
    LruHashMap::with_max_entries(MAX_CACHES, 0);
/// Cache being refilled, per thread, between the refill's entry and return.
#[map(name = "REFILLS")]
pub(crate) static REFILLS: HashMap<u32, ObjKey> = HashMap::with_max_entries(MAX_INFLIGHT, 0);
/// Lookup in flight, per thread, when the lookup's return is probed.
#[map(name = "LOOKUPS")]
pub(crate) static LOOKUPS: LruHashMap<u32, Inflight> =
    LruHashMap::with_max_entries(MAX_INFLIGHT, 0);
/// Room for a Python frame's value stack, searched for the failed dict (too big for the BPF
/// stack).
#[map(name = "VALUE_STACK")]
pub(crate) static VALUE_STACK: PerCpuArray<[u64; STACK_SLOTS]> =
    PerCpuArray::with_max_entries(1, 0);
/// The keys that raised KeyError in a dict's open window, judged when it closes (a set: the
/// value is unused).
#[map(name = "PENDING")]
pub(crate) static PENDING: HashMap<PendingKey, u8> = HashMap::with_max_entries(MAX_PENDING, 0);
/// Dicts with keys in `PENDING`, so a window's close walks that map only when it has to.
#[map(name = "PENDING_DICTS")]
pub(crate) static PENDING_DICTS: HashMap<ObjKey, u8> = HashMap::with_max_entries(MAX_CACHES, 0);
/// Lookups per (cache, reader thread), and the reader's last lookup, for the hazard report.
#[map(name = "READERS")]
pub(crate) static READERS: LruHashMap<ReaderKey, ReaderState> =
    LruHashMap::with_max_entries(MAX_READERS, 0);
/// `--provoke`'s accounting on each CPU: time held, windows held, windows refused.
#[map(name = "PROVOKE")]
pub(crate) static PROVOKE: PerCpuArray<ProvokeState> = PerCpuArray::with_max_entries(1, 0);
/// CPython writers armed to hand the GIL over in their window, by thread.
#[map(name = "GIL_HOLDS")]
pub(crate) static GIL_HOLDS: HashMap<u32, GilHold> = HashMap::with_max_entries(MAX_INFLIGHT, 0);
/// Counters on each CPU, indexed by [`Stat`].
#[map(name = "STATS")]
pub(crate) static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);
/// A reader's stack goes with its first flagged lookup of each window only (userspace gives that
/// stack to the thread's further lookups of the window): a thread reading in a loop through a
/// wide window would otherwise send thousands of identical 8 KiB copies, and pay for each.
/// Keyed by thread, the value is the window's opening time.
#[map(name = "READER_STACKS")]
pub(crate) static READER_STACKS: LruHashMap<u32, u64> =
    LruHashMap::with_max_entries(MAX_INFLIGHT, 0);
/// A reader's CPython frames go with its first KeyError of each window, and again only when they
/// change (userspace gives the last frames a thread sent in a window to its further KeyErrors
/// there): a reader missing in a loop would otherwise send the same frames with every KeyError.
/// Keyed by thread; the value is the window's opening time and a hash of the frames sent.
#[map(name = "READER_FRAMES")]
pub(crate) static READER_FRAMES: LruHashMap<u32, [u64; 2]> =
    LruHashMap::with_max_entries(MAX_INFLIGHT, 0);

/// `--quiet-misses`: the miss a thread's `d[k]` on a dict subclass was just counted for at its
/// entry, `[dict, key]`, so that the KeyError that follows (a subclass without `__missing__`)
/// is not counted again.
#[map(name = "SUBSCRIPT_MISSES")]
pub(crate) static SUBSCRIPT_MISSES: LruHashMap<u32, [u64; 2]> =
    LruHashMap::with_max_entries(MAX_INFLIGHT, 0);

/// A str's characters, read to be hashed (`--quiet-misses`): too large for the BPF stack beside
/// the rest of a lookup's program. Twice what is hashed, so that a read's masked length is
/// within it.
#[map(name = "STR_DATA")]
pub(crate) static STR_DATA: PerCpuArray<[u8; 2 * HASHED_STR_MAX]> =
    PerCpuArray::with_max_entries(1, 0);
