//! `--provoke`: holding a writer inside its window, natively at the refill or, for CPython, by
//! handing the GIL over, within the time budget.

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_ktime_get_ns, generated::bpf_loop},
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use detector_common::{GilHold, ObjKey, ProbeConfig, Stat, request_wait_ns, within_budget};

use crate::{
    globals::{
        DROP_REQUEST_IN_THREAD, DROP_REQUEST_MASK, DROP_REQUEST_VADDR, PROVOKE_CPUS, PROVOKE_NS,
        PROVOKE_START_NS, SWITCH_INTERVAL_VADDR, global,
    },
    maps::{GIL_HOLDS, PROVOKE},
    stacks::{Interp, py_tstate},
    util::{bump, caller, read_user, window},
};

/// Whether this run makes CPython writers hand the GIL over in their windows.
pub(crate) fn gil_handover() -> bool {
    global(&DROP_REQUEST_VADDR) != 0 || global(&DROP_REQUEST_IN_THREAD) != 0
}

/// CPython `--provoke`, at a clear's entry (configured by `cfg`): arms the
/// handover (see on_clear_return and on_take_gil) if the budget allows a wait for a reader to ask
/// for the GIL (as long as the interpreter's switch interval, read now) and the hold after it.
pub(crate) fn arm_gil_handover(
    ctx: &ProbeContext,
    cfg: &ProbeConfig,
    cache: ObjKey,
    tid: u32,
    now: u64,
) {
    let hold = global(&PROVOKE_NS);
    let Some(state) = PROVOKE.get_ptr_mut(0) else {
        return;
    };
    // Where the interpreter's file is loaded: the probe's address less its file address.
    // SAFETY: the context's registers are valid for the whole program.
    let bias = unsafe { (*ctx.regs).rip }.wrapping_sub(cfg.vaddr);
    let interval_us =
        read_user::<u64>(bias.wrapping_add(global(&SWITCH_INTERVAL_VADDR))).unwrap_or(0);
    // SAFETY: this CPU's slot of the per-CPU array, for the rest of the program.
    let state = unsafe { &mut *state };
    state.switch_interval_us = state.switch_interval_us.max(interval_us);
    let Some(wait) = request_wait_ns(interval_us, hold) else {
        state.beyond_reach += 1;
        return;
    };
    let (start_ns, cpus) = (global(&PROVOKE_START_NS), global(&PROVOKE_CPUS));
    if !within_budget(start_ns, now, state.held_ns, wait + hold, cpus) {
        state.refused += 1;
        return;
    }
    // The main interpreter's static flag (3.11, 3.12), or the writer's own eval_breaker (3.13+).
    let in_thread = global(&DROP_REQUEST_IN_THREAD);
    let drop_request = if in_thread != 0 {
        // SAFETY: the context's registers are valid for the whole program.
        let Some(tstate) = Interp::at(unsafe { &*ctx.regs }, cfg).and_then(py_tstate) else {
            return;
        };
        tstate.wrapping_add(in_thread)
    } else {
        bias.wrapping_add(global(&DROP_REQUEST_VADDR))
    };
    let armed = GilHold {
        cache,
        deadline_ns: now + wait,
        hold_ns: hold,
        drop_request,
        drop_mask: u64::from(global(&DROP_REQUEST_MASK)),
    };
    if GIL_HOLDS.insert(&tid, &armed, 0).is_err() {
        bump(Stat::MapFull);
    }
}

/// The return of CPython's clear of a dict (`dict_clear`), an OrderedDict, a list or a set,
/// attached with `python --provoke`: the window is open and the writer holds the GIL. It is kept
/// here until a thread waiting for the GIL asks for it (sets the interpreter's
/// `gil_drop_request`, as CPython does after the switch interval) or the wait ends. Asked, the
/// writer drops the GIL at the eval-breaker check that follows the call, inside the window, and
/// is kept from taking it back for the hold; racewatch never writes to the target's memory.
#[uretprobe]
pub fn on_clear_return(_ctx: RetProbeContext) -> u32 {
    let Some(tid) = caller().map(|c| c.tid) else {
        return 0;
    };
    // SAFETY: copied out at once.
    let Some(mut armed) = (unsafe { GIL_HOLDS.get(&tid).copied() }) else {
        return 0;
    };
    let handed_over = hold_until(
        unsafe { bpf_ktime_get_ns() },
        armed.deadline_ns,
        armed.drop_request,
        armed.drop_mask,
    );
    count_provoked();
    if handed_over {
        armed.deadline_ns = unsafe { bpf_ktime_get_ns() } + armed.hold_ns;
        let _ = GIL_HOLDS.insert(&tid, &armed, 0);
    } else {
        // Nobody asked for the GIL in time: the window was held that long, and goes on as it
        // would.
        let _ = GIL_HOLDS.remove(&tid);
        if let Some(state) = PROVOKE.get_ptr_mut(0) {
            // SAFETY: this CPU's slot of the per-CPU array.
            unsafe { (*state).unanswered += 1 };
        }
    }
    0
}

/// CPython's `static void take_gil(PyThreadState *tstate)`, attached with `python --provoke`: a
/// writer that handed the GIL over in its window is kept here, without the GIL, until the
/// deadline, so the readers run while its dict is empty.
#[uprobe]
pub fn on_take_gil(_ctx: ProbeContext) -> u32 {
    let Some(tid) = caller().map(|c| c.tid) else {
        return 0;
    };
    // SAFETY: copied out at once.
    let Some(armed) = (unsafe { GIL_HOLDS.get(&tid).copied() }) else {
        return 0;
    };
    let _ = GIL_HOLDS.remove(&tid);
    if window(&armed.cache).is_some_and(|w| w.closes_on_refill(tid)) {
        hold_until(unsafe { bpf_ktime_get_ns() }, armed.deadline_ns, 0, 0);
    }
    0
}

/// What a hold waits for: the deadline, or any of `mask`'s bits set in the 4-byte flag in the
/// target at `flag`.
struct Spin {
    deadline: u64,
    /// 0: the deadline only.
    flag: u64,
    mask: u64,
    /// Set when the flag ended the hold.
    flagged: u64,
}

/// `bpf_loop` callback: 1 (stop) once the deadline has passed or the flag is set.
extern "C" fn spin(_index: u64, s: *mut Spin) -> i64 {
    // SAFETY: `s` is hold_until's stack variable, live for the whole loop.
    let s = unsafe { &mut *s };
    if s.flag != 0 && read_user::<u32>(s.flag).is_some_and(|v| u64::from(v) & s.mask != 0) {
        s.flagged = 1;
        return 1;
    }
    (unsafe { bpf_ktime_get_ns() } >= s.deadline) as i64
}

/// `--provoke`: keeps the calling writer inside its window for up to PROVOKE_NS, within the
/// budget, so readers on other CPUs run while the cache is empty. A busy-wait, since a BPF
/// program cannot sleep; `bpf_loop` bounds it (2^23 clock reads, longer than PROVOKE_MAX_NS).
pub(crate) fn hold_writer() {
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
    hold_until(start, start + hold, 0, 0);
    count_provoked();
}

/// Busy-waits until `deadline`, or until one of `mask`'s bits is set in the target's 4-byte flag
/// at `flag` (if not 0), and accounts the time held since `start`; true if the flag ended it.
/// The program runs with migration disabled, so the hold is accounted on the CPU that ran it.
fn hold_until(start: u64, deadline: u64, flag: u64, mask: u64) -> bool {
    let Some(state) = PROVOKE.get_ptr_mut(0) else {
        return false;
    };
    if start >= deadline {
        return false;
    }
    let mut s = Spin {
        deadline,
        flag,
        mask,
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
