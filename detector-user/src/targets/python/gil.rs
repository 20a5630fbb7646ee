//! Where a thread waiting for the GIL asks its holder for it, from libpython's symbols and DWARF:
//! what `python --provoke` watches to let a writer hand the GIL over inside its window.
//!
//! CPython 3.11 and 3.12 keep the main interpreter inside `_PyRuntime` (`_main_interpreter`), and
//! in it `ceval.gil_drop_request`, which a thread that has waited the switch interval for the GIL sets
//! to make the holder drop it at its next eval-breaker check; 3.13 moved that request into bit 0
//! of each thread state's `eval_breaker`. The offsets are read from DWARF, not hard-coded.
use std::path::Path;

use super::dwarf::{SiteError, member_offsets, symbol, with_dwarf};
use crate::probe::plan::DropRequest;

/// The (struct, member) pairs `--provoke` needs, read in one pass over the DWARF.
const MEMBERS: [(&str, &str); 8] = [
    // From `_PyRuntime` to the main interpreter's `ceval.gil_drop_request` (3.11, 3.12).
    ("pyruntimestate", "_main_interpreter"),
    ("_is", "ceval"),
    ("_ceval_state", "gil_drop_request"),
    // To its GIL: the interpreter's own `_gil` since 3.12, the runtime's `ceval.gil` in 3.11.
    ("_is", "_gil"),
    ("pyruntimestate", "ceval"),
    ("_ceval_runtime_state", "gil"),
    ("_gil_runtime_state", "interval"),
    // 3.13+: the request is bit 0 of the holder's `eval_breaker`.
    ("_ts", "eval_breaker"),
];

/// Where `--provoke` reads the GIL's state.
#[derive(Debug)]
pub struct GilState {
    pub drop_request: DropRequest,
    /// The link-time address (ELF vaddr) of the main interpreter's switch interval (`unsigned
    /// long`, in µs): a thread waiting for the GIL asks its holder for it only after waiting that
    /// long.
    pub switch_interval_vaddr: u64,
}

/// The GIL's state in `image`: with `in_thread` (3.13+), the drop request is in each thread
/// state; before, it is the main interpreter's static flag.
pub fn find_gil_state(image: &Path, in_thread: bool) -> Result<GilState, SiteError> {
    let runtime = symbol(image, "_PyRuntime")?.ok_or_else(|| SiteError::NoGilState {
        path: image.into(),
        missing: "the symbol _PyRuntime".into(),
    })?;
    with_dwarf(image, |_, dpath, dwarf| {
        let found = member_offsets(dwarf, &MEMBERS).map_err(|source| SiteError::Dwarf {
            path: dpath.into(),
            source,
        })?;
        let missing = |missing: String| SiteError::NoGilState {
            path: dpath.into(),
            missing,
        };
        let need = |i: usize| {
            found[i].ok_or_else(|| {
                let (strukt, member) = MEMBERS[i];
                missing(format!("struct {strukt}'s member {member}"))
            })
        };
        let drop_request = if in_thread {
            DropRequest::InThread { offset: need(7)? }
        } else {
            DropRequest::Static {
                vaddr: runtime + need(0)? + need(1)? + need(2)?,
            }
        };
        let gil = match found {
            [Some(interp), _, _, Some(gil), ..] | [_, _, _, _, Some(interp), Some(gil), ..] => {
                interp + gil
            }
            _ => {
                return Err(missing(
                    "the main interpreter's GIL (struct _is's member _gil)".into(),
                ));
            }
        };
        Ok(GilState {
            drop_request,
            switch_interval_vaddr: runtime + gil + need(6)?,
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
        let DropRequest::Static { vaddr: found } = find_gil_state(lib, false).unwrap().drop_request
        else {
            panic!("3.11's drop request is static");
        };
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
            let found = find_gil_state(lib, false).unwrap().switch_interval_vaddr;
            let Some(gdb) = gdb_address(lib, expr) else {
                eprintln!("skipped: no gdb");
                return;
            };
            assert_eq!(gdb, found, "{}", lib.display());
        }
    }

    /// What the hazard forecast reads at each window's ends: `switch_number` where every build
    /// keeps it, and 3.11's GIL where the layout places it.
    #[test]
    fn the_layout_finds_the_gil_switch_number() {
        for v in ["3.11.7", "3.12.1", "3.13.0"] {
            let minor = &v[..4];
            let lib = format!("/root/.pyenv/versions/{v}/lib/libpython{minor}.so.1.0");
            let lib = Path::new(&lib);
            if !lib.is_file() {
                eprintln!("skipped: no {}", lib.display());
                continue;
            }
            let Some(at) = gdb_address(lib, "&((struct _gil_runtime_state *)0)->switch_number")
            else {
                eprintln!("skipped: no gdb");
                return;
            };
            assert_eq!(at, detector_common::GIL_SWITCH_NUMBER, "{v}");
            let image = crate::targets::python::image::Image::load(lib).unwrap();
            let l = crate::targets::python::layout::layout(&image)
                .unwrap()
                .kernel;
            if v.starts_with("3.11") {
                assert_eq!(l.gil_hops, 0);
                let want = gdb_address(lib, "&_PyRuntime.ceval.gil.switch_number").unwrap();
                assert_eq!(
                    l.runtime + l.gil[0] + detector_common::GIL_SWITCH_NUMBER,
                    want
                );
            } else {
                // Through the main interpreter to its `ceval.gil` pointer, as the thread state.
                assert_eq!((l.gil_hops, &l.gil[..2]), (2, &l.tstate[..2]), "{v}");
            }
        }
    }

    #[test]
    fn an_image_without_the_runtime_says_what_is_missing() {
        let err = find_gil_state(Path::new("/bin/true"), false).unwrap_err();
        assert!(
            err.to_string()
                .contains("/bin/true does not describe the symbol _PyRuntime in its DWARF"),
            "{err}"
        );
    }
}
