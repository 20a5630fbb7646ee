//! The load-time statics the loader rewrites before load, and the one way to read them.

use detector_common::{EVENTS_BYTES_DEFAULT, StackMode};

/// 1: every process that hits a probe is watched (system-wide runs); 0: those in `WATCHED`.
#[unsafe(no_mangle)]
pub(crate) static WATCH_ALL: u32 = 0;
/// Offset of `tgid` in `struct task_struct`, read from the kernel's BTF (0: forks are not
/// followed).
#[unsafe(no_mangle)]
pub(crate) static TASK_TGID_OFFSET: u64 = 0;
/// Ring fill above which a write wakes the collector; below it the collector polls, which spares
/// the target the wakeup's cost (~6 µs an event on this kind of machine).
#[unsafe(no_mangle)]
pub(crate) static WAKEUP_BYTES: u64 = (EVENTS_BYTES_DEFAULT / 2) as u64;
/// How long to hold a writer inside each window (0: never; set at load time).
#[unsafe(no_mangle)]
pub(crate) static PROVOKE_NS: u64 = 0;
/// When the provocation budget starts accruing (set at load time).
#[unsafe(no_mangle)]
pub(crate) static PROVOKE_START_NS: u64 = 0;
/// CPUs that share the provocation budget (set at load time).
#[unsafe(no_mangle)]
pub(crate) static PROVOKE_CPUS: u32 = 1;
/// CPython `--provoke`: the file address of the interpreter's `gil_drop_request` (0: native
/// `--provoke`, which holds at the refill).
#[unsafe(no_mangle)]
pub(crate) static DROP_REQUEST_VADDR: u64 = 0;
/// CPython 3.13+ `--provoke`: the offset of `eval_breaker` in the writer's thread state, where a
/// waiter asks for the GIL (0: the static flag above).
#[unsafe(no_mangle)]
pub(crate) static DROP_REQUEST_IN_THREAD: u64 = 0;
/// The bits of the drop request's word that ask for the GIL (3.13+: bit 0 of eval_breaker).
#[unsafe(no_mangle)]
pub(crate) static DROP_REQUEST_MASK: u32 = u32::MAX;
/// CPython `--provoke`: the file address of the main interpreter's switch interval (µs).
#[unsafe(no_mangle)]
pub(crate) static SWITCH_INTERVAL_VADDR: u64 = 0;

/// Which stacks go with the events that reach userspace ([`StackMode`], set at load time).
#[unsafe(no_mangle)]
pub(crate) static STACK_MODE: u32 = StackMode::None as u32;
pub(crate) fn global<T: Copy>(v: &'static T) -> T {
    // SAFETY: the loader rewrites these before load; volatile keeps the compiler from folding them.
    unsafe { core::ptr::read_volatile(v) }
}
