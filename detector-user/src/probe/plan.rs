//! What to attach where: the functions racewatch found, where in each its probe goes, and the
//! role each plays. Placement fills it in; the loader attaches it.
use std::path::PathBuf;

use detector_common::DictSite;

use crate::{
    engine::cost::Traps,
    probe::symbols::{Function, SymbolTable},
    text::escape,
};

/// A function and where in it its probe goes.
#[derive(Clone, Debug)]
pub struct Placed {
    pub function: Function,
    /// Bytes from the function's entry (see `placement`).
    pub offset: u64,
    /// Whether the kernel emulates the probed instruction rather than single-stepping it.
    pub emulated: bool,
}

/// How the cache's lookup is observed.
pub enum LookupProbe {
    /// Entry only: lookups entered inside a window.
    Entry(Placed),
    /// Entry and return: also lookups in flight when the window opened, with their result.
    EntryAndReturn(Placed),
    /// The instructions by which the lookup returns its miss value: misses alone trap.
    Miss {
        function: Function,
        /// Offsets of the miss-path sites in the function.
        offsets: Vec<u64>,
        /// `pt_regs` slot of the register that holds the cache at those sites.
        cache_slot: u32,
        value: i64,
        /// Every site is on an instruction the kernel emulates.
        emulated: bool,
    },
    /// CPython: `_PyErr_SetKeyError`'s entry, with where each call site keeps the dict, keyed by
    /// return address minus the function's address.
    KeyError {
        function: Placed,
        sites: Vec<(u64, DictSite)>,
    },
}

/// CPython `--provoke`: `dict_clear` (its return is probed), `take_gil`, and where the
/// interpreter's `gil_drop_request` is relative to the clear probe's address.
pub struct GilHandover {
    pub clear: Function,
    pub take_gil: Placed,
    pub drop_request_delta: i64,
}

/// Everything to attach, in one binary (executable or shared library).
pub struct Plan {
    pub binary: PathBuf,
    /// Which argument (0-based) of the window's functions is the object at their entry.
    pub object_arg: u32,
    /// Which of the run's windows these probes belong to (events carry it).
    pub window: u32,
    pub clear: Placed,
    /// Functions whose return closes the window (CPython has two ways to refill a dict).
    pub refills: Vec<RefillProbe>,
    pub lookup: LookupProbe,
    /// CPython `--provoke`: how to make a writer hand the GIL over (None: native holds).
    pub gil: Option<GilHandover>,
    /// A lookup function's entry to count lookups in short bursts (see `sampling`), when
    /// `lookup` does not probe every lookup.
    pub sample: Option<Placed>,
    /// Keep that probe attached the whole run: every lookup counted, at a trap each.
    pub sample_always: bool,
    /// What of the named functions these probes do not see (copies the compiler made of them),
    /// for the summary's `unwatched`.
    pub unprobed: Vec<String>,
}

/// How a refill is probed: at its entry (to learn which cache) and where it ends.
pub enum RefillProbe {
    /// The entry, and the return through a return probe (which needs the entry's breakpoint).
    Return(Placed),
    /// An emulated prologue instruction, and every exit, each one emulated (tail calls): two
    /// cheap traps instead of the entry's and the return trampoline's.
    Exits { entry: Placed, exits: Vec<u64> },
}

impl Plan {
    /// How each probe traps, for the estimate of the time racewatch adds.
    pub fn traps(&self) -> Traps {
        let (lookup_entry, lookup_miss, keyerror) = match &self.lookup {
            LookupProbe::Entry(p) | LookupProbe::EntryAndReturn(p) => (p.emulated, true, true),
            LookupProbe::Miss { emulated, .. } => (true, *emulated, true),
            LookupProbe::KeyError { function, .. } => (true, true, function.emulated),
        };
        Traps {
            clear: self.clear.emulated,
            refill: self.refills.iter().all(|r| match r {
                RefillProbe::Return(p) => p.emulated,
                RefillProbe::Exits { .. } => true,
            }),
            refill_exits: self
                .refills
                .iter()
                .all(|r| matches!(r, RefillProbe::Exits { .. })),
            lookup_entry,
            lookup_miss,
            lookup_sample: self.sample.as_ref().is_none_or(|p| p.emulated),
            keyerror,
        }
    }
}

/// The copies the compiler made of the probed functions that their probes do not see, said for
/// the summary: a separate entry point (`.constprop`, `.isra`, `.part`) runs instead of the
/// function for some callers; a `.cold` part belongs to the function (its entry and return
/// probes cover it), but a miss returned from it escapes `miss_path`'s probes on the main part.
pub fn copies_not_probed(
    table: &SymbolTable,
    probed: &[(&str, &Function)],
    miss_path: Option<&Function>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (role, f) in probed {
        for (copy, entry_point) in table.copies(f) {
            if entry_point {
                let name = if copy.display == copy.symbol {
                    escape(&copy.symbol)
                } else {
                    format!("{} ({})", escape(&copy.display), escape(&copy.symbol))
                };
                out.push(format!(
                    "{name}, a copy the compiler made of the {role} function {}: the calls that \
                     run it are not seen",
                    escape(&f.display)
                ));
            } else if miss_path.is_some_and(|m| m.symbol == f.symbol) {
                out.push(format!(
                    "{}, the cold part of the lookup {}: a miss returned there is not seen \
                     (--probe-returns sees it)",
                    escape(&copy.symbol),
                    escape(&f.display)
                ));
            }
        }
    }
    out
}
