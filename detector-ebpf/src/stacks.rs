//! The stacks that go with the events reaching userspace: native registers and stack top, or
//! CPython frames.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, pt_regs},
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user_buf},
    maps::ring_buf::RingBufEntry,
};
use detector_common::{
    EventKind, NativeStack, ObjKey, PY_FRAMES_MAX, ProbeConfig, PyFrame, PyFrames, PyLayout,
    STACK_BYTES, STACK_CHUNK, StackMode, Stat, TSTATE_HOPS, Window, WriterAt,
};

use crate::{
    globals::{STACK_MODE, WAKEUP_BYTES, global},
    maps::{EVENTS, PY_LAYOUTS, READER_FRAMES, WRITERS},
    util::{bump, read_user, wakeup_flags, window},
};

/// One CPython interpreter as a probe of it sees it: where its file is loaded in the process
/// (the probed instruction's address less its address in the file) and, by the probe's window,
/// its layout.
#[derive(Clone, Copy)]
pub(crate) struct Interp {
    pub(crate) bias: u64,
    pub(crate) layout: &'static PyLayout,
}

impl Interp {
    pub(crate) fn at(regs: &pt_regs, cfg: &ProbeConfig) -> Option<Interp> {
        Some(Interp {
            bias: regs.rip.wrapping_sub(cfg.vaddr),
            layout: PY_LAYOUTS.get(cfg.window)?,
        })
    }
}

/// Where a native stack is unwound from.
struct StackTop {
    rip: u64,
    rsp: u64,
    rbp: u64,
}

/// Copies the registers and the top of the user stack into a reserved ring record, for userspace
/// to unwind with `.eh_frame`. Straight into the record: it is far larger than the BPF stack.
/// Not taken while the ring is over half full: a burst of 8 KiB stacks would otherwise crowd out
/// the small events the counts are made of.
fn copy_native_stack(
    top: &StackTop,
    tid: u32,
    ns: u64,
    flags: u32,
) -> Option<RingBufEntry<NativeStack>> {
    if EVENTS.query(BPF_RB_AVAIL_DATA as u64) >= global(&WAKEUP_BYTES) {
        bump(Stat::StacksShed);
        return None;
    }
    let Some(mut entry) = EVENTS.reserve::<NativeStack>(0) else {
        bump(Stat::LostNativeStack);
        return None;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at reserved ring memory of the record's size; every header field is set,
    // and `len` says how much of `stack` was written.
    unsafe {
        (*e).kind = EventKind::NativeStack as u32;
        (*e).tid = tid;
        (*e).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*e)._pad = 0;
        (*e).ns = ns;
        (*e).rip = top.rip;
        (*e).rsp = top.rsp;
        (*e).rbp = top.rbp;
        (*e).flags = flags;
        let stack = (*e).stack.as_mut_ptr();
        let mut len = 0u32;
        // One read when the whole copy is mapped (the common case); else chunk by chunk: a read
        // that crosses the top of the stack fails whole, so stop at the first chunk that cannot
        // be read and keep those below it.
        let whole = core::slice::from_raw_parts_mut(stack, STACK_BYTES);
        let chunks = if bpf_probe_read_user_buf(top.rsp as *const u8, whole).is_ok() {
            len = STACK_BYTES as u32;
            0
        } else {
            STACK_BYTES / STACK_CHUNK
        };
        for i in 0..chunks {
            let off = i * STACK_CHUNK;
            let dst = core::slice::from_raw_parts_mut(stack.add(off), STACK_CHUNK);
            if bpf_probe_read_user_buf(top.rsp.wrapping_add(off as u64) as *const u8, dst).is_err()
            {
                break;
            }
            len += STACK_CHUNK as u32;
        }
        (*e).len = len;
    }
    Some(entry)
}

/// Sends the calling thread's registers and the top of its user stack.
pub(crate) fn native_stack(regs: &pt_regs, tid: u32, ns: u64, flags: u32) {
    let top = StackTop {
        rip: regs.rip,
        rsp: regs.rsp,
        rbp: regs.rbp,
    };
    if let Some(entry) = copy_native_stack(&top, tid, ns, flags) {
        entry.submit(wakeup_flags());
    }
}

/// The writer opening window `w` on `cache` at `regs` (`racewatch watch`): remembered, for the
/// first reader that lands in the window to copy its stack (see [`writer_stack`]).
fn remember_writer(regs: &pt_regs, cache: &ObjKey, w: &Window) {
    let at = WriterAt {
        open_ns: w.open_ns,
        rip: regs.rip,
        rsp: regs.rsp,
        rbp: regs.rbp,
        return_address: read_user::<u64>(regs.rsp).unwrap_or(0),
    };
    if WRITERS.insert(cache, &at, 0).is_err() {
        bump(Stat::MapFull);
    }
}

/// Sends the stack the writer of the open window `w` on `cache` had when it opened it, once per
/// window: called by a reader landing in it, before the reader's own events, so userspace has
/// the writer's stack by the time it reads the lookup. Copied from the writer's stack as it is
/// now (threads share memory), the return address at its top put back; discarded if the writer
/// left the window while it was copied, as the frames read may then be gone.
pub(crate) fn writer_stack(cache: &ObjKey, w: &Window) {
    if w.open == 0 {
        return;
    }
    // SAFETY: copied out at once.
    let Some(at) = (unsafe { WRITERS.get(cache).copied() }) else {
        return;
    };
    // Of the readers that find it, the one whose delete succeeds sends it.
    if at.open_ns != w.open_ns || WRITERS.remove(cache).is_err() {
        return;
    }
    let top = StackTop {
        rip: at.rip,
        rsp: at.rsp,
        rbp: at.rbp,
    };
    let Some(mut entry) = copy_native_stack(&top, w.writer_tid, w.open_ns, 0) else {
        return;
    };
    // SAFETY: the record's first word was written when `len` covers it.
    unsafe {
        let e = entry.as_mut_ptr();
        if (*e).len >= 8 {
            (*e).stack
                .as_mut_ptr()
                .cast::<u64>()
                .write_unaligned(at.return_address);
        }
    }
    if window(cache).is_some_and(|now| now.open != 0 && now.open_ns == w.open_ns) {
        entry.submit(wakeup_flags());
    } else {
        entry.discard(0);
        bump(Stat::WriterStacksUnread);
    }
}

/// The thread state of the thread in dict code: it holds the GIL, so it is the one the layout's
/// hops reach from `_PyRuntime`.
// Inlined, as the functions below: the interpreter is two words, and a BPF call takes five.
#[inline(always)]
pub(crate) fn py_tstate(py: Interp) -> Option<u64> {
    let l = py.layout;
    let mut at = py.bias.wrapping_add(l.runtime);
    for i in 0..TSTATE_HOPS {
        if i as u64 >= l.tstate_hops {
            break;
        }
        at = read_user::<u64>(at.wrapping_add(l.tstate[i]))?;
    }
    Some(at)
}

/// The innermost Python frame of the thread in dict code.
#[inline(always)]
pub(crate) fn py_current_frame(py: Interp) -> Option<u64> {
    let l = py.layout;
    let mut at = py_tstate(py)?;
    for i in 0..2 {
        if i as u64 >= l.frame_hops {
            break;
        }
        at = read_user::<u64>(at.wrapping_add(l.frame[i]))?;
    }
    Some(at)
}

/// Mixes one word into an FNV-1a style hash of a thread's frames.
fn mix(hash: u64, word: u64) -> u64 {
    (hash ^ word).wrapping_mul(0x0000_0100_0000_01b3)
}

/// Copies the calling thread's CPython frames (code object and current instruction, innermost
/// first). With `window_open_ns` (not 0), frames the thread already sent in that window are not
/// sent again.
#[inline(always)]
fn py_frames(tid: u32, ns: u64, py: Interp, window: u32, window_open_ns: u64) {
    let Some(mut entry) = EVENTS.reserve::<PyFrames>(0) else {
        bump(Stat::LostPyFrames);
        return;
    };
    let e = entry.as_mut_ptr();
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    // SAFETY: `e` points at reserved ring memory of the record's size; the header is set and
    // `depth` says how many frames were written.
    unsafe {
        (*e).kind = EventKind::PyFrames as u32;
        (*e).tid = tid;
        (*e).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*e).window = window;
        (*e).ns = ns;
        (*e).truncated = 0;
        let l = py.layout;
        let mut depth = 0u32;
        let mut frame = py_current_frame(py).unwrap_or(0);
        for i in 0..PY_FRAMES_MAX {
            if frame == 0 {
                break;
            }
            // One read at a time: LLVM turns a pair of reads into a select the verifier refuses.
            let Some(code) = read_user::<u64>(frame.wrapping_add(l.f_code)) else {
                break;
            };
            let Some(prev_instr) = read_user::<u64>(frame.wrapping_add(l.instr)) else {
                break;
            };
            let code = code & !l.tag_bits;
            (*e).frames[i] = PyFrame { code, prev_instr };
            hash = mix(mix(hash, code), prev_instr);
            depth += 1;
            frame = read_user::<u64>(frame.wrapping_add(l.previous)).unwrap_or(0);
        }
        (*e).depth = depth;
        (*e).truncated = (frame != 0 && depth as usize == PY_FRAMES_MAX) as u32;
        hash = mix(hash, u64::from(depth));
    }
    if window_open_ns != 0 {
        let sent = [window_open_ns, hash];
        // SAFETY: copied out at once.
        if unsafe { READER_FRAMES.get(&tid).copied() } == Some(sent) {
            entry.discard(0);
            return;
        }
        let _ = READER_FRAMES.insert(&tid, &sent, 0);
    }
    entry.submit(wakeup_flags());
}

/// Sends the stack the load-time mode asks for, just before the event (`tid`, `ns`) it belongs to,
/// for a probe configured by `cfg` (CPython frames are found with its window's interpreter).
/// With `window_open_ns` (not 0), CPython frames the thread already sent in that window are not
/// sent again.
pub(crate) fn stack(regs: &pt_regs, tid: u32, ns: u64, cfg: &ProbeConfig, window_open_ns: u64) {
    match global(&STACK_MODE) {
        m if m == StackMode::Native as u32 => native_stack(regs, tid, ns, 0),
        m if m == StackMode::Python as u32 => {
            if let Some(py) = Interp::at(regs, cfg) {
                py_frames(tid, ns, py, cfg.window, window_open_ns);
            }
        }
        _ => {}
    }
}

/// The writer's stack for the window `w` it opens on `cache`: CPython frames now (a few reads,
/// while the writer's frames are the current ones), native registers remembered for the first
/// reader that lands in the window ([`writer_stack`]).
pub(crate) fn writer_opened(regs: &pt_regs, cache: &ObjKey, w: &Window, cfg: &ProbeConfig) {
    if global(&STACK_MODE) == StackMode::Native as u32 {
        remember_writer(regs, cache, w);
    } else {
        stack(regs, w.writer_tid, w.open_ns, cfg, 0);
    }
}
