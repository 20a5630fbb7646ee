//! What one probe hit costs a target on this machine, measured at the end of each run on racewatch's own
//! functions, so that every run can say how much racewatch itself added to the target.
//!
//! The kernel's cost of a uprobe depends on the probed instruction (emulated or single-stepped)
//! and on whether the return is probed too; the eBPF program's own work is small beside it.
use std::{hint::black_box, time::Duration};

use aya::{
    EbpfLoader,
    maps::PerCpuArray,
    programs::{UProbe, uprobe::UProbeScope},
};
use detector_common::{STATS_MAP, Stat, globals};
use serde::Serialize;

use crate::{loader, output::ProbeHits};

// Functions to probe, one per kind of probed instruction. They take and return a value so the
// calls cannot be folded away.
std::arch::global_asm!(
    ".text",
    ".globl racewatch_calibrate_push",
    ".type racewatch_calibrate_push,@function",
    "racewatch_calibrate_push:",
    "push %rbp",
    "mov %rdi,%rax",
    "pop %rbp",
    "ret",
    ".size racewatch_calibrate_push, .-racewatch_calibrate_push",
    ".globl racewatch_calibrate_mov",
    ".type racewatch_calibrate_mov,@function",
    "racewatch_calibrate_mov:",
    "mov %rdi,%rax",
    "ret",
    ".size racewatch_calibrate_mov, .-racewatch_calibrate_mov",
    options(att_syntax)
);

unsafe extern "C" {
    fn racewatch_calibrate_push(x: u64) -> u64;
    fn racewatch_calibrate_mov(x: u64) -> u64;
}

/// Nanoseconds one probe hit adds, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Costs {
    /// An entry probe on an instruction the kernel emulates (push, nop, direct branch).
    pub emulated_ns: f64,
    /// An entry probe on an instruction the kernel single-steps.
    pub single_stepped_ns: f64,
    /// What probing the return adds to the entry's trap.
    pub return_ns: f64,
}

/// How each probe of a run traps: true where the probed instruction is emulated.
#[derive(Clone, Copy, Debug, Default)]
pub struct Traps {
    pub clear: bool,
    pub refill: bool,
    /// The refill's end is probed at its exits (emulated), not through a return probe.
    pub refill_exits: bool,
    pub lookup_entry: bool,
    pub lookup_miss: bool,
    pub lookup_sample: bool,
    pub keyerror: bool,
}

/// The time racewatch's probes added to the target: each probe's hits times its cost.
pub fn added_ns(costs: &Costs, traps: &Traps, hits: &ProbeHits) -> f64 {
    let trap = |emulated: bool| {
        if emulated {
            costs.emulated_ns
        } else {
            costs.single_stepped_ns
        }
    };
    // A refill's entry probe and its return probe share one breakpoint at the entry.
    let refill_end = if traps.refill_exits {
        costs.emulated_ns
    } else {
        costs.return_ns
    };
    hits.clear as f64 * trap(traps.clear)
        + hits.refill_entry as f64 * trap(traps.refill)
        + hits.refill_return as f64 * refill_end
        + hits.lookup_entry as f64 * trap(traps.lookup_entry)
        + hits.lookup_return as f64 * costs.return_ns
        + hits.lookup_miss as f64 * trap(traps.lookup_miss)
        + hits.lookup_sample as f64 * trap(traps.lookup_sample)
        + hits.keyerror as f64 * trap(traps.keyerror)
}

#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    #[error("cannot locate racewatch's own calibration functions: {0}")]
    Symbols(String),
    #[error("cannot load the calibration probe: {0}")]
    Load(String),
    #[error("the calibration probe fired {fired} times for {calls} calls")]
    Miscount { fired: u64, calls: u64 },
}

/// This thread's CPU time: the kernel's uprobe work runs in the probed thread and counts, the
/// time other processes take the CPU away does not.
fn thread_cpu() -> Duration {
    // SAFETY: clock_gettime fills the struct it is given.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time per call of `f` over `calls` calls.
fn per_call(f: unsafe extern "C" fn(u64) -> u64, calls: u64) -> Duration {
    let start = thread_cpu();
    for i in 0..calls {
        // SAFETY: the calibration functions only copy their argument.
        black_box(unsafe { f(black_box(i)) });
    }
    (thread_cpu() - start) / calls as u32
}

/// Median over three batches of the time a call takes, the batches sized to ~5 ms.
fn median_per_call(f: unsafe extern "C" fn(u64) -> u64) -> (f64, u64) {
    let probe = per_call(f, 100).as_nanos().max(1) as u64;
    let calls = (5_000_000 / probe).clamp(200, 1_000_000);
    let mut t: Vec<f64> = (0..3)
        .map(|_| per_call(f, calls).as_nanos() as f64)
        .collect();
    t.sort_by(f64::total_cmp);
    (t[1], calls * 3 + 100)
}

/// Where the code at `addr` in this process lies in its file, from /proc/self/maps (cheaper than
/// reading racewatch's own symbol table, which debug builds make large).
fn file_offset(addr: u64) -> Result<u64, CalibrationError> {
    let maps = std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| CalibrationError::Symbols(e.to_string()))?;
    maps.lines()
        .find_map(|line| {
            let mut f = line.split_whitespace();
            let (start, end) = f.next()?.split_once('-')?;
            let (start, end) = (
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
            );
            let offset = u64::from_str_radix(f.nth(1)?, 16).ok()?;
            (start <= addr && addr < end).then_some(addr - start + offset)
        })
        .ok_or_else(|| CalibrationError::Symbols(format!("{addr:#x} is in no mapping")))
}

/// Measures the three costs with racewatch's own programs attached to its own functions.
pub fn calibrate() -> Result<Costs, CalibrationError> {
    let exe = std::env::current_exe().map_err(|e| CalibrationError::Symbols(e.to_string()))?;
    let (push_at, mov_at) = (
        file_offset(racewatch_calibrate_push as *const () as u64)?,
        file_offset(racewatch_calibrate_mov as *const () as u64)?,
    );
    let load = |e: &dyn std::fmt::Display| CalibrationError::Load(e.to_string());
    let me = std::process::id();
    let mut ebpf = EbpfLoader::new()
        .override_global(globals::TARGET_TGID, &me, true)
        .load(loader::OBJECT)
        .map_err(|e| load(&e))?;
    for name in ["on_lookup", "on_refill_return"] {
        let prog: &mut UProbe = ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| load(&name))?;
        prog.load().map_err(|e| load(&e))?;
    }
    let scope = UProbeScope::OneProcess(std::num::NonZeroU32::new(me).ok_or_else(|| load(&0))?);
    let (base, _) = median_per_call(racewatch_calibrate_push);
    let mut timed = |program: &str, at: u64, f: unsafe extern "C" fn(u64) -> u64| {
        let prog: &mut UProbe = ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| load(&program))?;
        let link = prog.attach(at, &exe, scope).map_err(|e| load(&e))?;
        let (t, calls) = median_per_call(f);
        prog.detach(link).map_err(|e| load(&e))?;
        Ok::<_, CalibrationError>((t - base, calls))
    };
    let (emulated, emulated_calls) = timed("on_lookup", push_at, racewatch_calibrate_push)?;
    let (stepped, stepped_calls) = timed("on_lookup", mov_at, racewatch_calibrate_mov)?;
    let (with_return, return_calls) = timed("on_refill_return", push_at, racewatch_calibrate_push)?;
    let stats: PerCpuArray<_, u64> = ebpf
        .map(STATS_MAP)
        .ok_or_else(|| load(&STATS_MAP))?
        .try_into()
        .map_err(|e| load(&e))?;
    let fired = |stat: Stat| {
        stats
            .get(&(stat as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum::<u64>())
            .map_err(|e| load(&e))
    };
    for (stat, calls) in [
        (Stat::HitsLookupEntry, emulated_calls + stepped_calls),
        (Stat::HitsRefillReturn, return_calls),
    ] {
        let fired = fired(stat)?;
        if fired != calls {
            return Err(CalibrationError::Miscount { fired, calls });
        }
    }
    Ok(Costs {
        emulated_ns: emulated.max(0.0),
        single_stepped_ns: stepped.max(0.0),
        return_ns: (with_return - emulated).max(0.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_time_is_hits_times_cost_by_kind() {
        let costs = Costs {
            emulated_ns: 1000.0,
            single_stepped_ns: 10_000.0,
            return_ns: 2000.0,
        };
        let traps = Traps {
            clear: true,
            refill: false,
            refill_exits: false,
            lookup_entry: true,
            lookup_miss: true,
            lookup_sample: true,
            keyerror: true,
        };
        let hits = ProbeHits {
            clear: 10,
            refill_entry: 10,
            refill_return: 10,
            lookup_miss: 5,
            ..ProbeHits::default()
        };
        // 10 emulated clears, 10 single-stepped refill entries, 10 returns, 5 emulated misses.
        assert_eq!(
            added_ns(&costs, &traps, &hits),
            10_000.0 + 100_000.0 + 20_000.0 + 5_000.0
        );
    }

    #[test]
    fn calibration_functions_compute() {
        // SAFETY: they only copy their argument.
        unsafe {
            assert_eq!(racewatch_calibrate_push(7), 7);
            assert_eq!(racewatch_calibrate_mov(9), 9);
        }
    }
}
