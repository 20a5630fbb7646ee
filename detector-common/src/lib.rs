//! What crosses the kernel boundary: event layouts, map names, limits and the window rules that
//! both the eBPF programs and the userspace collector apply.
#![no_std]

#[cfg(feature = "user")]
extern crate alloc;

pub mod event;
pub mod probe;
pub mod provoke;
pub mod pykey;
pub mod window;

pub use event::*;
pub use probe::{
    ARG_SLOTS, OBJECT_IN_MEMORY, OBJECT_IN_REGISTER, OBJECT_STATIC, ProbeConfig, REG_SLOTS,
};
pub use provoke::{
    GilHold, PROVOKE_BUDGET_PCT, PROVOKE_MAX_NS, ProvokeState, request_wait_ns, within_budget,
};
pub use pykey::{HASHED_STR_MAX, KEY_HEADER_LEN, UNKNOWN_HASH, key_hash, small_int, str_hash};
pub use window::{Window, WriterAt};

/// Ring buffer that carries events to userspace.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-cache window state.
pub const WINDOWS_MAP: &str = "WINDOWS";
/// What each attachment does ([`ProbeConfig`]), indexed by its attach cookie.
pub const PROBES_MAP: &str = "PROBES";
/// The processes watched (tgid to 1), unless the run watches the whole host.
pub const WATCHED_MAP: &str = "WATCHED";
/// Per-CPU counters, indexed by [`Stat`].
pub const STATS_MAP: &str = "STATS";

/// Per-(cache, thread) lookup counts, for the hazard report.
pub const READERS_MAP: &str = "READERS";
/// Provocation counters ([`ProvokeState`]), per CPU, one entry.
pub const PROVOKE_MAP: &str = "PROVOKE";
/// Where each window's CPython interpreter keeps a thread's frames ([`PyLayout`]), by window.
pub const PY_LAYOUTS_MAP: &str = "PY_LAYOUTS";

/// Default ring buffer size: at 128 bytes an event, 16k events between two polls.
pub const EVENTS_BYTES_DEFAULT: u32 = 1 << 21;
/// Ring buffer size when stacks are taken: 2,048 native stack records between two polls.
pub const EVENTS_BYTES_STACKS: u32 = 1 << 24;
/// Attachments one loaded object can configure.
pub const MAX_PROBES: u32 = 256;
/// Windows one run watches at once (`ProbeConfig::window`): a `racewatch python` run on the host
/// has one per distinct interpreter file, each with its CPython layout in `PY_LAYOUTS`.
pub const MAX_WINDOWS: u32 = 64;
/// Processes watched at once.
pub const MAX_WATCHED: u32 = 65_536;
/// Caches tracked at once; least recently used ones are evicted first.
pub const MAX_CACHES: u32 = 16_384;
/// Threads inside a probed function at once (refill or lookup in flight).
pub const MAX_INFLIGHT: u32 = 16_384;
/// (cache, reader thread) pairs counted at once; least recently used ones are evicted first.
pub const MAX_READERS: u32 = 16_384;
/// KeyError keys awaiting their window's close at once, over all dicts (one window can see
/// thousands).
pub const MAX_PENDING: u32 = 16_384;

/// Globals set at load time (`EbpfLoader::set_global`).
pub mod globals {
    /// 1: every process that maps a probed file is watched; 0: only those in `WATCHED`.
    pub const WATCH_ALL: &str = "WATCH_ALL";
    /// How long to hold a writer inside each window, in ns (0: never).
    pub const PROVOKE_NS: &str = "PROVOKE_NS";
    /// When the provocation budget starts accruing (CLOCK_MONOTONIC ns).
    pub const PROVOKE_START_NS: &str = "PROVOKE_START_NS";
    /// CPUs that share the provocation budget.
    pub const PROVOKE_CPUS: &str = "PROVOKE_CPUS";
    /// CPython `--provoke`: the file address of the main interpreter's `gil_drop_request`, placed
    /// by each probe's own `vaddr` (0: hold native writers at the refill instead).
    pub const DROP_REQUEST_VADDR: &str = "DROP_REQUEST_VADDR";
    /// CPython 3.13+ `--provoke`: the offset of `eval_breaker` in the writer's thread state, where
    /// a waiter asks for the GIL (0: the static flag of DROP_REQUEST_VADDR).
    pub const DROP_REQUEST_IN_THREAD: &str = "DROP_REQUEST_IN_THREAD";
    /// The bits of the drop request's word that ask for the GIL.
    pub const DROP_REQUEST_MASK: &str = "DROP_REQUEST_MASK";
    /// CPython `--provoke`: the file address of the main interpreter's switch interval (µs).
    pub const SWITCH_INTERVAL_VADDR: &str = "SWITCH_INTERVAL_VADDR";
    /// Offset of `tgid` in the kernel's `struct task_struct` (from BTF), to tell a forked
    /// process from a new thread and to name it (0: forks are not followed).
    pub const TASK_TGID_OFFSET: &str = "TASK_TGID_OFFSET";
    /// Which stacks the kernel copies with the events that reach userspace ([`super::StackMode`]).
    pub const STACK_MODE: &str = "STACK_MODE";
}

/// What the kernel copies with a window's opening and a flagged lookup.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackMode {
    None = 0,
    /// Registers and the top of the user stack ([`NativeStack`]).
    Native = 1,
    /// CPython frames ([`PyFrames`]).
    Python = 2,
}
