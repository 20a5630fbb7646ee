//! `racewatch python`: finds the CPython interpreter a process runs and the probe points for a
//! dict's clear, its refill and the KeyError of a failed `d[k]`.
pub mod dwarf;
pub mod frames;
pub mod gil;
pub mod key;
pub mod keyerror_site;
pub mod linetable;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
};

use detector_common::DictSite;

use crate::probe::{
    plan::{GilHandover, LookupProbe, Plan, RefillProbe},
    symbols::{SymbolError, SymbolTable},
};

use dwarf::SiteError;
use keyerror_site::{DictLocation, KeyErrorSite};

/// The CPython versions whose object layouts racewatch knows.
const SUPPORTED: (u32, u32) = (3, 11);
/// `d.clear()`: only that method calls it, unlike `PyDict_Clear` (interpreter start-up and
/// shutdown call that hundreds of times).
const CLEAR: &str = "dict_clear";
/// `d.update(...)` and `d |= other`: neither kwargs handling nor `dict(...)` calls them.
const REFILLS: [&str; 2] = ["dict_update", "dict_ior"];
const KEYERROR: &str = "_PyErr_SetKeyError";
/// `d[k]` once its call site is specialised (BINARY_SUBSCR_DICT), arg0 the dict: probed in
/// sampling bursts only, for the hazard report's lookup rates.
const LOOKUP: &str = "PyDict_GetItemWithError";
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
    #[error(
        "{image} is CPython {major}.{minor}; racewatch python supports CPython {}.{} (the object \
         layouts it reads differ between versions)",
        SUPPORTED.0, SUPPORTED.1
    )]
    Version {
        image: PathBuf,
        major: u32,
        minor: u32,
    },
    #[error(
        "{image} lacks the function `{symbol}` racewatch probes: this interpreter is stripped; \
         use a CPython built with symbols (a pyenv or source build) or install its debug symbols"
    )]
    Symbol {
        image: PathBuf,
        symbol: &'static str,
        source: Box<SymbolError>,
    },
    #[error("{0}")]
    Sites(#[from] SiteError),
}

/// The ELF image holding the interpreter loop: libpython when the build is shared, else the
/// python executable itself.
#[derive(Debug)]
pub struct Interpreter {
    pub image: PathBuf,
}

/// `(major, minor)` from a name like `python3.11` or `libpython3.11.so.1.0`.
fn version_in_name(path: &Path) -> Option<(u32, u32)> {
    let name = path.file_name()?.to_str()?;
    let rest = &name[name.find("python")? + "python".len()..];
    let mut parts = rest.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// `python`, `python3`, `python3.11`: an interpreter's executable name.
fn is_python_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("python"))
        .is_some_and(|rest| rest.chars().all(|c| c.is_ascii_digit() || c == '.'))
}

fn check_version(image: PathBuf) -> Result<Interpreter, PythonError> {
    match version_in_name(&image) {
        Some(v) if v != SUPPORTED => Err(PythonError::Version {
            image,
            major: v.0,
            minor: v.1,
        }),
        _ => Ok(Interpreter { image }),
    }
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
                 print(sys.executable); print(lib); print(*sys.version_info[:2])";
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
    let [exe, lib, version] = lines[..] else {
        return Err(err(format!(
            "unexpected answer {text:?}: is {python} CPython?"
        )));
    };
    let image = if !lib.is_empty() && Path::new(lib).exists() {
        PathBuf::from(lib)
    } else {
        PathBuf::from(exe)
    };
    if let Some((major, minor)) = version
        .split_once(' ')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        && (major, minor) != SUPPORTED
    {
        return Err(PythonError::Version {
            image,
            major,
            minor,
        });
    }
    Ok(Interpreter { image })
}

/// For `-p PID`: the libpython the process maps, else its executable if that is python.
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
        Some(lib) => check_version(crate::process::file_of(pid, Path::new(lib))),
        None if is_python_name(&exe) => check_version(exe),
        None => Err(PythonError::NotPython { pid, exe }),
    }
}

/// An interpreter file the host's CPython processes map, with those processes.
#[derive(Debug)]
pub struct HostInterpreter {
    pub found: Result<Interpreter, PythonError>,
    pub pids: Vec<u32>,
}

/// For a system-wide run: each distinct interpreter file (by device and inode, so a container's
/// copy at the same path is another file) that running CPython processes map, the most used
/// first.
pub fn on_host() -> Vec<HostInterpreter> {
    use std::os::unix::fs::MetadataExt;
    let me = std::process::id();
    let mut files: Vec<((u64, u64), HostInterpreter)> = Vec::new();
    for pid in crate::process::all_pids().into_iter().filter(|&p| p != me) {
        let found = match for_pid(pid) {
            Err(PythonError::NotPython { .. } | PythonError::Target(_)) => continue,
            found => found,
        };
        let id = match &found {
            Ok(i) => {
                std::fs::metadata(&i.image).map_or((0, u64::from(pid)), |m| (m.dev(), m.ino()))
            }
            Err(PythonError::Version { image, .. }) => {
                std::fs::metadata(image).map_or((0, u64::from(pid)), |m| (m.dev(), m.ino()))
            }
            Err(_) => (0, u64::from(pid)),
        };
        match files.iter_mut().find(|(f, _)| *f == id) {
            Some((_, h)) => h.pids.push(pid),
            None => files.push((
                id,
                HostInterpreter {
                    found,
                    pids: vec![pid],
                },
            )),
        }
    }
    files.sort_by_key(|(_, h)| std::cmp::Reverse(h.pids.len()));
    files.into_iter().map(|(_, h)| h).collect()
}

fn dict_site(site: &KeyErrorSite, keyerror_vaddr: u64) -> DictSite {
    let (dwarf_reg, deref, offset) = match site.dict {
        DictLocation::Deref { dwarf_reg, offset } => (dwarf_reg, 1, offset),
        DictLocation::Reg { dwarf_reg } => (dwarf_reg, 0, 0),
    };
    let (outer_sp_offset, outer_delta) = site.outer.as_ref().map_or((0, 0), |o| {
        (o.sp_offset, o.return_vaddr.wrapping_sub(keyerror_vaddr))
    });
    DictSite {
        dwarf_reg: u32::from(dwarf_reg),
        deref,
        offset,
        outer_sp_offset,
        outer_delta,
    }
}

/// The probes for `interp`; `verbose` says where each KeyError site reads the dict.
/// What to probe in `interp`; with `provoke`, also how to make a writer hand the GIL over.
pub fn plan(
    interp: &Interpreter,
    provoke: bool,
    every_lookup: bool,
    verbose: bool,
) -> Result<Plan, PythonError> {
    let image = &interp.image;
    let table = SymbolTable::load(image).map_err(|e| PythonError::Symbol {
        image: image.clone(),
        symbol: CLEAR,
        source: Box::new(e),
    })?;
    let resolve = |symbol: &'static str| {
        table.resolve(symbol).map_err(|e| PythonError::Symbol {
            image: image.clone(),
            symbol,
            source: Box::new(e),
        })
    };
    let clear = crate::probe::placement::place_entry(image, "clear", resolve(CLEAR)?, 0, verbose);
    let refills = REFILLS
        .into_iter()
        .map(|r| {
            resolve(r).map(|f| {
                let at =
                    crate::probe::placement::at_entry(image, "refill (return probed)", f, verbose);
                RefillProbe::Return(at)
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let keyerror = resolve(KEYERROR)?;
    let unprobed = crate::probe::plan::copies_not_probed(
        &table,
        &[("clear", &clear.function), ("KeyError", &keyerror)]
            .into_iter()
            .chain(refills.iter().map(|r| match r {
                RefillProbe::Return(p) | RefillProbe::Exits { entry: p, .. } => {
                    ("refill", &p.function)
                }
            }))
            .collect::<Vec<_>>(),
        None,
    );
    let gil = if provoke {
        let drop_request = gil::find_gil_drop_request(image)?;
        let at = clear.function.address + clear.offset;
        let take_gil = resolve(TAKE_GIL)?;
        Some(GilHandover {
            clear: clear.function.clone(),
            take_gil: crate::probe::placement::place_entry(image, TAKE_GIL, take_gil, 0, verbose),
            drop_request_delta: drop_request.wrapping_sub(at) as i64,
        })
    } else {
        None
    };
    let sample =
        crate::probe::placement::place_entry(image, "lookup sample", resolve(LOOKUP)?, 0, verbose);
    let sites = keyerror_site::find_keyerror_sites(image)?;
    if verbose {
        for s in &sites {
            eprintln!(
                "racewatch: KeyError site in {} returning to {:#x}: dict at {:?}, outer frame {:?}",
                crate::text::escape(&s.caller),
                s.return_vaddr,
                s.dict,
                s.outer
            );
        }
    }
    let sites = sites
        .iter()
        .map(|s| {
            (
                s.return_vaddr.wrapping_sub(keyerror.address),
                dict_site(s, keyerror.address),
            )
        })
        .collect();
    Ok(Plan {
        unprobed,
        binary: image.clone(),
        object_arg: 0,
        window: 0,
        clear,
        refills,
        lookup: LookupProbe::KeyError {
            function: crate::probe::placement::at_entry(image, "KeyError", keyerror, verbose),
            sites,
        },
        sample: Some(sample),
        sample_always: every_lookup,
        gil,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_from_file_names() {
        assert_eq!(
            version_in_name(Path::new("/usr/lib/libpython3.11.so.1.0")),
            Some((3, 11))
        );
        assert_eq!(
            version_in_name(Path::new("/usr/bin/python3.12")),
            Some((3, 12))
        );
        assert_eq!(version_in_name(Path::new("/usr/bin/python3")), None);
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        let err = check_version(PathBuf::from("/opt/libpython3.12.so")).unwrap_err();
        assert!(
            err.to_string()
                .contains("is CPython 3.12; racewatch python supports CPython 3.11"),
            "{err}"
        );
    }
}
