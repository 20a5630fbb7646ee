//! Per-attachment configuration: what each probe does comes with its attachment (the attach
//! cookie indexes the `PROBES` array), not from load-time globals, so one loaded object can watch
//! several windows, in several files, at once.

/// `pt_regs` slots (in u64s, x86_64) of the six integer argument registers: rdi, rsi, rdx, rcx,
/// r8, r9.
pub const ARG_SLOTS: [u32; 6] = [14, 13, 12, 11, 9, 8];
/// `pt_regs` slots of the general-purpose registers (r15 at 0 to rdi at 14, then orig_ax, ip,
/// cs, flags, and sp at 19); a probe reads the object from, or through, one of these.
pub const REG_SLOTS: u32 = 20;

/// [`ProbeConfig::object_kind`]: the object is the register's value.
pub const OBJECT_IN_REGISTER: u32 = 0;
/// The object is the 8 bytes at the register's value plus `object_offset` (a stack slot).
pub const OBJECT_IN_MEMORY: u32 = 1;
/// The object is a global at file address `object_offset`, wherever the file is loaded (a copy
/// the compiler made of a function for one constant object).
pub const OBJECT_STATIC: u32 = 2;

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
    /// The probed instruction's address in the file: the instruction pointer less it is where
    /// the file is loaded, which places the file's data (CPython's `_PyRuntime`, its types).
    pub vaddr: u64,
    /// How `object_slot` gives the object: [`OBJECT_IN_REGISTER`], [`OBJECT_IN_MEMORY`] or
    /// [`OBJECT_STATIC`].
    pub object_kind: u32,
    /// At a miss-path probe every lookup passes (where its result is known): how many low bytes
    /// of the result to compare with `miss_value` (0: every hit is a miss).
    pub value_bytes: u32,
    /// The stack slot's offset, or the global's file address (see `object_kind`).
    pub object_offset: i64,
    /// Where the result is, as `object_slot` and `object_kind` say for the object:
    /// [`OBJECT_IN_REGISTER`] or [`OBJECT_IN_MEMORY`] at `value_offset`.
    pub value_slot: u32,
    pub value_kind: u32,
    pub value_offset: i64,
}
