//! Any bytes as the ELF file racewatch resolves function names in: parsing, listing and resolving
//! must end in a table or a typed error, never a panic.
#![no_main]

use std::path::Path;

use detector_user::probe::symbols::SymbolTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(table) = SymbolTable::parse(Path::new("fuzzed.elf"), data) else {
        return;
    };
    let names: Vec<String> = table.names().into_iter().map(str::to_string).collect();
    for name in names.iter().take(8) {
        // A listed name resolves, or is ambiguous among overloads: never "not found".
        if let Err(e) = table.resolve(name) {
            assert!(
                matches!(e, detector_user::probe::symbols::SymbolError::Ambiguous { .. }),
                "listed name {name:?} does not resolve: {e}"
            );
        }
    }
    let _ = table.resolve("main");
    let _ = table.nearest("Cache::clear", 5);
});
