//! Orchestration that plain cargo cannot do: install the eBPF toolchain, build the demo targets,
//! run the tests that need root, the demo and the benchmarks.
mod bench;
mod chart;
mod demo;
mod dist;
mod first_finding;
mod forecast;
mod fuzz;
mod setup;
mod soak;
mod zoo;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "racewatch's development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing racewatch needs (nightly rust-src, bpf-linker, g++,
    /// cargo-fuzz; as root, the Debian roots the container tests run in), idempotently.
    Setup,
    /// Set up, build racewatch and the demos, and watch the demos race (then their fixed modes).
    Demo,
    /// Build what people install, in <target>/dist: the static racewatch binary as a Python
    /// wheel and a .deb (with its manual pages and completions).
    Dist,
    /// Set up and run every test, the root ones included, then each fuzz target for a while.
    Test {
        /// Seconds each fuzz target runs (0: none).
        #[arg(long, default_value_t = 30)]
        fuzz_seconds: u64,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up and measure racewatch's cost against the same workloads unobserved; writes
    /// docs/BENCHMARKS.md.
    Bench {
        /// Interleaved repetitions per configuration (medians are reported).
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Seconds per measured run.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Another racewatch binary (e.g. a build of an earlier commit) measured in the same
        /// interleaved run, for a before/after comparison of a change to the hot path.
        #[arg(long, value_name = "RACEWATCH")]
        baseline: Option<PathBuf>,
        /// Minutes of the soak (system-wide, short-lived processes beside a long one; 0: none).
        #[arg(long, default_value_t = 10.0)]
        soak_minutes: f64,
        /// Measure the zoo alone, and put its tables in docs/BENCHMARKS.md in place of the ones
        /// there (saying at which commit).
        #[arg(long)]
        zoo: bool,
        /// Measure the time to the first finding alone (hazard line, provoked miss), and put its
        /// table in docs/BENCHMARKS.md in place of the one there.
        #[arg(long, conflicts_with = "zoo")]
        first_finding: bool,
        /// Measure the quiet readers alone (demo/quiet.py, `racewatch python --quiet-misses`),
        /// and put their table in docs/BENCHMARKS.md in place of the one there.
        #[arg(long, conflicts_with_all = ["zoo", "first_finding"])]
        quiet: bool,
        /// Measure the hazard forecast against what happens over a sweep of configurations, and
        /// put its table and chart in docs/HAZARD.md (each configuration run once, `--seconds`
        /// long).
        #[arg(long, conflicts_with_all = ["zoo", "first_finding", "quiet"])]
        forecast: bool,
    },
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Runs a command to completion, failing with its command line if it fails.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc_geteuid() == 0 }
}

/// Sends `sig` to `pid` (a negative pid: its process group), as kill(2).
pub fn kill(pid: i32, sig: i32) {
    // SAFETY: kill(2) takes no memory; a process already gone is not an error here.
    unsafe { libc_kill(pid, sig) };
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

/// Builds racewatch in release mode and returns its path.
pub fn build_racewatch() -> Result<PathBuf> {
    run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .args(["build", "--release", "--package", "detector-user"]),
    )?;
    Ok(workspace_root().join("target/release/racewatch"))
}

fn test(args: &[String], fuzz_seconds: u64) -> Result<()> {
    if !is_root() {
        bail!("the root tests load BPF programs: run `sudo -E cargo xtask test`");
    }
    demo::build_demos()?;
    // tests/install.rs installs these in a clean root.
    let dist = dist::run()?;
    // Unit tests, then the root ones (ignored by a plain `cargo test`), one at a time: they
    // measure and probe real processes.
    run_cmd(
        Command::new(env!("CARGO"))
            .current_dir(workspace_root())
            .arg("test")
            .env("RACEWATCH_DIST", &dist)
            .args(args)
            .args(["--", "--include-ignored", "--test-threads=1"]),
    )?;
    if fuzz_seconds > 0 {
        fuzz::run(fuzz_seconds)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    setup::ensure()?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Demo => demo::run(),
        Task::Dist => dist::run().map(drop),
        Task::Test { args, fuzz_seconds } => test(&args, fuzz_seconds),
        Task::Bench {
            runs,
            first_finding: true,
            ..
        } => bench::run_first_finding(runs),
        Task::Bench {
            runs,
            seconds,
            quiet: true,
            ..
        } => bench::run_quiet(runs, seconds),
        Task::Bench {
            seconds,
            forecast: true,
            ..
        } => bench::run_forecast(seconds),
        Task::Bench {
            runs,
            seconds,
            baseline,
            zoo: true,
            ..
        } => bench::run_zoo(runs, seconds, baseline.as_deref()),
        Task::Bench {
            runs,
            seconds,
            baseline,
            soak_minutes,
            ..
        } => bench::run(runs, seconds, baseline.as_deref(), soak_minutes),
    }
}
