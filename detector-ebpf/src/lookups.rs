//! Lookups while a window is open: the entry, the return and the miss path, and the per-reader
//! counts of the hazard report.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::bpf_ktime_get_ns,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use detector_common::{
    EventKind, Inflight, LookupEvent, NearEvent, ObjKey, ReaderKey, ReaderState, STACK_AT_RETURN,
    StackMode, Stat, Window,
};

use crate::{
    globals::{STACK_MODE, global},
    maps::{LOOKUPS, READER_STACKS, READERS},
    stacks::{native_stack, writer_stack},
    util::{bump, caller, comm, result_is_miss, send, watched_object, window},
};

/// The lookup probes belong to `racewatch watch`, whose stacks are native: the writer's, if no
/// reader has sent it yet, then the reader's.
// Inlined: it takes more arguments than a BPF call may.
#[inline(always)]
fn reader_stack(regs: &pt_regs, cache: &ObjKey, tid: u32, w: &Window, ns: u64, flags: u32) {
    if global(&STACK_MODE) != StackMode::Native as u32 {
        return;
    }
    writer_stack(cache, w);
    // SAFETY: copied out at once.
    if unsafe { READER_STACKS.get(&tid).copied() } == Some(w.open_ns) {
        return;
    }
    let _ = READER_STACKS.insert(&tid, &w.open_ns, 0);
    native_stack(regs, tid, ns, flags);
}

// Inlined: with the reader and the window it takes more arguments than a BPF call may.
#[inline(always)]
fn lookup_event(cache: &ObjKey, tid: u32, w: &Window, lookup_ns: u64, ret: Option<i64>) {
    bump(Stat::WindowLookups);
    send(
        EventKind::Lookup,
        LookupEvent {
            kind: EventKind::Lookup as u32,
            reader_tid: tid,
            tgid: cache.tgid,
            window: cache.window,
            cache: cache.object,
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
pub(crate) fn note_lookup(cache: &ObjKey, tid: u32, now: u64, w: Option<&Window>) {
    let key = ReaderKey {
        obj: *cache,
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
            tgid: cache.tgid,
            window: cache.window,
            cache: cache.object,
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
    let Some((who, cache, _)) = watched_object(&ctx) else {
        return 0;
    };
    let tid = who.tid;
    let now = unsafe { bpf_ktime_get_ns() };
    let w = window(&cache);
    note_lookup(&cache, tid, now, w.as_ref());
    if let Some(w) = w.filter(|w| w.overlaps(tid, None)) {
        // SAFETY: the context's registers are valid for the whole program.
        reader_stack(unsafe { &*ctx.regs }, &cache, tid, &w, now, 0);
        lookup_event(&cache, tid, &w, now, None);
    }
    0
}

/// The lookup function's entry, `V lookup(Cache *c, K key)`, when its return is probed too
/// (`--miss-ret`): remembers the cache and the entry time so the return can tell whether a window
/// opened meanwhile.
#[uprobe]
pub fn on_lookup_entry(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLookupEntry);
    let Some((who, cache, _)) = watched_object(&ctx) else {
        return 0;
    };
    let tid = who.tid;
    let inflight = Inflight {
        obj: cache,
        entry_ns: unsafe { bpf_ktime_get_ns() },
    };
    let w = window(&cache);
    note_lookup(&cache, tid, inflight.entry_ns, w.as_ref());
    // The writer's stack while its window is surely open: by this lookup's return it may not be.
    if let Some(w) = w.filter(|w| w.overlaps(tid, None))
        && global(&STACK_MODE) == StackMode::Native as u32
    {
        writer_stack(&cache, &w);
    }
    if LOOKUPS.insert(&tid, &inflight, 0).is_err() {
        bump(Stat::MapFull);
    }
    0
}

/// The lookup function's return, `V lookup(Cache *c, K key)`: reports the lookup, with its return
/// value, if a window was open at any time since its entry.
#[uretprobe]
pub fn on_lookup_return(ctx: RetProbeContext) -> u32 {
    bump(Stat::HitsLookupReturn);
    let Some(tid) = caller().map(|c| c.tid) else {
        return 0;
    };
    // SAFETY: copied out at once.
    let Some(inflight) = (unsafe { LOOKUPS.get(&tid).copied() }) else {
        return 0;
    };
    let _ = LOOKUPS.remove(&tid);
    if let Some(w) = window(&inflight.obj).filter(|w| w.overlaps(tid, Some(inflight.entry_ns))) {
        // SAFETY: the context's registers are valid for the whole program.
        let regs = unsafe { &*ctx.regs };
        reader_stack(
            regs,
            &inflight.obj,
            tid,
            &w,
            inflight.entry_ns,
            STACK_AT_RETURN,
        );
        lookup_event(
            &inflight.obj,
            tid,
            &w,
            inflight.entry_ns,
            Some(ctx.ret::<i64>()),
        );
    }
    0
}

/// An instruction on the path by which the lookup function, `V lookup(Cache *c, K key)`, returns
/// its miss value (`--miss-ret`): only misses pass here, so lookups that find their key never
/// trap. The cache is read from the register the function keeps it in at that point. Where the
/// code has no such path, an instruction every lookup passes once its result is known, which
/// the configuration says where to read.
#[uprobe]
pub fn on_lookup_miss(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLookupMiss);
    let Some((who, cache, cfg)) = watched_object(&ctx) else {
        return 0;
    };
    if !result_is_miss(&ctx, &cfg) {
        return 0;
    }
    let tid = who.tid;
    if let Some(w) = window(&cache).filter(|w| w.overlaps(tid, None)) {
        let now = unsafe { bpf_ktime_get_ns() };
        // SAFETY: the context's registers are valid for the whole program.
        reader_stack(unsafe { &*ctx.regs }, &cache, tid, &w, now, 0);
        lookup_event(&cache, tid, &w, now, Some(cfg.miss_value));
    }
    0
}
