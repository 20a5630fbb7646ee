//! What every program family uses: counters, the traced-thread filter, argument and register
//! reads, ring sends, and each cache's stored window.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
    },
    programs::ProbeContext,
};
use detector_common::{COMM_LEN, EventKind, Stat, Window, WindowEvent};

use crate::{
    globals::{CACHE_ARG, TARGET_TGID, WAKEUP_BYTES, global},
    maps::{EVENTS, STATS, WINDOWS},
};

pub(crate) fn bump(stat: Stat) {
    if let Some(n) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *n += 1 }
    }
}

/// The calling thread's id if it belongs to the traced process.
pub(crate) fn traced_tid() -> Option<u32> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let target = global(&TARGET_TGID);
    (target == 0 || (pid_tgid >> 32) as u32 == target).then_some(pid_tgid as u32)
}

/// Reads `pt_regs` slot `slot` (in u64s). The index is only known at load time, and the verifier
/// refuses a context access at a computed offset, hence the helper read.
pub(crate) fn reg_slot(regs: *const pt_regs, slot: usize) -> Option<u64> {
    // SAFETY: slot < size_of::<pt_regs>() / 8 at every call site; the helper checks the read.
    unsafe { bpf_probe_read_kernel((regs as *const u64).add(slot)) }.ok()
}

/// pt_regs slots of the six integer arguments (rdi, rsi, rdx, rcx, r8, r9).
const ARG_SLOTS: [usize; 6] = [14, 13, 12, 11, 9, 8];

pub(crate) fn cache_arg(ctx: &ProbeContext) -> Option<u64> {
    match global(&CACHE_ARG) {
        // The common case (`this`, or CPython's dict) as a plain context load: no helper call on
        // the hot path.
        0 => ctx.arg(0),
        n => reg_slot(ctx.regs, *ARG_SLOTS.get(n as usize)?),
    }
}

pub(crate) fn comm() -> [u8; COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; COMM_LEN])
}

pub(crate) fn wakeup_flags() -> u64 {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= global(&WAKEUP_BYTES) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

pub(crate) fn send<T: 'static>(kind: EventKind, event: T) {
    if EVENTS.output::<T>(event, wakeup_flags()).is_err() {
        bump(Stat::lost(kind));
    }
}

pub(crate) fn window(cache: u64) -> Option<Window> {
    // SAFETY: the value is copied out at once.
    unsafe { WINDOWS.get(&cache).copied() }
}

pub(crate) fn store_window(cache: u64, w: &Window) {
    if WINDOWS.insert(&cache, w, 0).is_err() {
        bump(Stat::MapFull);
    }
}

pub(crate) fn window_event(kind: EventKind, cache: u64, w: &Window, tid: u32) {
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

/// A callee-saved register by DWARF number: the only ones that still hold the caller's values at
/// a function's entry.
pub(crate) fn register(regs: &pt_regs, dwarf_reg: u32) -> Option<u64> {
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

pub(crate) fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the read; any bit pattern is a valid integer.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}
