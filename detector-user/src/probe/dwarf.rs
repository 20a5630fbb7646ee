//! A native file's own DWARF, for what placement asks of it: where a compiler's copy of a
//! function receives its object (`copies`), what a function returns (`returns`).
use std::path::Path;

use gimli::{EndianSlice, LittleEndian, constants as dw};
use object::{Object as _, ObjectSection as _};

pub type R<'a> = EndianSlice<'a, LittleEndian>;

/// Runs `f` on `binary`'s DWARF. `Err` says why there is none to read.
pub fn with_dwarf<T>(
    binary: &Path,
    f: impl FnOnce(&gimli::Dwarf<R>) -> gimli::Result<T>,
) -> Result<T, String> {
    let data =
        std::fs::read(binary).map_err(|e| format!("cannot read {}: {e}", binary.display()))?;
    let obj = object::File::parse(&*data).map_err(|e| format!("not an ELF file: {e}"))?;
    if obj
        .section_by_name(".debug_info")
        .is_none_or(|s| s.size() == 0)
    {
        return Err("the file has no DWARF".into());
    }
    let sections = gimli::DwarfSections::load(|id| {
        obj.section_by_name(id.name())
            .map_or(Ok(Default::default()), |s| s.uncompressed_data())
    })
    .map_err(|e| format!("unreadable DWARF: {e}"))?;
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
    f(&dwarf).map_err(|e| format!("unreadable DWARF: {e}"))
}

/// Runs `f` on the subprogram DIE whose code begins at `address` (its `low_pc`, or one of its
/// ranges when the compiler split it into a hot and a `.cold` part); None when there is none.
pub fn at_function<T>(
    dwarf: &gimli::Dwarf<R>,
    address: u64,
    mut f: impl FnMut(&gimli::Unit<R>, gimli::UnitOffset) -> gimli::Result<Option<T>>,
) -> gimli::Result<Option<T>> {
    let mut units = dwarf.units();
    while let Some(header) = units.next()? {
        let unit = dwarf.unit(header)?;
        let mut entries = unit.entries();
        while let Some(entry) = entries.next_dfs()? {
            if entry.tag() == dw::DW_TAG_subprogram && starts_at(dwarf, &unit, entry, address)? {
                return f(&unit, entry.offset());
            }
        }
    }
    Ok(None)
}

fn starts_at<'d>(
    dwarf: &gimli::Dwarf<R<'d>>,
    unit: &gimli::Unit<R<'d>>,
    entry: &gimli::DebuggingInformationEntry<R<'d>>,
    address: u64,
) -> gimli::Result<bool> {
    // DWARF 5 (clang's default) gives it as an index into .debug_addr.
    if let Some(low) = entry.attr_value(dw::DW_AT_low_pc) {
        return Ok(dwarf.attr_address(unit, low)? == Some(address));
    }
    if entry.attr_value(dw::DW_AT_ranges).is_none() {
        return Ok(false);
    }
    let mut ranges = dwarf.die_ranges(unit, entry)?;
    while let Some(r) = ranges.next()? {
        if r.begin == address {
            return Ok(true);
        }
    }
    Ok(false)
}
