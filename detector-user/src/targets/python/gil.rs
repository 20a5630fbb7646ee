//! Where a thread waiting for the GIL asks its holder for it, from libpython's symbols and DWARF:
//! what `python --provoke` watches to let a writer hand the GIL over inside its window.
//!
//! CPython 3.11 and 3.12 keep the main interpreter inside `_PyRuntime` (`_main_interpreter`), and
//! in it `ceval.gil_drop_request`, which a thread that has waited the switch interval for the GIL sets
//! to make the holder drop it at its next eval-breaker check; 3.13 moved that request into bit 0
//! of each thread state's `eval_breaker`. The offsets are read from DWARF, not hard-coded.
use std::path::Path;

use super::dwarf::{SiteError, member_offsets, symbol, with_dwarf};

/// (struct, member) pairs whose offsets lead from `_PyRuntime` to the flag.
const PATH: [(&str, &str); 3] = [
    ("pyruntimestate", "_main_interpreter"),
    ("_is", "ceval"),
    ("_ceval_state", "gil_drop_request"),
];

/// The link-time address (ELF vaddr) of the main interpreter's `gil_drop_request` in `image`.
pub fn find_gil_drop_request(image: &Path) -> Result<u64, SiteError> {
    in_runtime(image, &PATH, |found| {
        PATH.iter()
            .zip(found)
            .map(|((strukt, member), off)| {
                off.ok_or_else(|| format!("struct {strukt}'s member {member}"))
            })
            .sum()
    })
}

/// Members that lead from `_PyRuntime` to the main interpreter GIL's switch interval: in the
/// interpreter's own `_gil` since 3.12, in the runtime's `ceval.gil` in 3.11.
const INTERVAL: [(&str, &str); 5] = [
    ("pyruntimestate", "_main_interpreter"),
    ("_is", "_gil"),
    ("pyruntimestate", "ceval"),
    ("_ceval_runtime_state", "gil"),
    ("_gil_runtime_state", "interval"),
];

/// The link-time address of the main interpreter's switch interval (`unsigned long`, in µs): a
/// thread waiting for the GIL asks its holder for it only after waiting that long.
pub fn find_switch_interval(image: &Path) -> Result<u64, SiteError> {
    in_runtime(image, &INTERVAL, |found| {
        let interval = found[4].ok_or("struct _gil_runtime_state's member interval")?;
        match found {
            [Some(interp), Some(gil), ..] | [_, _, Some(interp), Some(gil), _] => {
                Ok(interp + gil + interval)
            }
            _ => Err("the main interpreter's GIL (struct _is's member _gil)".into()),
        }
    })
}

/// `_PyRuntime`'s address plus the offset `pick` makes of `members`' offsets (or names what is
/// missing).
fn in_runtime<const N: usize>(
    image: &Path,
    members: &[(&str, &str); N],
    pick: impl FnOnce(&[Option<u64>; N]) -> Result<u64, String>,
) -> Result<u64, SiteError> {
    let runtime = symbol(image, "_PyRuntime")?.ok_or_else(|| SiteError::NoGilState {
        path: image.into(),
        missing: "the symbol _PyRuntime".into(),
    })?;
    with_dwarf(image, |_, dpath, dwarf| {
        let found = member_offsets(dwarf, members).map_err(|source| SiteError::Dwarf {
            path: dpath.into(),
            source,
        })?;
        let offset = pick(&found).map_err(|missing| SiteError::NoGilState {
            path: dpath.into(),
            missing,
        })?;
        Ok(runtime + offset)
    })
}

/// CPython 3.13+: the offset of `eval_breaker` in `PyThreadState` (`struct _ts`), whose bit 0 a
/// thread waiting for the GIL sets in its holder's thread state.
pub fn find_eval_breaker(image: &Path) -> Result<u64, SiteError> {
    with_dwarf(image, |_, dpath, dwarf| {
        let [offset] = member_offsets(dwarf, &[("_ts", "eval_breaker")]).map_err(|source| {
            SiteError::Dwarf {
                path: dpath.into(),
                source,
            }
        })?;
        offset.ok_or_else(|| SiteError::NoGilState {
            path: dpath.into(),
            missing: "struct _ts's member eval_breaker".into(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBPYTHON: &str = "/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0";

    #[test]
    fn finds_the_drop_request_of_the_main_interpreter() {
        let lib = Path::new(LIBPYTHON);
        if !lib.is_file() {
            eprintln!("skipped: no {LIBPYTHON}");
            return;
        }
        let found = find_gil_drop_request(lib).unwrap();
        let Some(gdb) = gdb_address(lib, "&_PyRuntime._main_interpreter.ceval.gil_drop_request")
        else {
            eprintln!("skipped: no gdb");
            return;
        };
        assert_eq!(gdb, found);
    }

    /// The address gdb prints for `expr` in `lib`, None without gdb.
    fn gdb_address(lib: &Path, expr: &str) -> Option<u64> {
        let gdb = std::process::Command::new("gdb")
            .args(["-batch", "-ex"])
            .arg(format!("print/x (long){expr}"))
            .arg(lib)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&gdb.stdout);
        let addrs: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split("0x").nth(1))
            .filter_map(|h| u64::from_str_radix(h.trim(), 16).ok())
            .collect();
        assert_eq!(addrs.len(), 1, "{text}");
        Some(addrs[0])
    }

    /// 3.11 keeps the GIL in the runtime, 3.12+ in each interpreter: both as gdb reads them.
    #[test]
    fn finds_the_switch_interval_in_either_layout() {
        for (lib, expr) in [
            (LIBPYTHON, "&_PyRuntime.ceval.gil.interval"),
            (
                "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0",
                "&_PyRuntime._main_interpreter._gil.interval",
            ),
        ] {
            let lib = Path::new(lib);
            if !lib.is_file() {
                eprintln!("skipped: no {}", lib.display());
                continue;
            }
            let found = find_switch_interval(lib).unwrap();
            let Some(gdb) = gdb_address(lib, expr) else {
                eprintln!("skipped: no gdb");
                return;
            };
            assert_eq!(gdb, found, "{}", lib.display());
        }
    }

    #[test]
    fn an_image_without_the_runtime_says_what_is_missing() {
        let err = find_gil_drop_request(Path::new("/bin/true")).unwrap_err();
        assert!(
            err.to_string()
                .contains("/bin/true does not describe the symbol _PyRuntime in its DWARF"),
            "{err}"
        );
    }
}
