//! Where in a function a probe goes. A uprobe on an instruction the x86 kernel emulates (push,
//! one-byte nop, direct jmp/call/jcc) costs about a tenth of one it must single-step, and a probe
//! on the path that returns a lookup's miss value traps on misses alone. Both need the function's
//! code decoded (iced-x86); whenever the analysis is not sure it says why and the caller falls
//! back to the function's entry.
use std::path::Path;

use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, Register};

use crate::{
    probe::{
        callees::{Callees, releases_lock, takes_lock},
        closing,
        code::{
            ARG_REGS, Decoded, Site, code_of, describe, how, is_emulated, slot_name, slot_register,
            writes,
        },
        miss_path::{self, ReturnReg},
        plan::{LockEdges, MissSite, ObjectAt, Placed, RefillProbe},
        symbols::{Function, SymbolTable},
    },
    text::escape,
};

/// Instructions decoded before giving up on finding an emulated one in a prologue.
const PROLOGUE_LIMIT: usize = 16;
/// The first instruction of the function's straight-line prologue that the kernel emulates and
/// before which `reads` still hold the function's arguments; every call passes it exactly once.
/// `Err` says why the entry must be probed instead.
fn entry_site(code: &[u8], start: u64, reads: &[Register]) -> Result<Site, String> {
    let decoded = Decoded::decode(code, start)?;
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

/// Where the probe that reads argument `arg` at `f`'s entry goes: the first emulated prologue
/// instruction, or the entry itself. `-v` says which and why.
pub fn place_entry(
    binary: &Path,
    role: &str,
    f: Function,
    arg: u32,
    object: Option<ObjectAt>,
    verbose: bool,
) -> Placed {
    Placed {
        object,
        ..place_entry_reading(binary, role, f, &reads(arg, object), verbose)
    }
}

/// Where a probe that reads registers `regs` as `f`'s entry left them goes: the first emulated
/// prologue instruction before which they still hold them, or the entry itself.
pub fn place_entry_reading(
    binary: &Path,
    role: &str,
    f: Function,
    regs: &[Register],
    verbose: bool,
) -> Placed {
    let site = code_of(binary, &f).and_then(|code| entry_site(&code, f.address, regs));
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
        object: None,
    }
}

/// The registers an entry-side probe reads: the object argument's, unless the object is a
/// global (a copy the compiler made for one object).
fn reads(arg: u32, object: Option<ObjectAt>) -> Vec<Register> {
    match object {
        None => vec![ARG_REGS.get(arg as usize).copied().unwrap_or(Register::RDI)],
        Some(ObjectAt::Register(slot)) => slot_register(slot).into_iter().collect(),
        Some(_) => vec![],
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
        object: None,
    }
}

/// The miss-path sites of lookup `f` (or of a copy the compiler made of it, whose object is
/// `object` when not in argument `arg`) for `--miss-ret VALUE`, compared at the width the code
/// returns; `Err` with the reason when the code does not show them (the caller falls back to
/// entry and return probes).
pub fn place_miss(
    binary: &Path,
    f: &Function,
    arg: u32,
    object: Option<ObjectAt>,
    (value, ret): (i64, ReturnReg),
    verbose: bool,
) -> Result<Vec<MissSite>, String> {
    let c = lookup_code(binary, f, arg, object, ret)?;
    let (width, reg, fixed) = (c.width, c.reg, c.fixed);
    let found = miss_path::miss_sites(&c.decoded, value, width, reg, c.arrives)?;
    let mut sites = Vec::new();
    for m in found {
        let object = fixed
            .or(m.object)
            .expect("an object where the function has one");
        if verbose {
            eprintln!(
                "racewatch: lookup miss: {} at {:#x}+{:#x} ({}, {}), {value} returned in {width} \
                 byte(s) of {reg:?}, cache {}",
                escape(&f.display),
                f.address,
                m.site.offset,
                m.site.instruction,
                how(m.site.emulated),
                describe_object(object),
            );
        }
        sites.push(planned(f, &m.site, object, None));
    }
    Ok(sites)
}

/// The plan's probe at `site` of lookup `f`, reading the object there and, for a result site,
/// the result.
fn planned(
    f: &Function,
    site: &Site,
    object: ObjectAt,
    result: Option<(ObjectAt, u8)>,
) -> MissSite {
    MissSite {
        function: f.clone(),
        offset: site.offset,
        emulated: site.emulated,
        object,
        result,
    }
}

/// A lookup's code as the miss analysis takes it.
struct LookupCode {
    decoded: Decoded,
    /// The width and register of the value its miss is told by.
    width: u8,
    reg: Register,
    /// Where its object arrives: the register of the object argument, or one a copy receives it
    /// in; nowhere for a copy made for one global, `fixed`, which every site then names.
    arrives: Option<Register>,
    fixed: Option<ObjectAt>,
}

/// Where the object of argument `arg` (or of a copy, `object`) arrives: a register, or nowhere
/// for a copy made for one global, which every site then names.
fn arrival(arg: u32, object: Option<ObjectAt>) -> (Option<Register>, Option<ObjectAt>) {
    match object {
        None => (ARG_REGS.get(arg as usize).copied(), None),
        Some(ObjectAt::Register(slot)) => (slot_register(slot), None),
        Some(other) => (None, Some(other)),
    }
}

/// Lookup `f`'s code, for the object of argument `arg` (or of a copy, `object`), its miss told
/// by `ret`.
fn lookup_code(
    binary: &Path,
    f: &Function,
    arg: u32,
    object: Option<ObjectAt>,
    ret: ReturnReg,
) -> Result<LookupCode, String> {
    let (arrives, fixed) = arrival(arg, object);
    let code = code_of(binary, f)?;
    let decoded = Decoded::decode(&code, f.address)?;
    let (width, reg) = match ret {
        ReturnReg::Rax => (miss_path::return_width(&decoded), Register::RAX),
        ReturnReg::Rdx { bytes } => (bytes, Register::RDX),
    };
    Ok(LookupCode {
        decoded,
        width,
        reg,
        arrives,
        fixed,
    })
}

/// Where every call of lookup `f` (or of a copy, whose object is `object`) has its result, for
/// code with no instruction on misses alone: one trap per lookup, the kernel comparing the result
/// with the miss value. `Err` says why not.
pub fn place_result(
    binary: &Path,
    f: &Function,
    arg: u32,
    object: Option<ObjectAt>,
    (value, ret): (i64, ReturnReg),
    verbose: bool,
) -> Result<Vec<MissSite>, String> {
    let c = lookup_code(binary, f, arg, object, ret)?;
    let fixed = c.fixed;
    let found = miss_path::result_sites(&c.decoded, value, c.width, c.reg, c.arrives)?;
    let mut sites = Vec::new();
    for (m, at, bytes) in found {
        let object = fixed
            .or(m.object)
            .expect("an object where the function has one");
        if verbose {
            eprintln!(
                "racewatch: lookup result: {} at {:#x}+{:#x} ({}, {}), the low {bytes} byte(s) of \
                 its result {}, cache {}",
                escape(&f.display),
                f.address,
                m.site.offset,
                m.site.instruction,
                how(m.site.emulated),
                describe_object(at),
                describe_object(object),
            );
        }
        sites.push(planned(f, &m.site, object, Some((at, bytes))));
    }
    Ok(sites)
}

/// How many low bytes of `rax` lookup `f` sets at its returns (8 when its code cannot be read).
pub fn return_bytes(binary: &Path, f: &Function) -> u8 {
    code_of(binary, f)
        .and_then(|code| Decoded::decode(&code, f.address))
        .map_or(8, |d| miss_path::return_width(&d))
}

/// Where the object is, for `-v`.
fn describe_object(object: ObjectAt) -> String {
    match object {
        ObjectAt::Register(slot) => format!("in {}", slot_name(slot)),
        ObjectAt::Memory { slot, offset } => format!("at {offset:+#x}({})", slot_name(slot)),
        ObjectAt::Static(address) => format!("the global at {address:#x}"),
    }
}

/// Where a lock-guarded cache's readers can get in: from each of clear `clear`'s releases of
/// the cache's lock to the first instruction refill `refill` runs holding it again (see
/// `closing::unlock_sites` and `closing::locked_sites`), both traps inside the critical
/// sections. The object arrives in argument `arg` of both. `Err` says why racewatch does not
/// see the lock (then the hazard counts all of each window).
pub fn place_lock_edges(
    binary: &Path,
    table: &SymbolTable,
    clear: &Function,
    refill: &Function,
    arg: u32,
    verbose: bool,
) -> Result<LockEdges, String> {
    let callees = Callees::load(binary);
    let callees = &callees;
    let named = |pred: fn(&str) -> bool| {
        move |ins: &iced_x86::Instruction| callees.name(ins, table).is_some_and(|n| pred(&n))
    };
    let (arrives, _) = arrival(arg, None);
    let placed = |f: &Function, sites: Vec<(Site, ObjectAt)>| -> Vec<Placed> {
        sites
            .into_iter()
            .map(|(s, o)| Placed {
                function: f.clone(),
                offset: s.offset,
                emulated: s.emulated,
                object: Some(o),
            })
            .collect()
    };
    let decoded = |f: &Function| code_of(binary, f).and_then(|c| Decoded::decode(&c, f.address));
    let d = decoded(clear).map_err(|e| format!("clear: {e}"))?;
    let exits = d.exits(&|_| false).map_err(|e| format!("clear: {e}"))?;
    let unlocks = closing::unlock_sites(&d, &exits, arrives, None, &named(releases_lock))
        .map_err(|e| format!("clear: {e}"))?;
    let d = decoded(refill).map_err(|e| format!("update: {e}"))?;
    let locked = closing::locked_sites(&d, arrives, None, &named(takes_lock))
        .map_err(|e| format!("update: {e}"))?;
    if verbose {
        let list = |f: &Function, sites: &[(Site, ObjectAt)]| {
            sites
                .iter()
                .map(|(s, o)| {
                    format!(
                        "{:#x}+{:#x} ({}, {}), cache {}",
                        f.address,
                        s.offset,
                        s.instruction,
                        how(s.emulated),
                        describe_object(*o)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        eprintln!(
            "racewatch: the cache's lock: released by {} at {}, taken again by {} at {}",
            escape(&clear.display),
            list(clear, &unlocks),
            escape(&refill.display),
            list(refill, &locked),
        );
    }
    Ok(LockEdges {
        unlocks: placed(clear, unlocks),
        locked: placed(refill, locked),
    })
}

/// The cheapest sure way to probe refill `f`: its last calls, each reading the cache (see
/// `closing`); else its entry and its exits when they are all emulated instructions; else its
/// entry and a return probe.
pub fn place_refill(
    binary: &Path,
    table: &SymbolTable,
    f: Function,
    arg: u32,
    object: Option<ObjectAt>,
    verbose: bool,
) -> RefillProbe {
    let fragment_prefix = format!("{}.", f.symbol);
    let is_fragment = |addr: u64| {
        table
            .containing(addr)
            .is_some_and(|g| g.symbol.starts_with(&fragment_prefix))
    };
    // The code, and its exits: every plan below needs them.
    let read = code_of(binary, &f).and_then(|code| {
        let decoded = Decoded::decode(&code, f.address)?;
        let exits = decoded.exits(&is_fragment)?;
        Ok((code, decoded, exits))
    });
    let closes = read
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|(_, decoded, exits)| {
            let (arrives, fixed) = arrival(arg, object);
            closing::close_sites(decoded, exits, arrives, fixed)
        });
    let why_not_closes = match closes {
        Ok(sites) => {
            if verbose {
                eprintln!(
                    "racewatch: update: {} closes its window at its last calls: {}",
                    escape(&f.display),
                    sites
                        .iter()
                        .map(|(s, o)| format!(
                            "{:#x}+{:#x} ({}, emulated), cache {}",
                            f.address,
                            s.offset,
                            s.instruction,
                            describe_object(*o)
                        ))
                        .collect::<Vec<_>>()
                        .join("; ")
                );
            }
            return RefillProbe::Closes {
                sites: sites
                    .into_iter()
                    .map(|(s, o)| Placed {
                        function: f.clone(),
                        offset: s.offset,
                        emulated: true,
                        object: Some(o),
                    })
                    .collect(),
                entry: place_entry(binary, "update", f, arg, object, false),
            };
        }
        Err(why) => why,
    };
    let plan = read.and_then(|(code, decoded, exits)| {
        let exits: Vec<Site> = exits
            .iter()
            .map(|&i| decoded.site(&decoded.instrs[i]))
            .collect();
        if let Some(slow) = exits.iter().find(|e| !e.emulated) {
            return Err(format!(
                "it returns by {} at +{:#x}, which the kernel single-steps",
                slow.instruction, slow.offset
            ));
        }
        let entry = entry_site(&code, f.address, &reads(arg, object))?;
        Ok((entry, exits))
    });
    match plan {
        Ok((entry, exits)) => {
            if verbose {
                eprintln!(
                    "racewatch: update: {} at {:#x}+{:#x} ({}), and its exits at {} (emulated), \
                     its entry probed: {why_not_closes}",
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
                    object,
                },
            }
        }
        Err(why) => {
            if verbose {
                eprintln!(
                    "racewatch: update: {} at its entry {:#x}, with its return probed: {}",
                    escape(&f.display),
                    f.address,
                    if why == why_not_closes {
                        why
                    } else {
                        format!("{why_not_closes}; {why}")
                    }
                );
            }
            RefillProbe::Return(Placed {
                object,
                ..at_entry(binary, "update", f, false)
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::probe::code::fixtures::{START, fixed_lookup};

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
}
