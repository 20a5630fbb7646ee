//! Where `d[k]`'s KeyError is raised inline. Built with link-time optimisation (as Debian's
//! CPython 3.11 and 3.13 are), the eval loop (a specialised `d[k]`) and `dict_subscript` (one not
//! yet specialised) inline `_PyErr_SetKeyError`: they pack `(key,)` with a call, then load
//! `PyExc_KeyError` as an argument of the call that raises it. No symbol marks that code, but the
//! load does: it reads the exported `PyExc_KeyError` pointer.
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
}
