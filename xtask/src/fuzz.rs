//! Runs each fuzz target (`fuzz/`) for a bounded time: what racewatch parses from untrusted
//! bytes (ELF files, ring-buffer records) must never panic. A crash fails the run and leaves its
//! input in fuzz/artifacts/TARGET/, to be turned into a regression test.
use std::{path::Path, process::Command};

use anyhow::Result;

use crate::{run_cmd, workspace_root};

const TARGETS: [&str; 2] = ["symbols", "event"];

/// A small C++ executable with symbols (methods, so demangling is exercised), as the symbol
/// resolver's first corpus entry: mutations of a real ELF reach much deeper than random bytes.
fn seed_elf(corpus: &Path) -> Result<()> {
    let src = corpus.join("../seed.cpp");
    std::fs::write(
        &src,
        "struct Cache { int n; __attribute__((noinline)) void clear() { n = 0; } };\n\
         static Cache c; int main() { c.clear(); return c.n; }\n",
    )?;
    run_cmd(
        Command::new("g++")
            .args(["-O1", "-g0", "-o"])
            .arg(corpus.join("seed.elf"))
            .arg(&src),
    )
}

pub fn run(seconds: u64) -> Result<()> {
    let root = workspace_root();
    for target in TARGETS {
        let corpus = root.join("target/fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        if target == "symbols" {
            seed_elf(&corpus)?;
        }
        eprintln!("fuzz: {target} for {seconds} s");
        run_cmd(
            Command::new("cargo")
                .current_dir(&root)
                .args(["+nightly", "fuzz", "run", target])
                .arg(&corpus)
                .args(["--", &format!("-max_total_time={seconds}")]),
        )?;
    }
    Ok(())
}
