//! The bundled demos: built here, watched by racewatch in `cargo xtask demo`.
use std::{path::PathBuf, process::Command};

use anyhow::Result;

use crate::{build_racewatch, run_cmd, workspace_root};

pub fn demo_dir() -> PathBuf {
    workspace_root().join("target/demo")
}

/// Compiles the native demo (-O2, with symbols, as a release build of a real service would be).
pub fn build_demos() -> Result<PathBuf> {
    let out = demo_dir();
    std::fs::create_dir_all(&out)?;
    let bin = out.join("cache_demo");
    run_cmd(
        Command::new("g++")
            .args(["-O2", "-g", "-pthread", "-o"])
            .arg(&bin)
            .arg(workspace_root().join("demo/cache_demo.cpp")),
    )?;
    Ok(bin)
}

fn banner(text: &str) {
    eprintln!("\n=== {text}");
}

/// racewatch exits 1 when it found a race: that is the demo working, not failing.
fn watch(racewatch: &PathBuf, args: &[&str]) -> Result<()> {
    eprintln!("$ racewatch {}", args.join(" "));
    let status = Command::new(racewatch).args(args).status()?;
    eprintln!(
        "(racewatch exit status: {})",
        status.code().map_or("signal".into(), |c| c.to_string())
    );
    Ok(())
}

pub fn run() -> Result<()> {
    let racewatch = build_racewatch()?;
    let demo = build_demos()?;
    let demo = demo.to_string_lossy();
    let probes = [
        "--clear",
        "Cache::clear",
        "--update",
        "Cache::update",
        "--lookup",
        "Cache::lookup",
        "--miss-ret",
        "-1",
    ];
    banner("native demo: a locked cache refreshed by clear() then update()");
    let mut args = vec!["watch"];
    args.extend(probes);
    args.extend(["--", &demo, "--seconds", "2"]);
    watch(&racewatch, &args)?;
    banner("native demo, --fixed: refreshed by build-then-swap");
    args.push("--fixed");
    watch(&racewatch, &args)
}
