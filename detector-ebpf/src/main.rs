//! racewatch's probes. The kernel keeps each cache's window state and sends userspace only window
//! boundaries and the lookups that overlap an open window: ordinary lookups never cross.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, pt_regs},
    cty::c_void,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user, bpf_probe_read_user_buf, bpf_probe_read_user_str_bytes,
        generated::{bpf_for_each_map_elem, bpf_loop},
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use detector_common::{
    COMM_LEN, DictSite, EVENTS_BYTES_DEFAULT, EventKind, GilHold, Inflight, KEY_ABSENT,
    KEY_PRESENT, KEY_UNKNOWN, KeyErrorEvent, KeyVerdict, LookupEvent, MAX_CACHES, MAX_INFLIGHT,
    MAX_KEYERROR_SITES, MAX_PENDING, MAX_READERS, NativeStack, NearEvent, PY_FRAMES_MAX,
    PendingKey, ProvokeState, PyFrame, PyFrames, PyLayout, ReaderKey, ReaderState, STACK_AT_RETURN,
    STACK_BYTES, STACK_CHUNK, StackMode, Stat, UNKNOWN_HASH, Window, WindowEvent, key_hash,
    within_budget,
};

/// Only this process is traced; 0 traces any (set at load time).
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;
/// Which argument is the cache object (set at load time).
#[unsafe(no_mangle)]
static CACHE_ARG: u32 = 0;
/// `pt_regs` slot of the register that holds the cache on the lookup's miss path (set at load
/// time from the decoded function).
#[unsafe(no_mangle)]
static MISS_CACHE_SLOT: u32 = 0;
/// The lookup's miss value, reported as the return value of each miss-path hit.
#[unsafe(no_mangle)]
static MISS_VALUE: i64 = 0;
/// Ring fill above which a write wakes the collector; below it the collector polls, which spares
/// the target the wakeup's cost (~6 µs an event on this kind of machine).
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = (EVENTS_BYTES_DEFAULT / 2) as u64;
/// How long to hold a writer inside each window (0: never; set at load time).
#[unsafe(no_mangle)]
static PROVOKE_NS: u64 = 0;
/// When the provocation budget starts accruing (set at load time).
#[unsafe(no_mangle)]
static PROVOKE_START_NS: u64 = 0;
/// CPUs that share the provocation budget (set at load time).
#[unsafe(no_mangle)]
static PROVOKE_CPUS: u32 = 1;
/// CPython `--provoke`: where the interpreter's `gil_drop_request` is, relative to the clear
/// probe's address (0: native `--provoke`, which holds at the refill).
#[unsafe(no_mangle)]
static DROP_REQUEST_DELTA: i64 = 0;

/// Which stacks go with the events that reach userspace ([`StackMode`], set at load time).
#[unsafe(no_mangle)]
static STACK_MODE: u32 = StackMode::None as u32;
/// Where CPython keeps a thread's frames (set at load time for `racewatch python`).
#[unsafe(no_mangle)]
static PY_LAYOUT: PyLayout = PyLayout {
    tstate_from_clear: 0,
    tstate_from_keyerror: 0,
    cframe: 0,
    current_frame: 0,
    f_code: 0,
    previous: 0,
    prev_instr: 0,
};

#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES_DEFAULT, 0);
#[map(name = "WINDOWS")]
static WINDOWS: LruHashMap<u64, Window> = LruHashMap::with_max_entries(MAX_CACHES, 0);
/// Cache being refilled, per thread, between the refill's entry and return.
#[map(name = "REFILLS")]
static REFILLS: HashMap<u32, u64> = HashMap::with_max_entries(MAX_INFLIGHT, 0);
/// Lookup in flight, per thread, when the lookup's return is probed.
#[map(name = "LOOKUPS")]
static LOOKUPS: LruHashMap<u32, Inflight> = LruHashMap::with_max_entries(MAX_INFLIGHT, 0);
#[map(name = "KEYERROR_SITES")]
static KEYERROR_SITES: HashMap<u64, DictSite> = HashMap::with_max_entries(MAX_KEYERROR_SITES, 0);
/// The keys that raised KeyError in a dict's open window, judged when it closes (a set: the
/// value is unused).
#[map(name = "PENDING")]
static PENDING: HashMap<PendingKey, u8> = HashMap::with_max_entries(MAX_PENDING, 0);
/// Dicts with keys in `PENDING`, so a window's close walks that map only when it has to.
#[map(name = "PENDING_DICTS")]
static PENDING_DICTS: HashMap<u64, u8> = HashMap::with_max_entries(MAX_CACHES, 0);
/// Lookups per (cache, reader thread), and the reader's last lookup, for the hazard report.
#[map(name = "READERS")]
static READERS: LruHashMap<ReaderKey, ReaderState> = LruHashMap::with_max_entries(MAX_READERS, 0);
#[map(name = "PROVOKE")]
static PROVOKE: PerCpuArray<ProvokeState> = PerCpuArray::with_max_entries(1, 0);
/// CPython writers armed to hand the GIL over in their window, by thread.
#[map(name = "GIL_HOLDS")]
static GIL_HOLDS: HashMap<u32, GilHold> = HashMap::with_max_entries(MAX_INFLIGHT, 0);
#[map(name = "STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Stat::COUNT, 0);

fn global<T: Copy>(v: &'static T) -> T {
    // SAFETY: the loader rewrites these before load; volatile keeps the compiler from folding them.
    unsafe { core::ptr::read_volatile(v) }
}

fn bump(stat: Stat) {
    if let Some(n) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *n += 1 }
    }
}

/// The calling thread's id if it belongs to the traced process.
fn traced_tid() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let target = global(&TARGET_TGID);
    (target == 0 || (pid_tgid >> 32) as u32 == target).then_some(pid_tgid as u32)
}

/// Reads `pt_regs` slot `slot` (in u64s). The index is only known at load time, and the verifier
/// refuses a context access at a computed offset, hence the helper read.
fn reg_slot(regs: *const pt_regs, slot: usize) -> Option<u64> {
    // SAFETY: slot < size_of::<pt_regs>() / 8 at every call site; the helper checks the read.
    unsafe { bpf_probe_read_kernel((regs as *const u64).add(slot)) }.ok()
}

/// pt_regs slots of the six integer arguments (rdi, rsi, rdx, rcx, r8, r9).
const ARG_SLOTS: [usize; 6] = [14, 13, 12, 11, 9, 8];

fn cache_arg(ctx: &ProbeContext) -> Option<u64> {
    match global(&CACHE_ARG) {
        // The common case (`this`, or CPython's dict) as a plain context load: no helper call on
        // the hot path.
        0 => ctx.arg(0),
        n => reg_slot(ctx.regs, *ARG_SLOTS.get(n as usize)?),
    }
}

fn comm() -> [u8; COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; COMM_LEN])
}

fn wakeup_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= global(&WAKEUP_BYTES) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

fn send<T: 'static>(kind: EventKind, event: T) {
    if EVENTS.output::<T>(event, wakeup_flags()).is_err() {
        bump(Stat::lost(kind));
    }
}

fn window(cache: u64) -> Option<Window> {
    // SAFETY: the value is copied out at once.
    unsafe { WINDOWS.get(&cache).copied() }
}

fn store_window(cache: u64, w: &Window) {
    if WINDOWS.insert(&cache, w, 0).is_err() {
        bump(Stat::MapFull);
    }
}

fn window_event(kind: EventKind, cache: u64, w: &Window, tid: u32) {
    send(
        kind,
        WindowEvent {
            kind: kind as u32,
            writer_tid: tid,
            cache,
            open_ns: w.open_ns,
            close_ns: w.close_ns,
            writer_comm: comm(),
        },
    );
}

/// Copies the registers and the top of the user stack into the ring, for userspace to unwind
/// with `.eh_frame`. Straight into the reserved record: it is far larger than the BPF stack.
fn native_stack(regs: &pt_regs, tid: u32, ns: u64, flags: u32) {
    let Some(mut entry) = EVENTS.reserve::<NativeStack>(0) else {
        bump(Stat::LostNativeStack);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at reserved ring memory of the record's size; every header field is set,
    // and `len` says how much of `stack` was written.
    unsafe {
        (*e).kind = EventKind::NativeStack as u32;
        (*e).tid = tid;
        (*e).ns = ns;
        (*e).rip = regs.rip;
        (*e).rsp = regs.rsp;
        (*e).rbp = regs.rbp;
        (*e).flags = flags;
        let stack = (*e).stack.as_mut_ptr();
        let mut len = 0u32;
        // One read when the whole copy is mapped (the common case); else chunk by chunk: a read
        // that crosses the top of the stack fails whole, so stop at the first chunk that cannot
        // be read and keep those below it.
        let whole = core::slice::from_raw_parts_mut(stack, STACK_BYTES);
        let chunks = if bpf_probe_read_user_buf(regs.rsp as *const u8, whole).is_ok() {
            len = STACK_BYTES as u32;
            0
        } else {
            STACK_BYTES / STACK_CHUNK
        };
        for i in 0..chunks {
            let off = i * STACK_CHUNK;
            let dst = core::slice::from_raw_parts_mut(stack.add(off), STACK_CHUNK);
            if bpf_probe_read_user_buf(regs.rsp.wrapping_add(off as u64) as *const u8, dst).is_err()
            {
                break;
            }
            len += STACK_CHUNK as u32;
        }
        (*e).len = len;
    }
    entry.submit(wakeup_flags());
}

/// Copies the calling thread's CPython frames (code object and current instruction, innermost
/// first). The thread runs dict code, so it holds the GIL and is the runtime's current thread
/// state, found `tstate_from` bytes from the probe's address.
fn py_frames(regs: &pt_regs, tid: u32, ns: u64, tstate_from: i64) {
    let layout = global(&PY_LAYOUT);
    let Some(mut entry) = EVENTS.reserve::<PyFrames>(0) else {
        bump(Stat::LostPyFrames);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at reserved ring memory of the record's size; the header is set and
    // `depth` says how many frames were written.
    unsafe {
        (*e).kind = EventKind::PyFrames as u32;
        (*e).tid = tid;
        (*e).ns = ns;
        (*e).truncated = 0;
        let mut depth = 0u32;
        let mut frame = read_user::<u64>(regs.rip.wrapping_add(tstate_from as u64))
            .and_then(|tstate| read_user::<u64>(tstate.wrapping_add(layout.cframe)))
            .and_then(|cframe| read_user::<u64>(cframe.wrapping_add(layout.current_frame)))
            .unwrap_or(0);
        for i in 0..PY_FRAMES_MAX {
            if frame == 0 {
                break;
            }
            let (Some(code), Some(prev_instr)) = (
                read_user::<u64>(frame.wrapping_add(layout.f_code)),
                read_user::<u64>(frame.wrapping_add(layout.prev_instr)),
            ) else {
                break;
            };
            (*e).frames[i] = PyFrame { code, prev_instr };
            depth += 1;
            frame = read_user::<u64>(frame.wrapping_add(layout.previous)).unwrap_or(0);
        }
        (*e).depth = depth;
        (*e).truncated = (frame != 0 && depth as usize == PY_FRAMES_MAX) as u32;
    }
    entry.submit(wakeup_flags());
}

/// Sends the stack the load-time mode asks for, just before the event (`tid`, `ns`) it belongs to.
fn stack(regs: &pt_regs, tid: u32, ns: u64, flags: u32, tstate_from: impl Fn(&PyLayout) -> i64) {
    match global(&STACK_MODE) {
        m if m == StackMode::Native as u32 => native_stack(regs, tid, ns, flags),
        m if m == StackMode::Python as u32 => {
            py_frames(regs, tid, ns, tstate_from(&global(&PY_LAYOUT)))
        }
        _ => {}
    }
}

/// The cache's clear function, `void clear(Cache *c)` (the cache is argument CACHE_ARG):
/// opens a window.
#[uprobe]
pub fn on_clear(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsClear);
    let (Some(tid), Some(cache)) = (traced_tid(), cache_arg(&ctx)) else {
        return 0;
    };
    if let Some(w) = Window::on_clear(window(cache).as_ref(), tid, unsafe { bpf_ktime_get_ns() }) {
        // Stack and event first: a lookup that sees the stored window then reserves its own
        // event later in the ring, so userspace always reads a window's opening (and the
        // writer's stack just before it) before its lookups.
        // SAFETY: the context's registers are valid for the whole program.
        stack(unsafe { &*ctx.regs }, tid, w.open_ns, 0, |l| {
            l.tstate_from_clear
        });
        window_event(EventKind::WindowOpen, cache, &w, tid);
        store_window(cache, &w);
        if global(&DROP_REQUEST_DELTA) != 0 {
            arm_gil_handover(&ctx, cache, tid, w.open_ns);
        }
    }
    0
}

/// CPython `--provoke`, at `dict_clear`'s entry: arms the handover (see on_clear_return and
/// on_take_gil) if the budget allows, with the deadline of the whole hold.
fn arm_gil_handover(ctx: &ProbeContext, cache: u64, tid: u32, now: u64) {
    let hold = global(&PROVOKE_NS);
    let Some(state) = PROVOKE.get_ptr_mut(0) else {
        return;
    };
    let (start_ns, cpus) = (global(&PROVOKE_START_NS), global(&PROVOKE_CPUS));
    // SAFETY: this CPU's slot of the per-CPU array.
    if !within_budget(start_ns, now, unsafe { (*state).held_ns }, hold, cpus) {
        unsafe { (*state).refused += 1 };
        return;
    }
    // SAFETY: the context's registers are valid for the whole program.
    let rip = unsafe { (*ctx.regs).rip };
    let armed = GilHold {
        cache,
        deadline_ns: now + hold,
        drop_request: rip.wrapping_add(global(&DROP_REQUEST_DELTA) as u64),
    };
    if GIL_HOLDS.insert(&tid, &armed, 0).is_err() {
        bump(Stat::MapFull);
    }
}

/// `dict_clear`'s return, attached with `python --provoke`: the window is open and the writer
/// holds the GIL. It is kept here until a thread waiting for the GIL asks for it (sets the
/// interpreter's `gil_drop_request`, as CPython does after the switch interval) or the
/// deadline passes. Asked, the writer drops the GIL at the eval-breaker check that follows the
/// call, inside the window; racewatch never writes to the target's memory.
#[uretprobe]
pub fn on_clear_return(_ctx: RetProbeContext) -> u32 {
    let Some(tid) = traced_tid() else { return 0 };
    // SAFETY: copied out at once.
    let Some(armed) = (unsafe { GIL_HOLDS.get(&tid).copied() }) else {
        return 0;
    };
    let handed_over = hold_until(
        unsafe { bpf_ktime_get_ns() },
        armed.deadline_ns,
        armed.drop_request,
    );
    count_provoked();
    if !handed_over {
        // Nobody asked for the GIL in time: the window was held that long, and goes on as it
        // would.
        let _ = GIL_HOLDS.remove(&tid);
    }
    0
}

/// CPython's `static void take_gil(PyThreadState *tstate)`, attached with `python --provoke`: a
/// writer that handed the GIL over in its window is kept here, without the GIL, until the
/// deadline, so the readers run while its dict is empty.
#[uprobe]
pub fn on_take_gil(_ctx: ProbeContext) -> u32 {
    let Some(tid) = traced_tid() else { return 0 };
    // SAFETY: copied out at once.
    let Some(armed) = (unsafe { GIL_HOLDS.get(&tid).copied() }) else {
        return 0;
    };
    let _ = GIL_HOLDS.remove(&tid);
    if window(armed.cache).is_some_and(|w| w.closes_on_refill(tid)) {
        hold_until(unsafe { bpf_ktime_get_ns() }, armed.deadline_ns, 0);
    }
    0
}

/// The cache's refill function's entry, `void update(Cache *c, ...)`: remembers which cache this
/// thread is refilling, when the refill is the one that closes its window.
#[uprobe]
pub fn on_refill(ctx: ProbeContext) -> u32 {
    refill_entry(&ctx, false);
    0
}

/// `on_refill` for native `--provoke`: also holds the writer inside the window. A program of its
/// own because `bpf_loop` needs kernel 5.17+, which runs without `--provoke` need not.
#[uprobe]
pub fn on_refill_provoke(ctx: ProbeContext) -> u32 {
    refill_entry(&ctx, true);
    0
}

fn refill_entry(ctx: &ProbeContext, hold: bool) {
    bump(Stat::HitsRefillEntry);
    let (Some(tid), Some(cache)) = (traced_tid(), cache_arg(ctx)) else {
        return;
    };
    if window(cache).is_some_and(|w| w.closes_on_refill(tid)) {
        if REFILLS.insert(&tid, &cache, 0).is_err() {
            bump(Stat::MapFull);
        }
        if hold {
            hold_writer();
        }
    }
}

/// What a hold waits for: the deadline, or a non-zero 4-byte flag in the target at `flag`.
struct Spin {
    deadline: u64,
    /// 0: the deadline only.
    flag: u64,
    /// Set when the flag ended the hold.
    flagged: u64,
}

/// `bpf_loop` callback: 1 (stop) once the deadline has passed or the flag is set.
extern "C" fn spin(_index: u64, s: *mut Spin) -> i64 {
    // SAFETY: `s` is hold_until's stack variable, live for the whole loop.
    let s = unsafe { &mut *s };
    if s.flag != 0 && read_user::<i32>(s.flag).is_some_and(|v| v != 0) {
        s.flagged = 1;
        return 1;
    }
    (unsafe { bpf_ktime_get_ns() } >= s.deadline) as i64
}

/// `--provoke`: keeps the calling writer inside its window for up to PROVOKE_NS, within the
/// budget, so readers on other CPUs run while the cache is empty. A busy-wait, since a BPF
/// program cannot sleep; `bpf_loop` bounds it (2^23 clock reads, longer than PROVOKE_MAX_NS).
fn hold_writer() {
    let hold = global(&PROVOKE_NS);
    if hold == 0 {
        return;
    }
    let Some(state) = PROVOKE.get_ptr_mut(0) else {
        return;
    };
    let start = unsafe { bpf_ktime_get_ns() };
    let (start_ns, cpus) = (global(&PROVOKE_START_NS), global(&PROVOKE_CPUS));
    // SAFETY: this CPU's slot of the per-CPU array.
    if !within_budget(start_ns, start, unsafe { (*state).held_ns }, hold, cpus) {
        unsafe { (*state).refused += 1 };
        return;
    }
    hold_until(start, start + hold, 0);
    count_provoked();
}

/// Busy-waits until `deadline`, or until the target's 4-byte flag at `flag` (if not 0) is set,
/// and accounts the time held since `start`; true if the flag ended it. The program runs with
/// migration disabled, so the hold is accounted on the CPU that ran it.
fn hold_until(start: u64, deadline: u64, flag: u64) -> bool {
    let Some(state) = PROVOKE.get_ptr_mut(0) else {
        return false;
    };
    if start >= deadline {
        return false;
    }
    let mut s = Spin {
        deadline,
        flag,
        flagged: 0,
    };
    // SAFETY: `s` lives on this stack for the whole loop; the state is this CPU's slot.
    unsafe {
        bpf_loop(
            1 << 23,
            spin as *mut c_void,
            &mut s as *mut Spin as *mut c_void,
            0,
        );
        (*state).held_ns += bpf_ktime_get_ns() - start;
    }
    s.flagged != 0
}

/// One more window held open.
fn count_provoked() {
    if let Some(state) = PROVOKE.get_ptr_mut(0) {
        // SAFETY: this CPU's slot of the per-CPU array.
        unsafe { (*state).windows += 1 };
    }
}

/// The refill function's return: closes the window.
#[uretprobe]
pub fn on_refill_return(_ctx: RetProbeContext) -> u32 {
    refill_done()
}

/// An instruction by which the refill function leaves (a tail call the kernel emulates): closes
/// the window like the return does, at a fraction of a return probe's cost.
#[uprobe]
pub fn on_refill_exit(_ctx: ProbeContext) -> u32 {
    refill_done()
}

fn refill_done() -> u32 {
    bump(Stat::HitsRefillReturn);
    let Some(tid) = traced_tid() else { return 0 };
    // SAFETY: copied out at once.
    let Some(cache) = (unsafe { REFILLS.get(&tid).copied() }) else {
        return 0;
    };
    let _ = REFILLS.remove(&tid);
    // A CPython writer armed to hand the GIL over that never did: the window ends here.
    if global(&DROP_REQUEST_DELTA) != 0 {
        let _ = GIL_HOLDS.remove(&tid);
    }
    if let Some(w) = window(cache).filter(|w| w.closes_on_refill(tid)) {
        let closed = w.closed(unsafe { bpf_ktime_get_ns() });
        store_window(cache, &closed);
        window_event(EventKind::WindowClose, cache, &closed, tid);
        if PENDING_DICTS.remove(&cache).is_ok() {
            judge_pending(cache);
        }
    }
    0
}

/// A reader's stack goes with its first flagged lookup of each window only (userspace gives that
/// stack to the thread's further lookups of the window): a thread reading in a loop through a
/// wide window would otherwise send thousands of identical 8 KiB copies, and pay for each.
/// Keyed by thread, the value is the window's opening time.
#[map(name = "READER_STACKS")]
static READER_STACKS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(MAX_INFLIGHT, 0);

fn reader_stack(regs: &pt_regs, tid: u32, w: &Window, ns: u64, flags: u32) {
    if global(&STACK_MODE) == StackMode::None as u32 {
        return;
    }
    // SAFETY: copied out at once.
    if unsafe { READER_STACKS.get(&tid).copied() } == Some(w.open_ns) {
        return;
    }
    let _ = READER_STACKS.insert(&tid, &w.open_ns, 0);
    stack(regs, tid, ns, flags, |_| 0);
}

fn lookup_event(cache: u64, tid: u32, w: &Window, lookup_ns: u64, ret: Option<i64>) {
    bump(Stat::WindowLookups);
    send(
        EventKind::Lookup,
        LookupEvent {
            kind: EventKind::Lookup as u32,
            reader_tid: tid,
            cache,
            lookup_ns,
            window_open_ns: w.open_ns,
            writer_tid: w.writer_tid,
            has_ret: ret.is_some() as u32,
            ret: ret.unwrap_or(0),
            reader_comm: comm(),
        },
    );
}

/// Counts a lookup by `tid` on `cache` at `now`, and tells userspace when it is the reader's
/// first since a window opened there (so it can tell how close the reader came to that window).
fn note_lookup(cache: u64, tid: u32, now: u64, w: Option<&Window>) {
    let key = ReaderKey {
        cache,
        tid,
        _pad: 0,
    };
    let Some(state) = READERS.get_ptr_mut(&key) else {
        let first = ReaderState {
            lookups: 1,
            last_ns: now,
            comm: comm(),
        };
        if READERS.insert(&key, &first, 0).is_err() {
            bump(Stat::MapFull);
        }
        return;
    };
    // SAFETY: a live map value; only this thread updates its own key.
    let prev = unsafe {
        let prev = (*state).last_ns;
        (*state).lookups += 1;
        (*state).last_ns = now;
        prev
    };
    let Some(w) = w.filter(|w| w.open_ns > prev && w.writer_tid != tid) else {
        return;
    };
    let close_ns = if w.open == 0 && w.close_ns > prev {
        w.close_ns
    } else {
        0
    };
    send(
        EventKind::Near,
        NearEvent {
            kind: EventKind::Near as u32,
            reader_tid: tid,
            cache,
            prev_lookup_ns: prev,
            lookup_ns: now,
            close_ns,
        },
    );
}

/// The cache's lookup function, `V lookup(Cache *c, K key)`, when its return is not probed:
/// a lookup entered while another thread's window is open is a race.
#[uprobe]
pub fn on_lookup(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLookupEntry);
    let (Some(tid), Some(cache)) = (traced_tid(), cache_arg(&ctx)) else {
        return 0;
    };
    let now = unsafe { bpf_ktime_get_ns() };
    let w = window(cache);
    note_lookup(cache, tid, now, w.as_ref());
    if let Some(w) = w.filter(|w| w.overlaps(tid, None)) {
        // SAFETY: the context's registers are valid for the whole program.
        reader_stack(unsafe { &*ctx.regs }, tid, &w, now, 0);
        lookup_event(cache, tid, &w, now, None);
    }
    0
}

/// The lookup function's entry (`V lookup(Cache *c, K key)`; CPython's
/// `PyDict_GetItemWithError(dict, key)`), attached in short bursts when lookups are not otherwise
/// probed: counts the lookup for the hazard report, and nothing else.
#[uprobe]
pub fn on_lookup_sample(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLookupSample);
    let (Some(tid), Some(cache)) = (traced_tid(), cache_arg(&ctx)) else {
        return 0;
    };
    note_lookup(
        cache,
        tid,
        unsafe { bpf_ktime_get_ns() },
        window(cache).as_ref(),
    );
    0
}

/// The lookup function's entry when its return is probed too (`--miss-ret`): remembers the cache
/// and the entry time so the return can tell whether a window opened meanwhile.
#[uprobe]
pub fn on_lookup_entry(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLookupEntry);
    let (Some(tid), Some(cache)) = (traced_tid(), cache_arg(&ctx)) else {
        return 0;
    };
    let inflight = Inflight {
        cache,
        entry_ns: unsafe { bpf_ktime_get_ns() },
    };
    note_lookup(cache, tid, inflight.entry_ns, window(cache).as_ref());
    if LOOKUPS.insert(&tid, &inflight, 0).is_err() {
        bump(Stat::MapFull);
    }
    0
}

/// The lookup function's return: reports the lookup, with its return value, if a window was open
/// at any time since its entry.
#[uretprobe]
pub fn on_lookup_return(ctx: RetProbeContext) -> u32 {
    bump(Stat::HitsLookupReturn);
    let Some(tid) = traced_tid() else { return 0 };
    // SAFETY: copied out at once.
    let Some(inflight) = (unsafe { LOOKUPS.get(&tid).copied() }) else {
        return 0;
    };
    let _ = LOOKUPS.remove(&tid);
    if let Some(w) = window(inflight.cache).filter(|w| w.overlaps(tid, Some(inflight.entry_ns))) {
        // SAFETY: the context's registers are valid for the whole program.
        let regs = unsafe { &*ctx.regs };
        reader_stack(regs, tid, &w, inflight.entry_ns, STACK_AT_RETURN);
        lookup_event(
            inflight.cache,
            tid,
            &w,
            inflight.entry_ns,
            Some(ctx.ret::<i64>()),
        );
    }
    0
}

/// An instruction on the path by which the lookup function returns its miss value (`--miss-ret`):
/// only misses pass here, so lookups that find their key never trap. The cache is read from the
/// register the function keeps it in at that point.
#[uprobe]
pub fn on_lookup_miss(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLookupMiss);
    let Some(tid) = traced_tid() else { return 0 };
    // pt_regs has 21 slots; the loader only sets general-purpose ones (< 15).
    let slot = global(&MISS_CACHE_SLOT) as usize;
    if slot >= 15 {
        return 0;
    }
    let Some(cache) = reg_slot(ctx.regs, slot) else {
        return 0;
    };
    if let Some(w) = window(cache).filter(|w| w.overlaps(tid, None)) {
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: the context's registers are valid for the whole program.
        reader_stack(unsafe { &*ctx.regs }, tid, &w, now, 0);
        lookup_event(cache, tid, &w, now, Some(global(&MISS_VALUE)));
    }
    0
}

/// A callee-saved register by DWARF number: the only ones that still hold the caller's values at
/// a function's entry.
fn register(regs: &pt_regs, dwarf_reg: u32) -> Option<u64> {
    let slot = match dwarf_reg {
        3 => 5,  // rbx
        6 => 4,  // rbp
        12 => 3, // r12
        13 => 2, // r13
        14 => 1, // r14
        15 => 0, // r15
        _ => return None,
    };
    reg_slot(regs, slot)
}

/// The dict of a failed `d[k]`, read where the calling site keeps it.
fn failed_dict(regs: &pt_regs) -> Option<u64> {
    let read = |addr: u64| unsafe { bpf_probe_read_user(addr as *const u64) }.ok();
    let return_addr = read(regs.rsp)?;
    // SAFETY: copied out at once.
    let site = unsafe {
        KEYERROR_SITES
            .get(&return_addr.wrapping_sub(regs.rip))
            .copied()
    }?;
    if site.outer_sp_offset != 0
        && read(regs.rsp.wrapping_add(site.outer_sp_offset))?.wrapping_sub(regs.rip)
            != site.outer_delta
    {
        return None;
    }
    let reg = register(regs, site.dwarf_reg)?;
    if site.deref == 0 {
        return Some(reg);
    }
    read(reg.wrapping_add(site.offset as u64))
}

fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the read; any bit pattern is a valid integer.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}

/// Keeps `key` to be judged at the window's close; false when it cannot be.
fn add_pending(dict: u64, key: u64, hash: i64) -> bool {
    if hash == UNKNOWN_HASH {
        return false;
    }
    if PENDING
        .insert(&PendingKey { dict, key, hash }, &0, 0)
        .is_err()
    {
        bump(Stat::PendingFull);
        return false;
    }
    let _ = PENDING_DICTS.insert(&dict, &0, 0);
    true
}

fn verdict(dict: u64, key: u64, hash: i64, present: u32) {
    send(
        EventKind::KeyVerdict,
        KeyVerdict {
            kind: EventKind::KeyVerdict as u32,
            present,
            dict,
            key,
            hash,
        },
    );
}

/// Probes per key before giving up (a refilled dict is at most 2/3 full, so most keys take 1-3).
const MAX_PROBES: usize = 16;

/// A CPython 3.11 `PyDictKeysObject`, enough of it to look a hash up.
struct DictKeys {
    log2_size: u8,
    /// `dk_kind` 0: entries carry their hash; 1 and 2 (str keys): the key object caches it.
    general: bool,
    indices: u64,
    entries: u64,
}

impl DictKeys {
    /// For a dict whose keys cannot be read: every read fails, so every key is judged unknown.
    const UNREADABLE: DictKeys = DictKeys {
        log2_size: 0,
        general: true,
        indices: 0,
        entries: 0,
    };

    /// `ma_keys` at +32 of the dict; `dk_log2_size`, `dk_log2_index_bytes`, `dk_kind` at +8.
    fn of(dict: u64) -> Option<DictKeys> {
        let keys = read_user::<u64>(dict + 32)?;
        let [log2_size, log2_index_bytes, kind] = read_user::<[u8; 3]>(keys + 8)?;
        // Tables of 2^32 slots and more (8-byte indices) are not judged.
        if log2_size >= 32 || log2_index_bytes >= 64 {
            return None;
        }
        let indices = keys + 32;
        Some(DictKeys {
            log2_size,
            general: kind == 0,
            indices,
            entries: indices + (1u64 << log2_index_bytes),
        })
    }

    /// Slot `i` of the index table: an entry number, -1 empty, -2 deleted.
    fn index(&self, i: u64) -> Option<i64> {
        match self.log2_size {
            0..8 => read_user::<i8>(self.indices + i).map(i64::from),
            8..16 => read_user::<i16>(self.indices + 2 * i).map(i64::from),
            _ => read_user::<i32>(self.indices + 4 * i).map(i64::from),
        }
    }

    fn entry_hash(&self, ix: u64) -> Option<i64> {
        if self.general {
            read_user(self.entries + 24 * ix)
        } else {
            read_user(read_user::<u64>(self.entries + 16 * ix)? + 24)
        }
    }

    /// CPython's open-addressing probe sequence; an entry with an equal hash counts as the key.
    fn lookup(&self, hash: i64) -> u32 {
        let mask = (1u64 << self.log2_size) - 1;
        let mut i = hash as u64 & mask;
        let mut perturb = hash as u64;
        for _ in 0..MAX_PROBES {
            match self.index(i) {
                None => return KEY_UNKNOWN,
                Some(-1) => return KEY_ABSENT,
                Some(ix) if ix >= 0 => match self.entry_hash(ix as u64) {
                    Some(h) if h == hash => return KEY_PRESENT,
                    None => return KEY_UNKNOWN,
                    _ => {}
                },
                _ => {}
            }
            perturb >>= 5;
            i = i.wrapping_mul(5).wrapping_add(perturb).wrapping_add(1) & mask;
        }
        KEY_UNKNOWN
    }
}

/// The callback's context. No `Option` in it: the verifier refuses the uninitialised payload
/// LLVM stores for `None`.
struct Judge {
    dict: u64,
    keys: DictKeys,
}

/// `bpf_for_each_map_elem` callback over `PENDING`: judges and drops the keys of one dict.
extern "C" fn judge_key(
    _map: *mut c_void,
    pending: *const PendingKey,
    _value: *const u8,
    judge: *const Judge,
) -> i64 {
    // SAFETY: the helper passes a live key, and `judge` from judge_pending's stack.
    let (p, judge) = unsafe { (*pending, &*judge) };
    if p.dict == judge.dict {
        verdict(p.dict, p.key, p.hash, judge.keys.lookup(p.hash));
        let _ = PENDING.remove(&p);
    }
    0
}

/// At a window's close, tells userspace whether each key that raised KeyError inside it is in the
/// dict just refilled: a key absent even now was not the window's doing.
fn judge_pending(dict: u64) {
    let judge = Judge {
        dict,
        keys: DictKeys::of(dict).unwrap_or(DictKeys::UNREADABLE),
    };
    // SAFETY: PENDING is #[repr(transparent)] over its map definition, which is what the helper
    // takes; the callback's signature is the one the helper calls.
    unsafe {
        bpf_for_each_map_elem(
            &PENDING as *const _ as *mut c_void,
            judge_key as *mut c_void,
            &judge as *const Judge as *mut c_void,
            0,
        );
    }
}

/// CPython's `void _PyErr_SetKeyError(PyObject *key)`, called when `d[k]` misses: reports the
/// KeyError when another thread's window is open on that dict, with the key's bytes, and keeps
/// the key to be judged at the window's close (or sends an unknown verdict at once).
#[uprobe]
pub fn on_keyerror(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsKeyError);
    let Some(tid) = traced_tid() else { return 0 };
    // SAFETY: the context's registers are valid for the whole program.
    let regs = unsafe { &*ctx.regs };
    let Some(dict) = failed_dict(regs) else {
        return 0;
    };
    let Some(w) = window(dict).filter(|w| w.overlaps(tid, None)) else {
        return 0;
    };
    let raised_ns = unsafe { bpf_ktime_get_ns() };
    stack(regs, tid, raised_ns, 0, |l| l.tstate_from_keyerror);
    let Some(mut entry) = EVENTS.reserve::<KeyErrorEvent>(0) else {
        bump(Stat::LostKeyError);
        return 0;
    };
    let key: u64 = ctx.arg(0).unwrap_or(0);
    let e = entry.as_mut_ptr();
    let hash;
    // SAFETY: `e` points at reserved ring-buffer memory of the event's size; every field is set
    // (failed reads leave zeros) before submit.
    unsafe {
        (*e).kind = EventKind::KeyError as u32;
        (*e).reader_tid = tid;
        (*e).dict = dict;
        (*e).raised_ns = raised_ns;
        (*e).window_open_ns = w.open_ns;
        (*e).writer_tid = w.writer_tid;
        (*e)._pad = 0;
        (*e).key = key;
        (*e).reader_comm = comm();
        (*e).key_type = [0; detector_common::TYPE_NAME_LEN];
        (*e).key_obj = [0; detector_common::KEY_OBJ_LEN];
        // ob_type at +8, then tp_name at +24 in the type object.
        if let Ok(ty) = bpf_probe_read_user((key + 8) as *const u64)
            && let Ok(name) = bpf_probe_read_user((ty + 24) as *const u64)
        {
            let _ = bpf_probe_read_user_str_bytes(name as *const u8, &mut (*e).key_type);
        }
        let _ = bpf_probe_read_user_buf(key as *const u8, &mut (*e).key_obj);
        hash = key_hash(&(*e).key_type, &(*e).key_obj);
    }
    entry.submit(wakeup_flags());
    // Reserved after the KeyError, so userspace reads the verdict after it.
    if !add_pending(dict, key, hash) {
        verdict(dict, key, hash, KEY_UNKNOWN);
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
