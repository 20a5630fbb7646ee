//! Where the main interpreter's `gil_drop_request` is, from libpython's symbols and DWARF: what
//! `python --provoke` watches to let a writer hand the GIL over inside its window.
//!
//! CPython 3.11 keeps the main interpreter inside `_PyRuntime` (`_main_interpreter`), and in it
//! `ceval.gil_drop_request`, which a thread that has waited the switch interval for the GIL sets
//! to make the holder drop it at its next eval-breaker check. The offsets are read from DWARF,
//! not hard-coded.
use std::path::Path;

use gimli::{AttributeValue, EndianSlice, LittleEndian, constants as dw};
use object::{Object, ObjectSection, ObjectSymbol};

use super::keyerror_site::{SiteError, has_dwarf, load_debug_file, parse, read};

pub(super) type R<'a> = EndianSlice<'a, LittleEndian>;

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

/// The ELF address of symbol `name` in `image`.
pub(super) fn symbol(image: &Path, name: &str) -> Result<Option<u64>, SiteError> {
    let data = read(image)?;
    let obj = parse(image, &data)?;
    Ok(obj
        .symbols()
        .find(|s| s.name() == Ok(name))
        .map(|s| s.address()))
}

/// Runs `f` on `image` (x86_64 only) and the DWARF that describes it (its own, or its debug
/// file's, whose path `f` gets for error messages).
pub(super) fn with_dwarf<T>(
    image: &Path,
    f: impl FnOnce(&object::File, &Path, &gimli::Dwarf<R>) -> Result<T, SiteError>,
) -> Result<T, SiteError> {
    let data = read(image)?;
    let obj = parse(image, &data)?;
    if obj.architecture() != object::Architecture::X86_64 {
        return Err(SiteError::UnsupportedArch {
            path: image.into(),
            arch: format!("{:?}", obj.architecture()),
        });
    }
    let debug = if has_dwarf(&obj) {
        None
    } else {
        Some(load_debug_file(image, &obj)?)
    };
    let (dpath, dobj) = match &debug {
        Some((path, data)) => (path.as_path(), parse(path, data)?),
        None => (image, parse(image, &data)?),
    };
    let sections = gimli::DwarfSections::load(|id| {
        dobj.section_by_name(id.name())
            .map_or(Ok(Default::default()), |s| s.uncompressed_data())
    })
    .map_err(|source| SiteError::Object {
        path: dpath.into(),
        source,
    })?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
    f(&obj, dpath, &dwarf)
}

/// The offset of each (struct, member) of `path`, from the first unit that defines the struct.
pub(super) fn member_offsets<const N: usize>(
    dwarf: &gimli::Dwarf<R>,
    path: &[(&str, &str); N],
) -> gimli::Result<[Option<u64>; N]> {
    let mut found = [None; N];
    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        let unit = dwarf.unit(header)?;
        let mut entries = unit.entries();
        // The struct whose members are being read, with its depth.
        let mut current: Option<(&str, isize)> = None;
        while let Some(entry) = entries.next_dfs()? {
            let depth = entry.depth();
            if current.is_some_and(|(_, d)| depth <= d) {
                current = None;
            }
            let name = match entry.attr_value(dw::DW_AT_name) {
                Some(v) => Some(dwarf.attr_string(&unit, v)?.to_string_lossy().into_owned()),
                None => None,
            };
            match entry.tag() {
                dw::DW_TAG_structure_type if entry.attr(dw::DW_AT_declaration).is_none() => {
                    current = path
                        .iter()
                        .map(|(s, _)| *s)
                        .find(|s| name.as_deref() == Some(*s))
                        .map(|s| (s, depth));
                }
                dw::DW_TAG_member => {
                    let Some((strukt, _)) = current else { continue };
                    for (i, (s, m)) in path.iter().enumerate() {
                        if *s == strukt
                            && name.as_deref() == Some(*m)
                            && found[i].is_none()
                            && let Some(AttributeValue::Udata(off)) =
                                entry.attr_value(dw::DW_AT_data_member_location)
                        {
                            found[i] = Some(off);
                        }
                    }
                }
                _ => {}
            }
        }
        if found.iter().all(Option::is_some) {
            break;
        }
    }
    Ok(found)
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
