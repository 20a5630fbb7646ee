//! Per-attachment configuration: what each probe does comes with its attachment (the attach
//! cookie indexes the `PROBES` array), not from load-time globals, so one loaded object can watch
//! several windows, in several files, at once.

/// `pt_regs` slots (in u64s, x86_64) of the six integer argument registers: rdi, rsi, rdx, rcx,
/// r8, r9.
pub const ARG_SLOTS: [u32; 6] = [14, 13, 12, 11, 9, 8];
/// `pt_regs` slots of the general-purpose registers (r15 at 0 to rdi at 14); a probe reads the
/// object from one of these.
pub const REG_SLOTS: u32 = 15;

/// One attachment's configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// The `pt_regs` slot of the register that holds the watched object at the probed
    /// instruction (an argument's at an entry, the callee-saved copy on a miss path).
    pub object_slot: u32,
    /// Which of the run's windows the probe belongs to: events and per-object state carry it.
    pub window: u32,
    /// At a miss-path probe: the lookup's miss value, reported as its return value.
    pub miss_value: i64,
}
