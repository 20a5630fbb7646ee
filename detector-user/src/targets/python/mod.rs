//! `racewatch python`: finds the CPython interpreter a process runs and the probe points for a
//! dict's clear, its refill and the KeyError of a failed `d[k]`, from what the interpreter's
//! file describes: its exported `PyDict_Type` and `_PyRuntime`, and its `_Py_DebugOffsets` or
//! DWARF where it has them.
pub mod dict_type;
pub mod dwarf;
pub mod eval_loop;
pub mod frames;
pub mod gil;
pub mod host;
pub mod image;
pub mod key;
pub mod layout;
pub mod linetable;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use iced_x86::Register;

use crate::probe::{
    placement::place_entry,
    plan::{GilHandover, LookupProbe, Placed, Plan, Quiet, RefillProbe, Sample},
    symbols::SymbolTable,
};

use dwarf::SiteError;
use eval_loop::InlineContains;
use layout::Layout;

const KEYERROR: &str = "_PyErr_SetKeyError";
/// `d[k]` once its call site is specialised (BINARY_SUBSCR_DICT), arg0 the dict: probed in
/// sampling bursts only, for the hazard report's lookup rates.
const LOOKUP_3_11: &str = "PyDict_GetItemWithError";
const LOOKUP_3_13: &str = "PyDict_GetItemRef";
/// The GIL's acquisition (static in ceval_gil.h; called after every release: a forced switch or
/// a blocking call): probed with `--provoke` only.
const TAKE_GIL: &str = "take_gil";

#[derive(Debug, thiserror::Error)]
pub enum PythonError {
    #[error("cannot ask {python} where its interpreter is: {reason}")]
    Probe { python: String, reason: String },
    #[error("{0}")]
    Target(#[from] crate::process::TargetError),
    #[error("script not found: {0}")]
    NoScript(String),
    #[error(
        "process {pid} is not a CPython process: it maps no libpython and its executable \
         {exe} is not python"
    )]
    NotPython { pid: u32, exe: PathBuf },
    #[error("{0}")]
    Image(#[from] image::ImageError),
    #[error("{0}")]
    Layout(#[from] layout::LayoutError),
    #[error("{0}")]
    DictType(#[from] dict_type::DictTypeError),
    #[error("{image} exports no {symbol}: it is not a CPython interpreter racewatch can probe")]
    Missing {
        image: PathBuf,
        symbol: &'static str,
    },
    #[error(
        "--provoke needs the interpreter's DWARF and its static take_gil, to find where a thread \
         asks for the GIL and where it takes it; {image} (CPython {}.{}) has no {missing}: run \
         without --provoke, or with a CPython built with symbols (a pyenv or source build)",
        version.0, version.1
    )]
    Provoke {
        image: PathBuf,
        version: (u32, u32),
        missing: &'static str,
    },
    #[error("{0}")]
    Sites(#[from] SiteError),
    #[error(
        "--provoke on the whole host holds the windows of one interpreter, and {} run here ({}): \
         give -p PID to provoke one process",
        files.len(),
        files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    ProvokeOnHost { files: Vec<PathBuf> },
}

/// The ELF image holding the interpreter loop: libpython when the build is shared, else the
/// python executable itself.
#[derive(Debug)]
pub struct Interpreter {
    pub image: PathBuf,
}

/// `python`, `python3`, `python3.11`: an interpreter's executable name.
fn is_python_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("python"))
        .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

/// For `--interpreter FILE`: that file, which must exist.
pub fn given(image: &Path) -> Result<Interpreter, PythonError> {
    std::fs::metadata(image).map_err(|e| {
        PythonError::Image(image::ImageError::Io {
            path: image.into(),
            source: e,
        })
    })?;
    Ok(Interpreter {
        image: image.into(),
    })
}

/// For `-- PYTHON ARGS`: asks the interpreter itself where it lives, which also sees through
/// launchers such as pyenv's shims.
pub fn for_command(command: &[OsString]) -> Result<Interpreter, PythonError> {
    let python = command
        .first()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    crate::process::resolve_command(&OsString::from(&python))?;
    if let Some(script) = command
        .get(1)
        .filter(|a| !a.to_string_lossy().starts_with('-'))
        && !Path::new(script).exists()
    {
        return Err(PythonError::NoScript(script.to_string_lossy().into_owned()));
    }
    let probe = "import sys, sysconfig, os\n\
                 v = sysconfig.get_config_var\n\
                 lib = os.path.join(v('LIBDIR') or '', v('INSTSONAME') or '') if v('Py_ENABLE_SHARED') else ''\n\
                 print(sys.executable); print(lib)";
    let err = |reason: String| PythonError::Probe {
        python: python.clone(),
        reason,
    };
    let out = Command::new(&python)
        .args(["-c", probe])
        .output()
        .map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(String::from_utf8_lossy(&out.stderr).trim().to_string()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let [exe, lib] = lines[..] else {
        return Err(err(format!(
            "unexpected answer {text:?}: is {python} CPython?"
        )));
    };
    let lib = (!lib.is_empty() && Path::new(lib).exists()).then(|| PathBuf::from(lib));
    Ok(holding_the_loop(PathBuf::from(exe), lib))
}

/// The file whose eval loop runs: the executable when it has its own (Debian's python3.x is
/// linked statically, though the shared libpython it also ships is what sysconfig names), else
/// the libpython it links.
fn holding_the_loop(exe: PathBuf, lib: Option<PathBuf>) -> Interpreter {
    let own_loop =
        || image::Image::load(&exe).is_ok_and(|i| i.symbol("_PyEval_EvalFrameDefault").is_some());
    match lib {
        Some(lib) if !own_loop() => Interpreter { image: lib },
        _ => Interpreter { image: exe },
    }
}

/// For `-p PID`: the file holding the eval loop of the process, its executable or the libpython
/// it maps.
pub fn for_pid(pid: u32) -> Result<Interpreter, PythonError> {
    let exe = crate::process::running_exe(pid)?;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| {
            Path::new(p)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libpython"))
        });
    match lib {
        Some(lib) => Ok(holding_the_loop(
            exe,
            Some(crate::process::file_of(pid, Path::new(lib))),
        )),
        None if is_python_name(&exe) => Ok(Interpreter { image: exe }),
        None => Err(PythonError::NotPython { pid, exe }),
    }
}

/// Where a `d[k]` is counted when its lookup function was inlined with its raise: the dict type
/// check its handler in the eval loop starts with.
fn inline_lookup_sample(
    image: &image::Image,
    inline: &[(crate::probe::symbols::Function, Vec<u64>)],
    verbose: bool,
) -> Option<Sample> {
    let (eval, raises) = inline
        .iter()
        .find(|(f, _)| f.symbol == "_PyEval_EvalFrameDefault")?;
    let (offset, reg) = raises
        .iter()
        .find_map(|&r| eval_loop::dict_check_before(image, eval, r))?;
    let object_slot = crate::probe::code::pt_regs_slot(reg)?;
    let (text, emulated) = crate::probe::code::describe(image.bytes_at(eval.address + offset, 16)?);
    if verbose {
        eprintln!(
            "racewatch: lookup sample: the dict check of d[k] in {} at {:#x}+{offset:#x} ({text}), \
             the dict in {reg:?}",
            eval.display, eval.address
        );
    }
    Some(Sample {
        at: Placed {
            function: eval.clone(),
            offset,
            emulated,
            object: None,
        },
        object_slot,
    })
}

/// What `racewatch python` was asked to watch, beyond the windows and their KeyErrors.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// `--provoke`: how to make a writer hand the GIL over.
    pub provoke: bool,
    /// `--every-lookup`: count every `d[k]`, not in bursts.
    pub every_lookup: bool,
    /// `--quiet-misses`: every `d.get`, `in` and subclass `d[k]` on a dict, and lists' windows
    /// with their `lst[i]` out of range.
    pub quiet_misses: bool,
    pub verbose: bool,
}

/// `--quiet-misses`: `d.get`, `d.pop`, `d.setdefault`, `in`, a subclass's `d[k]`, `lst[i]` (of
/// `lists`, where found), an OrderedDict's own `pop` and `setdefault` (of `ordered`) and `k in s`
/// (of `sets`) at their entries, where the object and the arguments are still in their
/// registers; where link-time optimisation inlined `PyDict_Contains` or the set's `in` (3.13+),
/// their calls to the lookup there; and where profile-guided optimisation inlined `dict_get`
/// behind a check of the function pointer, that copy's calls to the lookup. The second value
/// says what could not be found.
fn quiet_probes(
    image: &image::Image,
    version: (u32, u32),
    methods: &dict_type::DictMethods,
    lists: Option<&dict_type::ListMethods>,
    sets: Option<&dict_type::SetMethods>,
    ordered: Option<&dict_type::OrderedDictMethods>,
    verbose: bool,
) -> (Vec<Quiet>, Vec<String>) {
    let reading = |regs: &[Register], role, f: &crate::probe::symbols::Function| {
        crate::probe::placement::place_entry_reading(&image.path, role, f.clone(), regs, verbose)
    };
    let place = |role, f| reading(&[Register::RDI, Register::RSI], role, f);
    // The object, the arguments, their count and the keywords' names.
    let keywords = [Register::RDI, Register::RSI, Register::RDX, Register::RCX];
    let mut quiet = vec![
        Quiet::Get(place("d.get", &methods.get)),
        Quiet::Pop(place("d.pop", &methods.pop)),
        Quiet::SetDefault(place("d.setdefault", &methods.setdefault)),
        Quiet::Contains(place("in", &methods.contains)),
        Quiet::Subscript(place("d[k] (dict subclasses)", &methods.subscript)),
    ];
    quiet.extend(lists.map(|l| Quiet::Index(place("lst[i]", &l.subscript))));
    if let Some(o) = ordered {
        quiet.push(Quiet::OrderedPop(reading(&keywords, "od.pop", &o.pop)));
        let setdefault = reading(&keywords, "od.setdefault", &o.setdefault);
        quiet.push(Quiet::OrderedSetDefault(setdefault));
    }
    // `in` on a subclass calls the method; where the method calls the type's `in` (3.13+), that
    // probe counts it already.
    if !eval_loop::reaches(image, &methods.contains_method, methods.contains.address) {
        let method = place("in (dict subclasses)", &methods.contains_method);
        quiet.push(Quiet::Contains(method));
    }
    let set_contains = sets
        .map(|s| eval_loop::jumped_to(image, &s.contains).unwrap_or_else(|| s.contains.clone()));
    quiet.extend(
        set_contains
            .as_ref()
            .map(|c| Quiet::SetContains(place("k in s", c))),
    );
    // A lookup call in an inlined copy of a probed function: where the object, the key and its
    // hash are the call's first three arguments.
    let call_site = |at: u64, what: &str| {
        let function = image.function_at(at, &format!("{what} (inlined)"))?;
        if verbose {
            eprintln!("racewatch: {what}: an inlined copy's lookup call at {at:#x}");
        }
        Some(Placed {
            function,
            offset: 0,
            emulated: true,
            object: None,
        })
    };
    // A copy profile-guided optimisation inlined where a caller checks the function pointer first
    // runs without the probe. `.get`'s copy is watched at its calls to the dict lookup; any other
    // is said, not watched.
    let entries: Vec<&crate::probe::symbols::Function> =
        quiet.iter().map(|q| &q.at().function).collect();
    let lookup = eval_loop::dict_lookup(image, &methods.contains, &methods.get);
    let mut copied = Vec::new();
    let mut unwatched = Vec::new();
    for (i, guard) in eval_loop::speculated_copies(image, &entries) {
        let calls = (entries[i].address == methods.get.address)
            .then_some(lookup.as_ref().ok())
            .flatten()
            .and_then(|&lookup| eval_loop::copy_calls(image, guard, lookup))
            .filter(|calls| !calls.is_empty());
        match calls {
            Some(calls) => copied.extend(calls.into_iter().filter_map(|at| call_site(at, "d.get"))),
            None => unwatched.push(format!(
                "{} where {} runs an inlined copy of it after checking the function pointer (at \
                 {guard:#x}, profile-guided optimisation): the calls that take that copy",
                entries[i].display,
                image.path.display()
            )),
        }
    }
    if version < (3, 13) {
        quiet.extend(copied.into_iter().map(Quiet::GetCall));
        return (quiet, unwatched);
    }
    // Where the eval loop's specialised `in` (CONTAINS_OP_DICT, CONTAINS_OP_SET) calls none of
    // the functions probed, the calls to the lookup that its inlined copy makes.
    let inlined = |sites: InlineContains, (what, op): (&str, &str), unwatched: &mut Vec<String>| {
        match sites {
            InlineContains::Called => Vec::new(),
            InlineContains::At(sites) => sites
                .into_iter()
                .filter_map(|at| call_site(at, what))
                .collect(),
            InlineContains::Unknown(why) => {
                unwatched.push(format!(
                    "`{what}` where {} specialised it ({op}): {why}",
                    image.path.display()
                ));
                Vec::new()
            }
        }
    };
    // The functions probed at their entries, and those they call: a lookup in `d.pop`'s or
    // `d.setdefault`'s helper is theirs, counted at their entries, not an inlined `in`.
    let callees: Vec<crate::probe::symbols::Function> = entries
        .iter()
        .flat_map(|f| eval_loop::callees(image, f))
        .collect();
    let probed: Vec<&crate::probe::symbols::Function> =
        entries.into_iter().chain(&callees).collect();
    let dict_sites = eval_loop::inline_contains(image, &methods.contains, &methods.get, &probed);
    let mut dict_calls = inlined(dict_sites, ("k in d", "CONTAINS_OP_DICT"), &mut unwatched);
    dict_calls.retain(|c| {
        !copied
            .iter()
            .any(|g| g.function.address == c.function.address)
    });
    let set_calls = match &set_contains {
        Some(c) => inlined(
            eval_loop::inline_set_contains(image, c),
            ("k in s", "CONTAINS_OP_SET"),
            &mut unwatched,
        ),
        None => Vec::new(),
    };
    quiet.extend(copied.into_iter().map(Quiet::GetCall));
    quiet.extend(dict_calls.into_iter().map(Quiet::ContainsCall));
    quiet.extend(set_calls.into_iter().map(Quiet::SetContainsCall));
    (quiet, unwatched)
}

/// What to probe in `interp`, as the run's window `window`, and where its threads keep their
/// frames.
pub fn plan(
    interp: &Interpreter,
    window: u32,
    options: &Options,
) -> Result<(Plan, Layout), PythonError> {
    let Options {
        provoke,
        every_lookup,
        quiet_misses,
        verbose,
    } = *options;
    let path = &interp.image;
    let image = image::Image::load(path)?;
    let layout = layout::layout(&image)?;
    let version = layout.version;
    if verbose {
        eprintln!(
            "racewatch: {} is CPython {}.{}; its layout is from {}",
            path.display(),
            version.0,
            version.1,
            layout.source
        );
    }
    let methods = dict_type::dict_methods(&image)?;
    // `--quiet-misses` watches lists too: their windows, and `lst[i]` out of range in them.
    let (lists, no_lists) = match quiet_misses.then(|| dict_type::list_methods(&image)) {
        Some(Ok(l)) => (Some(l), None),
        Some(Err(e)) => (None, Some(format!("list windows: {e}"))),
        None => (None, None),
    };
    // And sets: their windows, and `k in s` false in them.
    let (sets, no_sets) = match quiet_misses.then(|| dict_type::set_methods(&image)) {
        Some(Ok(s)) => (Some(s), None),
        Some(Err(e)) => (None, Some(format!("set windows: {e}"))),
        None => (None, None),
    };
    // OrderedDict empties and refills itself with its own methods; its d[k] is dict's.
    let (ordered, no_ordered) = match dict_type::ordered_dict_methods(&image) {
        Ok(o) => (Some(o), None),
        Err(e) => (None, Some(format!("OrderedDict windows: {e}"))),
    };
    let (quiet, no_quiet) = if quiet_misses {
        quiet_probes(
            &image,
            version,
            &methods,
            lists.as_ref(),
            sets.as_ref(),
            ordered.as_ref(),
            verbose,
        )
    } else {
        (Vec::new(), Vec::new())
    };
    let list_clear = lists
        .as_ref()
        .map(|l| place_entry(path, "list clear", l.clear.clone(), 0, None, verbose));
    let set_clear = sets
        .as_ref()
        .map(|s| place_entry(path, "set clear", s.clear.clone(), 0, None, verbose));
    let exported = |symbol: &'static str| {
        image.function(symbol).ok_or_else(|| PythonError::Missing {
            image: path.clone(),
            symbol,
        })
    };
    let clear = place_entry(path, "clear", methods.clear, 0, None, verbose);
    let ordered_clear = ordered
        .as_ref()
        .map(|o| place_entry(path, "OrderedDict clear", o.clear.clone(), 0, None, verbose));
    let refills: Vec<RefillProbe> = [methods.update, methods.ior]
        .into_iter()
        .chain(ordered.into_iter().flat_map(|o| [o.update, o.ior]))
        .chain(lists.into_iter().flat_map(|l| [l.extend, l.inplace_concat]))
        .chain(sets.into_iter().flat_map(|s| [s.update, s.ior]))
        .map(|f| {
            RefillProbe::Return(crate::probe::placement::at_entry(
                path,
                "refill (return probed)",
                f,
                verbose,
            ))
        })
        .collect();
    let keyerror = exported(KEYERROR)?;
    // Static functions (copies the compiler made, take_gil) are named only where the symbol
    // table is kept.
    let table = image
        .has_symtab()
        .then(|| SymbolTable::parse(path, image.data()).ok())
        .flatten();
    let mut unprobed = match &table {
        Some(table) => crate::probe::plan::copies_not_probed(
            table,
            &[("clear", &clear.function), ("KeyError", &keyerror)]
                .into_iter()
                .chain(ordered_clear.iter().map(|c| ("clear", &c.function)))
                .chain(refills.iter().map(|r| ("refill", r.function())))
                .chain(
                    quiet
                        .iter()
                        .filter(|q| {
                            !matches!(
                                q,
                                Quiet::ContainsCall(_)
                                    | Quiet::GetCall(_)
                                    | Quiet::SetContainsCall(_)
                            )
                        })
                        .map(|q| ("quiet miss", &q.at().function)),
                )
                .collect::<Vec<_>>(),
            None,
            &[],
        ),
        None => Vec::new(),
    };
    unprobed.extend(no_ordered);
    unprobed.extend(no_quiet);
    unprobed.extend(no_lists);
    unprobed.extend(no_sets);
    let gil = if provoke {
        let no_provoke = |missing| PythonError::Provoke {
            image: path.clone(),
            version,
            missing,
        };
        let no_dwarf = |e| match e {
            SiteError::NoDebugInfo { .. } => no_provoke("DWARF"),
            e => e.into(),
        };
        // 3.13 moved the request from the interpreter into each thread's eval_breaker.
        let state = gil::find_gil_state(path, version >= (3, 13)).map_err(no_dwarf)?;
        let take_gil = table
            .as_ref()
            .and_then(|t| t.resolve(TAKE_GIL).ok())
            .ok_or_else(|| no_provoke("symbol take_gil"))?;
        Some(GilHandover {
            take_gil: place_entry(path, TAKE_GIL, take_gil, 0, None, verbose),
            drop_request: state.drop_request,
            switch_interval_vaddr: state.switch_interval_vaddr,
        })
    } else {
        None
    };
    let lookup = if version >= (3, 13) {
        LOOKUP_3_13
    } else {
        LOOKUP_3_11
    };
    let keyerror_probe = place_entry(path, "KeyError", keyerror, 0, None, verbose);
    let inline = eval_loop::inline_raises(&image, &[&methods.subscript]);
    if verbose {
        for (f, offsets) in &inline {
            for o in offsets {
                eprintln!(
                    "racewatch: KeyError: raised inside {} at {:#x}+{o:#x} (link-time inlined)",
                    f.display, f.address
                );
            }
        }
    }
    let sample = match inline_lookup_sample(&image, &inline, verbose) {
        Some(s) => s,
        None => Sample::at_entry(
            place_entry(path, "lookup sample", exported(lookup)?, 0, None, verbose),
            0,
        ),
    };
    let plan = Plan {
        unprobed,
        // A window per interpreter file.
        name: path.to_string_lossy().into_owned(),
        binary: path.clone(),
        object_arg: 0,
        window,
        clear: [clear]
            .into_iter()
            .chain(ordered_clear)
            .chain(list_clear)
            .chain(set_clear)
            .collect(),
        refills,
        lookup: LookupProbe::KeyError {
            function: keyerror_probe,
            inline,
            quiet,
        },
        sample: Some(sample),
        sample_always: every_lookup,
        lock_edges: None,
        gil,
        py_layout: Some(layout.kernel),
    };
    Ok((plan, layout))
}
