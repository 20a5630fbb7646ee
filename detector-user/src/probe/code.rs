//! A function's machine code as placement reads it: decoded instructions, where control can
//! join, which instructions the kernel emulates under a uprobe, and the registers' roles in the
//! System V x86-64 calling convention.
use std::{
    collections::HashSet,
    io::{Read as _, Seek as _, SeekFrom},
    path::Path,
};

use iced_x86::{
    Code, Decoder, DecoderOptions, FlowControl, Formatter as _, GasFormatter, Instruction,
    InstructionInfoFactory, OpAccess, OpKind, Register,
};

use crate::probe::symbols::Function;

/// Registers that hold the six integer arguments, in order.
pub const ARG_REGS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// Registers a call preserves (System V x86-64).
pub const CALLEE_SAVED: [Register; 6] = [
    Register::RBX,
    Register::RBP,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

/// A probe site inside a function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    /// Bytes from the function's first instruction.
    pub offset: u64,
    /// Whether the kernel emulates the probed instruction (cheap) or single-steps it.
    pub emulated: bool,
    /// The probed instruction, in AT&T syntax, for `-v`.
    pub instruction: String,
}

/// The decoded function: instructions in address order and every direct branch target.
pub struct Decoded {
    pub start: u64,
    pub instrs: Vec<Instruction>,
    targets: HashSet<u64>,
    /// The function jumps through a register (a jump table): its targets are unknown.
    pub indirect_jumps: bool,
}

impl Decoded {
    pub fn decode(code: &[u8], start: u64) -> Result<Decoded, String> {
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
        Ok(Decoded {
            start,
            instrs,
            targets,
            indirect_jumps,
        })
    }

    pub fn index_of(&self, ip: u64) -> Option<usize> {
        self.instrs.binary_search_by_key(&ip, |i| i.ip()).ok()
    }

    pub fn site(&self, ins: &Instruction) -> Site {
        let mut text = String::new();
        GasFormatter::new().format(ins, &mut text);
        Site {
            offset: ins.ip() - self.start,
            emulated: is_emulated(ins),
            instruction: text,
        }
    }

    /// Can control reach `ins` other than by falling through from the instruction before it?
    pub fn is_join(&self, ins: &Instruction) -> bool {
        self.indirect_jumps || self.targets.contains(&ins.ip())
    }

    /// The instructions by which the function leaves: `ret`s and tail calls, by index. `Err`
    /// when a jump leaves for code that may come back (a `.cold` fragment of the function,
    /// `is_fragment`) or goes through a jump table.
    pub fn exits(&self, is_fragment: &dyn Fn(u64) -> bool) -> Result<Vec<usize>, String> {
        if self.indirect_jumps {
            return Err("the function jumps through a register (a jump table)".into());
        }
        let end = self.start + self.instrs.iter().map(|x| x.len() as u64).sum::<u64>();
        let mut found = Vec::new();
        for (i, ins) in self.instrs.iter().enumerate() {
            let leaves = match ins.flow_control() {
                FlowControl::Return | FlowControl::IndirectBranch => true,
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                    let t = ins.near_branch_target();
                    let outside = t < self.start || t >= end;
                    if outside && is_fragment(t) {
                        return Err(format!(
                            "+{:#x} jumps to a fragment of the function placed elsewhere",
                            ins.ip() - self.start
                        ));
                    }
                    if outside && ins.flow_control() == FlowControl::ConditionalBranch {
                        return Err(format!(
                            "+{:#x} leaves the function conditionally",
                            ins.ip() - self.start
                        ));
                    }
                    outside
                }
                _ => false,
            };
            if leaves {
                found.push(i);
            }
        }
        if found.is_empty() {
            return Err("the function never returns".into());
        }
        Ok(found)
    }
}

/// How the kernel runs a probed instruction, for `-v`.
pub fn how(emulated: bool) -> &'static str {
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
pub fn is_emulated(ins: &Instruction) -> bool {
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

pub fn writes(factory: &mut InstructionInfoFactory, ins: &Instruction, reg: Register) -> bool {
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

/// The function's bytes, read from the ELF file.
pub fn code_of(binary: &Path, f: &Function) -> Result<Vec<u8>, String> {
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

/// pt_regs slot (in u64s) of a general-purpose register, as the kernel lays out `struct pt_regs`.
pub fn pt_regs_slot(reg: Register) -> Option<u32> {
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

/// Code shaped as compilers emit it, for the tests of the analyses that read it.
/// The general-purpose register in `pt_regs` slot `slot`.
pub fn slot_register(slot: u32) -> Option<Register> {
    [
        Register::R15,
        Register::R14,
        Register::R13,
        Register::R12,
        Register::RBP,
        Register::RBX,
        Register::R11,
        Register::R10,
        Register::R9,
        Register::R8,
        Register::RAX,
        Register::RCX,
        Register::RDX,
        Register::RSI,
        Register::RDI,
    ]
    .get(slot as usize)
    .copied()
}

/// The register in `pt_regs` slot `slot`, for messages.
pub fn slot_name(slot: u32) -> &'static str {
    const NAMES: [&str; 20] = [
        "R15", "R14", "R13", "R12", "RBP", "RBX", "R11", "R10", "R9", "R8", "RAX", "RCX", "RDX",
        "RSI", "RDI", "ORIG_RAX", "RIP", "CS", "EFLAGS", "RSP",
    ];
    NAMES.get(slot as usize).copied().unwrap_or("?")
}

#[cfg(test)]
pub mod fixtures {
    pub const START: u64 = 0x3fa0;

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

    pub fn fixed_lookup() -> Vec<u8> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::code::fixtures::{START, fixed_lookup};

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

    #[test]
    fn exits_are_the_rets_and_the_tail_calls() {
        let decoded = Decoded::decode(&fixed_lookup(), START).unwrap();
        let found = decoded.exits(&|_| false).unwrap();
        assert_eq!(found.len(), 1);
        let ret = decoded.site(&decoded.instrs[found[0]]);
        assert_eq!(ret.offset, 0x2c, "the ret");
        assert!(!ret.emulated);
        // push %rbp; mov %rdi,%rbp; pop %rbp; jmp <elsewhere>: a tail call, emulated.
        let tail = [0x55, 0x48, 0x89, 0xfd, 0x5d, 0xe9, 0x00, 0x10, 0x00, 0x00];
        let decoded = Decoded::decode(&tail, START).unwrap();
        let found = decoded.exits(&|_| false).unwrap();
        assert_eq!(found.len(), 1);
        let tail = decoded.site(&decoded.instrs[found[0]]);
        assert_eq!(tail.offset, 5);
        assert!(tail.emulated);
        let err = decoded.exits(&|_| true).map(|_| ()).unwrap_err();
        assert!(err.contains("fragment"), "{err}");
    }
}
