//! The stacks that go with the events reaching userspace: native registers and stack top, or
//! CPython frames.

use aya_ebpf::{
    bindings::pt_regs,
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user_buf},
};
use detector_common::{
    EventKind, NativeStack, PY_FRAMES_MAX, PyFrame, PyFrames, PyLayout, STACK_BYTES, STACK_CHUNK,
    StackMode, Stat,
};

use crate::{
    globals::{PY_LAYOUT, STACK_MODE, global},
    maps::EVENTS,
    util::{bump, read_user, wakeup_flags},
};

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
        (*e).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*e)._pad = 0;
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
        (*e).tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*e)._pad = 0;
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
pub(crate) fn stack(
    regs: &pt_regs,
    tid: u32,
    ns: u64,
    flags: u32,
    tstate_from: impl Fn(&PyLayout) -> i64,
) {
    match global(&STACK_MODE) {
        m if m == StackMode::Native as u32 => native_stack(regs, tid, ns, flags),
        m if m == StackMode::Python as u32 => {
            py_frames(regs, tid, ns, tstate_from(&global(&PY_LAYOUT)))
        }
        _ => {}
    }
}
