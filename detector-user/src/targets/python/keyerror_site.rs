//! Finds where a failed `d[k]` leaves its dict readable at `_PyErr_SetKeyError`'s entry, from DWARF.
//!
//! A uprobe on `_PyErr_SetKeyError` sees only the missing key (arg0). At its first instruction
//! `[rsp]` is the return address, which names the call site, and the callee-saved registers
//! (rbx, rbp, r12-r15) still hold the caller's values. So wherever the caller's DWARF location
//! list puts the dict (or the value-stack pointer) in such a register over the call, the probe
//! can read which dict missed. Locations differ per build, so nothing here is hard-coded but
//! the CPython 3.11 source facts in [`CALLERS`] and [`TAIL_CHAIN`].
//!
//! Where the caller itself has lost the dict, a frame further out may still have it: see [`TAIL_CHAIN`].

use std::collections::HashMap;
use std::path::Path;

use gimli::{
    AttributeValue, CfaRule, LittleEndian, Operation, Register, RegisterRule, UnitOffset,
    UnwindSection, constants as dw,
};
use object::{Object, ObjectSection};

/// x86-64 only (checked), hence little-endian.
use super::dwarf::{R, SiteError, with_dwarf};

const KEY_ERROR_FN: &str = "_PyErr_SetKeyError";

/// The callers whose `_PyErr_SetKeyError` call is a failed `d[k]`, the variable that finds the
/// dict there, and the value-stack slot it points into (`None`: the variable is the dict).
/// - `_PyEval_EvalFrameDefault`: `binary_subscr_dict_error` (BINARY_SUBSCR_DICT's miss path) does
///   `sub = POP()` before the call, so the dict is `stack_pointer[-1]`.
/// - `dict_subscript(mp, key)`: the `mp_subscript` slot, i.e. unspecialized `d[k]` and `PyObject_GetItem`.
const CALLERS: [(&str, &str, Option<i64>); 2] = [
    ("_PyEval_EvalFrameDefault", "stack_pointer", Some(-1)),
    ("dict_subscript", "mp", None),
];

/// A [`CALLERS`] function whose own dict location is unusable, the function that tail-calls it,
/// and the call of the latter (in `outer`, by the variable `var` in scope) whose frame it returns to.
struct TailChain {
    inner: &'static str,
    via: &'static str,
    outer: &'static str,
    var: &'static str,
}

/// In `dict_subscript`, `mp` is only a DW_OP_entry_value at the `_PyErr_SetKeyError` call. But
/// `PyObject_GetItem` tail-jumps to the `mp_subscript` slot, so for an unspecialized `d[k]`,
/// `dict_subscript`'s frame returns straight to the eval loop's BINARY_SUBSCR call of
/// `PyObject_GetItem`, where `container` (the dict) is in a callee-saved register. The ABI makes
/// `PyObject_GetItem` restore those before its tail jump; `dict_subscript`'s CFI must show it left
/// that register alone. The eval loop's other `PyObject_GetItem` calls (name lookups in non-dict
/// namespaces) have no `container` in scope. Caveat: a C `mp_subscript` that tail-jumps on into
/// `PyObject_GetItem` (`mappingproxy_getitem`) leaves the wrapper, not the dict, in `container`, so
/// the reader must check that the object it reads is a dict. Dict subclasses reach
/// `dict_subscript` through `slot_mp_subscript`, a real call, so their outer frame never matches.
const TAIL_CHAIN: TailChain = TailChain {
    inner: "dict_subscript",
    via: "PyObject_GetItem",
    outer: "_PyEval_EvalFrameDefault",
    var: "container",
};

/// x86-64 registers a callee must preserve, so they still hold the caller's values at its entry.
const CALLEE_SAVED: [Register; 6] = [
    gimli::X86_64::RBX,
    gimli::X86_64::RBP,
    gimli::X86_64::R12,
    gimli::X86_64::R13,
    gimli::X86_64::R14,
    gimli::X86_64::R15,
];

/// A call of `_PyErr_SetKeyError` where the dict whose lookup failed is readable at the callee's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyErrorSite {
    /// ELF virtual address of the instruction after the call (what [rsp] holds at the callee's entry).
    pub return_vaddr: u64,
    /// Caller function name, for -v output.
    pub caller: String,
    pub dict: DictLocation,
    /// Set when the dict's location belongs to an outer frame: the site's function was tail-called
    /// from there, and the site only counts when that frame's return address is found at
    /// [rsp + sp_offset] at `_PyErr_SetKeyError`'s entry.
    pub outer: Option<OuterFrame>,
}

/// The frame a tail-called site function returns to (see [`KeyErrorSite::outer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OuterFrame {
    pub sp_offset: u64,
    pub return_vaddr: u64,
}

/// Where the dict is at the callee's entry; `dwarf_reg` is a DWARF x86-64 register number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DictLocation {
    /// dict = *(reg + offset) — value-stack slot (BINARY_SUBSCR_DICT: stack_pointer[-1] → offset -8).
    Deref { dwarf_reg: u16, offset: i64 },
    /// dict = reg.
    Reg { dwarf_reg: u16 },
}

/// Every call of `_PyErr_SetKeyError` in `image` (python or libpython) after which the missing dict
/// can be read at the callee's entry, sorted by return address.
pub fn find_keyerror_sites(image: &Path) -> Result<Vec<KeyErrorSite>, SiteError> {
    with_dwarf(image, |obj, dpath, dwarf| {
        sites_in(image, obj, dpath, dwarf)
    })
}

fn sites_in(
    image: &Path,
    obj: &object::File,
    dpath: &Path,
    dwarf: &gimli::Dwarf<R>,
) -> Result<Vec<KeyErrorSite>, SiteError> {
    let cfi = Cfi::new(obj).map_err(|source| SiteError::Object {
        path: image.into(),
        source,
    })?;
    let Scan {
        mut sites,
        calls,
        tail_called,
        outer_calls,
    } = scan(dwarf).map_err(|source| SiteError::Dwarf {
        path: dpath.into(),
        source,
    })?;
    // The BPF side keys sites by the inner return address alone, so one outer call per inner
    // site: if the compiler duplicated BINARY_SUBSCR, the copies beyond the first go unwatched.
    if let (Some(cfi), Some(&(outer_pc, dwarf_reg))) = (&cfi, outer_calls.iter().min()) {
        for return_vaddr in tail_called {
            let slot = cfi
                .return_address_slot(return_vaddr, dwarf_reg)
                .map_err(|source| SiteError::Dwarf {
                    path: image.into(),
                    source,
                })?;
            if let Some(sp_offset) = slot {
                sites.push(KeyErrorSite {
                    return_vaddr,
                    caller: TAIL_CHAIN.inner.into(),
                    dict: DictLocation::Reg { dwarf_reg },
                    outer: Some(OuterFrame {
                        sp_offset,
                        return_vaddr: outer_pc,
                    }),
                });
            }
        }
        sites.sort_by_key(|s| s.return_vaddr);
    }
    match (calls, sites.is_empty()) {
        (0, _) => Err(SiteError::NoCallSites { path: image.into() }),
        (calls, true) => Err(SiteError::NoUsableSites {
            path: image.into(),
            calls,
        }),
        _ => Ok(sites),
    }
}

/// The image's `.eh_frame`, which stays in the image when its DWARF is split off.
struct Cfi<'a> {
    eh_frame: gimli::EhFrame<R<'a>>,
    bases: gimli::BaseAddresses,
}

impl<'a> Cfi<'a> {
    fn new(obj: &object::File<'a>) -> Result<Option<Self>, object::Error> {
        let (Some(eh_frame), Some(text)) = (
            obj.section_by_name(".eh_frame"),
            obj.section_by_name(".text"),
        ) else {
            return Ok(None);
        };
        Ok(Some(Cfi {
            eh_frame: gimli::EhFrame::new(eh_frame.data()?, LittleEndian),
            bases: gimli::BaseAddresses::default()
                .set_eh_frame(eh_frame.address())
                .set_text(text.address()),
        }))
    }

    /// For the call returning to `return_pc`: the offset from the callee's entry rsp of the
    /// calling frame's own return address, if the CFA is rsp-based there and the function has not
    /// saved (so not changed) `reg`.
    fn return_address_slot(&self, return_pc: u64, reg: u16) -> gimli::Result<Option<u64>> {
        let mut ctx = gimli::UnwindContext::new();
        // `return_pc - 1` lies inside the call instruction.
        let pc = return_pc.saturating_sub(1);
        let row = match self.eh_frame.unwind_info_for_address(
            &self.bases,
            &mut ctx,
            pc,
            gimli::EhFrame::cie_from_offset,
        ) {
            Err(gimli::Error::NoUnwindInfoForAddress) => return Ok(None),
            row => row?,
        };
        let unchanged = matches!(
            row.register(Register(reg)),
            None | Some(RegisterRule::SameValue)
        );
        Ok(match (row.cfa(), row.register(gimli::X86_64::RA)) {
            (&CfaRule::RegisterAndOffset { register, offset }, Some(RegisterRule::Offset(ra)))
                if unchanged && register == gimli::X86_64::RSP =>
            {
                // The call pushes 8 bytes, so the callee's entry rsp is CFA - offset - 8.
                u64::try_from(offset + ra + 8).ok()
            }
            _ => None,
        })
    }
}

/// DIE names, following `DW_AT_abstract_origin` / `DW_AT_specification` (inlined and out-of-line copies).
struct Names<'d, 'a> {
    dwarf: &'d gimli::Dwarf<R<'a>>,
    units: &'d [gimli::Unit<R<'a>>],
    cache: HashMap<(usize, UnitOffset), Option<String>>,
}

impl<'d, 'a> Names<'d, 'a> {
    /// The DIE a reference attribute points to, as (unit index, offset in that unit).
    fn target(&self, unit: usize, value: AttributeValue<R<'a>>) -> Option<(usize, UnitOffset)> {
        match value {
            AttributeValue::UnitRef(offset) => Some((unit, offset)),
            AttributeValue::DebugInfoRef(offset) => {
                let i = self
                    .units
                    .partition_point(|u| u.header.offset().0 <= offset.0)
                    .checked_sub(1)?;
                Some((i, offset.to_unit_offset(&self.units[i].header)?))
            }
            _ => None,
        }
    }

    fn name(&mut self, unit: usize, offset: UnitOffset) -> gimli::Result<Option<String>> {
        if let Some(name) = self.cache.get(&(unit, offset)) {
            return Ok(name.clone());
        }
        let entry = self.units[unit].entry(offset)?;
        let name = if let Some(value) = entry.attr_value(dw::DW_AT_name) {
            Some(
                self.dwarf
                    .attr_string(&self.units[unit], value)?
                    .to_string_lossy()
                    .into_owned(),
            )
        } else {
            let origin = entry
                .attr_value(dw::DW_AT_abstract_origin)
                .or(entry.attr_value(dw::DW_AT_specification));
            match origin.and_then(|v| self.target(unit, v)) {
                Some((u, o)) if (u, o) != (unit, offset) => self.name(u, o)?,
                _ => None,
            }
        };
        self.cache.insert((unit, offset), name.clone());
        Ok(name)
    }
}

/// A lexical scope around the DIE being visited; `func` is set for (inlined) functions.
struct Scope {
    depth: isize,
    offset: UnitOffset,
    func: Option<String>,
}

/// What a call is: of `_PyErr_SetKeyError` from the [`CALLERS`] function at this index, or of
/// [`TAIL_CHAIN`]`.via` from its `outer` function.
#[derive(Clone, Copy)]
enum Role {
    Site(usize),
    Outer,
}

/// A call of interest, with its enclosing scopes (innermost first, up to the function).
struct Call {
    return_pc: u64,
    caller: String,
    role: Role,
    scopes: Vec<UnitOffset>,
}

/// The variable `func`'s calls need, if `name` is one.
fn watched(func: &str, name: &str) -> Option<&'static str> {
    CALLERS
        .iter()
        .map(|c| (c.0, c.1))
        .chain([(TAIL_CHAIN.outer, TAIL_CHAIN.var)])
        .find(|&(f, v)| f == func && v == name)
        .map(|(_, v)| v)
}

/// What [`scan`] finds, before the tail-called sites are joined to their outer call.
struct Scan {
    /// Sites whose own caller has the dict.
    sites: Vec<KeyErrorSite>,
    /// Calls of `_PyErr_SetKeyError` seen.
    calls: usize,
    /// Return addresses of [`TAIL_CHAIN`]`.inner`'s calls that lost the dict.
    tail_called: Vec<u64>,
    /// [`TAIL_CHAIN`]`.via` calls in `outer` with `var` in a callee-saved register: (return pc, register).
    outer_calls: Vec<(u64, u16)>,
}

fn scan(dwarf: &gimli::Dwarf<R>) -> gimli::Result<Scan> {
    let mut units = Vec::new();
    let mut headers = dwarf.units();
    while let Some(header) = headers.next()? {
        units.push(dwarf.unit(header)?);
    }
    let mut names = Names {
        dwarf,
        units: &units,
        cache: HashMap::new(),
    };
    let (mut sites, mut calls, mut tail_called, mut outer_calls) =
        (Vec::new(), 0, Vec::new(), Vec::new());
    for (u, unit) in units.iter().enumerate() {
        let mut scopes: Vec<Scope> = Vec::new();
        // Locations of the [`watched`] variables, by declaring scope and name.
        let mut vars: HashMap<(UnitOffset, &str), AttributeValue<R>> = HashMap::new();
        let mut found: Vec<Call> = Vec::new();
        let mut cursor = unit.entries();
        while let Some(entry) = cursor.next_dfs()? {
            let depth = entry.depth();
            while scopes.last().is_some_and(|s| s.depth >= depth) {
                scopes.pop();
            }
            let func = scopes.iter().rev().find_map(|s| s.func.as_deref());
            let rule = func.and_then(|f| CALLERS.iter().position(|c| c.0 == f));
            match entry.tag() {
                dw::DW_TAG_subprogram | dw::DW_TAG_inlined_subroutine => {
                    let func = names.name(u, entry.offset())?.unwrap_or_default();
                    scopes.push(Scope {
                        depth,
                        offset: entry.offset(),
                        func: Some(func),
                    });
                }
                dw::DW_TAG_lexical_block => scopes.push(Scope {
                    depth,
                    offset: entry.offset(),
                    func: None,
                }),
                dw::DW_TAG_variable | dw::DW_TAG_formal_parameter => {
                    let (Some(func), Some(scope), Some(loc)) =
                        (func, scopes.last(), entry.attr_value(dw::DW_AT_location))
                    else {
                        continue;
                    };
                    // Name lookups only in the functions that need a variable.
                    if scope.depth != depth - 1 || rule.is_none() && func != TAIL_CHAIN.outer {
                        continue;
                    }
                    if let Some(name) = names.name(u, entry.offset())? {
                        if let Some(var) = watched(func, &name) {
                            vars.insert((scope.offset, var), loc);
                        }
                    }
                }
                dw::DW_TAG_call_site | dw::DW_TAG_GNU_call_site => {
                    let origin = entry
                        .attr_value(dw::DW_AT_call_origin)
                        .or(entry.attr_value(dw::DW_AT_abstract_origin));
                    let Some((ou, oo)) = origin.and_then(|v| names.target(u, v)) else {
                        continue;
                    };
                    let callee = names.name(ou, oo)?;
                    let role = match (callee.as_deref(), rule) {
                        (Some(KEY_ERROR_FN), rule) => {
                            calls += 1;
                            rule.map(Role::Site)
                        }
                        (Some(f), _) if f == TAIL_CHAIN.via && func == Some(TAIL_CHAIN.outer) => {
                            Some(Role::Outer)
                        }
                        _ => continue,
                    };
                    // A tail call leaves the caller's caller's return address in [rsp]: unusable.
                    let tail = [dw::DW_AT_call_tail_call, dw::DW_AT_GNU_tail_call]
                        .iter()
                        .any(|&a| entry.attr(a).is_some());
                    let pc = entry
                        .attr_value(dw::DW_AT_call_return_pc)
                        .or(entry.attr_value(dw::DW_AT_low_pc));
                    let (Some(role), false, Some(pc)) = (role, tail, pc) else {
                        continue;
                    };
                    let Some(return_pc) = dwarf.attr_address(unit, pc)? else {
                        continue;
                    };
                    let func_at = scopes.iter().rposition(|s| s.func.is_some()).unwrap_or(0);
                    let outer = scopes
                        .first()
                        .and_then(|s| s.func.clone())
                        .unwrap_or_default();
                    let caller = match func_at {
                        0 => outer,
                        _ => format!("{} (inlined into {outer})", func.unwrap_or_default()),
                    };
                    let scopes = scopes[func_at..].iter().rev().map(|s| s.offset).collect();
                    found.push(Call {
                        return_pc,
                        caller,
                        role,
                        scopes,
                    });
                }
                _ => {}
            }
        }
        for call in found {
            let var = match call.role {
                Role::Site(rule) => CALLERS[rule].1,
                Role::Outer => TAIL_CHAIN.var,
            };
            // The innermost declaration of the variable visible at the call.
            let loc = call.scopes.iter().find_map(|&s| vars.get(&(s, var)));
            // `return_pc - 1` lies inside the call instruction: where the caller sits during the call.
            let reg = match loc {
                Some(&loc) => {
                    callee_saved_reg(unit.unit_ref(dwarf), loc, call.return_pc.saturating_sub(1))?
                }
                None => None,
            };
            match (call.role, reg) {
                (Role::Outer, Some(reg)) => outer_calls.push((call.return_pc, reg)),
                // Only the out-of-line copy is the one `TAIL_CHAIN.via` jumps to.
                (Role::Site(_), None) if call.caller == TAIL_CHAIN.inner => {
                    tail_called.push(call.return_pc)
                }
                (Role::Site(rule), Some(reg)) => sites.push(KeyErrorSite {
                    return_vaddr: call.return_pc,
                    caller: call.caller,
                    dict: match CALLERS[rule].2 {
                        Some(slot) => DictLocation::Deref {
                            dwarf_reg: reg,
                            offset: slot * i64::from(unit.encoding().address_size),
                        },
                        None => DictLocation::Reg { dwarf_reg: reg },
                    },
                    outer: None,
                }),
                _ => {}
            }
        }
    }
    sites.sort_by_key(|s| s.return_vaddr);
    sites.dedup();
    tail_called.sort();
    tail_called.dedup();
    Ok(Scan {
        sites,
        calls,
        tail_called,
        outer_calls,
    })
}

/// The callee-saved register holding the variable at `pc`, if its location there is exactly `DW_OP_regN`.
fn callee_saved_reg<'a>(
    unit: gimli::UnitRef<R<'a>>,
    loc: AttributeValue<R<'a>>,
    pc: u64,
) -> gimli::Result<Option<u16>> {
    let expr = match loc {
        AttributeValue::Exprloc(expr) => Some(expr),
        other => {
            let mut found = None;
            if let Some(mut list) = unit.attr_locations(other)? {
                while let Some(e) = list.next()? {
                    if e.range.begin <= pc && pc < e.range.end {
                        found = Some(e.data);
                        break;
                    }
                }
            }
            found
        }
    };
    let Some(expr) = expr else { return Ok(None) };
    let mut ops = expr.operations(unit.encoding());
    Ok(match (ops.next()?, ops.next()?) {
        (Some(Operation::Register { register }), None) if CALLEE_SAVED.contains(&register) => {
            Some(register.0)
        }
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use object::ObjectSymbol;

    use crate::targets::python::dwarf::{has_dwarf, parse, read};

    const LIBPYTHON: &str = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0";
    const PYENV_PYTHON: &str = "/root/.pyenv/versions/3.11.7/bin/python3.11";
    const STRIPPED: &str = "/usr/bin/python3.11";

    fn present(path: &str) -> Option<&Path> {
        let p = Path::new(path);
        if !p.exists() {
            eprintln!("note: {path} is absent, test skipped");
        }
        p.exists().then_some(p)
    }

    #[test]
    fn finds_binary_subscr_dict_site_in_libpython() {
        let Some(lib) = present(LIBPYTHON) else {
            return;
        };
        let sites = find_keyerror_sites(lib).expect("sites");
        let eval = sites
            .iter()
            .find(|s| s.caller == "_PyEval_EvalFrameDefault")
            .expect("eval-loop site");
        match eval.dict {
            DictLocation::Deref { dwarf_reg, offset } => {
                assert!(
                    CALLEE_SAVED.contains(&Register(dwarf_reg)),
                    "reg {dwarf_reg}"
                );
                assert_eq!(offset, -8);
            }
            other => panic!("eval-loop dict should be a stack slot, got {other:?}"),
        }
        assert_eq!(eval.outer, None);
        // Return addresses must be code of this image, where [rsp] can point.
        let data = read(lib).expect("read");
        let obj = parse(lib, &data).expect("parse");
        let text = obj.section_by_name(".text").expect(".text");
        assert!(
            sites
                .iter()
                .all(|s| (text.address()..text.address() + text.size()).contains(&s.return_vaddr))
        );
    }

    #[test]
    fn finds_dict_subscript_site_chained_to_binary_subscr() {
        let Some(lib) = present(LIBPYTHON) else {
            return;
        };
        let sites = find_keyerror_sites(lib).expect("sites");
        let site = sites
            .iter()
            .find(|s| s.caller == "dict_subscript")
            .expect("dict_subscript site");
        let DictLocation::Reg { dwarf_reg } = site.dict else {
            panic!("container should be a register, got {:?}", site.dict);
        };
        assert!(
            CALLEE_SAVED.contains(&Register(dwarf_reg)),
            "reg {dwarf_reg}"
        );
        let outer = site.outer.expect("outer frame");
        // dict_subscript pushes rbp and rbx and reserves 0x28 bytes: CFA = rsp + 0x40 at its call.
        assert_eq!(outer.sp_offset, 0x40);
        // The outer return address follows a direct call (e8 rel32) in the eval loop.
        let data = read(lib).expect("read");
        let obj = parse(lib, &data).expect("parse");
        let eval = obj
            .symbols()
            .find(|s| s.name() == Ok("_PyEval_EvalFrameDefault"))
            .expect("eval loop symbol");
        assert!((eval.address()..eval.address() + eval.size()).contains(&outer.return_vaddr));
        let text = obj.section_by_name(".text").expect(".text");
        let at = usize::try_from(outer.return_vaddr - 5 - text.address()).expect("offset");
        assert_eq!(text.data().expect("text")[at], 0xe8);
    }

    #[test]
    fn python_linking_libpython_points_at_the_library() {
        let Some(exe) = present(PYENV_PYTHON) else {
            return;
        };
        let err = find_keyerror_sites(exe).expect_err("interpreter lives in libpython");
        assert!(matches!(err, SiteError::NoCallSites { .. }), "{err}");
    }

    #[test]
    fn stripped_python_gives_clear_error() {
        let Some(exe) = present(STRIPPED) else { return };
        if !has_dwarf(&parse(exe, &read(exe).expect("read")).expect("parse")) {
            let err = find_keyerror_sites(exe).expect_err("stripped image");
            assert!(matches!(err, SiteError::NoDebugInfo { .. }), "{err}");
            assert!(err.to_string().contains("no DWARF debug info"), "{err}");
        }
    }

    #[test]
    fn missing_file_and_non_elf_errors() {
        let err = find_keyerror_sites(Path::new("/nonexistent/python")).expect_err("missing");
        assert!(matches!(err, SiteError::Io { .. }), "{err}");
        let err = find_keyerror_sites(Path::new("/proc/self/status")).expect_err("not ELF");
        assert!(matches!(err, SiteError::Object { .. }), "{err}");
    }
}
