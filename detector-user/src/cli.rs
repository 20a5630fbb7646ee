//! racewatch's command line.
use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand};

/// Exit status when at least one lookup fell inside an empty-cache window.
pub const EXIT_RACE: u8 = 1;
/// Exit status for bad input or an environment racewatch cannot run in.
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the run failed after it started.
pub const EXIT_FAILURE: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "racewatch",
    version,
    about = "Finds the races that vanish when you look at them: lookups that land in a cache's \
             empty window between clear() and its refill, seen through uprobes without slowing \
             the target.",
    after_help = "Exit status: 0 no lookup fell in a window, 1 at least one did, \
                  2 bad input or environment, 3 the run failed."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Watch a native program's cache: its clear, refill and lookup functions.
    #[command(after_help = "Examples:\n  \
        racewatch watch --clear Cache::clear --update Cache::update --lookup Cache::lookup \\\n      \
        --miss-ret -1 -- ./cache_demo\n  \
        racewatch watch --binary /usr/lib/libfoo.so --clear foo_clear --update foo_fill \\\n      \
        --lookup foo_get --json -d 30 -p 1234\n\n\
        A window opens when --clear is entered on a cache object and closes when --update returns \
        on it; a lookup by another thread that overlaps it is reported.")]
    Watch(WatchArgs),
    /// Watch a CPython 3.11 program's dicts: a `d[k]` KeyError raised while another thread has
    /// emptied `d` with `clear()` and not yet refilled it with `update()` (or `|=`).
    #[command(after_help = "Examples:\n  \
        racewatch python -- python3 worker.py\n  \
        racewatch python --json -d 60 -p 1234\n\n\
        Only clear, refill and the KeyError path are probed, so ordinary dict lookups run \
        at full speed. Needs an interpreter with symbols and DWARF (pyenv and source builds \
        have them; distribution builds need their debug-symbol package).")]
    Python(PythonArgs),
    /// Print a file's function names, demangled, as racewatch matches them.
    #[command(after_help = "Examples:\n  \
        racewatch symbols ./cache_demo --grep '^Cache::'\n  \
        racewatch symbols /usr/lib/libfoo.so --grep 'clear|refill'")]
    Symbols {
        /// An executable or shared library.
        path: PathBuf,
        /// Only names matching this regular expression (unanchored: plain text matches anywhere
        /// in the name).
        #[arg(long, value_name = "REGEX")]
        grep: Option<String>,
    },
    /// Check what this kernel and this user allow: each feature racewatch uses, pass or fail,
    /// and the fix for each failure. Exits 0 when racewatch can run, 2 when it cannot.
    Info {
        /// Print one JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    #[command(name = crate::target::HELD_EXEC, hide = true)]
    HeldExec {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
}

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// ELF file holding the functions (default: the command's executable, or /proc/PID/exe);
    /// may be a shared library the target maps.
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,
    /// Function that empties the cache (exact symbol, or demangled name with or without its
    /// parameters).
    #[arg(long, value_name = "SYM")]
    pub clear: String,
    /// Function that refills it; the window closes when it returns.
    #[arg(long, value_name = "SYM")]
    pub update: String,
    /// Function that looks a key up.
    #[arg(long, value_name = "SYM")]
    pub lookup: String,
    /// The lookup's return value (signed) meaning "not found": racewatch probes the instructions
    /// by which the lookup returns it, so that only misses trap, and reports the misses in a
    /// window (it falls back to probing every lookup's entry and return, with a warning, when the
    /// code does not show where the miss is returned).
    #[arg(long, value_name = "VALUE", allow_hyphen_values = true)]
    pub miss_ret: Option<i64>,
    /// With --miss-ret: probe every lookup's entry and return instead of its miss path, which
    /// also counts the lookups in a window that found their key (costs two traps a lookup).
    #[arg(long, requires = "miss_ret")]
    pub probe_returns: bool,
    /// Which argument (0-based) of the three functions is the cache object (0 is `this`).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=5))]
    pub cache_arg: u32,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
pub struct PythonArgs {
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Print NDJSON: one object per alert, then a summary.
    #[arg(long)]
    pub json: bool,
    /// Write alerts and the summary to FILE instead of stdout.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Stop after SECS seconds.
    #[arg(short, long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Say where each probe goes.
    #[arg(short, long)]
    pub verbose: bool,
    /// Resolve, load and attach, then exit without running.
    #[arg(long)]
    pub dry_run: bool,
    /// Attach to this running process until Ctrl-C, SIGTERM or --duration.
    #[arg(
        short,
        long,
        value_name = "PID",
        conflicts_with = "command",
        required_unless_present = "command"
    )]
    pub pid: Option<u32>,
    /// Command to launch, held until every probe is attached; racewatch ends when it exits.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}
