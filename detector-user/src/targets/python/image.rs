//! What an interpreter's ELF file says about itself without debug information: its symbols
//! (`.symtab` when kept, `.dynsym` always), the pointers its static data holds (through the
//! dynamic relocations of a shared or position-independent build), and its functions' extents
//! (from `.eh_frame`, which stripping keeps because unwinding needs it).
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use gimli::{BaseAddresses, CieOrFde, EhFrame, UnwindSection};
use object::ObjectSymbolTable as _;
use object::{
    LittleEndian, Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, elf,
    read::elf::{ElfFile64, FileHeader as _},
};

use crate::probe::symbols::Function;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a 64-bit x86-64 ELF file: {reason}")]
    NotElf { path: PathBuf, reason: String },
}

/// A section with bytes in the file.
struct Section {
    name: String,
    address: u64,
    size: u64,
    /// Where its bytes are in the file.
    offset: u64,
    text: bool,
}

impl Section {
    fn holds(&self, vaddr: u64, len: u64) -> bool {
        self.address <= vaddr && vaddr.saturating_add(len) <= self.address + self.size
    }

    /// The file offset of `vaddr`, which the section holds.
    fn offset_of(&self, vaddr: u64) -> usize {
        (self.offset + vaddr - self.address) as usize
    }
}

/// One interpreter file, read and indexed once.
pub struct Image {
    pub path: PathBuf,
    data: Vec<u8>,
    sections: Vec<Section>,
    has_symtab: bool,
    /// Symbols by name, from `.symtab` and `.dynsym`: (address, size).
    symbols: HashMap<String, (u64, u64)>,
    /// What each relocated pointer slot holds once loaded, before the load bias.
    relocated: HashMap<u64, u64>,
    /// Function extents from `.eh_frame`, sorted by start.
    extents: Vec<(u64, u64)>,
}

impl Image {
    pub fn load(path: &Path) -> Result<Image, ImageError> {
        let data = std::fs::read(path).map_err(|source| ImageError::Io {
            path: path.into(),
            source,
        })?;
        Image::parse(path, data)
    }

    pub fn parse(path: &Path, data: Vec<u8>) -> Result<Image, ImageError> {
        let not_elf = |reason: String| ImageError::NotElf {
            path: path.into(),
            reason,
        };
        let file = ElfFile64::<LittleEndian>::parse(&*data).map_err(|e| not_elf(e.to_string()))?;
        if file.elf_header().e_machine(LittleEndian) != elf::EM_X86_64 {
            return Err(not_elf("not built for x86-64".into()));
        }
        let mut symbols = HashMap::new();
        for sym in file.symbols().chain(file.dynamic_symbols()) {
            if sym.is_undefined() {
                continue;
            }
            if let Ok(name) = sym.name()
                && !name.is_empty()
            {
                symbols
                    .entry(name.to_string())
                    .or_insert((sym.address(), sym.size()));
            }
        }
        let mut relocated = HashMap::new();
        if let Some(relocs) = file.dynamic_relocations() {
            for (at, r) in relocs {
                let RelocationFlags::Elf { r_type } = r.flags() else {
                    continue;
                };
                let value = match (r_type, r.target()) {
                    (elf::R_X86_64_RELATIVE, _) => Some(r.addend() as u64),
                    // A PLT's GOT slot: the function the stub jumps to, when the file defines it.
                    (elf::R_X86_64_64 | elf::R_X86_64_JUMP_SLOT, RelocationTarget::Symbol(i)) => {
                        file.dynamic_symbol_table()
                            .and_then(|t| t.symbol_by_index(i).ok())
                            .filter(|s| !s.is_undefined())
                            .map(|s| s.address().wrapping_add(r.addend() as u64))
                    }
                    _ => None,
                };
                if let Some(value) = value {
                    relocated.insert(at, value);
                }
            }
        }
        let extents = eh_frame_extents(&file);
        let has_symtab = file.section_by_name(".symtab").is_some();
        let sections = file
            .sections()
            .filter_map(|s| {
                let (offset, size) = s.file_range()?;
                Some(Section {
                    name: s.name().ok()?.to_string(),
                    address: s.address(),
                    size: size.min(s.size()),
                    offset,
                    text: s.kind() == object::SectionKind::Text,
                })
            })
            .collect();
        drop(file);
        Ok(Image {
            path: path.into(),
            data,
            sections,
            has_symtab,
            symbols,
            relocated,
            extents,
        })
    }

    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// A symbol's address and size, from either symbol table.
    pub fn symbol(&self, name: &str) -> Option<(u64, u64)> {
        self.symbols.get(name).copied()
    }

    /// `len` bytes of the file's contents at virtual address `vaddr`.
    pub fn bytes_at(&self, vaddr: u64, len: u64) -> Option<&[u8]> {
        let section = self.sections.iter().find(|s| s.holds(vaddr, len))?;
        let at = section.offset_of(vaddr);
        self.data.get(at..at + len as usize)
    }

    /// A section's contents in the file.
    pub fn section(&self, name: &str) -> Option<&[u8]> {
        self.bytes_of(self.sections.iter().find(|s| s.name == name)?)
    }

    /// Each section of code: its address and its bytes.
    pub fn code_sections(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.sections
            .iter()
            .filter(|s| s.text)
            .filter_map(|s| Some((s.address, self.bytes_of(s)?)))
    }

    fn bytes_of(&self, s: &Section) -> Option<&[u8]> {
        self.data
            .get(s.offset as usize..(s.offset + s.size) as usize)
    }

    /// The pointer stored at `vaddr` once the file is loaded (without the load bias).
    pub fn pointer_at(&self, vaddr: u64) -> Option<u64> {
        if let Some(v) = self.relocated.get(&vaddr) {
            return Some(*v);
        }
        let b = self.bytes_at(vaddr, 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    /// The NUL-terminated string at `vaddr`.
    pub fn c_str_at(&self, vaddr: u64) -> Option<&str> {
        let section = self.sections.iter().find(|s| s.holds(vaddr, 1))?;
        let end = (section.offset + section.size) as usize;
        let bytes = self.data.get(section.offset_of(vaddr)..end)?;
        let len = bytes.iter().position(|&b| b == 0)?;
        std::str::from_utf8(&bytes[..len]).ok()
    }

    /// The function that starts at `vaddr`, its extent from `.eh_frame` (0 when no unwind entry
    /// starts there), named `name` in messages.
    pub fn function_at(&self, vaddr: u64, name: &str) -> Option<Function> {
        let section = self.sections.iter().find(|s| s.text && s.holds(vaddr, 1))?;
        let size = self
            .extents
            .binary_search_by_key(&vaddr, |&(start, _)| start)
            .map_or(0, |i| self.extents[i].1);
        Some(Function {
            symbol: name.to_string(),
            display: name.to_string(),
            address: vaddr,
            file_offset: section.offset_of(vaddr) as u64,
            size,
        })
    }

    /// The function a symbol names, sized by the symbol (or its unwind entry when the symbol
    /// gives none).
    pub fn function(&self, name: &str) -> Option<Function> {
        let (address, size) = self.symbol(name)?;
        let mut f = self.function_at(address, name)?;
        if size != 0 {
            f.size = size;
        }
        Some(f)
    }

    /// The function whose extent (from `.eh_frame`) holds `vaddr`, named `name`.
    pub fn function_containing(&self, vaddr: u64, name: &str) -> Option<Function> {
        let i = self.extents.partition_point(|&(start, _)| start <= vaddr);
        let (start, _) = self.extents[..i]
            .last()
            .filter(|&&(start, len)| vaddr < start + len)?;
        self.function_at(*start, name)
    }

    /// Whether the file keeps a full symbol table (static functions included).
    pub fn has_symtab(&self) -> bool {
        self.has_symtab
    }
}

/// Every function extent `.eh_frame` describes, sorted by start.
fn eh_frame_extents(file: &ElfFile64<'_, LittleEndian>) -> Vec<(u64, u64)> {
    let Some(section) = file.section_by_name(".eh_frame") else {
        return Vec::new();
    };
    let Ok(data) = section.data() else {
        return Vec::new();
    };
    let eh_frame = EhFrame::new(data, gimli::LittleEndian);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(hdr) = file.section_by_name(".eh_frame_hdr") {
        bases = bases.set_eh_frame_hdr(hdr.address());
    }
    let mut out = Vec::new();
    let mut entries = eh_frame.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let CieOrFde::Fde(partial) = entry
            && let Ok(fde) = partial.parse(|s, b, o| s.cie_from_offset(b, o))
        {
            out.push((fde.initial_address(), fde.len()));
        }
    }
    out.sort_unstable();
    out.dedup_by_key(|e| e.0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_that_is_not_elf_says_so() {
        let err = Image::parse(Path::new("/x"), b"#!/bin/sh\n".to_vec())
            .err()
            .unwrap();
        assert!(
            err.to_string()
                .starts_with("/x is not a 64-bit x86-64 ELF file"),
            "{err}"
        );
    }

    /// racewatch's own test binary: its unwind table covers its functions.
    #[test]
    fn unwind_entries_size_functions() {
        let exe = std::env::current_exe().unwrap();
        let image = Image::load(&exe).unwrap();
        assert!(image.extents.len() > 100, "{}", image.extents.len());
        let (start, len) = image.extents[image.extents.len() / 2];
        let f = image.function_at(start, "f").unwrap();
        assert_eq!(f.size, len);
    }
}
