//! Where a copy the compiler made of a function (`f.constprop.0`, `f.isra.0`, `f.part.0`)
//! receives the watched object. A copy made for one constant object (gcc clones a function
//! called with `&global`) has no object argument left: its DWARF still names the object, as the
//! parameter's location `DW_OP_addr X; DW_OP_stack_value`. A copy whose arguments were
//! reordered says in which register the object arrives. A copy inlined into another function
//! has no call to probe: the DWARF says where each one is, for racewatch to name.
use std::path::Path;

use gimli::{AttributeValue, Operation, UnitOffset, constants as dw};

use crate::probe::{
    code::pt_regs_slot,
    dwarf::{self, R},
    plan::ObjectAt,
    symbols::{self, Function},
};

/// DWARF register numbers (x86-64 psABI) of the general-purpose registers.
const DWARF_REGS: [iced_x86::Register; 16] = {
    use iced_x86::Register::*;
    [
        RAX, RDX, RCX, RBX, RSI, RDI, RBP, RSP, R8, R9, R10, R11, R12, R13, R14, R15,
    ]
};

/// Where `copy` receives the object that `original_arg` (0-based) of the function it was copied
/// from carries, from the file's DWARF. `Err` says why it cannot be told.
pub fn object_in_copy(
    binary: &Path,
    copy: &Function,
    original_arg: u32,
) -> Result<ObjectAt, String> {
    dwarf::with_dwarf(binary, |d| {
        dwarf::at_function(d, copy.address, |unit, die| {
            let Some(AttributeValue::UnitRef(origin)) =
                unit.entry(die)?.attr_value(dw::DW_AT_abstract_origin)
            else {
                return Ok(None);
            };
            let Some(param) = nth_parameter(unit, origin, original_arg)? else {
                return Ok(None);
            };
            parameter_location(d, unit, die, param, copy.address)
        })
    })
    .map_err(|e| format!("{e} to say where its object is"))?
    .ok_or_else(|| {
        "its DWARF does not say where the object is (the argument was optimized away)".into()
    })
}

/// The offset of the `n`th formal parameter of the subprogram at `of`.
fn nth_parameter(
    unit: &gimli::Unit<R>,
    of: UnitOffset,
    n: u32,
) -> gimli::Result<Option<UnitOffset>> {
    let mut tree = unit.entries_tree(Some(of))?;
    let mut children = tree.root()?.children();
    let mut seen = 0;
    while let Some(child) = children.next()? {
        if child.entry().tag() == dw::DW_TAG_formal_parameter {
            if seen == n {
                return Ok(Some(child.entry().offset()));
            }
            seen += 1;
        }
    }
    Ok(None)
}

/// Where the copy at `copy` (its DIE) has parameter `param` (the abstract one) on entry.
fn parameter_location(
    dwarf: &gimli::Dwarf<R>,
    unit: &gimli::Unit<R>,
    copy: UnitOffset,
    param: UnitOffset,
    entry_pc: u64,
) -> gimli::Result<Option<ObjectAt>> {
    let mut tree = unit.entries_tree(Some(copy))?;
    let mut children = tree.root()?.children();
    while let Some(child) = children.next()? {
        let e = child.entry();
        if e.tag() != dw::DW_TAG_formal_parameter
            || e.attr_value(dw::DW_AT_abstract_origin) != Some(AttributeValue::UnitRef(param))
        {
            continue;
        }
        let Some(location) = e.attr_value(dw::DW_AT_location) else {
            return Ok(None);
        };
        if let AttributeValue::Exprloc(expr) = location {
            return Ok(object_at(expr, unit.encoding()));
        }
        // A location list: the entry that covers the copy's first instruction.
        let Some(mut list) = dwarf.attr_locations(unit, location)? else {
            return Ok(None);
        };
        while let Some(l) = list.next()? {
            if (l.range.begin..l.range.end).contains(&entry_pc) {
                return Ok(object_at(l.data, unit.encoding()));
            }
        }
        return Ok(None);
    }
    Ok(None)
}

/// The object a location expression gives: a constant address, or a register.
fn object_at(expr: gimli::Expression<R>, encoding: gimli::Encoding) -> Option<ObjectAt> {
    let mut ops = expr.operations(encoding);
    match (ops.next().ok()?, ops.next().ok()?) {
        (Some(Operation::Address { address }), Some(Operation::StackValue)) => {
            Some(ObjectAt::Static(address))
        }
        (Some(Operation::Register { register }), None) => {
            let reg = *DWARF_REGS.get(usize::from(register.0))?;
            pt_regs_slot(reg).map(ObjectAt::Register)
        }
        _ => None,
    }
}

/// A place the compiler inlined a watched function into another: there is no call to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inlined {
    /// The function it was inlined into, demangled.
    pub into: String,
    /// Where the inlined code begins.
    pub address: u64,
}

/// Every place the file's DWARF says a function whose symbol `is_it` accepts was inlined. Empty
/// when the file has no DWARF: nothing then tells.
pub fn inlined(binary: &Path, is_it: impl Fn(&str) -> bool) -> Vec<Inlined> {
    dwarf::with_dwarf(binary, |d| {
        let mut units = Vec::new();
        let mut headers = d.units();
        while let Some(header) = headers.next()? {
            units.push(d.unit(header)?);
        }
        let mut found = Vec::new();
        for unit in &units {
            // The subprogram the walk is in, by depth: what the inlined code sits in.
            let mut within: Vec<(isize, Option<String>)> = Vec::new();
            let mut entries = unit.entries();
            while let Some(e) = entries.next_dfs()? {
                let depth = e.depth();
                while within.last().is_some_and(|(d, _)| *d >= depth) {
                    within.pop();
                }
                if e.tag() == dw::DW_TAG_subprogram {
                    let name = linkage_name(d, &units, unit, e.offset())?;
                    within.push((depth, name));
                } else if e.tag() == dw::DW_TAG_inlined_subroutine
                    && let Some(name) = linkage_name(d, &units, unit, e.offset())?
                    && is_it(&name)
                {
                    let into = within.first().and_then(|(_, n)| n.clone());
                    found.push(Inlined {
                        into: into.map_or_else(|| "?".into(), |n| symbols::short_name(&n)),
                        address: first_address(d, unit, e)?.unwrap_or(0),
                    });
                }
            }
        }
        found.sort_by_key(|i| i.address);
        Ok(found)
    })
    .unwrap_or_default()
}

/// The symbol the function a DIE stands for has: its linkage name, or its name where the
/// language does not mangle (C), found through the DIEs it refers to (the abstract instance an
/// inlined or out-of-line copy comes from, the declaration in a class).
fn linkage_name<'d>(
    dwarf: &gimli::Dwarf<R<'d>>,
    units: &'d [gimli::Unit<R<'d>>],
    unit: &'d gimli::Unit<R<'d>>,
    offset: UnitOffset,
) -> gimli::Result<Option<String>> {
    let (mut unit, mut offset) = (unit, offset);
    let mut name = None;
    for _ in 0..4 {
        let e = unit.entry(offset)?;
        for at in [dw::DW_AT_linkage_name, dw::DW_AT_MIPS_linkage_name] {
            if let Some(v) = e.attr_value(at) {
                return Ok(Some(
                    dwarf.attr_string(unit, v)?.to_string_lossy().into_owned(),
                ));
            }
        }
        if name.is_none()
            && let Some(v) = e.attr_value(dw::DW_AT_name)
        {
            name = Some(dwarf.attr_string(unit, v)?.to_string_lossy().into_owned());
        }
        let next = [dw::DW_AT_abstract_origin, dw::DW_AT_specification]
            .into_iter()
            .find_map(|at| e.attr_value(at));
        match next {
            Some(AttributeValue::UnitRef(o)) => offset = o,
            Some(AttributeValue::DebugInfoRef(o)) => {
                let Some((u, o)) = units
                    .iter()
                    .find_map(|u| Some((u, o.to_unit_offset(&u.header)?)))
                else {
                    break;
                };
                (unit, offset) = (u, o);
            }
            _ => break,
        }
    }
    Ok(name)
}

/// Where a DIE's code begins: its `low_pc`, else its first range.
fn first_address<'d>(
    dwarf: &gimli::Dwarf<R<'d>>,
    unit: &gimli::Unit<R<'d>>,
    e: &gimli::DebuggingInformationEntry<R<'d>>,
) -> gimli::Result<Option<u64>> {
    if let Some(low) = e.attr_value(dw::DW_AT_low_pc) {
        return dwarf.attr_address(unit, low);
    }
    if e.attr_value(dw::DW_AT_ranges).is_none() {
        return Ok(None);
    }
    let mut ranges = dwarf.die_ranges(unit, e)?;
    Ok(ranges.next()?.map(|r| r.begin))
}
