//! Resolves the function names a user gives to probe offsets in an ELF file: exact symbol names,
//! or demangled C++/Rust names with or without their parameter list or hash.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::text::escape;
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};

#[derive(Debug, thiserror::Error)]
pub enum SymbolError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not an ELF file ({reason}): point --binary at an executable or shared library"
    )]
    NotElf { path: PathBuf, reason: String },
    #[error("{path} is a truncated or corrupt ELF file ({reason}): rebuild or copy it again")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path} is an ELF file for {arch}, not for this machine (x86_64)")]
    WrongArch { path: PathBuf, arch: String },
    #[error(
        "{path} has no symbol table (stripped?): racewatch needs the function symbols; \
         use an unstripped build"
    )]
    NoSymbols { path: PathBuf },
    #[error("no function named `{name}` in {path}{}", nearest_hint(.nearest))]
    NotFound {
        name: String,
        path: PathBuf,
        nearest: Vec<String>,
    },
    #[error(
        "`{name}` names {} functions in {path}: give one of these exactly:\n  {}",
        .matches.len(), .matches.join("\n  ")
    )]
    Ambiguous {
        name: String,
        path: PathBuf,
        matches: Vec<String>,
    },
    #[error("`{name}` in {path} is a data symbol, not a function")]
    NotAFunction { name: String, path: PathBuf },
    #[error(
        "`{name}` in {path} has no code in the file (an import?): probe the library that defines it"
    )]
    Undefined { name: String, path: PathBuf },
}

fn nearest_hint(nearest: &[String]) -> String {
    if nearest.is_empty() {
        String::new()
    } else {
        format!("; nearest names: {}", nearest.join(", "))
    }
}

/// A function found in the ELF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// The symbol as written in the file.
    pub symbol: String,
    /// Its demangled name, for messages.
    pub display: String,
    /// Virtual address in the file.
    pub address: u64,
    /// Offset of its first byte in the file: what a uprobe attaches to.
    pub file_offset: u64,
    pub size: u64,
}

/// The functions of one ELF file, loaded once and searched by name.
pub struct SymbolTable {
    path: PathBuf,
    /// Functions by address (aliases at one address are one function).
    functions: BTreeMap<u64, Entry>,
    /// Data symbols' names (raw and demangled), so a user naming one hears what it is.
    data: Vec<String>,
    undefined: Vec<String>,
}

struct Entry {
    function: Function,
    /// Every name the function answers to.
    names: Vec<String>,
}

/// The symbol a compiler's copy was made from: `f` for `f.constprop.0`, `f.isra.0`, `f.cold`.
pub fn base_symbol(symbol: &str) -> &str {
    symbol.split_once('.').map_or(symbol, |(base, _)| base)
}

/// Is this the cold part of a function (code its body jumps to, never called)?
pub fn is_cold(symbol: &str) -> bool {
    symbol.split('.').skip(1).any(|part| part == "cold")
}

/// When every function a name matches is one function or copies of it, the one to name: the
/// function itself, else its only copy that callers call.
fn one_function<'a>(matches: &[&'a Entry]) -> Option<&'a Function> {
    let base = base_symbol(&matches[0].function.symbol);
    if matches
        .iter()
        .any(|e| base_symbol(&e.function.symbol) != base)
    {
        return None;
    }
    let functions = || matches.iter().map(|e| &e.function);
    if let Some(original) = functions().find(|f| f.symbol == base) {
        return Some(original);
    }
    let mut entry_points = functions().filter(|f| !is_cold(&f.symbol));
    match (entry_points.next(), entry_points.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// A symbol as messages name it: demangled, without parameters or hash.
pub fn short_name(raw: &str) -> String {
    names_for(raw).pop().unwrap_or_default()
}

/// Does the symbol `raw` answer to `name` (raw, or demangled with or without parameters)?
pub fn answers_to(raw: &str, name: &str) -> bool {
    names_for(raw).iter().any(|n| n == name)
}

/// The names a symbol answers to: raw, demangled, demangled without parameters or hash.
fn names_for(raw: &str) -> Vec<String> {
    let mut names = vec![raw.to_string()];
    if let Ok(sym) = rustc_demangle::try_demangle(raw) {
        names.push(format!("{sym}"));
        names.push(format!("{sym:#}"));
    } else if let Ok(sym) = cpp_demangle::Symbol::new(raw) {
        let opts = cpp_demangle::DemangleOptions::new();
        if let Ok(full) = sym.demangle_with_options(&opts) {
            names.push(full);
        }
        if let Ok(short) = sym.demangle_with_options(&opts.no_params()) {
            names.push(short);
        }
    }
    names.dedup();
    names
}

impl SymbolTable {
    pub fn load(path: &Path) -> Result<SymbolTable, SymbolError> {
        let data = std::fs::read(path).map_err(|source| SymbolError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &data)
    }

    pub fn parse(path: &Path, data: &[u8]) -> Result<SymbolTable, SymbolError> {
        let not_elf = |reason: String| SymbolError::NotElf {
            path: path.to_path_buf(),
            reason,
        };
        let file = object::File::parse(data).map_err(|e| {
            if data.starts_with(b"\x7fELF") {
                SymbolError::Corrupt {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                }
            } else {
                not_elf(e.to_string())
            }
        })?;
        if file.format() != object::BinaryFormat::Elf {
            return Err(not_elf(format!("{:?} format", file.format())));
        }
        if file.architecture() != object::Architecture::X86_64 {
            return Err(SymbolError::WrongArch {
                path: path.to_path_buf(),
                arch: format!("{:?}", file.architecture()),
            });
        }
        let mut table = SymbolTable {
            path: path.to_path_buf(),
            functions: BTreeMap::new(),
            data: Vec::new(),
            undefined: Vec::new(),
        };
        for sym in file.symbols().chain(file.dynamic_symbols()) {
            let Ok(raw) = sym.name() else { continue };
            if raw.is_empty() {
                continue;
            }
            if sym.is_undefined() {
                table.undefined.push(raw.to_string());
                continue;
            }
            if sym.kind() != SymbolKind::Text {
                table.data.extend(names_for(raw));
                continue;
            }
            let Some(section) = sym
                .section_index()
                .and_then(|i| file.section_by_index(i).ok())
            else {
                continue;
            };
            let Some((section_offset, section_size)) = section.file_range() else {
                continue;
            };
            // A symbol that does not point into its section's bytes (a corrupt or crafted file)
            // has no code racewatch could probe.
            let Some(file_offset) = sym
                .address()
                .checked_sub(section.address())
                .filter(|delta| *delta < section_size)
                .and_then(|delta| delta.checked_add(section_offset))
            else {
                continue;
            };
            let entry = table.functions.entry(sym.address()).or_insert_with(|| {
                let names = names_for(raw);
                Entry {
                    function: Function {
                        symbol: raw.to_string(),
                        display: names.get(1).unwrap_or(&names[0]).clone(),
                        address: sym.address(),
                        file_offset,
                        size: sym.size(),
                    },
                    names: Vec::new(),
                }
            });
            for name in names_for(raw) {
                if !entry.names.contains(&name) {
                    entry.names.push(name);
                }
            }
        }
        if table.functions.is_empty() {
            return Err(SymbolError::NoSymbols {
                path: path.to_path_buf(),
            });
        }
        Ok(table)
    }

    /// The one function `name` designates.
    pub fn resolve(&self, name: &str) -> Result<Function, SymbolError> {
        let matches: Vec<&Entry> = self
            .functions
            .values()
            .filter(|e| e.names.iter().any(|n| n == name))
            .collect();
        match matches.as_slice() {
            [one] => Ok(one.function.clone()),
            [] => Err(self.not_found(name)),
            many if let Some(f) = one_function(many) => Ok(f.clone()),
            many => Err(SymbolError::Ambiguous {
                name: name.to_string(),
                path: self.path.clone(),
                // Escaped here: the list is laid out on lines of its own.
                matches: many.iter().map(|e| escape(&e.function.display)).collect(),
            }),
        }
    }

    fn not_found(&self, name: &str) -> SymbolError {
        let path = self.path.clone();
        let name_s = name.to_string();
        if self.data.iter().any(|d| d == name) {
            return SymbolError::NotAFunction { name: name_s, path };
        }
        if self.undefined.iter().any(|d| d == name) {
            return SymbolError::Undefined { name: name_s, path };
        }
        SymbolError::NotFound {
            nearest: self.nearest(name, 5),
            name: name_s,
            path,
        }
    }

    /// The `n` function names closest to `name`, most alike first.
    pub fn nearest(&self, name: &str, n: usize) -> Vec<String> {
        let mut scored: Vec<(f64, &str)> = self
            .functions
            .values()
            .map(|e| {
                let best = e
                    .names
                    .iter()
                    .map(|c| strsim::jaro_winkler(name, c))
                    .fold(0.0, f64::max);
                (best, e.function.display.as_str())
            })
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
        scored
            .into_iter()
            .take(n)
            .map(|(_, s)| s.to_string())
            .collect()
    }

    /// The copies the compiler made of `f`'s function (`f.constprop.0`, `f.isra.0`, `f.part.0`,
    /// `f.cold`, `f.constprop.0.cold`, ...), `f` itself left out: each with whether it is a
    /// separate entry point that callers may call instead (a `.cold` part is only jumped to from
    /// its function's own body).
    pub fn copies(&self, f: &Function) -> Vec<(&Function, bool)> {
        let base = base_symbol(&f.symbol);
        self.functions
            .values()
            .filter(|e| e.function.symbol != f.symbol && base_symbol(&e.function.symbol) == base)
            .map(|e| (&e.function, !is_cold(&e.function.symbol)))
            .collect()
    }

    /// The function whose code holds `address`.
    pub fn containing(&self, address: u64) -> Option<&Function> {
        let (_, e) = self.functions.range(..=address).next_back()?;
        (address < e.function.address + e.function.size).then_some(&e.function)
    }

    /// Every function's display name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .functions
            .values()
            .map(|e| e.function.display.as_str())
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `symbols` fuzz target: a small executable whose symbol table has a function
    /// at an address below its section's (parsing used to underflow computing its offset).
    #[test]
    fn a_symbol_outside_its_section_is_skipped() {
        let data = include_bytes!("../../tests/data/symbol-outside-its-section.elf");
        let table = SymbolTable::parse(Path::new("crafted.elf"), data).expect("other symbols");
        for f in table.functions.values() {
            assert!(
                f.function.file_offset < data.len() as u64,
                "{} at file offset {:#x}",
                f.function.display,
                f.function.file_offset
            );
        }
        let names = table.names();
        assert!(names.contains(&"frame_dummy"), "{names:?}");
    }
}
