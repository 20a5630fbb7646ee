//! What a call calls, by name: a direct target by its symbol, one through the PLT or the GOT by
//! the dynamic symbol its GOT slot is relocated to; and which names take or release a lock,
//! which is how racewatch sees a cache's critical sections (`closing::unlock_sites`,
//! `closing::locked_sites`).
use std::{collections::HashMap, path::Path};

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction, OpKind};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _, ObjectSymbolTable as _};

use crate::probe::symbols::{SymbolTable, base_symbol};

/// The names of a file's calls through its PLT and GOT.
#[derive(Debug, Default)]
pub struct Callees {
    /// GOT slot address to the symbol its relocation names.
    got: HashMap<u64, String>,
    /// PLT stub address to the GOT slot it jumps through.
    plt: HashMap<u64, u64>,
}

impl Callees {
    /// The file's PLT and GOT; empty when it has none or cannot be read (then only direct
    /// calls have names).
    pub fn load(binary: &Path) -> Callees {
        std::fs::read(binary)
            .ok()
            .and_then(|data| Callees::parse(&data))
            .unwrap_or_default()
    }

    fn parse(data: &[u8]) -> Option<Callees> {
        let file = object::File::parse(data).ok()?;
        let dynsym = file.dynamic_symbol_table()?;
        let mut got = HashMap::new();
        for (slot, rel) in file.dynamic_relocations()? {
            if let object::RelocationTarget::Symbol(i) = rel.target()
                && let Ok(name) = dynsym.symbol_by_index(i).and_then(|s| s.name())
                && !name.is_empty()
            {
                got.insert(slot, name.to_string());
            }
        }
        let mut plt = HashMap::new();
        for name in [".plt", ".plt.sec", ".plt.got"] {
            let Some(section) = file.section_by_name(name) else {
                continue;
            };
            let Ok(code) = section.data() else { continue };
            let mut stub = None;
            for ins in Decoder::with_ip(64, code, section.address(), DecoderOptions::NONE) {
                // A stub is `jmp *slot(%rip)`, after an `endbr64` where the file marks its
                // branch targets.
                if ins.code() == Code::Endbr64 {
                    stub = Some(ins.ip());
                    continue;
                }
                if ins.flow_control() == FlowControl::IndirectBranch
                    && ins.is_ip_rel_memory_operand()
                {
                    plt.insert(stub.unwrap_or(ins.ip()), ins.ip_rel_memory_address());
                }
                stub = None;
            }
        }
        Some(Callees { got, plt })
    }

    /// What the call or jump `ins` goes to, by name: `table` names direct targets inside the
    /// file.
    pub fn name(&self, ins: &Instruction, table: &SymbolTable) -> Option<String> {
        if ins.op0_kind() == OpKind::Memory {
            return ins
                .is_ip_rel_memory_operand()
                .then(|| self.got.get(&ins.ip_rel_memory_address()).cloned())
                .flatten();
        }
        if !matches!(
            ins.op0_kind(),
            OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16
        ) {
            return None;
        }
        let target = ins.near_branch_target();
        if let Some(slot) = self.plt.get(&target) {
            return self.got.get(slot).cloned();
        }
        table
            .containing(target)
            .filter(|f| f.address == target)
            .map(|f| f.display.clone())
    }
}

/// C functions that take a lock for writing, as a symbol names them (libc's own names in a
/// static binary start with underscores).
const LOCKS: [&str; 9] = [
    "pthread_mutex_lock",
    "pthread_mutex_timedlock",
    "pthread_mutex_clocklock",
    "pthread_rwlock_wrlock",
    "pthread_rwlock_timedwrlock",
    "pthread_rwlock_clockwrlock",
    "pthread_spin_lock",
    "mtx_lock",
    "mtx_timedlock",
];

const UNLOCKS: [&str; 4] = [
    "pthread_mutex_unlock",
    "pthread_rwlock_unlock",
    "pthread_spin_unlock",
    "mtx_unlock",
];

/// `name` without its version (`@GLIBC_2.2.5`), its copy suffix or libc's leading underscores.
fn c_name(name: &str) -> &str {
    base_symbol(name.split('@').next().unwrap_or(name)).trim_start_matches('_')
}

/// C++'s lock guards, whose constructor takes a lock and whose destructor releases it.
const GUARDS: [&str; 3] = ["lock_guard", "unique_lock", "scoped_lock"];

/// Whether a function named `name` takes a lock: a C lock function, or a C++ mutex's `lock()`
/// or a lock guard's constructor, called out of line (an unoptimised build).
pub fn takes_lock(name: &str) -> bool {
    LOCKS.contains(&c_name(name))
        || name.ends_with("::lock()")
        || GUARDS.iter().any(|g| name.contains(&format!("::{g}(")))
}

/// Whether a function named `name` releases a lock (see [`takes_lock`]).
pub fn releases_lock(name: &str) -> bool {
    UNLOCKS.contains(&c_name(name))
        || name.ends_with("::unlock()")
        || GUARDS.iter().any(|g| name.contains(&format!("::~{g}(")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_names_from_c_and_cxx() {
        assert!(takes_lock("pthread_mutex_lock"));
        assert!(takes_lock("pthread_mutex_lock@GLIBC_2.2.5"));
        assert!(takes_lock("___pthread_mutex_lock"));
        assert!(takes_lock("std::mutex::lock()"));
        assert!(takes_lock(
            "std::lock_guard<std::mutex>::lock_guard(std::mutex&)"
        ));
        assert!(!takes_lock("pthread_mutex_unlock"));
        assert!(
            !takes_lock("pthread_mutex_trylock"),
            "may fail without waiting"
        );
        assert!(!takes_lock("memset"));
        assert!(releases_lock("pthread_mutex_unlock"));
        assert!(releases_lock("std::lock_guard<std::mutex>::~lock_guard()"));
        assert!(releases_lock("std::mutex::unlock()"));
        assert!(!releases_lock("operator delete(void*, unsigned long)"));
    }

    /// The calls of a g++ build through its PLT, named by their GOT slots' relocations.
    #[test]
    fn plt_calls_are_named_by_their_relocations() {
        let Ok(gxx) = which::which("g++") else {
            eprintln!("skipped: no g++");
            return;
        };
        let dir = std::env::temp_dir().join(format!("racewatch-callees-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("m.cpp");
        std::fs::write(
            &src,
            "#include <mutex>\nstd::mutex m; int v;\n\
             __attribute__((noinline)) void set(int x) { std::lock_guard<std::mutex> g(m); v = x; }\n\
             int main(int c, char **) { set(c); return v; }\n",
        )
        .unwrap();
        let bin = dir.join("m");
        let built = std::process::Command::new(gxx)
            .args(["-O2", "-pthread", "-o"])
            .arg(&bin)
            .arg(&src)
            .status()
            .unwrap();
        assert!(built.success());
        let table = SymbolTable::load(&bin).unwrap();
        let callees = Callees::load(&bin);
        let set = table.resolve("set").unwrap();
        let code = crate::probe::code::code_of(&bin, &set).unwrap();
        let names: Vec<String> = Decoder::with_ip(64, &code, set.address, DecoderOptions::NONE)
            .into_iter()
            .filter(|i| {
                matches!(
                    i.flow_control(),
                    FlowControl::Call | FlowControl::UnconditionalBranch
                ) && i.op0_kind() != OpKind::Memory
                    && !(set.address..set.address + set.size).contains(&i.near_branch_target())
            })
            .filter_map(|i| callees.name(&i, &table))
            .collect();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(names.iter().any(|n| takes_lock(n)), "{names:?}");
        assert!(names.iter().any(|n| releases_lock(n)), "{names:?}");
    }
}
