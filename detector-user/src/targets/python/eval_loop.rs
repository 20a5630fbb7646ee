//! Where `d[k]`'s KeyError is raised inline. Built with link-time optimisation (as Debian's
//! CPython 3.11 and 3.13 are), the eval loop (a specialised `d[k]`) and `dict_subscript` (one not
//! yet specialised) inline `_PyErr_SetKeyError`: they pack `(key,)` with a call, then load
//! `PyExc_KeyError` as an argument of the call that raises it. No symbol marks that code, but the
//! load does: it reads the exported `PyExc_KeyError` pointer.
//!
//! The same builds inline `k in d` (`PyDict_Contains`, which 3.13's CONTAINS_OP_DICT calls) into
//! the eval loop and into C code: there, the call to the dict's lookup function whose result is
//! then told apart as an error (-3) and as "no entry" (-1) is that `in`.
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};

use super::image::Image;
use crate::probe::symbols::Function;

/// Instructions looked at on either side of the load.
const NEAR: usize = 6;

/// Each of `functions` that raises inline (the eval loop is added), with where to probe each raise
/// in it (see [`probe_site`]).
pub fn inline_raises(image: &Image, functions: &[&Function]) -> Vec<(Function, Vec<u64>)> {
    let Some((key_error, _)) = image.symbol("PyExc_KeyError") else {
        return Vec::new();
    };
    let eval = image.function("_PyEval_EvalFrameDefault");
    eval.iter()
        .chain(functions.iter().copied())
        .filter_map(|f| {
            let instrs = decode(image, f)?;
            let offsets: Vec<u64> = (0..instrs.len())
                .filter(|&i| loads(&instrs[i], key_error))
                .filter_map(|i| probe_site(&instrs, i))
                .map(|i| instrs[i].ip() - f.address)
                .collect();
            (!offsets.is_empty()).then(|| (f.clone(), offsets))
        })
        .collect()
}

/// `f`'s instructions, from the file.
fn decode(image: &Image, f: &Function) -> Option<Vec<Instruction>> {
    let code = image.bytes_at(f.address, f.size)?;
    Some(
        Decoder::with_ip(64, code, f.address, DecoderOptions::NONE)
            .iter()
            .collect(),
    )
}

/// How far before an inlined raise the dict's type check is looked for, in instructions.
const HANDLER: usize = 96;

/// In `f`, which raises inline at offset `raise`, the type check that `d[k]`'s handler starts
/// with (`cmp $PyDict_Type, 8(%reg)`, DEOPT_IF(!PyDict_CheckExact(dict))), nearest before the
/// raise: its offset and the register holding the dict there. Every `d[k]` runs it, so it is
/// where lookups are counted when the lookup function itself was inlined.
pub fn dict_check_before(image: &Image, f: &Function, raise: u64) -> Option<(u64, Register)> {
    let (dict_type, _) = image.symbol("PyDict_Type")?;
    let instrs = decode(image, f)?;
    let at = instrs.iter().position(|i| i.ip() == f.address + raise)?;
    instrs[at.saturating_sub(HANDLER)..at]
        .iter()
        .rev()
        .find(|i| checks_type(i, dict_type))
        .map(|i| (i.ip() - f.address, i.memory_base()))
}

/// `cmp $TYPE, 8(%reg)`: an object's `ob_type` compared with `ty`.
fn checks_type(ins: &Instruction, ty: u64) -> bool {
    ins.mnemonic() == Mnemonic::Cmp
        && ins.op0_kind() == OpKind::Memory
        && ins.memory_index() == Register::None
        && ins.memory_base().is_gpr64()
        && ins.memory_displacement64() == 8
        && matches!(ins.op1_kind(), OpKind::Immediate32to64)
        && ins.immediate(1) == ty
}

/// `mov reg, [rip + PyExc_KeyError]` into the first or second argument register.
fn loads(ins: &Instruction, key_error: u64) -> bool {
    ins.mnemonic() == Mnemonic::Mov
        && matches!(ins.op0_register(), Register::RDI | Register::RSI)
        && ins.op1_kind() == OpKind::Memory
        && ins.is_ip_rel_memory_operand()
        && ins.ip_rel_memory_address() == key_error
}

/// For the load of `PyExc_KeyError` at `at`: `None` unless it sits between the call that packed
/// the tuple (`rax` untouched since) and the call that raises; else the instruction to probe: that
/// raising call when `rax` still holds the tuple there (the kernel emulates a call, where it
/// single-steps the load), else the load.
fn probe_site(instrs: &[Instruction], at: usize) -> Option<usize> {
    let packed = instrs[at.saturating_sub(NEAR)..at]
        .iter()
        .rev()
        .take_while(|i| !writes_rax(i))
        .any(|i| i.flow_control() == FlowControl::Call);
    let end = (at + 1 + NEAR).min(instrs.len());
    let call = (at + 1..end)
        .take_while(|&i| {
            matches!(
                instrs[i].flow_control(),
                FlowControl::Next | FlowControl::Call
            )
        })
        .find(|&i| instrs[i].flow_control() == FlowControl::Call)?;
    if !packed {
        return None;
    }
    let kept = instrs[at + 1..call].iter().all(|i| !writes_rax(i));
    Some(if kept { call } else { at })
}

fn writes_rax(ins: &Instruction) -> bool {
    ins.flow_control() != FlowControl::Call
        && ins.op_count() > 0
        && ins.op0_kind() == OpKind::Register
        && ins.op0_register().full_register() == Register::RAX
        && !matches!(ins.mnemonic(), Mnemonic::Test | Mnemonic::Cmp)
}

/// Where the interpreter runs `k in d` on a dict besides the dict type's `in`.
#[derive(Debug, PartialEq, Eq)]
pub enum InlineContains {
    /// Its eval loop calls the dict's `in` (the function probed already).
    Called,
    /// Link-time optimisation inlined `PyDict_Contains` (into the eval loop's CONTAINS_OP_DICT
    /// and into C code): the addresses of those copies' calls to the dict's lookup function,
    /// where the dict, the key and its hash are the call's first three arguments.
    At(Vec<u64>),
    /// Neither could be found: why.
    Unknown(String),
}

/// How the interpreter in `image` runs `k in d` where it does not call `contains` (the dict
/// type's `in`; `get` is its `.get`, and the lookup function is the one both call). Copies
/// inside `probed` (functions probed at their entries) are not counted again.
pub fn inline_contains(
    image: &Image,
    contains: &Function,
    get: &Function,
    probed: &[&Function],
) -> InlineContains {
    let calls = |instrs: &[Instruction]| -> Vec<u64> {
        targets(image, instrs, &[Mnemonic::Call]).collect()
    };
    let exported = image.function("PyDict_Contains");
    let eval = image.function("_PyEval_EvalFrameDefault");
    if let Some(instrs) = eval.as_ref().and_then(|e| decode(image, e)) {
        let called = calls(&instrs);
        let probed = [Some(contains), exported.as_ref()];
        if probed.iter().flatten().any(|f| called.contains(&f.address)) {
            return InlineContains::Called;
        }
    }
    let lookup = match dict_lookup(image, contains, get) {
        Ok(lookup) => lookup,
        Err(why) => return InlineContains::Unknown(why),
    };
    // The functions probed at their entries already.
    let probed: Vec<(u64, u64)> = probed
        .iter()
        .copied()
        .chain(exported.as_ref())
        .map(|f| (f.address, f.address + f.size.max(1)))
        .collect();
    let mut sites = Vec::new();
    for (start, code) in image.code_sections() {
        let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
        for ins in decoder.iter() {
            if ins.mnemonic() != Mnemonic::Call
                || ins.op0_kind() != OpKind::NearBranch64
                || ins.near_branch64() != lookup
                || probed.iter().any(|&(a, b)| (a..b).contains(&ins.ip()))
            {
                continue;
            }
            let at = (ins.next_ip() - start) as usize;
            let after: Vec<Instruction> =
                Decoder::with_ip(64, &code[at..], ins.next_ip(), DecoderOptions::NONE)
                    .iter()
                    .take(RESULT_USE)
                    .collect();
            if tells_entry_apart(&after) {
                sites.push(ins.ip());
            }
        }
    }
    if sites.is_empty() {
        return InlineContains::Unknown(
            "its eval loop calls no dict `in`, and no inlined copy of one was found".into(),
        );
    }
    InlineContains::At(sites)
}

/// The dict lookup function: the first both `contains` (the dict type's `in`) and `get` (its
/// `.get`) call, past the key's hash (later shared calls are error paths).
pub fn dict_lookup(image: &Image, contains: &Function, get: &Function) -> Result<u64, String> {
    let (Some(c), Some(g)) = (decode(image, contains), decode(image, get)) else {
        return Err("its dict methods cannot be read".into());
    };
    let from_get: Vec<u64> = targets(image, &g, &[Mnemonic::Call]).collect();
    let hash = image.symbol("PyObject_Hash").map(|s| s.0);
    targets(image, &c, &[Mnemonic::Call])
        .find(|t| from_get.contains(t) && Some(*t) != hash)
        .ok_or_else(|| "its dict `in` and `.get` call no lookup in common".into())
}

/// Where a set's `k in s` runs: `contains` (the set type's `sq_contains`), or the function it
/// jumps straight on to (3.14's `set_contains` is a jump to `_PySet_Contains`, which the eval
/// loop calls as well).
pub fn jumped_to(image: &Image, contains: &Function) -> Option<Function> {
    let code = image.bytes_at(contains.address, 16)?;
    let first: Vec<Instruction> =
        Decoder::with_ip(64, code, contains.address, DecoderOptions::NONE)
            .iter()
            .take(2)
            .collect();
    let jmp = first
        .iter()
        .find(|i| i.mnemonic() != Mnemonic::Endbr64)
        .filter(|i| i.mnemonic() == Mnemonic::Jmp && i.op0_kind() == OpKind::NearBranch64)?;
    let target = through_stub(image, jmp.near_branch64());
    image.function_at(target, &format!("{} (jumped to)", contains.display))
}

/// Where the eval loop's specialised `k in s` (CONTAINS_OP_SET, 3.13+) looks a key up. Where
/// code calls `contains` (through the PLT or not: 3.14's eval loop is a function of its own,
/// unnamed), that probe sees it. Where link-time optimisation inlined `contains` into the
/// eval loop instead, the copy calls a function `contains` reaches within two calls (the set
/// lookup, `(set, key, hash)`) and tests the entry it returns for NULL and then for an empty
/// key: those calls.
pub fn inline_set_contains(image: &Image, contains: &Function) -> InlineContains {
    if called_anywhere(image, contains.address) {
        return InlineContains::Called;
    }
    let Some(eval) = image.function("_PyEval_EvalFrameDefault") else {
        return InlineContains::Unknown("it exports no _PyEval_EvalFrameDefault".into());
    };
    let (Some(instrs), Some(c)) = (decode(image, &eval), decode(image, contains)) else {
        return InlineContains::Unknown("its eval loop or its set `in` cannot be read".into());
    };
    let called = |instrs: &[Instruction]| -> Vec<u64> {
        targets(image, instrs, &[Mnemonic::Call, Mnemonic::Jmp]).collect()
    };
    let hash = image.symbol("PyObject_Hash").map(|s| s.0);
    let mut reached = called(&c);
    for t in reached.clone() {
        if let Some(inner) = image.function_at(t, "").and_then(|f| decode(image, &f)) {
            reached.extend(called(&inner));
        }
    }
    reached.retain(|&t| Some(t) != hash);
    let sites: Vec<u64> = instrs
        .iter()
        .enumerate()
        .filter(|(_, ins)| {
            ins.mnemonic() == Mnemonic::Call
                && ins.op0_kind() == OpKind::NearBranch64
                && reached.contains(&through_stub(image, ins.near_branch64()))
        })
        .filter(|&(i, _)| tests_set_entry(&instrs[i + 1..]))
        .map(|(_, ins)| ins.ip())
        .collect();
    if sites.is_empty() {
        return InlineContains::Unknown(
            "its eval loop calls no set `in`, and no inlined copy of one was found".into(),
        );
    }
    InlineContains::At(sites)
}

/// The functions `f` calls (through their PLT stubs), as far as `.eh_frame` tells each one's
/// extent.
pub fn callees(image: &Image, f: &Function) -> Vec<Function> {
    decode(image, f)
        .map(|instrs| {
            targets(image, &instrs, &[Mnemonic::Call])
                .filter_map(|t| image.function_at(t, &format!("a callee of {}", f.display)))
                .filter(|c| c.size > 0)
                .collect()
        })
        .unwrap_or_default()
}

/// Where code compares a function pointer with one of `functions` (by its address, an immediate
/// in a fixed-address executable or a `lea` of it in a position-independent one) to run an
/// inlined copy of it instead of calling it: profile-guided optimisation's speculative
/// devirtualization, as in Debian's 3.14, whose `method_vectorcall_FASTCALL` runs its own copy
/// of `dict_get` for method calls not yet specialised. Each such comparison: which function,
/// and where.
pub fn speculated_copies(image: &Image, functions: &[&Function]) -> Vec<(usize, u64)> {
    let mut found: Vec<(usize, u64)> = Vec::new();
    let which = |address: u64| functions.iter().position(|f| f.address == address);
    for (start, code) in image.code_sections() {
        let mut decoder = Decoder::with_ip(64, code, start, DecoderOptions::NONE);
        let mut loaded: Option<(Register, usize)> = None;
        for ins in decoder.iter() {
            let compared = match ins.mnemonic() {
                Mnemonic::Cmp
                    if matches!(
                        ins.op1_kind(),
                        OpKind::Immediate32to64 | OpKind::Immediate32
                    ) =>
                {
                    which(ins.immediate(1))
                }
                Mnemonic::Cmp if ins.op_count() == 2 => loaded.and_then(|(r, i)| {
                    [ins.op0_register(), ins.op1_register()]
                        .contains(&r)
                        .then_some(i)
                }),
                _ => None,
            };
            loaded = (ins.mnemonic() == Mnemonic::Lea && ins.is_ip_rel_memory_operand())
                .then(|| which(ins.ip_rel_memory_address()).map(|i| (ins.op0_register(), i)))
                .flatten()
                .or(loaded.filter(|_| ins.mnemonic() != Mnemonic::Cmp));
            found.extend(compared.map(|i| (i, ins.ip())));
        }
    }
    found
}

/// The calls to `lookup` in the copy a pointer check at `guard` (a `cmp` then `je` or `jne`, as
/// [`speculated_copies`] finds) runs when the pointer is the function's: every instruction of
/// the function holding the check reachable from its equal branch, its other branch left out.
/// None where no such branch follows the check or the function's extent is not known.
pub fn copy_calls(image: &Image, guard: u64, lookup: u64) -> Option<Vec<u64>> {
    let f = image.function_containing(guard, "")?;
    let instrs = decode(image, &f)?;
    calls_in_copy(&instrs, guard, |target| {
        through_stub(image, target) == lookup
    })
}

/// [`copy_calls`] in `instrs`, a whole function: the calls `to` accepts the target of.
fn calls_in_copy(instrs: &[Instruction], guard: u64, to: impl Fn(u64) -> bool) -> Option<Vec<u64>> {
    let at = |ip: u64| instrs.binary_search_by_key(&ip, |i| i.ip()).ok();
    let check = at(guard)?;
    let branch = instrs.get(check + 1)?;
    let taken = at(branch.near_branch_target());
    let (start, other) = match branch.mnemonic() {
        Mnemonic::Jne => (check + 2, taken?),
        Mnemonic::Je => (taken?, check + 2),
        _ => return None,
    };
    let mut seen = vec![false; instrs.len() + 1];
    seen[other] = true;
    let mut todo = vec![start];
    let mut calls = Vec::new();
    while let Some(i) = todo.pop() {
        let Some(ins) = instrs.get(i).filter(|_| !seen[i]) else {
            continue;
        };
        seen[i] = true;
        let target = at(ins.near_branch_target());
        match ins.flow_control() {
            FlowControl::Next | FlowControl::IndirectCall => todo.push(i + 1),
            FlowControl::Call => {
                if to(ins.near_branch_target()) {
                    calls.push(ins.ip());
                }
                todo.push(i + 1);
            }
            FlowControl::UnconditionalBranch => todo.extend(target),
            FlowControl::ConditionalBranch => {
                todo.extend([Some(i + 1), target].into_iter().flatten())
            }
            _ => {}
        }
    }
    calls.sort_unstable();
    Some(calls)
}

/// Whether a call anywhere in `image`'s code goes to `target`, directly or through its PLT stub.
fn called_anywhere(image: &Image, target: u64) -> bool {
    image.code_sections().any(|(start, code)| {
        Decoder::with_ip(64, code, start, DecoderOptions::NONE)
            .iter()
            .any(|i| {
                i.mnemonic() == Mnemonic::Call
                    && i.op0_kind() == OpKind::NearBranch64
                    && through_stub(image, i.near_branch64()) == target
            })
    })
}

/// Whether the code after a call to the set lookup tests its result (`rax`, an entry) for NULL
/// and then reads whether the entry's key is NULL (`cmpq $0, (%rax)`), as `set_contains_key`
/// does, before anything else is put in `rax`.
fn tests_set_entry(after: &[Instruction]) -> bool {
    let mut null_told = false;
    for i in after.iter().take(RESULT_USE) {
        if i.mnemonic() == Mnemonic::Test
            && i.op0_kind() == OpKind::Register
            && i.op0_register() == Register::RAX
            && i.op1_kind() == OpKind::Register
            && i.op1_register() == Register::RAX
        {
            null_told = true;
        } else if i.mnemonic() == Mnemonic::Cmp
            && i.op0_kind() == OpKind::Memory
            && i.memory_base() == Register::RAX
            && i.memory_index() == Register::None
            && i.memory_displacement64() == 0
            && matches!(
                i.op1_kind(),
                OpKind::Immediate8to64 | OpKind::Immediate32to64
            )
            && i.immediate(1) == 0
        {
            return null_told;
        }
        if writes_rax(i) || i.flow_control() == FlowControl::Call {
            return false;
        }
    }
    false
}

/// Instructions looked at after a lookup call for how its result is used.
const RESULT_USE: usize = 8;

/// Whether the code after a call to the dict lookup compares its result (`rax`, the entry's
/// index) with -3 (an error) and then with -1 (no entry: `cmp $-1` or `add $1`), as
/// `PyDict_Contains` does, rather than reading the value found (as `d[k]` does), before anything
/// else is put in `rax`.
fn tells_entry_apart(after: &[Instruction]) -> bool {
    let on_rax = |i: &Instruction, m: Mnemonic, v: i64| {
        i.mnemonic() == m
            && i.op0_kind() == OpKind::Register
            && i.op0_register() == Register::RAX
            && matches!(
                i.op1_kind(),
                OpKind::Immediate8to64 | OpKind::Immediate32to64
            )
            && i.immediate(1) as i64 == v
    };
    let mut error_told = false;
    for i in after.iter().take(RESULT_USE) {
        if on_rax(i, Mnemonic::Cmp, -3) {
            error_told = true;
        } else if on_rax(i, Mnemonic::Cmp, -1) || on_rax(i, Mnemonic::Add, 1) {
            return error_told;
        }
        if writes_rax(i) || i.flow_control() == FlowControl::Call {
            return false;
        }
    }
    false
}

/// Whether `f` calls `target` (or jumps to it, a tail call), directly or through a PLT stub.
pub fn reaches(image: &Image, f: &Function, target: u64) -> bool {
    decode(image, f).is_some_and(|instrs| {
        targets(image, &instrs, &[Mnemonic::Call, Mnemonic::Jmp]).any(|t| t == target)
    })
}

/// The functions `instrs` branch to directly by one of `branches` (a PLT stub's, through it).
fn targets<'a>(
    image: &'a Image,
    instrs: &'a [Instruction],
    branches: &'a [Mnemonic],
) -> impl Iterator<Item = u64> + 'a {
    instrs
        .iter()
        .filter(|i| branches.contains(&i.mnemonic()) && i.op0_kind() == OpKind::NearBranch64)
        .map(|i| through_stub(image, i.near_branch64()))
}

/// The function a call to `at` runs: `at`, or where the PLT stub there jumps (through a GOT
/// slot the file's relocations fill with a function of its own).
fn through_stub(image: &Image, at: u64) -> u64 {
    let Some(code) = image.bytes_at(at, 16) else {
        return at;
    };
    Decoder::with_ip(64, code, at, DecoderOptions::NONE)
        .iter()
        .take(2)
        .find(|i| {
            i.mnemonic() == Mnemonic::Jmp
                && i.op0_kind() == OpKind::Memory
                && i.is_ip_rel_memory_operand()
        })
        .and_then(|jmp| image.pointer_at(jmp.ip_rel_memory_address()))
        .filter(|&target| target != 0)
        .unwrap_or(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: u64 = 0x1000;
    const KEY_ERROR: u64 = 0x9000;

    /// Machine code from parts, each either bytes or a rip-relative `PyExc_KeyError` load into
    /// `rsi` (`48 8b 35 disp32`).
    enum Part {
        Bytes(&'static [u8]),
        LoadKeyError,
    }

    fn decode(parts: &[Part]) -> Vec<Instruction> {
        let mut code = Vec::new();
        for p in parts {
            match p {
                Part::Bytes(b) => code.extend_from_slice(b),
                Part::LoadKeyError => {
                    let next = START + code.len() as u64 + 7;
                    code.extend_from_slice(&[0x48, 0x8b, 0x35]);
                    code.extend_from_slice(&((KEY_ERROR - next) as u32).to_le_bytes());
                }
            }
        }
        Decoder::with_ip(64, &code, START, DecoderOptions::NONE)
            .iter()
            .collect()
    }

    /// The instructions probed for the raises in `instrs`.
    fn found(instrs: &[Instruction]) -> Vec<usize> {
        (0..instrs.len())
            .filter(|&i| loads(&instrs[i], KEY_ERROR))
            .filter_map(|i| probe_site(instrs, i))
            .collect()
    }

    const CALL: Part = Part::Bytes(&[0xe8, 0, 0, 0, 0]);

    /// Debian's CPython 3.13: `(key,)` packed, tested, then `_PyErr_SetObject(tstate,
    /// PyExc_KeyError, tuple)`, the tuple still in `rax` at that call, which is probed.
    #[test]
    fn the_inlined_raise_is_found() {
        let i = decode(&[
            CALL,
            Part::Bytes(&[0x4c, 0x8b, 0x4c, 0x24, 0x18]), // mov 0x18(%rsp),%r9
            Part::Bytes(&[0x48, 0x85, 0xc0]),             // test %rax,%rax
            Part::Bytes(&[0x48, 0x89, 0xc2]),             // mov %rax,%rdx
            Part::LoadKeyError,
            Part::Bytes(&[0x48, 0x8b, 0x3c, 0x24]), // mov (%rsp),%rdi
            CALL,
        ]);
        assert_eq!(found(&i), [6]);
        // rax overwritten between the load and the call: the load is probed.
        let i = decode(&[
            CALL,
            Part::LoadKeyError,
            Part::Bytes(&[0x48, 0x8b, 0x03]), // mov (%rbx),%rax
            CALL,
        ]);
        assert_eq!(found(&i), [1]);
    }

    /// A load after `rax` was overwritten (an exception match, not a raise), or not followed by
    /// a call, is not taken.
    #[test]
    fn other_loads_are_not_raises() {
        let overwritten = decode(&[
            CALL,
            Part::Bytes(&[0x48, 0x8b, 0x03]), // mov (%rbx),%rax
            Part::LoadKeyError,
            CALL,
        ]);
        assert!(found(&overwritten).is_empty());
        let no_call_after = decode(&[CALL, Part::LoadKeyError, Part::Bytes(&[0xc3])]);
        assert!(found(&no_call_after).is_empty());
    }

    /// `cmpq $0x9fc840, 8(%r9)`, as Debian 13's BINARY_SUBSCR_DICT starts; the same compare at
    /// another offset, or with another type, is not the dict check.
    #[test]
    fn the_dict_check_is_recognised() {
        let check = |bytes: &[u8]| {
            let ins = Decoder::with_ip(64, bytes, START, DecoderOptions::NONE).decode();
            (checks_type(&ins, 0x9fc840), ins.memory_base())
        };
        assert_eq!(
            check(&[0x49, 0x81, 0x79, 0x08, 0x40, 0xc8, 0x9f, 0x00]),
            (true, Register::R9)
        );
        assert!(!check(&[0x49, 0x81, 0x79, 0x10, 0x40, 0xc8, 0x9f, 0x00]).0);
        assert!(!check(&[0x49, 0x81, 0x79, 0x08, 0x40, 0xc8, 0x9f, 0x01]).0);
    }

    fn after_call(bytes: &[u8]) -> bool {
        let i: Vec<Instruction> = Decoder::with_ip(64, bytes, START, DecoderOptions::NONE)
            .iter()
            .collect();
        tells_entry_apart(&i)
    }

    /// Debian 13's CONTAINS_OP_DICT after its lookup call: -3, then -1; its BINARY_SUBSCR_DICT
    /// reads the value found instead.
    #[test]
    fn the_copy_behind_a_pointer_check_is_walked_alone() {
        // As Debian 3.14's method_vectorcall_FASTCALL: `cmp $dict_get,%rax; jne generic`, the
        // copy (two lookup calls, one on a branch of its own, and a call to something else), a
        // shared return, then the generic path's own lookup call, which is not the copy's.
        const LOOKUP: u64 = 0x8000;
        let call = |from: u64, to: u64| {
            let mut b = vec![0xe8];
            b.extend_from_slice(&((to as i64 - (from as i64 + 5)) as i32).to_le_bytes());
            b
        };
        let mut code = Vec::new();
        code.extend_from_slice(&[0x48, 0x3d, 0xb0, 0x3a, 0x60, 0x00]); // cmp $0x603ab0,%rax
        code.extend_from_slice(&[0x75, 0x14]); // jne generic (START+0x1c)
        code.extend_from_slice(&[0x85, 0xc9]); // test %ecx,%ecx
        code.extend_from_slice(&[0x74, 0x05]); // je second (START+0x11)
        code.extend(call(START + 0xc, LOOKUP)); // first lookup call
        code.extend(call(START + 0x11, LOOKUP)); // second
        code.extend(call(START + 0x16, 0x9000)); // something else
        code.push(0xc3); // ret
        code.extend(call(START + 0x1c, LOOKUP)); // generic: not the copy's
        code.push(0xc3);
        let instrs: Vec<Instruction> = Decoder::with_ip(64, &code, START, DecoderOptions::NONE)
            .iter()
            .collect();
        let calls = calls_in_copy(&instrs, START, |t| t == LOOKUP);
        assert_eq!(calls, Some(vec![START + 0xc, START + 0x11]));
        // `je` instead: the copy is the branch taken, and the fall-through is left out.
        code[6] = 0x74;
        let instrs: Vec<Instruction> = Decoder::with_ip(64, &code, START, DecoderOptions::NONE)
            .iter()
            .collect();
        assert_eq!(
            calls_in_copy(&instrs, START, |t| t == LOOKUP),
            Some(vec![START + 0x1c])
        );
        // No branch after the check: nothing to tell the copy by.
        assert_eq!(calls_in_copy(&instrs, START + 0x1c, |t| t == LOOKUP), None);
    }

    #[test]
    fn the_inlined_set_in_is_told_from_other_set_lookups() {
        let after = |bytes: &[u8]| {
            let instrs: Vec<Instruction> = Decoder::with_ip(64, bytes, START, DecoderOptions::NONE)
                .iter()
                .collect();
            tests_set_entry(&instrs)
        };
        // Debian 13's CONTAINS_OP_SET after its call to set_lookkey.
        let contains = [
            0x44, 0x8b, 0x1c, 0x24, // mov (%rsp),%r11d
            0x48, 0x85, 0xc0, // test %rax,%rax
            0x0f, 0x84, 0x77, 0x54, 0x00, 0x00, // je
            0x48, 0x83, 0x38, 0x00, // cmpq $0,(%rax)
            0x0f, 0x95, 0xc0, // setne %al
        ];
        assert!(after(&contains));
        // A discard reads the entry's key into a register first.
        let discard = [
            0x48, 0x85, 0xc0, // test %rax,%rax
            0x0f, 0x84, 0x77, 0x54, 0x00, 0x00, // je
            0x48, 0x8b, 0x10, // mov (%rax),%rdx
            0x48, 0x85, 0xd2, // test %rdx,%rdx
        ];
        assert!(!after(&discard));
        // Without the NULL test first, the entry is some other use of the result.
        let unchecked = [
            0x48, 0x83, 0x38, 0x00, // cmpq $0,(%rax)
            0x0f, 0x95, 0xc0, // setne %al
        ];
        assert!(!after(&unchecked));
    }

    #[test]
    fn the_inlined_in_is_told_from_d_k() {
        let contains = [
            0x44, 0x8b, 0x1c, 0x24, // mov (%rsp),%r11d
            0x48, 0x83, 0xf8, 0xfd, // cmp $-3,%rax
            0x0f, 0x84, 0x35, 0x7d, 0x00, 0x00, // je
            0xc7, 0x04, 0x24, 0x00, 0x00, 0x00, 0x00, // movl $0,(%rsp)
            0x48, 0x83, 0xf8, 0xff, // cmp $-1,%rax
            0x0f, 0x85, 0x75, 0x5a, 0x00, 0x00, // jne
        ];
        assert!(after_call(&contains));
        let subscript = [
            0x4c, 0x8b, 0x0c, 0x24, // mov (%rsp),%r9
            0x48, 0x83, 0xf8, 0xfd, // cmp $-3,%rax
            0x0f, 0x84, 0xa9, 0x78, 0x00, 0x00, // je
            0x4c, 0x8b, 0xac, 0x24, 0xe0, 0x00, 0x00, 0x00, // mov 0xe0(%rsp),%r13
            0x4d, 0x85, 0xed, // test %r13,%r13
            0x0f, 0x85, 0x4f, 0x5b, 0x00, 0x00, // jne
        ];
        assert!(!after_call(&subscript));
        // Debian sid's 3.14 tests the index with `add $1`.
        let add_one = [
            0x48, 0x83, 0xf8, 0xfd, // cmp $-3,%rax
            0x0f, 0x84, 0x35, 0x7d, 0x00, 0x00, // je
            0x31, 0xd2, // xor %edx,%edx
            0x48, 0x83, 0xc0, 0x01, // add $1,%rax
            0x0f, 0x85, 0x75, 0x5a, 0x00, 0x00, // jne
        ];
        assert!(after_call(&add_one));
        // -1 tested before -3, or after rax is overwritten: not `in`'s.
        let mut reordered = contains;
        reordered[7] = 0xff;
        reordered[24] = 0xfd;
        assert!(!after_call(&reordered));
    }
}
