//! What every program family uses: counters, the traced-thread filter, argument and register
//! reads, ring sends, and each cache's stored window.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel, bpf_probe_read_user,
        generated::bpf_get_attach_cookie,
    },
    programs::ProbeContext,
};
use detector_common::{
    ARG_SLOTS, COMM_LEN, EventKind, OBJECT_IN_MEMORY, OBJECT_STATIC, ObjKey, ProbeConfig,
    REG_SLOTS, Stat, Window, WindowEvent,
};

use crate::{
    globals::{WAKEUP_BYTES, WATCH_ALL, global},
    maps::{EVENTS, PROBES, STATS, WATCHED, WINDOWS},
};

pub(crate) fn bump(stat: Stat) {
    if let Some(n) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: per-CPU slot, no other writer while this program runs on this CPU.
        unsafe { *n += 1 }
    }
}

/// The thread a probe fired in, when its process is watched.
#[derive(Clone, Copy)]
pub(crate) struct Caller {
    pub tid: u32,
    pub tgid: u32,
}

/// The calling thread, if its process is watched (in `WATCHED`, or every process when the run
/// watches the whole host).
pub(crate) fn caller() -> Option<Caller> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: only presence is tested.
    if unsafe { WATCHED.get(&tgid) }.is_none() {
        if global(&WATCH_ALL) == 0 {
            return None;
        }
        // Watching the whole host: a process joins the set at its first hit, so that its end
        // is seen (and a later process reusing its pid starts afresh).
        let _ = WATCHED.insert(&tgid, &1, 0);
    }
    Some(Caller {
        tid: pid_tgid as u32,
        tgid,
    })
}

/// This attachment's configuration: its attach cookie indexes `PROBES`.
pub(crate) fn config(ctx: &impl EbpfContext) -> Option<ProbeConfig> {
    // SAFETY: the helper reads the cookie of the perf link that ran this program.
    let cookie = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) };
    PROBES.get(cookie as u32).copied()
}

/// Reads `pt_regs` slot `slot` (in u64s). The index is only known at attach time, and the
/// verifier refuses a context access at a computed offset, hence the helper read.
pub(crate) fn reg_slot(regs: *const pt_regs, slot: u32) -> Option<u64> {
    if slot >= REG_SLOTS {
        return None;
    }
    // SAFETY: slot < REG_SLOTS, inside pt_regs; the helper checks the read.
    unsafe { bpf_probe_read_kernel((regs as *const u64).add(slot as usize)) }.ok()
}

/// The object this probe watches, as its configuration says where it is, in the caller's
/// process.
pub(crate) fn probed_object(ctx: &ProbeContext, cfg: &ProbeConfig, tgid: u32) -> Option<ObjKey> {
    let object = if cfg.object_kind == OBJECT_STATIC {
        // SAFETY: the context's registers are valid for the whole program.
        let ip = unsafe { (*ctx.regs).rip };
        (ip.wrapping_sub(cfg.vaddr) as i64).wrapping_add(cfg.object_offset) as u64
    } else {
        let reg = if cfg.object_slot == ARG_SLOTS[0] {
            // The common case (`this`, or CPython's dict) as a plain context load: no helper
            // call on the hot path.
            ctx.arg(0)?
        } else {
            reg_slot(ctx.regs, cfg.object_slot)?
        };
        if cfg.object_kind == OBJECT_IN_MEMORY {
            let at = (reg as i64).wrapping_add(cfg.object_offset) as *const u64;
            // SAFETY: the helper checks the read of the caller's stack.
            unsafe { bpf_probe_read_user(at) }.ok()?
        } else {
            reg
        }
    };
    Some(ObjKey {
        object,
        tgid,
        window: cfg.window,
    })
}

/// At a probe every lookup passes where its result is known: is the result the miss value?
/// Elsewhere (`value_bytes` 0) every hit is a miss.
pub(crate) fn result_is_miss(ctx: &ProbeContext, cfg: &ProbeConfig) -> bool {
    if cfg.value_bytes == 0 {
        return true;
    }
    let Some(reg) = reg_slot(ctx.regs, cfg.value_slot) else {
        return false;
    };
    let value = if cfg.value_kind == OBJECT_IN_MEMORY {
        let at = (reg as i64).wrapping_add(cfg.value_offset) as *const u64;
        // SAFETY: the helper checks the read of the caller's stack.
        match unsafe { bpf_probe_read_user(at) } {
            Ok(v) => v,
            Err(_) => return false,
        }
    } else {
        reg
    };
    let mask = if cfg.value_bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * cfg.value_bytes)) - 1
    };
    (value ^ cfg.miss_value as u64) & mask == 0
}

/// The watching caller and the object of a probe that reads one.
pub(crate) fn watched_object(ctx: &ProbeContext) -> Option<(Caller, ObjKey, ProbeConfig)> {
    let who = caller()?;
    let cfg = config(ctx)?;
    Some((who, probed_object(ctx, &cfg, who.tgid)?, cfg))
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

pub(crate) fn window(obj: &ObjKey) -> Option<Window> {
    // SAFETY: the value is copied out at once.
    unsafe { WINDOWS.get(obj).copied() }
}

pub(crate) fn store_window(obj: &ObjKey, w: &Window) {
    if WINDOWS.insert(obj, w, 0).is_err() {
        bump(Stat::MapFull);
    }
}

/// `gil_switches`: [`WindowEvent::gil_switches`].
pub(crate) fn window_event(kind: EventKind, obj: &ObjKey, w: &Window, tid: u32, gil_switches: u64) {
    send(
        kind,
        WindowEvent {
            kind: kind as u32,
            writer_tid: tid,
            tgid: obj.tgid,
            window: obj.window,
            cache: obj.object,
            open_ns: w.open_ns,
            close_ns: w.close_ns,
            gil_switches,
            reach_ns: w.reach_ns,
            reach_pairs: w.reach_pairs,
            _pad: 0,
            writer_comm: comm(),
        },
    );
}

pub(crate) fn read_user<T>(addr: u64) -> Option<T> {
    // SAFETY: the helper checks the read; any bit pattern is a valid integer.
    unsafe { bpf_probe_read_user(addr as *const T) }.ok()
}
