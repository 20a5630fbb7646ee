//! Native programs (`racewatch watch`): windows over any ELF file's functions (one from the
//! flags, or several from a config file), and the native stacks of both sides.
use std::path::{Path, PathBuf};

use crate::{
    probe::{
        copies::{self, Inlined},
        miss_path::ReturnReg,
        placement,
        plan::{LookupProbe, MissSite, ObjectAt, Placed, Plan, Sample, copies_not_probed},
        returns::{self, Returns},
        symbols::{Function, SymbolError, SymbolTable, answers_to, base_symbol},
    },
    targets::StackConfig,
    text::{error_chain, escape},
};

pub mod config;
pub mod stacks;
pub mod window;

use config::Config;
use stacks::ReturnedFrom;
use window::{Role, Window};

/// What `watch` watches: the window its flags name, or its config file's.
pub enum Windows {
    Flags(Window),
    Config(Config),
}

impl Windows {
    /// Each window, the run's window of its index.
    pub fn windows(&self) -> Vec<&Window> {
        match self {
            Windows::Flags(w) => vec![w],
            Windows::Config(c) => c.windows.iter().map(|c| &c.window).collect(),
        }
    }
}

/// A window's file or function that is not there (or not readable).
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
struct NotThere {
    /// The function's role; None: the file.
    role: Option<Role>,
    #[source]
    error: anyhow::Error,
}

/// Plans each window as the run's window of its index, in the file `binary` returns for the
/// file it names (None: the run's). A config's errors name its file, line and key.
pub fn plans(
    windows: &Windows,
    mut binary: impl FnMut(Option<&Path>) -> anyhow::Result<PathBuf>,
    probe_returns: bool,
    verbose: bool,
) -> anyhow::Result<(Vec<Plan>, StackConfig)> {
    let mut one = |number: usize, w: &Window| {
        let file = binary(w.binary.as_deref()).map_err(|error| NotThere { role: None, error })?;
        plan(w, file, number as u32, probe_returns, verbose)
    };
    let planned: Vec<(Plan, Option<ReturnedFrom>)> = match windows {
        Windows::Flags(w) => vec![one(0, w)?],
        Windows::Config(c) => c
            .windows
            .iter()
            .enumerate()
            .map(|(i, w)| one(i, &w.window).map_err(|e| c.error(w, e.role, error_chain(&e.error))))
            .collect::<Result<_, _>>()?,
    };
    let (plans, returned): (Vec<Plan>, Vec<Option<ReturnedFrom>>) = planned.into_iter().unzip();
    // The kernel's stack record does not say its window: with several windows probed at their
    // return, whose frame to put back is unknown, and the stack starts in the caller.
    let mut returned = returned.into_iter().flatten();
    let returned_from = returned.next().filter(|_| returned.next().is_none());
    Ok((plans, StackConfig::Native { returned_from }))
}

/// Finds `w`'s functions in `binary` and where to probe each, as the run's window `number`;
/// with its return probed, also the lookup's function for the stacks taken there.
fn plan(
    w: &Window,
    binary: PathBuf,
    number: u32,
    probe_returns: bool,
    verbose: bool,
) -> Result<(Plan, Option<ReturnedFrom>), NotThere> {
    let not_there = |role| {
        move |e: SymbolError| NotThere {
            role,
            error: e.into(),
        }
    };
    let table = SymbolTable::load(&binary).map_err(not_there(None))?;
    let resolve = |role| {
        let name = w.symbol(role);
        table.resolve(name).map_err(|e| match e {
            SymbolError::NotFound { .. } => NotThere {
                role: Some(role),
                error: only_inlined(&binary, name).map_or_else(|| e.into(), anyhow::Error::msg),
            },
            e => not_there(Some(role))(e),
        })
    };
    let (clear, refill, lookup) = (
        resolve(Role::Open)?,
        resolve(Role::Close)?,
        resolve(Role::Access)?,
    );
    let object_arg = w.object_arg;
    let (clears, refills, lookups) = (
        with_copies(&binary, &table, "clear", clear, object_arg),
        with_copies(&binary, &table, "refill", refill, object_arg),
        with_copies(&binary, &table, "lookup", lookup, object_arg),
    );
    // What the lookup returns, where its DWARF says: how wide, and for a bool, a pointer, an
    // Option or a std::optional, that "not found" is 0 (for a std::optional, in `dl`).
    let returns = returns::of(&binary, lookups.named.address);
    let mut wide = None;
    let too_wide = |name: &str, bytes: u64| {
        format!(
            "the misses of {}: it returns {} ({bytes} bytes), wider than the one register \
             racewatch reads a miss value from",
            escape(&lookups.named.display),
            escape(name)
        )
    };
    let (miss_ret, ret) = match (&returns, w.miss_ret) {
        (Some(Returns::Wide { name, bytes }), _) => {
            wide = Some(too_wide(name, *bytes));
            (None, ReturnReg::Rax)
        }
        // Its miss is read where its code sets the flag; a probed return reads only `rax`.
        (Some(Returns::EmptyOptional), None | Some(0)) if !probe_returns => {
            if verbose {
                eprintln!(
                    "racewatch: lookup: {} returns a std::optional, empty when the low byte of \
                     rdx is 0: --miss-ret 0 read there",
                    escape(&lookups.named.display)
                );
            }
            (Some(0), ReturnReg::Rdx { bytes: 1 })
        }
        (Some(Returns::EmptyOptional), _) => {
            wide = Some(too_wide("a std::optional", 16));
            (None, ReturnReg::Rax)
        }
        (_, Some(value)) => (Some(value), ReturnReg::Rax),
        (Some(Returns::NotFoundIsZero { kind, .. }), None) => {
            if verbose {
                eprintln!(
                    "racewatch: lookup: {} returns {kind} when it finds nothing: --miss-ret 0",
                    escape(&lookups.named.display)
                );
            }
            (Some(0), ReturnReg::Rax)
        }
        _ => (None, ReturnReg::Rax),
    };
    let miss_path = miss_ret.is_some() && !probe_returns;
    let handled: Vec<&Function> = [&clears, &refills, &lookups]
        .iter()
        .flat_map(|c| c.each.iter().map(|(f, _)| f).chain(&c.unwatched_copies))
        .collect();
    let mut unprobed = copies_not_probed(
        &table,
        &[
            ("clear", &clears.named),
            ("refill", &refills.named),
            ("lookup", &lookups.named),
        ],
        miss_path.then_some(&lookups.named),
        &handled,
    );
    for c in [&clears, &refills, &lookups] {
        unprobed.extend(c.unwatched.iter().cloned());
    }
    unprobed.extend(wide);
    let clear = clears
        .each
        .iter()
        .map(|(f, object)| {
            placement::place_entry(&binary, "clear", f.clone(), object_arg, *object, verbose)
        })
        .collect();
    // On the miss path alone, ordinary lookups are not seen: the hazard report counts them in
    // bursts at the entry of the function (a copy made for one object has no argument to read).
    let sample = lookups
        .each
        .iter()
        .find(|(_, object)| object.is_none())
        .filter(|_| miss_path)
        .map(|(f, _)| {
            Sample::at_entry(
                placement::place_entry(
                    &binary,
                    "lookup sample",
                    f.clone(),
                    object_arg,
                    None,
                    verbose,
                ),
                object_arg,
            )
        });
    // Where the cache's lock is released and taken again, for the hazard report: the named
    // functions only, where they receive the cache in its argument.
    let in_arg = |c: &Copies| {
        c.each
            .iter()
            .any(|(f, object)| f.address == c.named.address && object.is_none())
    };
    let lock_edges = (in_arg(&clears) && in_arg(&refills))
        .then(|| {
            placement::place_lock_edges(
                &binary,
                &table,
                &clears.named,
                &refills.named,
                object_arg,
                verbose,
            )
            .inspect_err(|why| {
                if verbose {
                    eprintln!(
                        "racewatch: the hazard report counts all of each window: racewatch \
                         does not see the cache's lock ({why})"
                    );
                }
            })
            .ok()
        })
        .flatten();
    let refills = refills
        .each
        .iter()
        .map(|(f, object)| {
            placement::place_refill(&binary, &table, f.clone(), object_arg, *object, verbose)
        })
        .collect();
    let bytes = match returns {
        Some(Returns::NotFoundIsZero { bytes, .. } | Returns::Integer { bytes }) => bytes,
        Some(Returns::EmptyOptional) => 1,
        _ => placement::return_bytes(&binary, &lookups.named),
    };
    let entry_and_return = |value| LookupProbe::EntryAndReturn {
        value,
        at: lookups
            .each
            .iter()
            .map(|(f, object)| Placed {
                object: *object,
                ..placement::at_entry(&binary, "lookup", f.clone(), verbose)
            })
            .collect(),
        bytes,
    };
    let entries = || {
        lookups
            .each
            .iter()
            .map(|(f, object)| {
                placement::place_entry(&binary, "lookup", f.clone(), object_arg, *object, verbose)
            })
            .collect()
    };
    let lookup = match miss_ret {
        Some(value) if probe_returns => entry_and_return(value),
        Some(value) => {
            let sites: Result<Vec<Vec<MissSite>>, (&Function, String)> = lookups
                .each
                .iter()
                .map(|(f, object)| {
                    placement::place_miss(&binary, f, object_arg, *object, (value, ret), verbose)
                        .map_err(|why| (f, why))
                })
                .collect();
            match sites {
                Ok(sites) => LookupProbe::Miss {
                    sites: sites.into_iter().flatten().collect(),
                    value,
                    bytes,
                },
                // A std::optional's flag is loaded into `dl` only after the unlock, where the
                // window a miss saw may have closed: without a miss path, its misses go unread.
                Err((_, why)) if ret != ReturnReg::Rax => {
                    unprobed.push(format!(
                        "the misses of {}: it returns a std::optional, and racewatch cannot tell \
                         from its code where it returns one empty ({why}); its lookups in windows \
                         are counted",
                        escape(&lookups.named.display)
                    ));
                    LookupProbe::Entry(entries())
                }
                Err((f, why)) => {
                    // No instruction on misses alone: one trap per lookup where its result is
                    // known, else two (its entry and its return).
                    let results: Result<Vec<Vec<MissSite>>, String> = lookups
                        .each
                        .iter()
                        .map(|(f, object)| {
                            placement::place_result(
                                &binary,
                                f,
                                object_arg,
                                *object,
                                (value, ret),
                                verbose,
                            )
                        })
                        .collect();
                    let (how, lookup) = match results.map(|r| r.concat()) {
                        Ok(sites) => (
                            "every lookup once, where its result is known".to_string(),
                            LookupProbe::Miss {
                                sites,
                                value,
                                bytes,
                            },
                        ),
                        Err(no_result) => (
                            format!("every lookup's entry and return ({no_result})"),
                            entry_and_return(value),
                        ),
                    };
                    eprintln!(
                        "racewatch: warning: probing {how}, not just its misses: cannot tell \
                         from {}'s code where it returns {value}: {why}",
                        escape(&f.display)
                    );
                    lookup
                }
            }
        }
        None => LookupProbe::Entry(entries()),
    };
    // At a probed return the lookup's own frame is gone: the stack starts in its caller.
    let returned_from = match &lookup {
        LookupProbe::EntryAndReturn { at, .. } => Some(ReturnedFrom {
            binary: binary.clone(),
            address: at[0].function.address,
        }),
        _ => None,
    };
    let plan = Plan {
        name: w.name.clone(),
        binary,
        object_arg,
        window: number,
        clear,
        refills,
        sample: sample.filter(|_| matches!(lookup, LookupProbe::Miss { .. })),
        sample_always: false,
        unprobed,
        lock_edges,
        gil: None,
        lookup,
        py_layout: None,
    };
    Ok((plan, returned_from))
}

/// A window's function and the copies the compiler made of it that callers call instead, each
/// with where it receives the object (None: in the window's object argument).
struct Copies {
    /// The function the window names (it may be a copy itself, where the compiler kept no other).
    named: Function,
    each: Vec<(Function, Option<ObjectAt>)>,
    /// The copies that cannot be watched, and why, for the summary's `unwatched`.
    unwatched: Vec<String>,
    unwatched_copies: Vec<Function>,
}

/// `f` (named for `role`) and its copies that are entry points, each with its object.
fn with_copies(binary: &Path, table: &SymbolTable, role: &str, f: Function, arg: u32) -> Copies {
    let mut out = Copies {
        named: f.clone(),
        each: Vec::new(),
        unwatched: Vec::new(),
        unwatched_copies: Vec::new(),
    };
    let copies = table
        .copies(&f)
        .into_iter()
        .filter(|(_, entry_point)| *entry_point)
        .map(|(c, _)| c.clone());
    let name = f.display.clone();
    let base = base_symbol(&f.symbol);
    let inlined = copies::inlined(binary, |s| s == base);
    if !inlined.is_empty() {
        out.unwatched.push(format!(
            "the {role} function {} where the compiler inlined it, into {}: an inlined copy \
             has no call to probe, so what runs through it is not seen",
            escape(&name),
            places(&inlined)
        ));
    }
    for g in std::iter::once(f).chain(copies) {
        if g.symbol == base_symbol(&g.symbol) {
            out.each.push((g, None));
            continue;
        }
        match copies::object_in_copy(binary, &g, arg) {
            Ok(object) => out.each.push((g, Some(object))),
            Err(why) => {
                out.unwatched.push(format!(
                    "{} ({}), a copy the compiler made of the {role} function {}: {why}: the \
                     calls that run it are not seen",
                    escape(&g.display),
                    escape(&g.symbol),
                    escape(&name)
                ));
                out.unwatched_copies.push(g);
            }
        }
    }
    out
}

/// Where the compiler inlined a function, the first few.
fn places(inlined: &[Inlined]) -> String {
    let mut text: Vec<String> = inlined
        .iter()
        .take(3)
        .map(|i| format!("{} at {:#x}", escape(&i.into), i.address))
        .collect();
    if inlined.len() > 3 {
        text.push(format!("{} more", inlined.len() - 3));
    }
    text.join(", ")
}

/// Why `name`, which no function symbol has, cannot be probed, where the DWARF says the compiler
/// inlined every call to it.
fn only_inlined(binary: &Path, name: &str) -> Option<String> {
    let inlined = copies::inlined(binary, |s| answers_to(s, name));
    (!inlined.is_empty()).then(|| {
        format!(
            "`{}` has no copy of its own in {}: the compiler inlined every call to it (into {}), \
             so there is no call to probe; build it with `__attribute__((noinline))` \
             (`#[inline(never)]` in Rust)",
            escape(name),
            binary.display(),
            places(&inlined)
        )
    })
}
