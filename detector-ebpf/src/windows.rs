//! Window boundaries: the clear opens a cache's window, the refill's return, exit or last call
//! closes it.

use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use detector_common::{EventKind, NO_GIL, ObjKey, ProbeConfig, Stat, Window};

use crate::{
    maps::{GIL_HOLDS, PENDING_DICTS, REFILLS},
    provoke::{arm_gil_handover, gil_handover, hold_writer},
    python::{gil_switch_at, holds_nothing, judge_pending},
    stacks::{Interp, writer_opened},
    util::{bump, caller, read_user, store_window, watched_object, window, window_event},
};

/// The cache's clear function, `void clear(Cache *c)` (the cache where the probe's
/// configuration says): opens a window.
#[uprobe]
pub fn on_clear(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsClear);
    let Some((who, cache, cfg)) = watched_object(&ctx) else {
        return 0;
    };
    let open = window(&cache).is_some_and(|w| w.open != 0);
    // Emptied again while still open (refilled by assignments racewatch does not watch, or freed
    // and its address reused): the KeyErrors it holds are judged against what the dict holds
    // now, before it is emptied, which is what was filled in since. An object still empty (a
    // writer that clears twice, or a second writer's clear) tells nothing yet: they wait for
    // the close. A second clear keeps the first opening: the cache has been empty since then.
    if open {
        if PENDING_DICTS.get_ptr(&cache).is_some()
            && !holds_nothing(cache.object)
            && PENDING_DICTS.remove(&cache).is_ok()
        {
            judge_pending(cache);
        }
    } else {
        open_window(&ctx, &cache, &cfg, who.tid);
    }
    0
}

/// Opens `cache`'s window, written by `tid`. A function of its own so that its frame and
/// `judge_pending`'s are not on the stack at once.
#[inline(never)]
fn open_window(ctx: &ProbeContext, cache: &ObjKey, cfg: &ProbeConfig, tid: u32) {
    // SAFETY: the context's registers are valid for the whole program.
    let regs = unsafe { &*ctx.regs };
    let Some(mut w) = Window::on_clear(None, tid, unsafe { bpf_ktime_get_ns() }) else {
        return;
    };
    // A CPython window: whether the GIL goes to another thread before it closes is what lets a
    // reader in at all (the hazard forecast's reachable windows).
    if let Some(at) = Interp::at(regs, cfg).and_then(gil_switch_at)
        && let Some(n) = read_user::<u64>(at)
    {
        w.gil_switch_at = at;
        w.gil_switch = n;
    }
    // Stack and event first: a lookup that sees the stored window then reserves its own event
    // later in the ring, so userspace always reads a window's opening (and the writer's stack,
    // when it is sent now, just before it) before its lookups.
    writer_opened(regs, cache, &w, cfg);
    window_event(EventKind::WindowOpen, cache, &w, tid, NO_GIL);
    store_window(cache, &w);
    if gil_handover() {
        arm_gil_handover(ctx, cfg, *cache, tid, w.open_ns);
    }
}

/// The cache's refill function's entry, `void update(Cache *c, ...)`: remembers which cache this
/// thread is refilling, when the refill is the one that closes its window.
#[uprobe]
pub fn on_refill(ctx: ProbeContext) -> u32 {
    refill_entry(&ctx, false);
    0
}

/// The refill function's entry, `void update(Cache *c, ...)`, for native `--provoke`: `on_refill`
/// that also holds the writer inside the window. A program of its own because `bpf_loop` needs
/// kernel 5.17+, which runs without `--provoke` need not.
#[uprobe]
pub fn on_refill_provoke(ctx: ProbeContext) -> u32 {
    refill_entry(&ctx, true);
    0
}

fn refill_entry(ctx: &ProbeContext, hold: bool) {
    bump(Stat::HitsRefillEntry);
    let Some((who, cache, _)) = watched_object(ctx) else {
        return;
    };
    let tid = who.tid;
    if window(&cache).is_some_and(|w| w.closes_on_refill(tid)) {
        if REFILLS.insert(&tid, &cache, 0).is_err() {
            bump(Stat::MapFull);
        }
        if hold {
            hold_writer();
        }
    }
}

/// The refill function's return, `void update(Cache *c, ...)`: closes the window.
#[uretprobe]
pub fn on_refill_return(_ctx: RetProbeContext) -> u32 {
    refill_done()
}

/// An instruction by which the refill function, `void update(Cache *c, ...)`, leaves (a tail call
/// the kernel emulates): closes the window like the return does, at a fraction of a return
/// probe's cost.
#[uprobe]
pub fn on_refill_exit(_ctx: ProbeContext) -> u32 {
    refill_done()
}

fn refill_done() -> u32 {
    bump(Stat::HitsRefillReturn);
    let Some(tid) = caller().map(|c| c.tid) else {
        return 0;
    };
    // SAFETY: copied out at once.
    let Some(cache) = (unsafe { REFILLS.get(&tid).copied() }) else {
        return 0;
    };
    let _ = REFILLS.remove(&tid);
    // A CPython writer armed to hand the GIL over that never did: the window ends here.
    if gil_handover() {
        let _ = GIL_HOLDS.remove(&tid);
    }
    close(&cache, tid);
    0
}

/// The refill's last call on a path to its return (for a lock-guarded cache, the unlock), the
/// cache where the probe's configuration says: the refill has refilled, and the window its thread
/// opened on that cache closes. No entry probe is needed (one would trap inside the window).
#[uprobe]
pub fn on_refill_close(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsRefillReturn);
    if let Some((who, cache, _)) = watched_object(&ctx) {
        // Left by the entry probe that holds the writer under `--provoke`.
        let _ = REFILLS.remove(&who.tid);
        close(&cache, who.tid);
    }
    0
}

/// The clear's release of the cache's lock (its last call, to `pthread_mutex_unlock` or the like;
/// the cache where the probe's configuration says): from here until the refill takes the lock,
/// a reader can take it and find the cache empty. A trap inside the clear's critical section, so
/// the span readers can get in is not widened.
#[uprobe]
pub fn on_clear_unlock(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLockEdge);
    if let Some((who, cache, _)) = watched_object(&ctx)
        && let Some(mut w) = window(&cache)
        && w.on_unlock(who.tid, unsafe { bpf_ktime_get_ns() })
    {
        store_window(&cache, &w);
    }
    0
}

/// The first instruction the refill runs holding the cache's lock (after its first call, to
/// `pthread_mutex_lock` or the like): the span since the clear's unlock ends.
#[uprobe]
pub fn on_refill_locked(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLockEdge);
    if let Some((who, cache, _)) = watched_object(&ctx)
        && let Some(mut w) = window(&cache)
        && w.on_locked(who.tid, unsafe { bpf_ktime_get_ns() })
    {
        store_window(&cache, &w);
    }
    0
}

/// Closes `cache`'s window when `tid` opened it.
fn close(cache: &ObjKey, tid: u32) {
    if store_closed(cache, tid) && PENDING_DICTS.remove(cache).is_ok() {
        judge_pending(*cache);
    }
}

/// Stores `cache`'s window closed now and sends its close, when `tid` opened it; false when it
/// did not. A function of its own so that its frame and `judge_pending`'s are not on the stack
/// at once.
#[inline(never)]
fn store_closed(cache: &ObjKey, tid: u32) -> bool {
    let Some(w) = window(cache).filter(|w| w.closes_on_refill(tid)) else {
        return false;
    };
    let closed = w.closed(unsafe { bpf_ktime_get_ns() });
    let switches = w.gil_switches(read_user::<u64>(w.gil_switch_at));
    store_window(cache, &closed);
    window_event(EventKind::WindowClose, cache, &closed, tid, switches);
    true
}
