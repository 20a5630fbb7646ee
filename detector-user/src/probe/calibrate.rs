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
use detector_common::{ARG_SLOTS, ObjKey, ProbeConfig, STATS_MAP, Stat, WINDOWS_MAP, Window};
use serde::Serialize;

use crate::{
    engine::cost::Costs,
    probe::{code, loader},
};

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
    ".globl racewatch_calibrate_nop",
    ".type racewatch_calibrate_nop,@function",
    "racewatch_calibrate_nop:",
    "nop",
    "mov %rdi,%rax",
    "ret",
    ".size racewatch_calibrate_nop, .-racewatch_calibrate_nop",
    ".globl racewatch_calibrate_nop5",
    ".type racewatch_calibrate_nop5,@function",
    "racewatch_calibrate_nop5:",
    ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
    "mov %rdi,%rax",
    "ret",
    ".size racewatch_calibrate_nop5, .-racewatch_calibrate_nop5",
    ".globl racewatch_calibrate_jmp",
    ".type racewatch_calibrate_jmp,@function",
    "racewatch_calibrate_jmp:",
    "jmp 2f",
    "2: mov %rdi,%rax",
    "ret",
    ".size racewatch_calibrate_jmp, .-racewatch_calibrate_jmp",
    ".globl racewatch_calibrate_call",
    ".type racewatch_calibrate_call,@function",
    "racewatch_calibrate_call:",
    "call 2f",
    "2: add $8,%rsp",
    "mov %rdi,%rax",
    "ret",
    ".size racewatch_calibrate_call, .-racewatch_calibrate_call",
    ".globl racewatch_calibrate_endbr64",
    ".type racewatch_calibrate_endbr64,@function",
    "racewatch_calibrate_endbr64:",
    "endbr64",
    "mov %rdi,%rax",
    "ret",
    ".size racewatch_calibrate_endbr64, .-racewatch_calibrate_endbr64",
    ".globl racewatch_calibrate_sub",
    ".type racewatch_calibrate_sub,@function",
    "racewatch_calibrate_sub:",
    "sub $8,%rsp",
    "add $8,%rsp",
    "mov %rdi,%rax",
    "ret",
    ".size racewatch_calibrate_sub, .-racewatch_calibrate_sub",
    // Two emulated jumps in a row: a lock-guarded cache's unlock and lock probes with nothing
    // between them, so the span they measure is racewatch's own (see `lock_edges`).
    ".globl racewatch_calibrate_edges",
    ".type racewatch_calibrate_edges,@function",
    "racewatch_calibrate_edges:",
    "jmp 2f",
    "2: jmp 3f",
    "3: mov %rdi,%rax",
    "ret",
    ".size racewatch_calibrate_edges, .-racewatch_calibrate_edges",
    options(att_syntax)
);

unsafe extern "C" {
    fn racewatch_calibrate_push(x: u64) -> u64;
    fn racewatch_calibrate_mov(x: u64) -> u64;
    fn racewatch_calibrate_nop(x: u64) -> u64;
    fn racewatch_calibrate_nop5(x: u64) -> u64;
    fn racewatch_calibrate_jmp(x: u64) -> u64;
    fn racewatch_calibrate_call(x: u64) -> u64;
    fn racewatch_calibrate_endbr64(x: u64) -> u64;
    fn racewatch_calibrate_sub(x: u64) -> u64;
    fn racewatch_calibrate_edges(x: u64) -> u64;
}

type Target = unsafe extern "C" fn(u64) -> u64;

/// Every calibration function, each opening with a different instruction.
const FUNCTIONS: [Target; 8] = [
    racewatch_calibrate_push,
    racewatch_calibrate_nop,
    racewatch_calibrate_nop5,
    racewatch_calibrate_jmp,
    racewatch_calibrate_call,
    racewatch_calibrate_endbr64,
    racewatch_calibrate_sub,
    racewatch_calibrate_mov,
];

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

/// Median over `batches` batches of the CPU time a call takes, each batch ~`batch_ns` long.
fn median_per_call(f: Target, batches: usize, batch_ns: u64) -> (f64, u64) {
    let probe = per_call(f, 100).as_nanos().max(1) as u64;
    let calls = (batch_ns / probe).clamp(200, 10_000_000);
    let mut t: Vec<f64> = (0..batches)
        .map(|_| per_call(f, calls).as_nanos() as f64)
        .collect();
    t.sort_by(f64::total_cmp);
    (t[batches / 2], calls * batches as u64 + 100)
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

/// racewatch's own programs loaded for this process, to time them on its own functions.
struct Bench {
    ebpf: aya::Ebpf,
    /// Batches per measurement and each batch's length.
    batches: usize,
    batch_ns: u64,
    exe: std::path::PathBuf,
    scope: UProbeScope,
    /// Time of an unprobed call.
    base: f64,
}

/// Where the probe goes: entry probes trap at the function's first instruction, return probes
/// at its entry and its return.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Entry,
    Return,
}

impl Bench {
    fn new(batches: usize, batch_ns: u64) -> Result<Bench, CalibrationError> {
        let load = |e: &dyn std::fmt::Display| CalibrationError::Load(e.to_string());
        let exe = std::env::current_exe().map_err(|e| CalibrationError::Symbols(e.to_string()))?;
        let me = std::process::id();
        let mut ebpf = EbpfLoader::new()
            .load(loader::OBJECT)
            .map_err(|e| load(&e))?;
        // Watched, with the cache in the first argument: each hit takes a real run's path.
        loader::watch_in(&mut ebpf, me).map_err(|e| load(&e))?;
        loader::configure_in(
            &mut ebpf,
            0,
            &ProbeConfig {
                object_slot: ARG_SLOTS[0],
                ..ProbeConfig::default()
            },
        )
        .map_err(|e| load(&e))?;
        // The return probe's program is the lookup's: on a call it did not see enter, it runs as
        // briefly as the refill's, and the kernel verifies it in a millisecond, not the half
        // second the refill's window close takes.
        for name in ["on_lookup", "on_lookup_return"] {
            let prog: &mut UProbe = ebpf
                .program_mut(name)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| load(&name))?;
            prog.load().map_err(|e| load(&e))?;
        }
        let scope = UProbeScope::OneProcess(std::num::NonZeroU32::new(me).ok_or_else(|| load(&0))?);
        let (base, _) = median_per_call(racewatch_calibrate_push, batches, batch_ns);
        Ok(Bench {
            ebpf,
            batches,
            batch_ns,
            exe,
            scope,
            base,
        })
    }

    /// What one hit of a `kind` probe on `f` adds to a call, checked against the hit count.
    fn cost(&mut self, kind: Kind, f: Target) -> Result<f64, CalibrationError> {
        let load = |e: &dyn std::fmt::Display| CalibrationError::Load(e.to_string());
        let (program, stat) = match kind {
            Kind::Entry => ("on_lookup", Stat::HitsLookupEntry),
            Kind::Return => ("on_lookup_return", Stat::HitsLookupReturn),
        };
        let at = file_offset(f as *const () as u64)?;
        let before = self.fired(stat)?;
        let prog: &mut UProbe = self
            .ebpf
            .program_mut(program)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| load(&program))?;
        let link = prog
            .attach(at, &self.exe, self.scope)
            .map_err(|e| load(&e))?;
        let (t, calls) = median_per_call(f, self.batches, self.batch_ns);
        prog.detach(link).map_err(|e| load(&e))?;
        let fired = self.fired(stat)? - before;
        if fired != calls {
            return Err(CalibrationError::Miscount { fired, calls });
        }
        Ok((t - self.base).max(0.0))
    }

    /// The span a lock-guarded cache's unlock and lock probes measure with no code between
    /// them: the tail of the first trap and the head of the second, which every span measured
    /// in a target holds too. The median over the batches of each batch's mean.
    fn lock_edges(&mut self) -> Result<f64, CalibrationError> {
        let load = |e: &dyn std::fmt::Display| CalibrationError::Load(e.to_string());
        let f = racewatch_calibrate_edges as Target;
        let at = file_offset(f as *const () as u64)?;
        let mut links = Vec::new();
        // `jmp rel8` is two bytes: the second probe is on the second jump.
        for (program, offset) in [("on_clear_unlock", 0), ("on_refill_locked", 2)] {
            let prog: &mut UProbe = self
                .ebpf
                .program_mut(program)
                .and_then(|p| p.try_into().ok())
                .ok_or_else(|| load(&program))?;
            prog.load().map_err(|e| load(&e))?;
            let link = prog
                .attach(at + offset, &self.exe, self.scope)
                .map_err(|e| load(&e))?;
            links.push((program, link));
        }
        let mut windows: aya::maps::HashMap<_, ObjKey, Window> = self
            .ebpf
            .map_mut(WINDOWS_MAP)
            .ok_or_else(|| load(&WINDOWS_MAP))?
            .try_into()
            .map_err(|e| load(&e))?;
        // A window this thread has open on a made-up cache, the calls' argument.
        let cache = ObjKey {
            object: 0x5eed,
            tgid: std::process::id(),
            window: 0,
        };
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let open = Window::on_clear(None, tid, 1).ok_or_else(|| load(&"no window"))?;
        const CALLS: u64 = 2_000;
        let mut means = Vec::new();
        for _ in 0..self.batches {
            windows.insert(cache, open, 0).map_err(|e| load(&e))?;
            for _ in 0..CALLS {
                // SAFETY: the calibration functions only copy their argument.
                black_box(unsafe { f(black_box(cache.object)) });
            }
            let w = windows.get(&cache, 0).map_err(|e| load(&e))?;
            if u64::from(w.reach_pairs) != CALLS {
                return Err(CalibrationError::Miscount {
                    fired: u64::from(w.reach_pairs),
                    calls: CALLS,
                });
            }
            means.push(w.reach_ns as f64 / CALLS as f64);
        }
        let _ = windows.remove(&cache);
        for (program, link) in links {
            if let Some(prog) = self
                .ebpf
                .program_mut(program)
                .and_then(|p| <&mut UProbe>::try_from(p).ok())
            {
                let _ = prog.detach(link);
            }
        }
        means.sort_by(f64::total_cmp);
        Ok(means[means.len() / 2])
    }

    fn fired(&self, stat: Stat) -> Result<u64, CalibrationError> {
        let load = |e: &dyn std::fmt::Display| CalibrationError::Load(e.to_string());
        let stats: PerCpuArray<_, u64> = self
            .ebpf
            .map(STATS_MAP)
            .ok_or_else(|| load(&STATS_MAP))?
            .try_into()
            .map_err(|e| load(&e))?;
        stats
            .get(&(stat as u32), 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .map_err(|e| load(&e))
    }
}

/// Measures the costs a run's estimate needs; what the lock edges add to a lock span only where
/// the run probes a cache's lock (`lock_edges`), 0 otherwise.
pub fn calibrate(lock_edges: bool) -> Result<Costs, CalibrationError> {
    // ~50 ms in all: the run's end waits for it.
    let mut bench = Bench::new(3, 4_000_000)?;
    let emulated = bench.cost(Kind::Entry, racewatch_calibrate_push)?;
    let stepped = bench.cost(Kind::Entry, racewatch_calibrate_mov)?;
    let with_return = bench.cost(Kind::Return, racewatch_calibrate_push)?;
    Ok(Costs {
        emulated_ns: emulated,
        single_stepped_ns: stepped,
        return_ns: (with_return - emulated).max(0.0),
        lock_edges_ns: if lock_edges { bench.lock_edges()? } else { 0.0 },
    })
}

/// One row of `racewatch calibrate`: what a hit costs by probed instruction and probe kind.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub instruction: String,
    pub probe: Kind,
    /// Whether the kernel emulates the instruction (racewatch's placement rule).
    pub emulated: bool,
    pub ns_per_hit: f64,
}

/// The cost of a hit for every calibration function's first instruction, entry probes, then
/// return probes on the push and mov functions. Medians of seven 20 ms batches each.
pub fn table() -> Result<(f64, Vec<Row>), CalibrationError> {
    let mut bench = Bench::new(7, 20_000_000)?;
    let mut rows = Vec::new();
    let returns = [racewatch_calibrate_push as Target, racewatch_calibrate_mov];
    let probes = FUNCTIONS
        .iter()
        .map(|f| (Kind::Entry, *f))
        .chain(returns.iter().map(|f| (Kind::Return, *f)));
    for (kind, f) in probes {
        // SAFETY: the calibration functions sit in racewatch's mapped .text, followed by more of
        // it: their first 8 bytes are readable.
        let code = unsafe { std::slice::from_raw_parts(f as *const u8, 8) };
        let (instruction, emulated) = code::describe(code);
        rows.push(Row {
            instruction,
            probe: kind,
            emulated,
            ns_per_hit: bench.cost(kind, f)?,
        });
    }
    Ok((bench.base, rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calibration_functions_compute() {
        // SAFETY: they only copy their argument.
        unsafe {
            assert_eq!(racewatch_calibrate_push(7), 7);
            assert_eq!(racewatch_calibrate_mov(9), 9);
        }
    }
}
