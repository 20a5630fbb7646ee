//! The paths by which a lookup returns its miss value, found the way compilers build them:
//! every path from a constant definition of the value is followed (both ways at each branch,
//! across calls in callee-saved registers and stack slots, through the copies and widenings
//! between registers of any width) to each `ret`, where the value must be in the return register
//! at the function's return width (`rax`, or `rdx` for the second half of a two-register return:
//! the "has a value" flag of a C++ `std::optional<long>`). Only misses pass such a definition, so
//! a probe there traps on misses alone. Where the cache object is at that probe (a register or a
//! stack slot) comes from a forward analysis of the whole function from the object argument at
//! its entry.
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use iced_x86::{
    Code, ConditionCode, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

use crate::probe::{
    code::{CALLEE_SAVED, Decoded, Site, is_emulated, pt_regs_slot, slot_register, writes},
    plan::ObjectAt,
};

/// Instructions looked at after a definition for a cheaper probe site.
const SITE_LOOKAHEAD: usize = 16;
/// Instructions visited along all the paths from one definition before giving up.
const PATH_BUDGET: usize = 20_000;
/// `pt_regs` slot of `rsp`, through which a stack slot is read.
const RSP_SLOT: u32 = 19;

/// Where a lookup returns the value a miss is told by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnReg {
    /// `rax`, at the width the function's code writes it.
    Rax,
    /// The low `bytes` of `rdx`, the second register of a two-register return.
    Rdx { bytes: u8 },
}

/// Where a value lives: a full register, or a stack slot at this offset from `rsp` at the
/// function's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Loc {
    Reg(Register),
    Slot(i64),
}

/// What a location holds: the cache object, a constant whose low `bytes` are known, or the value
/// a result site reads (of which the low `bytes` are carried, with zeros above them if `zext`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Val {
    Object,
    Const { value: u64, bytes: u8 },
    Result { bytes: u8, zext: bool },
}

/// What is known at one point on a path: `rsp` and `rbp` as offsets from `rsp` at entry, and
/// the locations that hold a value of interest.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
struct State {
    rsp: Option<i64>,
    rbp: Option<i64>,
    vals: BTreeMap<Loc, Val>,
}

/// A probe site on a miss path, and where the object is there (`None` when the function has no
/// object argument: a copy made for one constant object).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissSite {
    pub site: Site,
    pub object: Option<ObjectAt>,
}

fn mask(bytes: u8) -> u64 {
    if bytes >= 8 {
        u64::MAX
    } else {
        (1u64 << (8 * u32::from(bytes))) - 1
    }
}

/// A memory operand's stack slot, when its address is `rsp` or the frame's `rbp` plus a constant.
fn slot_of(ins: &Instruction, st: &State) -> Option<Loc> {
    if ins.memory_index() != Register::None {
        return None;
    }
    let disp = ins.memory_displacement64() as i64;
    match ins.memory_base() {
        Register::RSP => st.rsp.map(|r| Loc::Slot(r + disp)),
        Register::RBP => st.rbp.map(|r| Loc::Slot(r + disp)),
        _ => None,
    }
}

/// The location operand `n` names (a register or a stack slot).
fn operand(ins: &Instruction, n: u32, st: &State) -> Option<Loc> {
    match ins.op_kind(n) {
        OpKind::Register => Some(Loc::Reg(ins.op_register(n).full_register())),
        OpKind::Memory => slot_of(ins, st),
        _ => None,
    }
}

fn constant(value: u64, bytes: u8) -> Val {
    Val::Const {
        value: value & mask(bytes),
        bytes,
    }
}

/// What `ins` writes to its destination, when it is a constant or a copy of a known value, with
/// the widths the instruction gives it (32-bit register writes zero the upper half); and whether
/// it is a constant's definition rather than a copy.
fn transfer(ins: &Instruction, st: &State) -> Option<(Loc, Option<Val>, bool)> {
    let dest = operand(ins, 0, st)?;
    let to_reg = matches!(dest, Loc::Reg(_));
    let src = || operand(ins, 1, st).and_then(|l| st.vals.get(&l).copied());
    // A copy of `need` bytes; `zext`: the destination's upper bytes become zero.
    let copy = |need: u8, zext: bool, f: &dyn Fn(u64) -> Val| match src() {
        Some(Val::Const { value, bytes }) if bytes >= need => Some(f(value)),
        Some(Val::Result { bytes, zext: z }) => Some(Val::Result {
            bytes: bytes.min(need),
            // Between the carried bytes and `need`, the source's bytes: zero only if they were.
            zext: zext && (bytes >= need || z),
        }),
        _ => None,
    };
    let narrow = |need: u8, f: &dyn Fn(u64) -> Val| copy(need, false, f);
    let widen = |need: u8, f: &dyn Fn(u64) -> Val| copy(need, true, f);
    let val = match ins.code() {
        Code::Mov_r64_rm64 | Code::Mov_rm64_r64 => src(),
        Code::Mov_r64_imm64 => Some(constant(ins.immediate64(), 8)),
        Code::Mov_rm64_imm32 => Some(constant(ins.immediate32to64() as u64, 8)),
        Code::Mov_r32_imm32 | Code::Mov_rm32_imm32 => Some(constant(
            u64::from(ins.immediate32()),
            if to_reg { 8 } else { 4 },
        )),
        Code::Mov_r8_imm8 | Code::Mov_rm8_imm8 => Some(constant(u64::from(ins.immediate8()), 1)),
        Code::Xor_r32_rm32
        | Code::Xor_rm32_r32
        | Code::Xor_r64_rm64
        | Code::Xor_rm64_r64
        | Code::Sub_r32_rm32
        | Code::Sub_rm32_r32
        | Code::Sub_r64_rm64
        | Code::Sub_rm64_r64
            if to_reg
                && ins.op1_kind() == OpKind::Register
                && ins.op0_register() == ins.op1_register() =>
        {
            Some(constant(0, 8))
        }
        Code::Or_rm64_imm8 if to_reg && ins.immediate8to64() == -1 => Some(constant(u64::MAX, 8)),
        Code::Or_rm32_imm8 if to_reg && ins.immediate8to32() == -1 => {
            Some(constant(0xffff_ffff, 8))
        }
        Code::Mov_r32_rm32 | Code::Mov_rm32_r32 => {
            copy(4, to_reg, &|v| constant(v, if to_reg { 8 } else { 4 }))
        }
        Code::Mov_r8_rm8 | Code::Mov_rm8_r8 => narrow(1, &|v| constant(v, 1)),
        Code::Movzx_r32_rm8 | Code::Movzx_r64_rm8 => widen(1, &|v| constant(v & 0xff, 8)),
        Code::Movzx_r32_rm16 | Code::Movzx_r64_rm16 => widen(2, &|v| constant(v & 0xffff, 8)),
        Code::Movsx_r64_rm8 => narrow(1, &|v| constant(v as u8 as i8 as i64 as u64, 8)),
        Code::Movsx_r32_rm8 => narrow(1, &|v| constant(u64::from(v as u8 as i8 as i32 as u32), 8)),
        Code::Movsxd_r64_rm32 => narrow(4, &|v| constant(v as u32 as i32 as i64 as u64, 8)),
        // `and $1,%al` on a stored bool (clang -O0 reloads it so): the same 0 or 1.
        Code::And_rm8_imm8 | Code::And_AL_imm8 if to_reg && ins.immediate8() == 1 => {
            match st.vals.get(&dest) {
                Some(Val::Result { bytes, .. }) if *bytes >= 1 => Some(Val::Result {
                    bytes: 1,
                    zext: false,
                }),
                _ => None,
            }
        }
        _ => return None,
    };
    let copy = ins.op_count() > 1
        && matches!(ins.op1_kind(), OpKind::Register | OpKind::Memory)
        && !is_zeroing(ins);
    Some((dest, val, !copy))
}

/// The state after `ins`: what it writes is forgotten, what it copies or defines is recorded,
/// and `rsp` and `rbp` follow the prologue's and epilogue's moves. The second value is the
/// constant `ins` defines, if any.
fn step(
    ins: &Instruction,
    st: &State,
    factory: &mut InstructionInfoFactory,
) -> (State, Option<(Loc, Val)>) {
    let mut next = st.clone();
    let mut set: Option<(Loc, Option<Val>, bool)> = None;
    match ins.code() {
        Code::Push_r64 => {
            let val = st.vals.get(&Loc::Reg(ins.op0_register())).copied();
            next.rsp = st.rsp.map(|r| r - 8);
            if let Some(r) = next.rsp {
                set = Some((Loc::Slot(r), val, false));
            }
        }
        Code::Pop_r64 => {
            let val = st.rsp.and_then(|r| st.vals.get(&Loc::Slot(r)).copied());
            set = Some((Loc::Reg(ins.op0_register()), val, false));
        }
        _ => set = transfer(ins, st),
    }
    // Forget what the instruction writes.
    next.vals.retain(|loc, _| match loc {
        Loc::Reg(r) => !writes(factory, ins, *r),
        Loc::Slot(_) => true,
    });
    let writes_memory = factory
        .info(ins)
        .used_memory()
        .iter()
        .any(|m| !matches!(m.access(), OpAccess::Read | OpAccess::NoMemAccess));
    if writes_memory && let Some(slot) = slot_of(ins, st) {
        next.vals.remove(&slot);
    }
    // The frame.
    match ins.code() {
        Code::Pop_r64 => {
            next.rsp = st.rsp.map(|r| r + 8);
            if ins.op0_register() == Register::RBP {
                next.rbp = None;
            }
        }
        Code::Leaveq => {
            next.rsp = st.rbp.map(|r| r + 8);
            next.rbp = None;
        }
        Code::Mov_r64_rm64 | Code::Mov_rm64_r64
            if ins.op0_register() == Register::RBP && ins.op1_register() == Register::RSP =>
        {
            next.rbp = st.rsp;
        }
        Code::Mov_r64_rm64 | Code::Mov_rm64_r64
            if ins.op0_register() == Register::RSP && ins.op1_register() == Register::RBP =>
        {
            next.rsp = st.rbp;
        }
        Code::Sub_rm64_imm8 | Code::Sub_rm64_imm32 if ins.op0_register() == Register::RSP => {
            next.rsp = st.rsp.map(|r| r - ins.immediate32to64());
        }
        Code::Add_rm64_imm8 | Code::Add_rm64_imm32 if ins.op0_register() == Register::RSP => {
            next.rsp = st.rsp.map(|r| r + ins.immediate32to64());
        }
        Code::Lea_r64_m if ins.op0_register() == Register::RSP => {
            next.rsp = slot_of(ins, st).map(|l| match l {
                Loc::Slot(s) => s,
                Loc::Reg(_) => unreachable!("slot_of gives slots"),
            });
        }
        Code::Push_r64 | Code::Call_rel32_64 | Code::Call_rm64 => {}
        _ => {
            if writes(factory, ins, Register::RSP) {
                next.rsp = None;
            }
            if writes(factory, ins, Register::RBP) {
                next.rbp = None;
            }
        }
    }
    let mut defined = None;
    if let Some((loc, val, is_def)) = set {
        next.vals.remove(&loc);
        if let Some(val) = val {
            next.vals.insert(loc, val);
            if is_def {
                defined = Some((loc, val));
            }
        }
    }
    if ins.flow_control() == FlowControl::Call {
        // A call keeps the callee-saved registers and the caller's frame.
        next.vals.retain(|loc, _| match loc {
            Loc::Reg(r) => CALLEE_SAVED.contains(r),
            Loc::Slot(s) => next.rsp.is_some_and(|rsp| *s >= rsp),
        });
    }
    // Below `rsp` is free for signal handlers and the next call.
    if let Some(rsp) = next.rsp {
        next.vals
            .retain(|loc, _| !matches!(loc, Loc::Slot(s) if *s < rsp));
    }
    (next, defined)
}

fn is_zeroing(ins: &Instruction) -> bool {
    matches!(
        ins.code(),
        Code::Xor_r32_rm32
            | Code::Xor_rm32_r32
            | Code::Xor_r64_rm64
            | Code::Xor_rm64_r64
            | Code::Sub_r32_rm32
            | Code::Sub_rm32_r32
            | Code::Sub_r64_rm64
            | Code::Sub_rm64_r64
    ) && ins.op0_kind() == OpKind::Register
        && ins.op1_kind() == OpKind::Register
        && ins.op0_register() == ins.op1_register()
}

/// The state on the edge from conditional branch `i` to `to`: where the branch is taken only
/// when a register equals a constant (`test %r,%r; je`, `cmp $c,%r; jne` not taken), the register
/// holds it there (`find` returning NULL is often known only from the test that ended the search).
fn on_edge(d: &Decoded, i: usize, to: usize, mut st: State) -> State {
    let ins = &d.instrs[i];
    if ins.flow_control() != FlowControl::ConditionalBranch
        || i == 0
        || to == i + 1 && { d.index_of(ins.near_branch_target()) == Some(to) }
    {
        return st;
    }
    let taken = d.index_of(ins.near_branch_target()) == Some(to);
    let equal = match ins.condition_code() {
        ConditionCode::e => taken,
        ConditionCode::ne => !taken,
        _ => false,
    };
    let test = &d.instrs[i - 1];
    if !equal || test.op0_kind() != OpKind::Register {
        return st;
    }
    let reg = test.op0_register();
    let value = match (test.mnemonic(), test.op1_kind()) {
        (Mnemonic::Test, OpKind::Register) if test.op1_register() == reg => 0,
        (Mnemonic::Cmp, k) if k != OpKind::Register && k != OpKind::Memory => test.immediate(1),
        _ => return st,
    };
    let loc = Loc::Reg(reg.full_register());
    if st.vals.get(&loc) != Some(&Val::Object) {
        st.vals.insert(loc, constant(value, reg.size() as u8));
    }
    st
}

/// Where control goes after instruction `i`: the indices in the function, and whether it may also
/// leave it (a tail call, a conditional jump elsewhere) or cannot be followed (a jump table).
pub struct Successors {
    pub inside: Vec<usize>,
    pub leaves: bool,
}

pub fn successors(d: &Decoded, i: usize) -> Successors {
    let ins = &d.instrs[i];
    let next = (i + 1 < d.instrs.len()).then_some(i + 1);
    let target = || {
        (ins.op0_kind() != OpKind::Memory)
            .then(|| d.index_of(ins.near_branch_target()))
            .flatten()
    };
    let (inside, leaves) = match ins.flow_control() {
        FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall => {
            // A call the function never comes back from ends in `ud2` or `int3`.
            let noreturn = next.is_none_or(|n| {
                matches!(
                    d.instrs[n].flow_control(),
                    FlowControl::Exception | FlowControl::Interrupt
                )
            }) && ins.flow_control() != FlowControl::Next;
            if noreturn {
                (vec![], false)
            } else {
                (next.into_iter().collect(), next.is_none())
            }
        }
        FlowControl::UnconditionalBranch => match target() {
            Some(t) => (vec![t], false),
            None => (vec![], true),
        },
        FlowControl::ConditionalBranch => {
            let t = target();
            let v: Vec<usize> = t.into_iter().chain(next).collect();
            (v, t.is_none())
        }
        FlowControl::Return | FlowControl::Exception | FlowControl::Interrupt => (vec![], false),
        _ => (vec![], true),
    };
    Successors { inside, leaves }
}

/// The instructions control can come from to each instruction of `d`.
pub fn predecessors(d: &Decoded) -> Vec<Vec<usize>> {
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); d.instrs.len()];
    for i in 0..d.instrs.len() {
        for s in successors(d, i).inside {
            preds[s].push(i);
        }
    }
    preds
}

/// What holds the cache object (argument register `arg` at entry), and the values `keep` asks
/// for, before each instruction on every path there: a forward must-analysis (intersection where
/// paths join). `None`: unreachable from the entry.
fn forward_states(
    d: &Decoded,
    arg: Option<Register>,
    keep: &dyn Fn(&Val) -> bool,
) -> Vec<Option<State>> {
    let mut factory = InstructionInfoFactory::new();
    let mut states: Vec<Option<State>> = vec![None; d.instrs.len()];
    let mut entry = State {
        rsp: Some(0),
        ..State::default()
    };
    if let Some(arg) = arg {
        entry.vals.insert(Loc::Reg(arg), Val::Object);
    }
    states[0] = Some(entry);
    let mut work: VecDeque<usize> = VecDeque::from([0]);
    while let Some(i) = work.pop_front() {
        let Some(st) = states[i].clone() else {
            continue;
        };
        let (out, _) = step(&d.instrs[i], &st, &mut factory);
        for s in successors(d, i).inside {
            let mut out = on_edge(d, i, s, out.clone());
            out.vals.retain(|_, v| *v == Val::Object || keep(v));
            let merged = match &states[s] {
                None => out.clone(),
                Some(old) => State {
                    rsp: old.rsp.filter(|r| out.rsp == Some(*r)),
                    rbp: old.rbp.filter(|r| out.rbp == Some(*r)),
                    vals: old
                        .vals
                        .iter()
                        .filter(|(l, v)| out.vals.get(l) == Some(v))
                        .map(|(l, v)| (*l, *v))
                        .collect(),
                },
            };
            if states[s].as_ref() != Some(&merged) {
                states[s] = Some(merged);
                work.push_back(s);
            }
        }
    }
    states
}

/// Where the object, in register `arg` at the entry, is before each instruction of `d` on every
/// path there (None: nowhere sure, or unreachable).
pub fn object_before_each(d: &Decoded, arg: Register) -> Vec<Option<ObjectAt>> {
    let states = forward_states(d, Some(arg), &|_| false);
    (0..d.instrs.len()).map(|i| object_at(&states, i)).collect()
}

/// Where the probe can read the object before instruction `i`.
fn object_at(states: &[Option<State>], i: usize) -> Option<ObjectAt> {
    let st = states.get(i)?.as_ref()?;
    let objects = || {
        st.vals
            .iter()
            .filter(|(_, v)| **v == Val::Object)
            .map(|(l, _)| l)
    };
    let regs = objects().find_map(|l| match l {
        Loc::Reg(r) => pt_regs_slot(*r).map(ObjectAt::Register),
        Loc::Slot(_) => None,
    });
    regs.or_else(|| {
        objects().find_map(|l| match (l, st.rsp) {
            (Loc::Slot(s), Some(rsp)) => Some(ObjectAt::Memory {
                slot: RSP_SLOT,
                offset: s - rsp,
            }),
            _ => None,
        })
    })
}

/// Is the constant, held at the return, the miss value at the return's width?
fn matches_miss(val: Option<&Val>, miss: i64, width: u8) -> bool {
    match val {
        Some(Val::Const { value, bytes }) => {
            *bytes >= width && value & mask(width) == miss as u64 & mask(width)
        }
        _ => false,
    }
}

/// Follows every path from the definition at `def` (state `st` after it): true when each one
/// returns with the miss value in `rax` and none comes back to `def`. `seen` collects the
/// instructions visited.
fn every_path_returns(
    d: &Decoded,
    def: usize,
    st: State,
    miss: i64,
    width: u8,
    reg: Register,
    seen: &mut HashSet<usize>,
) -> Result<(), String> {
    // A `ret` is on the miss path by what it returns, not by any other place holding the value.
    if d.instrs[def].flow_control() == FlowControl::Return {
        return if matches_miss(st.vals.get(&Loc::Reg(reg)), miss, width) {
            Ok(())
        } else {
            Err(format!(
                "the ret at +{:#x} may return something else",
                d.instrs[def].ip() - d.start
            ))
        };
    }
    let mut factory = InstructionInfoFactory::new();
    let mut done: HashMap<(usize, State), ()> = HashMap::new();
    let mut stack: Vec<(usize, State)> = successors(d, def)
        .inside
        .into_iter()
        .map(|s| (s, on_edge(d, def, s, st.clone())))
        .collect();
    if successors(d, def).leaves {
        return Err("control leaves the function after it".into());
    }
    let mut budget = PATH_BUDGET;
    while let Some((i, st)) = stack.pop() {
        if i == def {
            return Err("a loop comes back to it".into());
        }
        if st.vals.is_empty() {
            return Err(format!(
                "the value is lost at +{:#x}",
                d.instrs[i].ip() - d.start
            ));
        }
        if done.insert((i, st.clone()), ()).is_some() {
            continue;
        }
        budget = budget
            .checked_sub(1)
            .ok_or_else(|| "too many paths to follow".to_string())?;
        seen.insert(i);
        let ins = &d.instrs[i];
        if ins.flow_control() == FlowControl::Return {
            if matches_miss(st.vals.get(&Loc::Reg(reg)), miss, width) {
                continue;
            }
            return Err(format!(
                "the ret at +{:#x} may return something else",
                ins.ip() - d.start
            ));
        }
        let succ = successors(d, i);
        if succ.leaves {
            return Err(format!(
                "control leaves the function at +{:#x}",
                ins.ip() - d.start
            ));
        }
        // Only the value followed from the start counts, not one defined on the way.
        let (mut next, defined) = step(ins, &st, &mut factory);
        if let Some((loc, _)) = defined {
            next.vals.remove(&loc);
        }
        for s in succ.inside {
            stack.push((s, on_edge(d, i, s, next.clone())));
        }
    }
    Ok(())
}

/// The return width of the function as its code shows it: on the paths back from each `ret`,
/// the size of the first write to `rax` met (a `bool` is set in `al`, an `int` in `eax`); the
/// narrowest, or 8 when none is met.
pub fn return_width(d: &Decoded) -> u8 {
    let preds = predecessors(d);
    let mut factory = InstructionInfoFactory::new();
    let mut width = 8;
    let mut seen = HashSet::new();
    let mut work: Vec<usize> = (0..d.instrs.len())
        .filter(|&i| d.instrs[i].flow_control() == FlowControl::Return)
        .flat_map(|i| preds[i].clone())
        .collect();
    while let Some(i) = work.pop() {
        if !seen.insert(i) || seen.len() > PATH_BUDGET {
            continue;
        }
        // iced names a 32-bit write by the full register (it zero-extends): the operand has the size.
        let ins = &d.instrs[i];
        let written = writes(&mut factory, ins, Register::RAX).then(|| {
            if ins.op_count() > 0 && ins.op0_kind() == OpKind::Register {
                ins.op0_register().size() as u8
            } else {
                8
            }
        });
        match written {
            Some(size) => width = width.min(size),
            None if d.instrs[i].flow_control() == FlowControl::Call => {}
            None => work.extend(preds[i].iter().copied()),
        }
    }
    width
}

/// The probe sites on the paths that return `miss` (compared at `width` bytes). An instruction
/// is on such a path when, on every path to it, the miss value is already in some register or
/// stack slot (or it puts it there), and every path from it returns that value: the constant
/// definitions from which every path returns it, and the blocks past the last branch that
/// decides a miss when the value was set before the search (a default the hit path overwrites).
/// Each site is where such a stretch of code begins (the first instruction the kernel emulates
/// there, with the object known), so each miss passes exactly one.
pub fn miss_sites(
    d: &Decoded,
    miss: i64,
    width: u8,
    reg: Register,
    arg: Option<Register>,
) -> Result<Vec<MissSite>, String> {
    if d.indirect_jumps {
        return Err("the function jumps through a register (a jump table)".into());
    }
    // A narrower constant may still be widened on its way to the return.
    let is_miss = |v: &Val| match v {
        Val::Const { bytes, .. } => matches_miss(Some(v), miss, width.min(*bytes)),
        _ => false,
    };
    let states = forward_states(d, arg, &is_miss);
    let mut factory = InstructionInfoFactory::new();
    let mut on_miss_path: HashMap<usize, HashSet<usize>> = HashMap::new();
    let mut why_not = None;
    for (i, ins) in d.instrs.iter().enumerate() {
        let Some(st) = &states[i] else {
            continue; // unreachable from the entry
        };
        let (mut after, defined) = step(ins, st, &mut factory);
        after.vals.retain(|_, v| is_miss(v));
        if after.vals.is_empty() {
            continue;
        }
        let mut seen = HashSet::new();
        match every_path_returns(d, i, after, miss, width, reg, &mut seen) {
            Ok(()) => {
                on_miss_path.insert(i, seen);
            }
            Err(why) if defined.is_some_and(|(_, v)| is_miss(&v)) => {
                why_not.get_or_insert(format!("+{:#x}: {why}", ins.ip() - d.start));
            }
            Err(_) => {}
        }
    }
    let preds = predecessors(d);
    if on_miss_path.is_empty() {
        return Err(match why_not {
            Some(why) => format!("no path surely returns {miss}: {why}"),
            None => format!("no path puts {miss} in the return register as a constant"),
        });
    }
    // Where code on misses alone begins: where some way in comes from elsewhere. Of two such
    // places on one path the later is kept (paths from elsewhere join there); failing that,
    // the places every way into which comes from elsewhere.
    let entries = |all_outside: bool| -> Vec<usize> {
        let mut v: Vec<usize> = on_miss_path
            .keys()
            .copied()
            .filter(|i| {
                let outside = |p: &usize| !on_miss_path.contains_key(p);
                *i == 0
                    || if all_outside {
                        preds[*i].iter().all(outside)
                    } else {
                        preds[*i].iter().any(outside)
                    }
            })
            .collect();
        v.sort_unstable();
        v
    };
    let joined = entries(false);
    let latest: Vec<usize> = joined
        .iter()
        .copied()
        .filter(|a| !joined.iter().any(|b| b != a && on_miss_path[a].contains(b)))
        .collect();
    let starts = match covers_every_miss(d, &states, &latest, miss, width, reg, &is_miss) {
        Ok(()) => latest,
        Err(why) => {
            let first = entries(true);
            covers_every_miss(d, &states, &first, miss, width, reg, &is_miss).map_err(|_| why)?;
            first
        }
    };
    starts
        .iter()
        .map(|start| site_from(d, *start, &states, arg.is_some()))
        .collect()
}

/// Where every lookup's result can be read once it is known, for code with no instruction on
/// misses alone: instructions such that every path to a `ret` passes exactly one of them (none
/// comes back to itself or leads to another), from each of which every path returns, at `width`
/// bytes, the value some register or stack slot holds there. One instruction that every path
/// passes where there is one; else one for each `ret` (a lookup whose hits and misses leave by
/// two epilogues, each with its own unlock). Each is the first the kernel emulates among those
/// that qualify (before the unlock, while the lookup still holds the cache's lock, so that the
/// window it missed in is still open), else the first. Each lookup then traps once, and the
/// kernel compares the value with the miss value.
pub fn result_sites(
    d: &Decoded,
    miss: i64,
    width: u8,
    reg: Register,
    arg: Option<Register>,
) -> Result<Vec<(MissSite, ObjectAt, u8)>, String> {
    if d.indirect_jumps {
        return Err("the function jumps through a register (a jump table)".into());
    }
    let states = forward_states(d, arg, &|_| false);
    let rets: Vec<usize> = (0..d.instrs.len())
        .filter(|i| d.instrs[*i].flow_control() == FlowControl::Return)
        .collect();
    // Where a result may be: any register, or any stack slot the function uses.
    let mut candidates: Vec<Loc> = (0..16)
        .filter_map(|slot| slot_register(slot).map(Loc::Reg))
        .collect();
    for (i, ins) in d.instrs.iter().enumerate() {
        if let Some(st) = &states[i]
            && (0..ins.op_count()).any(|n| ins.op_kind(n) == OpKind::Memory)
            && let Some(slot) = slot_of(ins, st)
            && !candidates.contains(&slot)
        {
            candidates.push(slot);
        }
    }
    // Where instruction `i` (not in a loop, with the object known) holds the result, if it does.
    let holds_result = |i: usize| -> Option<(ObjectAt, u8)> {
        let st = states[i].as_ref()?;
        if (arg.is_some() && object_at(&states, i).is_none()) || reaches(d, i, i) {
            return None;
        }
        candidates.iter().find_map(|&loc| {
            let readable = match loc {
                Loc::Reg(r) => pt_regs_slot(r).map(ObjectAt::Register),
                Loc::Slot(s) => st.rsp.map(|rsp| ObjectAt::Memory {
                    slot: RSP_SLOT,
                    offset: s - rsp,
                }),
            }?;
            let start = State {
                vals: BTreeMap::from([(
                    loc,
                    Val::Result {
                        bytes: 8,
                        zext: false,
                    },
                )]),
                ..st.clone()
            };
            let bytes = returns_result(d, i, start, width, reg)?;
            // A narrower value widened with zeros is the miss only if the miss's upper bytes
            // are zero.
            let upper = (miss as u64 & mask(width)) >> (8 * u32::from(bytes.min(7)));
            (bytes >= width || upper == 0).then_some((readable, bytes))
        })
    };
    // The instructions on every path to `to`, the emulated ones first, each in code order.
    let on_every_path = |to: &[usize]| {
        let mut on: Vec<usize> = (0..d.instrs.len())
            .filter(|&i| states[i].is_some() && every_path_passes(d, i, to))
            .collect();
        on.sort_by_key(|&i| !is_emulated(&d.instrs[i]));
        on
    };
    let site = |i: usize, (at, bytes): (ObjectAt, u8)| {
        (
            MissSite {
                site: d.site(&d.instrs[i]),
                object: arg.and_then(|_| object_at(&states, i)),
            },
            at,
            bytes,
        )
    };
    if let Some((i, at)) = on_every_path(&rets)
        .into_iter()
        .find_map(|i| holds_result(i).map(|at| (i, at)))
    {
        return Ok(vec![site(i, at)]);
    }
    let mut chosen: Vec<(usize, (ObjectAt, u8))> = Vec::new();
    for &r in &rets {
        // A site already on every way to this ret covers it; one on only some of them leaves
        // no room for another (the filter below then finds none).
        if chosen.iter().any(|&(c, _)| every_path_passes(d, c, &[r])) {
            continue;
        }
        let (i, at) = on_every_path(&[r])
            .into_iter()
            .filter(|&i| {
                chosen
                    .iter()
                    .all(|&(c, _)| !reaches(d, c, i) && !reaches(d, i, c))
            })
            .find_map(|i| holds_result(i).map(|at| (i, at)))
            .ok_or_else(|| {
                format!(
                    "no instruction on every way to the ret at +{:#x} holds its result",
                    d.instrs[r].ip() - d.start
                )
            })?;
        chosen.push((i, at));
    }
    Ok(chosen.into_iter().map(|(i, at)| site(i, at)).collect())
}

/// Does every path from the entry to one of `rets` pass instruction `i`?
fn every_path_passes(d: &Decoded, i: usize, rets: &[usize]) -> bool {
    let mut seen = HashSet::from([i]);
    let mut stack = vec![0];
    while let Some(n) = stack.pop() {
        if rets.contains(&n) {
            return false;
        }
        if seen.insert(n) {
            stack.extend(successors(d, n).inside);
        }
    }
    true
}

/// Can control get from instruction `from` to `to` (leaving `from` first)?
fn reaches(d: &Decoded, from: usize, to: usize) -> bool {
    let mut seen = HashSet::new();
    let mut stack = successors(d, from).inside;
    while let Some(n) = stack.pop() {
        if n == to {
            return true;
        }
        if seen.insert(n) {
            stack.extend(successors(d, n).inside);
        }
    }
    false
}

/// Does every path from `i` (whose state before it is `st`) return the tracked result? With how
/// many of its low bytes to compare (fewer than `width` where it is widened with zeros).
fn returns_result(d: &Decoded, i: usize, st: State, width: u8, reg: Register) -> Option<u8> {
    let mut compare = width;
    let mut factory = InstructionInfoFactory::new();
    let mut done = HashSet::new();
    let mut stack = vec![(i, st)];
    while let Some((n, st)) = stack.pop() {
        if done.len() > PATH_BUDGET {
            return None;
        }
        if !done.insert((n, st.clone())) {
            continue;
        }
        let ins = &d.instrs[n];
        if ins.flow_control() == FlowControl::Return {
            match st.vals.get(&Loc::Reg(reg)) {
                Some(Val::Result { bytes, .. }) if *bytes >= width => {}
                Some(Val::Result { bytes, zext: true }) => compare = compare.min(*bytes),
                _ => return None,
            }
            continue;
        }
        let succ = successors(d, n);
        if succ.leaves {
            return None;
        }
        let (mut next, _) = step(ins, &st, &mut factory);
        next.vals.retain(|_, v| matches!(v, Val::Result { .. }));
        if next.vals.is_empty() {
            return None;
        }
        for s in succ.inside {
            stack.push((s, next.clone()));
        }
    }
    Some(compare)
}

/// Checks that every path by which a constant definition of the miss value reaches a `ret` with
/// it in `rax` passes exactly one of `starts`: a miss returned by a way no site is on (the branch
/// that skips the search of an empty cache straight to the shared unlock, say) would go unseen.
fn covers_every_miss(
    d: &Decoded,
    states: &[Option<State>],
    starts: &[usize],
    miss: i64,
    width: u8,
    reg: Register,
    is_miss: &dyn Fn(&Val) -> bool,
) -> Result<(), String> {
    let mut factory = InstructionInfoFactory::new();
    let mut done: HashSet<(usize, State, u8)> = HashSet::new();
    let mut budget = PATH_BUDGET;
    let at = |i: usize| d.instrs[i].ip() - d.start;
    // Where the miss value appears: a constant's definition, or a branch that tests for it.
    let mut seeds: Vec<(usize, usize, State, u8)> = Vec::new();
    for (i, ins) in d.instrs.iter().enumerate() {
        let Some(st) = &states[i] else {
            continue;
        };
        // Each seed follows only the value it brings, not those it inherits (their own seeds
        // follow them, from where they passed or not a site).
        let (after, defined) = step(ins, st, &mut factory);
        let def = defined.filter(|(_, v)| is_miss(v));
        for s in successors(d, i).inside {
            let mut edge = on_edge(d, i, s, after.clone());
            edge.vals.retain(|l, v| {
                is_miss(v) && (def.is_some_and(|(at, _)| at == *l) || !after.vals.contains_key(l))
            });
            if def.is_some() {
                seeds.push((i, s, edge, u8::from(starts.contains(&i))));
            } else if !edge.vals.is_empty() {
                seeds.push((i, s, edge, 0));
            }
        }
    }
    for (def, first, state, passed) in seeds {
        let mut stack = vec![(first, state, passed)];
        while let Some((i, st, passed)) = stack.pop() {
            if st.vals.is_empty() || !done.insert((i, st.clone(), passed)) {
                continue;
            }
            budget = budget
                .checked_sub(1)
                .ok_or_else(|| "too many paths to check".to_string())?;
            let passed = passed + u8::from(starts.contains(&i));
            if passed > 1 {
                return Err(format!(
                    "the miss value set at +{:#x} passes two probe sites, the second at +{:#x}",
                    at(def),
                    at(i)
                ));
            }
            let ins = &d.instrs[i];
            if ins.flow_control() == FlowControl::Return {
                if passed == 0 && matches_miss(st.vals.get(&Loc::Reg(reg)), miss, width) {
                    return Err(format!(
                        "the miss value set at +{:#x} is returned at +{:#x} by a way where no \
                         instruction is on misses alone",
                        at(def),
                        at(i)
                    ));
                }
                continue;
            }
            let (mut next, defined) = step(ins, &st, &mut factory);
            if let Some((loc, _)) = defined {
                next.vals.remove(&loc);
            }
            for s in successors(d, i).inside {
                let mut next = on_edge(d, i, s, next.clone());
                next.vals.retain(|_, v| is_miss(v));
                stack.push((s, next, passed));
            }
        }
    }
    Ok(())
}

/// From the definition at `def`: the earliest instruction of its basic block, or after it up to
/// the next join, that the kernel emulates and where the object is known (else the earliest
/// where it is known). Every instruction of the block before the definition runs only on the way
/// to it, and an earlier site fires before the lookup lets go of the cache's lock.
fn site_from(
    d: &Decoded,
    def: usize,
    objects: &[Option<State>],
    needs_object: bool,
) -> Result<MissSite, String> {
    let mut first = def;
    while first > 0
        && !d.is_join(&d.instrs[first])
        && matches!(
            d.instrs[first - 1].flow_control(),
            FlowControl::Next | FlowControl::Call
        )
    {
        first -= 1;
    }
    let mut candidates: Vec<usize> = (first..=def).collect();
    for i in def + 1..(def + SITE_LOOKAHEAD).min(d.instrs.len()) {
        let prev = &d.instrs[i - 1];
        if d.is_join(&d.instrs[i]) || prev.flow_control() != FlowControl::Next {
            break;
        }
        candidates.push(i);
    }
    let with_object = |i: &usize| {
        if needs_object {
            object_at(objects, *i).map(|o| (*i, Some(o)))
        } else {
            Some((*i, None))
        }
    };
    let best = candidates
        .iter()
        .filter(|i| is_emulated(&d.instrs[**i]))
        .find_map(with_object)
        .or_else(|| candidates.iter().find_map(with_object));
    match best {
        Some((i, object)) => Ok(MissSite {
            site: d.site(&d.instrs[i]),
            object,
        }),
        None => Err(format!(
            "the cache object is in no register or stack slot at the miss (+{:#x})",
            d.instrs[def].ip() - d.start
        )),
    }
}

#[cfg(test)]
mod tests {
    use iced_x86::Register;

    use super::*;
    use crate::probe::code::fixtures::{START, fixed_lookup};

    fn sites(code: &[u8], miss: i64) -> Result<Vec<MissSite>, String> {
        let d = Decoded::decode(code, START).unwrap();
        miss_sites(
            &d,
            miss,
            return_width(&d),
            Register::RAX,
            Some(Register::RDI),
        )
    }

    /// g++ -O2's `std::unordered_map::find` under a `unique_lock`, returning the iterator (a node
    /// pointer, end() null): hits and misses leave by two epilogues, each with its own unlock, and
    /// one miss reaches the first by a branch edge alone. (demo/zoo/iter_umap.cpp's Index::find.)
    const ITERATOR_LOOKUP: [u8; 0xbb] = [
        0x41, 0x54, 0x49, 0x89, 0xfc, 0x55, 0x48, 0x89, 0xf5, 0x53, 0xe8, 0x81, 0xf1, 0xff, 0xff,
        0x85, 0xc0, 0x0f, 0x85, 0x9d, 0x00, 0x00, 0x00, 0x49, 0x83, 0x7c, 0x24, 0x40, 0x00, 0x74,
        0x61, 0x49, 0x8b, 0x7c, 0x24, 0x30, 0x48, 0x89, 0xe8, 0x31, 0xd2, 0x48, 0xf7, 0xf7, 0x49,
        0x8b, 0x44, 0x24, 0x28, 0x48, 0x8b, 0x1c, 0xd0, 0x49, 0x89, 0xd0, 0x48, 0x85, 0xdb, 0x74,
        0x33, 0x48, 0x8b, 0x03, 0x48, 0x8b, 0x48, 0x08, 0x48, 0x39, 0xe9, 0x74, 0x24, 0x48, 0x8b,
        0x30, 0x48, 0x85, 0xf6, 0x74, 0x5f, 0x48, 0x8b, 0x4e, 0x08, 0x48, 0x89, 0xc3, 0x31, 0xd2,
        0x48, 0x89, 0xc8, 0x48, 0xf7, 0xf7, 0x49, 0x39, 0xd0, 0x75, 0x4b, 0x48, 0x89, 0xf0, 0x48,
        0x39, 0xe9, 0x75, 0xdc, 0x48, 0x8b, 0x1b, 0x4c, 0x89, 0xe7, 0xe8, 0x68, 0xf0, 0xff, 0xff,
        0x48, 0x89, 0xd8, 0x5b, 0x5d, 0x41, 0x5c, 0xc3, 0x49, 0x8b, 0x5c, 0x24, 0x38, 0x48, 0x85,
        0xdb, 0x75, 0x0e, 0xeb, 0xe4, 0x0f, 0x1f, 0x40, 0x00, 0x48, 0x8b, 0x1b, 0x48, 0x85, 0xdb,
        0x74, 0xd8, 0x48, 0x39, 0x6b, 0x08, 0x75, 0xf2, 0x4c, 0x89, 0xe7, 0xe8, 0x3a, 0xf0, 0xff,
        0xff, 0x48, 0x89, 0xd8, 0x5b, 0x5d, 0x41, 0x5c, 0xc3, 0x66, 0x90, 0x31, 0xdb, 0xeb, 0xbc,
        0x89, 0xc7, 0xe8, 0x15, 0xf0, 0xff, 0xff,
    ];

    #[test]
    fn two_epilogues_get_a_result_site_each_before_their_unlock() {
        let d = Decoded::decode(&ITERATOR_LOOKUP, START).unwrap();
        let err = sites(&ITERATOR_LOOKUP, 0).unwrap_err();
        assert!(err.contains("no instruction is on misses alone"), "{err}");
        let found = result_sites(&d, 0, 8, Register::RAX, Some(Register::RDI)).unwrap();
        let rbx = ObjectAt::Register(pt_regs_slot(Register::RBX).unwrap());
        // The cache is in r12 and, handed to the unlock, in rdi.
        let cache = Some(ObjectAt::Register(pt_regs_slot(Register::RDI).unwrap()));
        let got: Vec<_> = found
            .iter()
            .map(|(m, at, bytes)| (m.site.offset, m.site.emulated, m.object, *at, *bytes))
            .collect();
        // The call to each unlock: the lock still held, the result in rbx.
        assert_eq!(
            got,
            [(0x73, true, cache, rbx, 8), (0xa1, true, cache, rbx, 8)]
        );
    }

    #[test]
    fn one_result_site_where_every_path_passes_it() {
        let d = Decoded::decode(&fixed_lookup(), START).unwrap();
        let found = result_sites(&d, 0, 8, Register::RAX, Some(Register::RDI)).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn miss_site_is_the_jump_after_the_miss_value() {
        let found = sites(&fixed_lookup(), -1).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].site.offset, 0x34);
        assert!(found[0].site.emulated);
        assert_eq!(
            found[0].object,
            Some(ObjectAt::Register(pt_regs_slot(Register::RBP).unwrap()))
        );
    }

    #[test]
    fn no_miss_site_for_another_value() {
        let err = sites(&fixed_lookup(), 0).unwrap_err();
        assert!(err.contains("no path puts 0"), "{err}");
    }

    #[test]
    fn an_optional_s_empty_flag_is_followed_in_dl_not_rax() {
        // A std::optional<long> whose hits may hold 0: rax is 0 on both paths, dl only on the
        // miss. cmpq $0,(%rdi); je miss; xor %eax,%eax; mov $1,%edx; ret;
        // miss: xor %eax,%eax; xor %edx,%edx; ret
        let code = [
            0x48, 0x83, 0x3f, 0x00, 0x74, 0x08, 0x31, 0xc0, 0xba, 0x01, 0x00, 0x00, 0x00, 0xc3,
            0x31, 0xc0, 0x31, 0xd2, 0xc3,
        ];
        let d = Decoded::decode(&code, START).unwrap();
        let found = miss_sites(&d, 0, 1, Register::RDX, Some(Register::RDI)).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].site.offset >= 14, "on the miss branch: {found:?}");
        // Read in rax, the hit's 0 would count as a miss: a site on each path.
        let in_rax = miss_sites(&d, 0, 8, Register::RAX, Some(Register::RDI)).unwrap();
        assert_eq!(in_rax.len(), 2, "{in_rax:?}");
    }

    #[test]
    fn leaf_function_keeps_the_cache_in_its_argument_register() {
        // cmpq $0,(%rdi); je miss; mov 8(%rdi),%rax; ret; miss: mov $-1,%rax; ret
        let code = [
            0x48, 0x83, 0x3f, 0x00, 0x74, 0x05, 0x48, 0x8b, 0x47, 0x08, 0xc3, 0x48, 0xc7, 0xc0,
            0xff, 0xff, 0xff, 0xff, 0xc3,
        ];
        let found = sites(&code, -1).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].site.offset, 11,
            "the definition: nothing emulated near"
        );
        assert!(!found[0].site.emulated);
        assert_eq!(
            found[0].object,
            Some(ObjectAt::Register(pt_regs_slot(Register::RDI).unwrap()))
        );
    }

    /// gcc -O3's `long cache_lookup(struct cache *c, long key)` (demo/zoo/global_cache.c): the
    /// loop's two ways out without the key join at `mov $-1,%rbp`, which the found path jumps
    /// past; the value crosses the unlock call in rbp.
    const GLOBAL_LOOKUP_O3: &[u8] = &[
        0x55, 0x48, 0x89, 0xf5, 0x53, 0x48, 0x89, 0xfb, 0x48, 0x83, 0xec, 0x08, 0xe8, 0, 0, 0, 0,
        0x48, 0x63, 0x93, 0x28, 0x04, 0x00, 0x00, 0x85, 0xd2, 0x7e, 0x24, 0x31, 0xc0, 0xeb, 0x09,
        0x48, 0x83, 0xc0, 0x01, 0x48, 0x39, 0xd0, 0x74, 0x17, 0x48, 0x39, 0x6c, 0xc3, 0x28, 0x75,
        0xf0, 0x48, 0x98, 0x48, 0x8b, 0xac, 0xc3, 0x28, 0x02, 0x00, 0x00, 0xeb, 0x0b, 0x0f, 0x1f,
        0x40, 0x00, 0x48, 0xc7, 0xc5, 0xff, 0xff, 0xff, 0xff, 0x48, 0x89, 0xdf, 0xe8, 0, 0, 0, 0,
        0x48, 0x83, 0xc4, 0x08, 0x48, 0x89, 0xe8, 0x5b, 0x5d, 0xc3,
    ];

    #[test]
    fn a_value_set_where_two_paths_join_and_carried_across_the_unlock() {
        let found = sites(GLOBAL_LOOKUP_O3, -1).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].site.offset, 0x40,
            "mov $-1,%rbp: a join, probed itself"
        );
        assert_eq!(
            found[0].object,
            Some(ObjectAt::Register(pt_regs_slot(Register::RBX).unwrap()))
        );
    }

    /// gcc -O0's `bool lookup(struct c *c, long key, long *out)` returning early when found:
    /// the cache lives in a stack slot, and the miss path's block starts before the unlock call.
    const EARLY_RETURN_O0: &[u8] = &[
        0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x30, 0x48, 0x89, 0x7d, 0xe8, 0x48, 0x89, 0x75,
        0xe0, 0x48, 0x89, 0x55, 0xd8, 0x48, 0x8b, 0x45, 0xe8, 0x48, 0x89, 0xc7, 0xe8, 0x00, 0x00,
        0x00, 0x00, 0xc7, 0x45, 0xfc, 0x00, 0x00, 0x00, 0x00, 0xeb, 0x3d, 0x48, 0x8b, 0x45, 0xe8,
        0x8b, 0x55, 0xfc, 0x48, 0x63, 0xd2, 0x48, 0x83, 0xc2, 0x04, 0x48, 0x8b, 0x44, 0xd0, 0x08,
        0x48, 0x39, 0x45, 0xe0, 0x75, 0x20, 0x8b, 0x45, 0xfc, 0x48, 0x63, 0xd0, 0x48, 0x8b, 0x45,
        0xd8, 0x48, 0x89, 0x10, 0x48, 0x8b, 0x45, 0xe8, 0x48, 0x89, 0xc7, 0xe8, 0x00, 0x00, 0x00,
        0x00, 0xb8, 0x01, 0x00, 0x00, 0x00, 0xeb, 0x21, 0x83, 0x45, 0xfc, 0x01, 0x48, 0x8b, 0x45,
        0xe8, 0x8b, 0x40, 0x48, 0x39, 0x45, 0xfc, 0x7c, 0xb7, 0x48, 0x8b, 0x45, 0xe8, 0x48, 0x89,
        0xc7, 0xe8, 0x00, 0x00, 0x00, 0x00, 0xb8, 0x00, 0x00, 0x00, 0x00, 0xc9, 0xc3,
    ];

    #[test]
    fn a_stack_slot_holds_the_cache_and_the_site_comes_before_the_unlock() {
        let d = Decoded::decode(EARLY_RETURN_O0, START).unwrap();
        assert_eq!(return_width(&d), 4, "mov $0,%eax before the ret");
        let found = sites(EARLY_RETURN_O0, 0).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].site.offset, 0x79, "call (unlock), emulated");
        assert!(found[0].site.emulated);
        // The code has just loaded the cache into rax to pass it to the unlock.
        assert_eq!(
            found[0].object,
            Some(ObjectAt::Register(pt_regs_slot(Register::RAX).unwrap()))
        );
        // After the call only its stack slot holds it: rsp is 0x38 below the entry's, and the
        // slot at rbp-0x18 is the entry's rsp-0x20.
        let after_call = d.index_of(START + 0x7e).unwrap();
        assert_eq!(
            object_at(
                &forward_states(&d, Some(Register::RDI), &|_| false),
                after_call
            ),
            Some(ObjectAt::Memory {
                slot: RSP_SLOT,
                offset: 0x18
            })
        );
    }

    #[test]
    fn a_flag_set_before_the_search_and_cleared_when_found_has_no_miss_only_path() {
        // gcc -O0: found = false; for (...) if (hit) { found = true; break; } unlock; return found;
        let code = [
            0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x30, 0x48, 0x89, 0x7d, 0xe8, 0x48, 0x89,
            0x75, 0xe0, 0x48, 0x89, 0x55, 0xd8, 0x48, 0x8b, 0x45, 0xe8, 0x48, 0x89, 0xc7, 0xe8,
            0x00, 0x00, 0x00, 0x00, 0xc6, 0x45, 0xff, 0x00, 0xc7, 0x45, 0xf8, 0x00, 0x00, 0x00,
            0x00, 0xeb, 0x30, 0x48, 0x8b, 0x45, 0xe8, 0x8b, 0x55, 0xf8, 0x48, 0x63, 0xd2, 0x48,
            0x83, 0xc2, 0x04, 0x48, 0x8b, 0x44, 0xd0, 0x08, 0x48, 0x39, 0x45, 0xe0, 0x75, 0x13,
            0x8b, 0x45, 0xf8, 0x48, 0x63, 0xd0, 0x48, 0x8b, 0x45, 0xd8, 0x48, 0x89, 0x10, 0xc6,
            0x45, 0xff, 0x01, 0xeb, 0x10, 0x83, 0x45, 0xf8, 0x01, 0x48, 0x8b, 0x45, 0xe8, 0x8b,
            0x40, 0x48, 0x39, 0x45, 0xf8, 0x7c, 0xc4, 0x48, 0x8b, 0x45, 0xe8, 0x48, 0x89, 0xc7,
            0xe8, 0x00, 0x00, 0x00, 0x00, 0x0f, 0xb6, 0x45, 0xff, 0xc9, 0xc3,
        ];
        let err = sites(&code, 0).unwrap_err();
        // found = true (movb $1,-1(%rbp) at +0x53) overwrites the flag set false at +0x20.
        assert!(err.contains("+0x20: the value is lost at +0x57"), "{err}");
    }

    /// clang -O2's `long cache_get(struct cache *c, long key)` (demo/zoo/array_heap.c): -1 is set
    /// before the search and overwritten on a hit. The exhausted loop leaves by a jump of its own,
    /// but an empty cache (the window's case) branches straight to the unlock the hit shares.
    const DEFAULT_OVERWRITTEN_CLANG_O2: &[u8] = &[
        0xf3, 0x0f, 0x1e, 0xfa, 0x41, 0x57, 0x41, 0x56, 0x53, 0x49, 0x89, 0xf7, 0x48, 0x89, 0xfb,
        0xe8, 0xbc, 0xfd, 0xff, 0xff, 0x8b, 0x83, 0x28, 0x04, 0x00, 0x00, 0x49, 0xc7, 0xc6, 0xff,
        0xff, 0xff, 0xff, 0x85, 0xc0, 0x7e, 0x25, 0x31, 0xc9, 0x66, 0x0f, 0x1f, 0x84, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x4c, 0x39, 0x7c, 0xcb, 0x28, 0x74, 0x0b, 0x48, 0x83, 0xc1, 0x01, 0x48,
        0x39, 0xc8, 0x75, 0xf0, 0xeb, 0x08, 0x4c, 0x8b, 0xb4, 0xcb, 0x28, 0x02, 0x00, 0x00, 0x48,
        0x89, 0xdf, 0xe8, 0x3e, 0xfd, 0xff, 0xff, 0x4c, 0x89, 0xf0, 0x5b, 0x41, 0x5e, 0x41, 0x5f,
        0xc3,
    ];

    #[test]
    fn a_miss_returned_by_a_way_no_site_is_on_is_refused_not_half_watched() {
        let err = sites(DEFAULT_OVERWRITTEN_CLANG_O2, -1).unwrap_err();
        assert!(
            err.contains("returned at +0x5a by a way where no instruction is on misses alone"),
            "{err}"
        );
    }
}
