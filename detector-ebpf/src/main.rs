//! racewatch's probes. The kernel keeps each cache's window state and sends userspace only window
//! boundaries and the lookups that overlap an open window: ordinary lookups never cross.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, pt_regs},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user, bpf_probe_read_user_buf, bpf_probe_read_user_str_bytes,
    },
    macros::{map, uprobe, uretprobe},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{ProbeContext, RetProbeContext},
};
use detector_common::{
    COMM_LEN, DictSite, EVENTS_BYTES_DEFAULT, EventKind, Inflight, KeyErrorEvent, LookupEvent,
    MAX_CACHES, MAX_INFLIGHT, MAX_KEYERROR_SITES, Stat, Window, WindowEvent,
};

/// Only this process is traced; 0 traces any (set at load time).
#[unsafe(no_mangle)]
static TARGET_TGID: u32 = 0;
/// Which argument is the cache object (set at load time).
#[unsafe(no_mangle)]
static CACHE_ARG: u32 = 0;
/// Ring fill above which a write wakes the collector; below it the collector polls, which spares
/// the target the wakeup's cost (~6 µs an event on this kind of machine).
#[unsafe(no_mangle)]
static WAKEUP_BYTES: u64 = (EVENTS_BYTES_DEFAULT / 2) as u64;

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
    reg_slot(ctx.regs, *ARG_SLOTS.get(global(&CACHE_ARG) as usize)?)
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

/// The cache's clear function, `void clear(Cache *c)` (the cache is argument CACHE_ARG):
/// opens a window.
#[uprobe]
pub fn on_clear(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsClear);
    let (Some(tid), Some(cache)) = (traced_tid(), cache_arg(&ctx)) else {
        return 0;
    };
    if let Some(w) = Window::on_clear(window(cache).as_ref(), tid, unsafe { bpf_ktime_get_ns() }) {
        // Event first: a lookup that sees the stored window then reserves its own event later in
        // the ring, so userspace always reads a window's opening before its lookups.
        window_event(EventKind::WindowOpen, cache, &w, tid);
        store_window(cache, &w);
    }
    0
}

/// The cache's refill function's entry, `void update(Cache *c, ...)`: remembers which cache this
/// thread is refilling, when the refill is the one that closes its window.
#[uprobe]
pub fn on_refill(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsRefillEntry);
    let (Some(tid), Some(cache)) = (traced_tid(), cache_arg(&ctx)) else {
        return 0;
    };
    if window(cache).is_some_and(|w| w.closes_on_refill(tid))
        && REFILLS.insert(&tid, &cache, 0).is_err()
    {
        bump(Stat::MapFull);
    }
    0
}

/// The refill function's return: closes the window.
#[uretprobe]
pub fn on_refill_return(_ctx: RetProbeContext) -> u32 {
    bump(Stat::HitsRefillReturn);
    let Some(tid) = traced_tid() else { return 0 };
    // SAFETY: copied out at once.
    let Some(cache) = (unsafe { REFILLS.get(&tid).copied() }) else {
        return 0;
    };
    let _ = REFILLS.remove(&tid);
    if let Some(w) = window(cache).filter(|w| w.closes_on_refill(tid)) {
        let closed = w.closed(unsafe { bpf_ktime_get_ns() });
        store_window(cache, &closed);
        window_event(EventKind::WindowClose, cache, &closed, tid);
    }
    0
}

fn lookup_event(cache: u64, tid: u32, w: &Window, lookup_ns: u64, ret: Option<i64>) {
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

/// The cache's lookup function, `V lookup(Cache *c, K key)`, when its return is not probed:
/// a lookup entered while another thread's window is open is a race.
#[uprobe]
pub fn on_lookup(ctx: ProbeContext) -> u32 {
    bump(Stat::HitsLookupEntry);
    let (Some(tid), Some(cache)) = (traced_tid(), cache_arg(&ctx)) else {
        return 0;
    };
    if let Some(w) = window(cache).filter(|w| w.overlaps(tid, None)) {
        lookup_event(cache, tid, &w, unsafe { bpf_ktime_get_ns() }, None);
    }
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

/// CPython's `void _PyErr_SetKeyError(PyObject *key)`, called when `d[k]` misses: reports the
/// KeyError when another thread's window is open on that dict, with the key's bytes.
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
    let Some(mut entry) = EVENTS.reserve::<KeyErrorEvent>(0) else {
        bump(Stat::LostKeyError);
        return 0;
    };
    let key: u64 = ctx.arg(0).unwrap_or(0);
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at reserved ring-buffer memory of the event's size; every field is set
    // (failed reads leave zeros) before submit.
    unsafe {
        (*e).kind = EventKind::KeyError as u32;
        (*e).reader_tid = tid;
        (*e).dict = dict;
        (*e).raised_ns = bpf_ktime_get_ns();
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
    }
    entry.submit(wakeup_flags());
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
