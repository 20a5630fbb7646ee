//! The bundled demos: built here, watched by racewatch in `cargo xtask demo`.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};

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
            // CET on, as distributions build by default: functions open with endbr64, which the
            // kernel single-steps under a uprobe (racewatch probes past it).
            .args(["-O2", "-g", "-pthread", "-fcf-protection=full", "-o"])
            .arg(&bin)
            .arg(workspace_root().join("demo/cache_demo.cpp")),
    )?;
    Ok(bin)
}

fn banner(text: &str) {
    eprintln!("\n=== {text}");
}

/// The native demo's cache functions, as racewatch watch names them.
pub const DEMO_PROBES: [&str; 6] = [
    "--clear",
    "Cache::clear",
    "--update",
    "Cache::update",
    "--lookup",
    "Cache::lookup",
];

/// Alerts shown per run (racewatch prints one per stack pair); the demo keeps the screen readable.
const SHOWN_ALERTS: usize = 5;

/// Runs racewatch, showing its first alerts and its summary. racewatch exits 1 when it found a
/// race: that is the demo working, not failing.
fn watch(racewatch: &PathBuf, args: &[&str]) -> Result<()> {
    eprintln!("$ racewatch {}", args.join(" "));
    let mut child = Command::new(racewatch)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("racewatch's stdout")?;
    let mut alerts = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if !line.starts_with("RACE ") {
            println!("{line}");
            continue;
        }
        alerts += 1;
        if alerts <= SHOWN_ALERTS {
            println!("{line}");
        } else if alerts == SHOWN_ALERTS + 1 {
            println!("... (more alerts stream here; the demo shows the first {SHOWN_ALERTS})");
        }
    }
    let status = child.wait()?;
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
    let probes = [&DEMO_PROBES[..], &["--miss-ret", "-1"]].concat();
    banner("native demo: a locked cache refreshed by clear() then update()");
    let mut args = vec!["watch"];
    args.extend(probes);
    args.extend(["--", &demo, "--seconds", "2"]);
    watch(&racewatch, &args)?;
    banner("native demo, --fixed: refreshed by build-then-swap");
    args.push("--fixed");
    watch(&racewatch, &args)?;

    let worker = workspace_root().join("demo/worker.py");
    let worker = worker.to_string_lossy();
    banner("the seed's Python worker: cache.clear() then cache.update() while a thread reads it");
    let mut args = vec!["python", "--", "python3", &worker, "--seconds", "2"];
    watch(&racewatch, &args)?;
    banner("the seed's fix: build the new dict, then swap the reference");
    args.push("--fixed");
    watch(&racewatch, &args)
}
