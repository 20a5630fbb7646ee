//! What to attach where: the functions racewatch found, where in each its probe goes, and the
//! role each plays. Placement fills it in; the loader attaches it.
use std::path::PathBuf;

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
    /// Where the object is there, when not in the plan's object argument (a copy the compiler
    /// made for one constant object).
    pub object: Option<ObjectAt>,
}

/// Where a probe finds the watched object, other than in an argument register at an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectAt {
    /// In a register (its `pt_regs` slot).
    Register(u32),
    /// The 8 bytes at a register (its `pt_regs` slot) plus an offset: a stack slot.
    Memory { slot: u32, offset: i64 },
    /// A global at this address in the file.
    Static(u64),
}

/// A probe on a path by which a lookup returns its miss value, or where every lookup's result is
/// known (then `result` says where to read it and how many low bytes to compare).
#[derive(Clone, Debug)]
pub struct MissSite {
    pub function: Function,
    pub offset: u64,
    pub emulated: bool,
    pub object: ObjectAt,
    pub result: Option<(ObjectAt, u8)>,
}

/// A place every lookup passes, and the `pt_regs` slot of the register holding the object there.
#[derive(Clone)]
pub struct Sample {
    pub at: Placed,
    pub object_slot: u32,
}

impl Sample {
    /// A lookup function's entry (or its first emulated prologue instruction), the object its
    /// argument `arg`.
    pub fn at_entry(at: Placed, arg: u32) -> Sample {
        Sample {
            at,
            object_slot: detector_common::ARG_SLOTS
                .get(arg as usize)
                .copied()
                .unwrap_or(detector_common::ARG_SLOTS[0]),
        }
    }
}

/// How the cache's lookup is observed (in the function and each copy the compiler made of it).
pub enum LookupProbe {
    /// Entry only: lookups entered inside a window.
    Entry(Vec<Placed>),
    /// Entry and return: also lookups in flight when the window opened, with their result, whose
    /// low `bytes` the function sets.
    EntryAndReturn {
        at: Vec<Placed>,
        value: i64,
        bytes: u8,
    },
    /// The instructions by which the lookup returns its miss value: misses alone trap.
    Miss {
        sites: Vec<MissSite>,
        value: i64,
        bytes: u8,
    },
    /// CPython: `_PyErr_SetKeyError`'s entry (the kernel finds the failed dict on the Python
    /// frame's value stack).
    KeyError {
        function: Placed,
        /// Where the KeyError is raised inline: each function and the offsets in it.
        inline: Vec<(Function, Vec<u64>)>,
        /// `--quiet-misses`: the dict's `.get` and `in`, probed at every call.
        quiet: Vec<Quiet>,
    },
}

/// A CPython dict, list or set lookup that misses without an exception, probed at its entry:
/// the kernel tells a miss from the object's table before the lookup runs.
#[derive(Clone, Debug)]
pub enum Quiet {
    /// `d.get(k)`: `dict_get(self, args, nargs)`, the key `args[0]`.
    Get(Placed),
    /// `d.pop(k, default)`: `dict_pop(self, args, nargs)`, the key `args[0]`.
    Pop(Placed),
    /// `d.setdefault(k, default)`: `dict_setdefault(self, args, nargs)`, the key `args[0]`.
    SetDefault(Placed),
    /// An OrderedDict's own `od.pop(k, default)`: `OrderedDict_pop(self, args, nargs, kwnames)`.
    OrderedPop(Placed),
    /// An OrderedDict's own `od.setdefault(k, default)`: `OrderedDict_setdefault(self, args,
    /// nargs, kwnames)`.
    OrderedSetDefault(Placed),
    /// `k in d`: the dict type's `sq_contains(self, key)`.
    Contains(Placed),
    /// `d[k]` on a dict subclass (a `Counter`'s, a `defaultdict`'s `__missing__` answers it):
    /// the dict type's `mp_subscript(self, key)`.
    Subscript(Placed),
    /// `k in d` inlined into the eval loop: its call to the dict lookup `(dict, key, hash, ...)`.
    ContainsCall(Placed),
    /// `d.get(k)` where profile-guided optimisation inlined `dict_get` behind a check of the
    /// function pointer: the copy's call to the dict lookup `(dict, key, hash, ...)`.
    GetCall(Placed),
    /// `lst[i]` out of range: the list type's `mp_subscript(self, item)`.
    Index(Placed),
    /// `k in s`: the set type's `sq_contains(self, key)`, or the function it jumps to.
    SetContains(Placed),
    /// `k in s` inlined into the eval loop: its call to the set lookup `(set, key, hash)`.
    SetContainsCall(Placed),
}

impl Quiet {
    pub fn at(&self) -> &Placed {
        match self {
            Quiet::Get(p)
            | Quiet::Pop(p)
            | Quiet::SetDefault(p)
            | Quiet::OrderedPop(p)
            | Quiet::OrderedSetDefault(p)
            | Quiet::Contains(p)
            | Quiet::Subscript(p)
            | Quiet::ContainsCall(p)
            | Quiet::GetCall(p)
            | Quiet::Index(p)
            | Quiet::SetContains(p)
            | Quiet::SetContainsCall(p) => p,
        }
    }

    /// The kernel program that watches it.
    pub fn program(&self) -> &'static str {
        match self {
            Quiet::Get(_) => "on_dict_get",
            Quiet::Pop(_) => "on_dict_pop",
            Quiet::SetDefault(_) => "on_dict_setdefault",
            Quiet::OrderedPop(_) => "on_odict_pop",
            Quiet::OrderedSetDefault(_) => "on_odict_setdefault",
            Quiet::Contains(_) => "on_dict_contains",
            Quiet::Subscript(_) => "on_dict_subscript",
            Quiet::ContainsCall(_) => "on_dict_contains_call",
            Quiet::GetCall(_) => "on_dict_get_call",
            Quiet::Index(_) => "on_list_subscript",
            Quiet::SetContains(_) => "on_set_contains",
            Quiet::SetContainsCall(_) => "on_set_contains_call",
        }
    }
}

/// CPython `--provoke`: `take_gil`, and where a thread waiting for the GIL asks its holder for
/// it (the plan's clears have their returns probed too).
pub struct GilHandover {
    pub take_gil: Placed,
    pub drop_request: DropRequest,
    /// The file address of the main interpreter's switch interval.
    pub switch_interval_vaddr: u64,
}

/// Where a waiter asks for the GIL.
#[derive(Clone, Copy, Debug)]
pub enum DropRequest {
    /// The main interpreter's `ceval.gil_drop_request` (3.11, 3.12), at this file address.
    Static { vaddr: u64 },
    /// Bit 0 (`_PY_GIL_DROP_REQUEST_BIT`) of `eval_breaker`, at this offset in the holder's thread
    /// state (3.13+).
    InThread { offset: u64 },
}

/// Everything to attach, in one binary (executable or shared library).
pub struct Plan {
    /// The window's name in alerts and the summary.
    pub name: String,
    pub binary: PathBuf,
    /// Which argument (0-based) of the window's functions is the object at their entry.
    pub object_arg: u32,
    /// Which of the run's windows these probes belong to (events carry it).
    pub window: u32,
    /// The emptying function, and the copies the compiler made of it.
    pub clear: Vec<Placed>,
    /// Functions whose return closes the window (CPython has two ways to refill a dict).
    pub refills: Vec<RefillProbe>,
    pub lookup: LookupProbe,
    /// A lock-guarded native cache's lock, where racewatch sees it taken and released: what
    /// the hazard report counts of each window.
    pub lock_edges: Option<LockEdges>,
    /// CPython `--provoke`: how to make a writer hand the GIL over (None: native holds).
    pub gil: Option<GilHandover>,
    /// Where lookups are counted in short bursts (see `sampling`), when `lookup` does not probe
    /// every lookup.
    pub sample: Option<Sample>,
    /// Keep that probe attached the whole run: every lookup counted, at a trap each.
    pub sample_always: bool,
    /// What of the named functions these probes do not see (copies the compiler made of them),
    /// for the summary's `unwatched`.
    pub unprobed: Vec<String>,
    /// CPython: where this interpreter keeps a thread's frames, for the kernel (stored by
    /// window).
    pub py_layout: Option<detector_common::PyLayout>,
}

/// Where the clear releases the cache's lock and where the refill holds it again (see
/// `placement::place_lock_edges`), each with where the cache is there.
pub struct LockEdges {
    pub unlocks: Vec<Placed>,
    pub locked: Vec<Placed>,
}

/// How a refill is probed: where it ends, and at its entry when only the entry says which cache.
pub enum RefillProbe {
    /// The entry, and the return through a return probe (which needs the entry's breakpoint).
    Return(Placed),
    /// An emulated prologue instruction, and every exit, each one emulated (tail calls): two
    /// cheap traps instead of the entry's and the return trampoline's.
    Exits { entry: Placed, exits: Vec<u64> },
    /// The last call on each path (see `closing`), each with where the cache is there: one trap,
    /// after the refill has refilled. The entry is probed only to hold the writer (`--provoke`).
    Closes { entry: Placed, sites: Vec<Placed> },
}

impl RefillProbe {
    pub fn function(&self) -> &Function {
        match self {
            RefillProbe::Return(p)
            | RefillProbe::Exits { entry: p, .. }
            | RefillProbe::Closes { entry: p, .. } => &p.function,
        }
    }
}

/// Finds, while a run goes on, what else to watch: the run attaches each plan it returns (a new
/// window) and adds each line to `unwatched`. `racewatch python` on the host meets interpreter
/// files so as processes start.
pub trait Discover {
    fn discover(&mut self) -> (Vec<Plan>, Vec<String>);
}

/// How each probe of several plans traps: an instruction counts as emulated only where it is in
/// every plan (the estimate of what racewatch adds errs high).
pub fn traps(plans: &[Plan]) -> Traps {
    plans
        .iter()
        .map(Plan::traps)
        .reduce(Traps::and)
        .unwrap_or_default()
}

impl LookupProbe {
    /// The value the lookup returns for "not found", and how many low bytes of the returned
    /// register say it, where misses are watched.
    pub fn miss(&self) -> Option<(i64, u8)> {
        match self {
            LookupProbe::EntryAndReturn { value, bytes, .. }
            | LookupProbe::Miss { value, bytes, .. } => Some((*value, *bytes)),
            _ => None,
        }
    }
}

impl Plan {
    /// How each probe traps, for the estimate of the time racewatch adds.
    pub fn traps(&self) -> Traps {
        let (lookup_entry, lookup_miss, keyerror, quiet_lookup) = match &self.lookup {
            LookupProbe::Entry(p) | LookupProbe::EntryAndReturn { at: p, .. } => {
                (p.iter().all(|p| p.emulated), true, true, true)
            }
            LookupProbe::Miss { sites, .. } => (true, sites.iter().all(|s| s.emulated), true, true),
            LookupProbe::KeyError {
                function, quiet, ..
            } => (
                true,
                true,
                function.emulated,
                quiet.iter().all(|q| q.at().emulated),
            ),
        };
        Traps {
            clear: self.clear.iter().all(|c| c.emulated),
            refill: self.refills.iter().all(|r| match r {
                RefillProbe::Return(p) => p.emulated,
                RefillProbe::Exits { .. } | RefillProbe::Closes { .. } => true,
            }),
            refill_exits: self
                .refills
                .iter()
                .all(|r| !matches!(r, RefillProbe::Return(_))),
            lookup_entry,
            lookup_miss,
            lookup_sample: self.sample.as_ref().is_none_or(|s| s.at.emulated),
            keyerror,
            quiet_lookup,
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
    handled: &[&Function],
) -> Vec<String> {
    let mut out = Vec::new();
    for (role, f) in probed {
        for (copy, entry_point) in table.copies(f) {
            if handled.iter().any(|h| h.symbol == copy.symbol) {
                continue;
            }
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
