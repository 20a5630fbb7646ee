//! The watched processes: a process forked by a watched one is watched from its first
//! instruction (a uprobe fires in every process that maps its file, forked children included; the
//! kernel keeps the events of the watched ones), and an ended one is forgotten, so a later process
//! that reuses its pid is not watched by mistake.

use aya_ebpf::{
    cty::c_void,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use detector_common::{EventKind, ProcessEvent, Stat};

use crate::{
    globals::{TASK_TGID_OFFSET, WATCH_ALL, global},
    maps::WATCHED,
    util::{bump, comm, send},
};

fn process_event(kind: EventKind, tgid: u32, parent: u32) {
    send(
        kind,
        ProcessEvent {
            kind: kind as u32,
            tgid,
            parent,
            _pad: 0,
            ns: unsafe { bpf_ktime_get_ns() },
            comm: comm(),
        },
    );
}

/// The kernel's `sched_process_fork(struct task_struct *parent, struct task_struct *child)`, in
/// the parent: a new process (not a new thread) of a watched one is watched too.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn on_fork(ctx: RawTracePointContext) -> i32 {
    let offset = global(&TASK_TGID_OFFSET);
    if offset == 0 || global(&WATCH_ALL) != 0 {
        return 0;
    }
    let parent = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: only presence is tested.
    if unsafe { WATCHED.get(&parent) }.is_none() {
        return 0;
    }
    let child: *const c_void = ctx.arg(1);
    // SAFETY: the helper checks the read; `child` is the task the tracepoint hands over.
    let Ok(tgid) = (unsafe {
        bpf_probe_read_kernel((child as *const u8).wrapping_add(offset as usize) as *const u32)
    }) else {
        return 0;
    };
    // A new thread shares its parent's tgid: nothing to add.
    if tgid == parent {
        return 0;
    }
    if WATCHED.insert(&tgid, &1, 0).is_err() {
        bump(Stat::ForksUnwatched);
        return 0;
    }
    bump(Stat::Forks);
    process_event(EventKind::Fork, tgid, parent);
    0
}

/// The kernel's `sched_process_exit(struct task_struct *p)`, in the exiting thread: when a
/// watched process's main thread exits, the process is forgotten.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn on_exit(_ctx: RawTracePointContext) -> i32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if pid_tgid as u32 != tgid {
        return 0;
    }
    if WATCHED.remove(&tgid).is_ok() {
        process_event(EventKind::Exit, tgid, 0);
    }
    0
}
