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
    let runtime = symbol(image, "_PyRuntime")?.ok_or_else(|| SiteError::NoGilState {
        path: image.into(),
        missing: "the symbol _PyRuntime".into(),
    })?;
    with_dwarf(image, |_, dpath, dwarf| {
        let offsets = member_offsets(dwarf, &PATH).map_err(|source| SiteError::Dwarf {
            path: dpath.into(),
            source,
        })?;
        let mut found = [0u64; PATH.len()];
        for (i, (strukt, member)) in PATH.iter().enumerate() {
            found[i] = offsets[i].ok_or_else(|| SiteError::NoGilState {
                path: dpath.into(),
                missing: format!("struct {strukt}'s member {member}"),
            })?;
        }
        Ok(runtime + found.iter().sum::<u64>())
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
        let gdb = std::process::Command::new("gdb")
            .args(["-batch", "-ex"])
            .arg("print/x (long)&_PyRuntime._main_interpreter.ceval.gil_drop_request")
            .arg(lib)
            .output();
        let Ok(gdb) = gdb else {
            eprintln!("skipped: no gdb");
            return;
        };
        let text = String::from_utf8_lossy(&gdb.stdout);
        let addrs: Vec<u64> = text
            .lines()
            .filter_map(|l| l.split("0x").nth(1))
            .filter_map(|h| u64::from_str_radix(h.trim(), 16).ok())
            .collect();
        assert_eq!(addrs, [found], "{text}");
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
