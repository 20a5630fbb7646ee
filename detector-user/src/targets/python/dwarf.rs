//! libpython's DWARF, loaded once per use: from the image itself, or from its separate debug file
//! (by build id, then `.gnu_debuglink`, as gdb looks), checked to belong to the same build. The
//! GIL's state (for `--provoke`) and the layout of builds without `_Py_DebugOffsets` are read
//! through it.
use std::path::{Path, PathBuf};

use gimli::{AttributeValue, EndianSlice, LittleEndian, constants as dw};
use object::{Object, ObjectSection, ObjectSymbol};

pub(super) type R<'a> = EndianSlice<'a, LittleEndian>;

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a readable ELF file: {source}")]
    Object {
        path: PathBuf,
        source: object::Error,
    },
    #[error("{path} is built for {arch}: only x86-64 is supported")]
    UnsupportedArch { path: PathBuf, arch: String },
    #[error(
        "{path} has no DWARF debug info: install the python debug symbols or use a python built with -g"
    )]
    NoDebugInfo { path: PathBuf },
    #[error(
        "{debug} is not the debug file of {path} (build ids differ): reinstall the matching python debug symbols"
    )]
    DebugMismatch { path: PathBuf, debug: PathBuf },
    #[error("malformed DWARF in {path}: {source}")]
    Dwarf { path: PathBuf, source: gimli::Error },
    #[error(
        "{path} does not describe {missing} in its DWARF, which --provoke needs to make a writer \
         hand the GIL over"
    )]
    NoGilState { path: PathBuf, missing: String },
    #[error(
        "{path} does not describe {missing} in its DWARF, which racewatch needs to name the Python \
         frames of a race"
    )]
    NoFrameLayout { path: PathBuf, missing: String },
}

pub(super) fn read(path: &Path) -> Result<Vec<u8>, SiteError> {
    std::fs::read(path).map_err(|source| SiteError::Io {
        path: path.into(),
        source,
    })
}

pub(super) fn parse<'d>(path: &Path, data: &'d [u8]) -> Result<object::File<'d>, SiteError> {
    object::File::parse(data).map_err(|source| SiteError::Object {
        path: path.into(),
        source,
    })
}

pub(super) fn has_dwarf(obj: &object::File) -> bool {
    obj.section_by_name(".debug_info")
        .is_some_and(|s| s.size() > 0)
}

/// The separate debug file GDB would use: by build id, else by `.gnu_debuglink`, else from a
/// debuginfod server.
fn debug_file_path(image: &Path, obj: &object::File) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let root = Path::new("/usr/lib/debug");
    let mut candidates = Vec::new();
    let build_id = obj
        .build_id()
        .ok()
        .flatten()
        .map(|id| id.iter().map(|b| format!("{b:02x}")).collect::<String>());
    if let Some(hex) = &build_id
        && hex.len() > 2
    {
        candidates.push(
            root.join(".build-id")
                .join(&hex[..2])
                .join(format!("{}.debug", &hex[2..])),
        );
    }
    if let (Ok(Some((name, _crc))), Ok(real)) = (obj.gnu_debuglink(), std::fs::canonicalize(image))
    {
        let name = std::ffi::OsStr::from_bytes(name);
        let dir = real.parent().unwrap_or(Path::new("/"));
        let under_root = root.join(dir.strip_prefix("/").unwrap_or(dir));
        candidates.extend([
            dir.join(name),
            dir.join(".debug").join(name),
            under_root.join(name),
        ]);
    }
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| crate::probe::debuginfod::debuginfo(build_id.as_deref()?))
}

/// Reads the separate debug file, checking that it was split from this very build.
pub(super) fn load_debug_file(
    image: &Path,
    obj: &object::File,
) -> Result<(PathBuf, Vec<u8>), SiteError> {
    let path =
        debug_file_path(image, obj).ok_or_else(|| SiteError::NoDebugInfo { path: image.into() })?;
    let data = read(&path)?;
    let debug = parse(&path, &data)?;
    if !has_dwarf(&debug) {
        return Err(SiteError::NoDebugInfo { path: image.into() });
    }
    match (obj.build_id(), debug.build_id()) {
        (Ok(Some(a)), Ok(Some(b))) if a != b => Err(SiteError::DebugMismatch {
            path: image.into(),
            debug: path,
        }),
        _ => Ok((path, data)),
    }
}

/// The ELF address of symbol `name` in `image`, from either symbol table.
pub(super) fn symbol(image: &Path, name: &str) -> Result<Option<u64>, SiteError> {
    let data = read(image)?;
    let obj = parse(image, &data)?;
    // A stripped file keeps its exported symbols in .dynsym alone.
    Ok(obj
        .symbols()
        .chain(obj.dynamic_symbols())
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
