//! Where in a function a probe goes. A uprobe on an instruction the x86 kernel emulates (push,
//! one-byte nop, direct jmp/call/jcc) costs about a tenth of one it must single-step, and a probe
//! on the path that returns a lookup's miss value traps on misses alone. Both need the function's
//! code decoded (iced-x86); whenever the analysis is not sure it says why and the caller falls
//! back to the function's entry.
use std::{
    collections::HashSet,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
};

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Formatter as _, GasFormatter, Instruction,
    InstructionInfoFactory, OpAccess, OpKind, Register,
};

use crate::{
    probe::{
        plan::{LookupProbe, Placed, RefillProbe},
        symbols::{Function, SymbolTable},
    },
    text::escape,
};

/// Registers that hold the six integer arguments, in order.
const ARG_REGS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// Registers a call preserves (System V x86-64).
const CALLEE_SAVED: [Register; 6] = [
    Register::RBX,
    Register::RBP,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

/// Instructions decoded before giving up on finding an emulated one in a prologue.
const PROLOGUE_LIMIT: usize = 16;
/// Instructions followed along a miss path before giving up.
const PATH_LIMIT: usize = 64;

/// A probe site inside a function.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Site {
    /// Bytes from the function's first instruction.
    pub offset: u64,
    /// Whether the kernel emulates the probed instruction (cheap) or single-steps it.
    pub emulated: bool,
    /// The probed instruction, in AT&T syntax, for `-v`.
    pub instruction: String,
}

/// Where a miss-path probe reads the cache object, and where it fires.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MissSites {
    /// The register that holds the cache object at every site.
    pub cache_reg: Register,
    pub sites: Vec<Site>,
}

/// The decoded function: instructions in address order and every direct branch target.
struct Code_ {
    start: u64,
    instrs: Vec<Instruction>,
    targets: HashSet<u64>,
    /// The function jumps through a register (a jump table): its targets are unknown.
    indirect_jumps: bool,
}

impl Code_ {
    fn decode(code: &[u8], start: u64) -> Result<Code_, String> {
        let mut instrs = Vec::new();
        let mut targets = HashSet::new();
        let mut indirect_jumps = false;
        for ins in Decoder::with_ip(64, code, start, DecoderOptions::NONE) {
            if ins.is_invalid() {
                return Err(format!("undecodable bytes at +{:#x}", ins.ip() - start));
            }
            match ins.flow_control() {
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
                    if ins.op0_kind() != OpKind::Memory =>
                {
                    targets.insert(ins.near_branch_target());
                }
                // `jmp *mem(%rip)` is a tail call through the GOT; `jmp *%reg` a jump table.
                FlowControl::IndirectBranch => {
                    indirect_jumps |= !(ins.is_ip_rel_memory_operand());
                }
                _ => {}
            }
            instrs.push(ins);
        }
        if instrs.is_empty() {
            return Err("the function has no code".into());
        }
        Ok(Code_ {
            start,
            instrs,
            targets,
            indirect_jumps,
        })
    }

    fn index_of(&self, ip: u64) -> Option<usize> {
        self.instrs.binary_search_by_key(&ip, |i| i.ip()).ok()
    }

    fn site(&self, ins: &Instruction) -> Site {
        let mut text = String::new();
        GasFormatter::new().format(ins, &mut text);
        Site {
            offset: ins.ip() - self.start,
            emulated: is_emulated(ins),
            instruction: text,
        }
    }

    /// Can control reach `ins` other than by falling through from the instruction before it?
    fn is_join(&self, ins: &Instruction) -> bool {
        self.indirect_jumps || self.targets.contains(&ins.ip())
    }
}

/// How the kernel runs a probed instruction, for `-v`.
fn how(emulated: bool) -> &'static str {
    if emulated {
        "emulated"
    } else {
        "single-stepped"
    }
}

/// The first instruction of `code`, in AT&T syntax, and whether the kernel emulates it.
pub fn describe(code: &[u8]) -> (String, bool) {
    let ins = Decoder::new(64, code, DecoderOptions::NONE).decode();
    let text = if ins.op0_kind() == OpKind::NearBranch64 {
        // The target is wherever the code was loaded; the form is what matters.
        format!("{:?} rel{}", ins.mnemonic(), 8 * (ins.len() - 1)).to_lowercase()
    } else {
        let mut text = String::new();
        GasFormatter::new().format(&ins, &mut text);
        text
    };
    (text, is_emulated(&ins))
}

/// Does the x86-64 kernel emulate this instruction under a uprobe instead of single-stepping it?
/// Mirrors arch/x86/kernel/uprobes.c, conservatively: only the unprefixed forms.
fn is_emulated(ins: &Instruction) -> bool {
    match ins.code() {
        // `push %rbx`, or `push %r15` with its REX.B prefix.
        Code::Push_r64 => ins.len() == 1 || (ins.len() == 2 && ins.op0_register() >= Register::R8),
        Code::Nopd if ins.len() == 1 => true,
        Code::Jmp_rel8_64 | Code::Jmp_rel32_64 | Code::Call_rel32_64 => !has_prefix(ins),
        _ => ins.flow_control() == FlowControl::ConditionalBranch && is_jcc(ins),
    }
}

fn has_prefix(ins: &Instruction) -> bool {
    ins.has_rep_prefix() || ins.has_repne_prefix() || ins.segment_prefix() != Register::None
}

/// `jcc rel8` (0x70-0x7f) or `jcc rel32` (0x0f 0x80-0x8f): the kernel's conditional branches.
fn is_jcc(ins: &Instruction) -> bool {
    !has_prefix(ins) && matches!(ins.len(), 2 | 6) && ins.op0_kind() == OpKind::NearBranch64
}

fn writes(factory: &mut InstructionInfoFactory, ins: &Instruction, reg: Register) -> bool {
    factory.info(ins).used_registers().iter().any(|u| {
        u.register().full_register() == reg
            && matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            )
    })
}

/// The first instruction of the function's straight-line prologue that the kernel emulates and
/// before which `reads` still hold the function's arguments; every call passes it exactly once.
/// `Err` says why the entry must be probed instead.
fn entry_site(code: &[u8], start: u64, reads: &[Register]) -> Result<Site, String> {
    let decoded = Code_::decode(code, start)?;
    let mut factory = InstructionInfoFactory::new();
    for (n, ins) in decoded.instrs.iter().take(PROLOGUE_LIMIT).enumerate() {
        if n > 0 && decoded.is_join(ins) {
            return Err(format!(
                "+{:#x} is a branch target before any emulated instruction",
                ins.ip() - start
            ));
        }
        if is_emulated(ins) {
            return Ok(decoded.site(ins));
        }
        if let Some(r) = reads.iter().find(|r| writes(&mut factory, ins, **r)) {
            return Err(format!(
                "{r:?} changes at +{:#x} before any emulated instruction",
                ins.ip() - start
            ));
        }
        if ins.flow_control() != FlowControl::Next {
            return Err(format!(
                "control leaves the prologue at +{:#x} before any emulated instruction",
                ins.ip() - start
            ));
        }
    }
    Err("no emulated instruction in the prologue".into())
}

/// The 64-bit value an instruction puts in its destination register, when it is a constant.
fn constant_def(ins: &Instruction) -> Option<(Register, i64)> {
    let reg = ins.op0_register();
    let value = match ins.code() {
        Code::Mov_r64_imm64 => ins.immediate64() as i64,
        Code::Mov_rm64_imm32 if ins.op0_kind() == OpKind::Register => ins.immediate32to64(),
        // A 32-bit write zero-extends into the full register.
        Code::Mov_r32_imm32 | Code::Mov_rm32_imm32 if ins.op0_kind() == OpKind::Register => {
            i64::from(ins.immediate32())
        }
        Code::Or_rm64_imm8 if ins.op0_kind() == OpKind::Register && ins.immediate8to64() == -1 => {
            -1
        }
        Code::Xor_r32_rm32 | Code::Xor_rm32_r32 | Code::Xor_r64_rm64 | Code::Xor_rm64_r64
            if ins.op0_kind() == OpKind::Register && ins.op0_register() == ins.op1_register() =>
        {
            0
        }
        _ => return None,
    };
    Some((reg.full_register(), value))
}

/// Does `value` in a full register read back as `miss`, for a lookup returning a 64-bit or a
/// 32-bit integer (whose upper half the caller ignores)?
fn is_miss(value: i64, miss: i64) -> bool {
    value == miss || (value as u64 >> 32 == 0 && value as i32 as i64 == miss)
}

/// Follows execution from the constant definition at `from` (never through a conditional
/// branch) to a `ret`; true if the miss value is in `rax` there.
fn reaches_ret_with(
    decoded: &Code_,
    factory: &mut InstructionInfoFactory,
    from: usize,
    holder: Register,
) -> bool {
    let mut holders = vec![holder];
    let mut i = from + 1;
    for _ in 0..PATH_LIMIT {
        let Some(ins) = decoded.instrs.get(i) else {
            return false;
        };
        match ins.flow_control() {
            FlowControl::Return => return holders.contains(&Register::RAX),
            FlowControl::UnconditionalBranch => match decoded.index_of(ins.near_branch_target()) {
                Some(t) => {
                    i = t;
                    continue;
                }
                None => return false,
            },
            FlowControl::Call => holders.retain(|r| CALLEE_SAVED.contains(r)),
            FlowControl::Next => {}
            _ => return false,
        }
        let copy = (ins.code() == Code::Mov_r64_rm64 || ins.code() == Code::Mov_rm64_r64)
            && ins.op0_kind() == OpKind::Register
            && ins.op1_kind() == OpKind::Register;
        if copy && holders.contains(&ins.op1_register()) {
            holders.push(ins.op0_register());
        } else {
            holders.retain(|r| !writes(factory, ins, *r));
        }
        if holders.is_empty() {
            return false;
        }
        i += 1;
    }
    false
}

/// The register that holds the cache object (argument `arg`) everywhere in the function after
/// the prologue: the argument register itself if nothing writes it, or the callee-saved
/// register the straight-line prologue copies it into and only the epilogue restores.
fn cache_register(
    decoded: &Code_,
    factory: &mut InstructionInfoFactory,
    arg: Register,
) -> Result<(Register, usize), String> {
    let written_at = |reg: Register, factory: &mut InstructionInfoFactory| -> Vec<usize> {
        (0..decoded.instrs.len())
            .filter(|&i| writes(factory, &decoded.instrs[i], reg))
            .collect()
    };
    if written_at(arg, factory).is_empty() {
        return Ok((arg, 0));
    }
    for (n, ins) in decoded.instrs.iter().enumerate() {
        if n > 0 && decoded.is_join(ins) {
            break;
        }
        let copies_arg = ins.code() == Code::Mov_r64_rm64 || ins.code() == Code::Mov_rm64_r64;
        if copies_arg
            && ins.op0_kind() == OpKind::Register
            && ins.op1_kind() == OpKind::Register
            && ins.op1_register() == arg
            && CALLEE_SAVED.contains(&ins.op0_register())
        {
            let reg = ins.op0_register();
            let only_restores = written_at(reg, factory).into_iter().all(|w| {
                w == n || (decoded.instrs[w].code() == Code::Pop_r64 && leaves_after(decoded, w))
            });
            if only_restores {
                return Ok((reg, n));
            }
            return Err(format!(
                "{reg:?}, where the prologue keeps the cache, is written again in the body"
            ));
        }
        if writes(factory, ins, arg)
            || !matches!(ins.flow_control(), FlowControl::Next | FlowControl::Call)
        {
            break;
        }
    }
    Err(format!(
        "the prologue does not keep the cache ({arg:?}) in a callee-saved register"
    ))
}

/// Is the instruction at `i` part of an epilogue: only pops and stack adjustment until a `ret`
/// or a tail call out of the function?
fn leaves_after(decoded: &Code_, i: usize) -> bool {
    let end = decoded.start + decoded.instrs.iter().map(|x| x.len() as u64).sum::<u64>();
    for ins in &decoded.instrs[i + 1..] {
        match ins.flow_control() {
            FlowControl::Return => return true,
            FlowControl::UnconditionalBranch | FlowControl::IndirectBranch => {
                let t = ins.near_branch_target();
                return ins.op0_kind() == OpKind::Memory || t < decoded.start || t >= end;
            }
            FlowControl::Next
                if matches!(
                    ins.code(),
                    Code::Pop_r64 | Code::Add_rm64_imm8 | Code::Add_rm64_imm32
                ) => {}
            _ => return false,
        }
    }
    false
}

/// The sites on the paths that return `miss`: for each instruction that puts the miss value in a
/// register that then reaches `rax` at a `ret`, the first emulated instruction from there that
/// nothing else jumps to (or the definition itself). Only misses pass these sites.
fn miss_sites(code: &[u8], start: u64, miss: i64, arg: Register) -> Result<MissSites, String> {
    let decoded = Code_::decode(code, start)?;
    if decoded.indirect_jumps {
        return Err("the function jumps through a register (a jump table)".into());
    }
    let mut factory = InstructionInfoFactory::new();
    let (cache_reg, set_at) = cache_register(&decoded, &mut factory, arg)?;
    let mut sites = Vec::new();
    for (i, ins) in decoded.instrs.iter().enumerate() {
        let Some((reg, value)) = constant_def(ins) else {
            continue;
        };
        if i <= set_at || !is_miss(value, miss) {
            continue;
        }
        if !reaches_ret_with(&decoded, &mut factory, i, reg) {
            continue;
        }
        sites.push(site_after(&decoded, i, cache_reg));
    }
    if sites.is_empty() {
        return Err(format!(
            "no path puts {miss} in the return register as a constant"
        ));
    }
    Ok(MissSites { cache_reg, sites })
}

/// From the miss definition at `def`, the first emulated instruction reached by falling through
/// (or the jump that leaves), provided nothing else jumps into the way and the cache register is
/// still live; otherwise the definition itself.
fn site_after(decoded: &Code_, def: usize, cache_reg: Register) -> Site {
    for ins in decoded.instrs.iter().skip(def + 1).take(PROLOGUE_LIMIT) {
        if decoded.is_join(ins) || (ins.code() == Code::Pop_r64 && ins.op0_register() == cache_reg)
        {
            break;
        }
        if is_emulated(ins) {
            return decoded.site(ins);
        }
        if ins.flow_control() != FlowControl::Next {
            break;
        }
    }
    decoded.site(&decoded.instrs[def])
}

/// The function's bytes, read from the ELF file.
fn code_of(binary: &Path, f: &Function) -> Result<Vec<u8>, String> {
    if f.size == 0 {
        return Err("the symbol has no size".into());
    }
    let mut code = vec![0; f.size as usize];
    std::fs::File::open(binary)
        .and_then(|mut file| {
            file.seek(SeekFrom::Start(f.file_offset))?;
            file.read_exact(&mut code)
        })
        .map_err(|e| format!("cannot read its code: {e}"))?;
    Ok(code)
}

/// Where the probe that reads argument `arg` at `f`'s entry goes: the first emulated prologue
/// instruction, or the entry itself. `-v` says which and why.
pub fn place_entry(binary: &Path, role: &str, f: Function, arg: u32, verbose: bool) -> Placed {
    let site = code_of(binary, &f).and_then(|code| {
        let reg = ARG_REGS.get(arg as usize).copied().unwrap_or(Register::RDI);
        entry_site(&code, f.address, &[reg])
    });
    let (offset, emulated) = match site {
        Ok(site) => {
            if verbose {
                eprintln!(
                    "racewatch: {role}: {} at {:#x}+{:#x} ({}, {})",
                    escape(&f.display),
                    f.address,
                    site.offset,
                    site.instruction,
                    how(site.emulated),
                );
            }
            (site.offset, site.emulated)
        }
        Err(why) => {
            if verbose {
                eprintln!(
                    "racewatch: {role}: {} at its entry {:#x}, which the kernel may single-step: {why}",
                    escape(&f.display),
                    f.address
                );
            }
            (0, entry_is_emulated(binary, &f))
        }
    };
    Placed {
        function: f,
        offset,
        emulated,
    }
}

/// Whether the kernel emulates `f`'s first instruction.
fn entry_is_emulated(binary: &Path, f: &Function) -> bool {
    code_of(binary, f).is_ok_and(|code| {
        Decoder::with_ip(64, &code, f.address, DecoderOptions::NONE)
            .iter()
            .next()
            .is_some_and(|ins| is_emulated(&ins))
    })
}

/// A probe at `f`'s entry: where a return probe must go, and an entry probe that reads the stack.
/// `-v` says which instruction it traps on.
pub fn at_entry(binary: &Path, role: &str, f: Function, verbose: bool) -> Placed {
    let emulated = entry_is_emulated(binary, &f);
    if verbose {
        let first = code_of(binary, &f).map_or_else(|e| e, |code| describe(&code).0);
        eprintln!(
            "racewatch: {role}: {} at its entry {:#x} ({first}, {})",
            escape(&f.display),
            f.address,
            how(emulated)
        );
    }
    Placed {
        emulated,
        function: f,
        offset: 0,
    }
}

/// The lookup probe for `--miss-ret VALUE`: on the miss path when the code shows it, else `Err`
/// with the reason (the caller falls back to entry and return probes).
pub fn place_miss(
    binary: &Path,
    f: Function,
    arg: u32,
    value: i64,
    verbose: bool,
) -> Result<LookupProbe, (Function, String)> {
    let reg = ARG_REGS.get(arg as usize).copied().unwrap_or(Register::RDI);
    let found = code_of(binary, &f).and_then(|code| miss_sites(&code, f.address, value, reg));
    let found = match found {
        Ok(found) => found,
        Err(why) => return Err((f, why)),
    };
    let Some(cache_slot) = pt_regs_slot(found.cache_reg) else {
        return Err((f, format!("the cache is in {:?}", found.cache_reg)));
    };
    if verbose {
        for site in &found.sites {
            eprintln!(
                "racewatch: lookup miss: {} at {:#x}+{:#x} ({}, {}), cache in {:?}",
                escape(&f.display),
                f.address,
                site.offset,
                site.instruction,
                how(site.emulated),
                found.cache_reg,
            );
        }
    }
    Ok(LookupProbe::Miss {
        emulated: found.sites.iter().all(|s| s.emulated),
        offsets: found.sites.iter().map(|s| s.offset).collect(),
        function: f,
        cache_slot,
        value,
    })
}

/// The instructions by which `decoded` leaves the function: `ret`s and tail calls. `Err` when a
/// jump leaves for code that may come back (a `.cold` fragment of the function) or goes through a
/// jump table.
fn exits(decoded: &Code_, is_fragment: &dyn Fn(u64) -> bool) -> Result<Vec<Site>, String> {
    if decoded.indirect_jumps {
        return Err("the function jumps through a register (a jump table)".into());
    }
    let end = decoded.start + decoded.instrs.iter().map(|x| x.len() as u64).sum::<u64>();
    let mut found = Vec::new();
    for ins in &decoded.instrs {
        let leaves = match ins.flow_control() {
            FlowControl::Return | FlowControl::IndirectBranch => true,
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                let t = ins.near_branch_target();
                let outside = t < decoded.start || t >= end;
                if outside && is_fragment(t) {
                    return Err(format!(
                        "+{:#x} jumps to a fragment of the function placed elsewhere",
                        ins.ip() - decoded.start
                    ));
                }
                if outside && ins.flow_control() == FlowControl::ConditionalBranch {
                    return Err(format!(
                        "+{:#x} leaves the function conditionally",
                        ins.ip() - decoded.start
                    ));
                }
                outside
            }
            _ => false,
        };
        if leaves {
            found.push(decoded.site(ins));
        }
    }
    if found.is_empty() {
        return Err("the function never returns".into());
    }
    Ok(found)
}

/// The cheapest sure way to probe refill `f`: its exits when they are all emulated instructions,
/// else a return probe.
pub fn place_refill(
    binary: &Path,
    table: &SymbolTable,
    f: Function,
    arg: u32,
    verbose: bool,
) -> RefillProbe {
    let reg = ARG_REGS.get(arg as usize).copied().unwrap_or(Register::RDI);
    let fragment_prefix = format!("{}.", f.symbol);
    let is_fragment = |addr: u64| {
        table
            .containing(addr)
            .is_some_and(|g| g.symbol.starts_with(&fragment_prefix))
    };
    let plan = code_of(binary, &f).and_then(|code| {
        let decoded = Code_::decode(&code, f.address)?;
        let exits = exits(&decoded, &is_fragment)?;
        if let Some(slow) = exits.iter().find(|e| !e.emulated) {
            return Err(format!(
                "it returns by {} at +{:#x}, which the kernel single-steps",
                slow.instruction, slow.offset
            ));
        }
        let entry = entry_site(&code, f.address, &[reg])?;
        Ok((entry, exits))
    });
    match plan {
        Ok((entry, exits)) => {
            if verbose {
                eprintln!(
                    "racewatch: update: {} at {:#x}+{:#x} ({}), and its exits at {} (emulated)",
                    escape(&f.display),
                    f.address,
                    entry.offset,
                    entry.instruction,
                    exits
                        .iter()
                        .map(|e| format!("+{:#x} {}", e.offset, e.instruction))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            RefillProbe::Exits {
                exits: exits.iter().map(|e| e.offset).collect(),
                entry: Placed {
                    function: f,
                    offset: entry.offset,
                    emulated: true,
                },
            }
        }
        Err(why) => {
            if verbose {
                eprintln!(
                    "racewatch: update: {} at its entry {:#x}, with its return probed: {why}",
                    escape(&f.display),
                    f.address
                );
            }
            RefillProbe::Return(at_entry(binary, "update", f, false))
        }
    }
}

/// pt_regs slot (in u64s) of a general-purpose register, as the kernel lays out `struct pt_regs`.
fn pt_regs_slot(reg: Register) -> Option<u32> {
    Some(match reg {
        Register::R15 => 0,
        Register::R14 => 1,
        Register::R13 => 2,
        Register::R12 => 3,
        Register::RBP => 4,
        Register::RBX => 5,
        Register::R11 => 6,
        Register::R10 => 7,
        Register::R9 => 8,
        Register::R8 => 9,
        Register::RAX => 10,
        Register::RCX => 11,
        Register::RDX => 12,
        Register::RSI => 13,
        Register::RDI => 14,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: u64 = 0x3fa0;

    /// The shape of the native demo's `long Cache::lookup(long)` (g++ -O2): the prologue keeps the
    /// cache in rbp; the miss path sets rbx to -1 and jumps back to the shared return tail.
    const LOOKUP: &[u8] = &[
        0x55, // push %rbp
        0x48, 0x89, 0xfd, // mov %rdi,%rbp
        0x53, // push %rbx
        0x48, 0x89, 0xf3, // mov %rsi,%rbx
        0x48, 0x83, 0xec, 0x08, // sub $8,%rsp
        0xe8, 0x00, 0x00, 0x00, 0x00, // call (lock)
        0x85, 0xc0, // test %eax,%eax
        0x75, 0x1c, // jne +0x33 (error)
        0x48, 0x83, 0x7d, 0x40, 0x00, // cmpq $0,0x40(%rbp)
        0x74, 0x0c, // je +0x28 (the miss path)
        0x48, 0x8b, 0x5d, 0x10, // mov 0x10(%rbp),%rbx   (found: load the value)
        // +0x20: the shared tail
        0x48, 0x89, 0xef, // mov %rbp,%rdi
        0x48, 0x83, 0xc4, 0x08, // add $8,%rsp
        0x48, 0x89, 0xd8, // mov %rbx,%rax
        0x5b, // pop %rbx
        0x5d, // pop %rbp
        0xc3, // ret
        // +0x2d: the miss path
        0x48, 0xc7, 0xc3, 0xff, 0xff, 0xff, 0xff, // mov $-1,%rbx
        0xeb, 0x00, // jmp (to the tail, patched below)
        // +0x36
        0x0f, 0x0b, // ud2
    ];

    fn fixed_lookup() -> Vec<u8> {
        let mut code = LOOKUP.to_vec();
        // Patch the jmp at +0x31 to land on the tail at +0x20, and the branches to their targets.
        let jmp_at = 0x34;
        code[jmp_at + 1] = (0x20i64 - (jmp_at as i64 + 2)) as u8;
        let je_at = 0x1a;
        code[je_at + 1] = (0x2d - (je_at + 2)) as u8;
        let jne_at = 0x13;
        code[jne_at + 1] = (0x36 - (jne_at + 2)) as u8;
        code
    }

    #[test]
    fn entry_site_is_the_first_push() {
        let site = entry_site(&fixed_lookup(), START, &[Register::RDI]).unwrap();
        assert_eq!(site.offset, 0);
        assert!(site.emulated);
    }

    #[test]
    fn entry_site_skips_instructions_that_keep_the_argument() {
        // endbr64; sub $8,%rsp; call x; ...: the call is the first emulated instruction.
        let code = [
            0xf3, 0x0f, 0x1e, 0xfa, 0x48, 0x83, 0xec, 0x08, 0xe8, 0, 0, 0, 0, 0xc3,
        ];
        let site = entry_site(&code, START, &[Register::RDI]).unwrap();
        assert_eq!(site.offset, 8);
        assert!(site.instruction.starts_with("call"), "{}", site.instruction);
    }

    #[test]
    fn entry_site_refuses_when_the_argument_changes_first() {
        // mov %rsi,%rdi; push %rbx: the probe would read the wrong cache at the push.
        let code = [0x48, 0x89, 0xf7, 0x53, 0xc3];
        let err = entry_site(&code, START, &[Register::RDI]).unwrap_err();
        assert!(err.contains("RDI changes at +0x0"), "{err}");
    }

    #[test]
    fn entry_site_refuses_a_prologue_that_is_a_loop_target() {
        // 0: mov %rdi,%rax; 3: add $1,%rax; 7: jne 3; 9: ret — +3 is jumped to.
        let code = [0x48, 0x89, 0xf8, 0x48, 0x83, 0xc0, 0x01, 0x75, 0xfa, 0xc3];
        let err = entry_site(&code, START, &[Register::RDI]).unwrap_err();
        assert!(err.contains("branch target"), "{err}");
    }

    #[test]
    fn miss_site_is_the_jump_after_the_miss_value() {
        let found = miss_sites(&fixed_lookup(), START, -1, Register::RDI).unwrap();
        assert_eq!(found.cache_reg, Register::RBP);
        assert_eq!(found.sites.len(), 1);
        assert_eq!(found.sites[0].offset, 0x34);
        assert!(found.sites[0].emulated);
    }

    #[test]
    fn no_miss_site_for_another_value() {
        let err = miss_sites(&fixed_lookup(), START, 0, Register::RDI).unwrap_err();
        assert!(err.contains("no path puts 0"), "{err}");
    }

    #[test]
    fn leaf_function_keeps_the_cache_in_its_argument_register() {
        // cmpq $0,(%rdi); je miss; mov 8(%rdi),%rax; ret; miss: mov $-1,%rax; ret
        let code = [
            0x48, 0x83, 0x3f, 0x00, 0x74, 0x05, 0x48, 0x8b, 0x47, 0x08, 0xc3, 0x48, 0xc7, 0xc0,
            0xff, 0xff, 0xff, 0xff, 0xc3,
        ];
        let found = miss_sites(&code, START, -1, Register::RDI).unwrap();
        assert_eq!(found.cache_reg, Register::RDI);
        assert_eq!(found.sites.len(), 1);
        assert_eq!(
            found.sites[0].offset, 11,
            "the definition: nothing emulated after it"
        );
        assert!(!found.sites[0].emulated);
    }

    #[test]
    fn exits_are_the_rets_and_the_tail_calls() {
        let decoded = Code_::decode(&fixed_lookup(), START).unwrap();
        let found = exits(&decoded, &|_| false).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].offset, 0x2c, "the ret");
        assert!(!found[0].emulated);
        // push %rbp; mov %rdi,%rbp; pop %rbp; jmp <elsewhere>: a tail call, emulated.
        let tail = [0x55, 0x48, 0x89, 0xfd, 0x5d, 0xe9, 0x00, 0x10, 0x00, 0x00];
        let decoded = Code_::decode(&tail, START).unwrap();
        let found = exits(&decoded, &|_| false).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].offset, 5);
        assert!(found[0].emulated);
        let err = exits(&decoded, &|_| true).map(|_| ()).unwrap_err();
        assert!(err.contains("fragment"), "{err}");
    }

    #[test]
    fn a_32_bit_minus_one_is_a_miss_for_an_int_lookup() {
        assert!(is_miss(0xffff_ffff, -1));
        assert!(is_miss(-1, -1));
        assert!(!is_miss(0xffff_ffff_0000_0000u64 as i64, 0));
    }

    #[test]
    fn emulated_instructions_match_the_kernel() {
        let decode = |bytes: &[u8]| Decoder::new(64, bytes, DecoderOptions::NONE).decode();
        for (bytes, emulated) in [
            (&[0x55][..], true),                    // push %rbp
            (&[0x41, 0x57][..], true),              // push %r15
            (&[0x90][..], true),                    // nop
            (&[0xeb, 0x00][..], true),              // jmp rel8
            (&[0xe8, 0, 0, 0, 0][..], true),        // call rel32
            (&[0x0f, 0x84, 0, 0, 0, 0][..], true),  // je rel32
            (&[0x48, 0x89, 0xe5][..], false),       // mov %rsp,%rbp
            (&[0xf3, 0x0f, 0x1e, 0xfa][..], false), // endbr64
            (&[0x0f, 0x1f, 0x44, 0, 0][..], false), // nopl 0(%rax,%rax,1)
            (&[0xc3][..], false),                   // ret
            (&[0x48, 0x83, 0xec, 0x08][..], false), // sub $8,%rsp
        ] {
            assert_eq!(is_emulated(&decode(bytes)), emulated, "{bytes:02x?}");
        }
    }
}
