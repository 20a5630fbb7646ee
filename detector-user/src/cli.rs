//! racewatch's command line.
use std::{ffi::OsString, path::PathBuf};

use clap::{Args, Parser, Subcommand};

/// Exit status when at least one lookup fell inside an empty-cache window.
pub const EXIT_RACE: u8 = 1;
/// Exit status for bad input or an environment racewatch cannot run in.
pub const EXIT_USAGE: u8 = 2;
/// Exit status when the run failed after it started.
pub const EXIT_FAILURE: u8 = 3;
/// Exit status when no lookup fell in a window but part of the target went unwatched (the
/// summary's `unwatched` says what): not an all-clear.
pub const EXIT_INCOMPLETE: u8 = 4;

/// `racewatch -V`: the release and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RACEWATCH_COMMIT"),
    ")"
);

/// `racewatch --version`: also what racewatch runs on and which interpreters it reads.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RACEWATCH_COMMIT"),
    ")\n",
    "kernel: Linux 5.15+ on x86_64 with BTF (attach cookies; --provoke needs 5.17+: bpf_loop)\n",
    "CPython: 3.11 to 3.14, builds with a GIL (racewatch python)"
);

#[derive(Parser, Debug)]
#[command(
    name = "racewatch",
    version = VERSION,
    long_version = LONG_VERSION,
    about = "Finds the races that vanish when you look at them: lookups that land in a cache's \
             empty window between clear() and its refill, seen through uprobes without slowing \
             the target.",
    after_help = "Exit status: 0 no lookup fell in a window, 1 at least one did, \
                  2 bad input or environment, 3 the run failed, 4 no lookup fell in a window \
                  but part of the target went unwatched (the summary says what)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Watch a native program's cache: its clear, refill and lookup functions (or several such
    /// windows, from a config file).
    #[command(after_help = "Examples:\n  \
        racewatch watch --clear Cache::clear --update Cache::update --lookup Cache::lookup \\\n      \
        --miss-ret -1 -- ./cache_demo\n  \
        racewatch watch --binary /usr/lib/libfoo.so --clear foo_clear --update foo_fill \\\n      \
        --lookup foo_get --json -d 30 -p 1234\n  \
        racewatch watch --clear Cache::clear --update Cache::update --lookup Cache::lookup \\\n      \
        --miss-ret -1 --provoke 2ms -- ./cache_demo --pause-us 2000 --refresh-us 200000\n  \
        racewatch watch --config demo/two_windows.toml -- ./two_windows\n\n\
        A window opens when --clear is entered on a cache object and closes when --update returns \
        on it; a lookup by another thread that overlaps it is reported. A hazard report per cache \
        (at the end, and every --interval) says how often a lookup will land in a window, before \
        one has (docs/HAZARD.md). With --miss-ret, ordinary lookups are counted for it in \
        bursts: the lookup's entry is probed 20 ms of every second, so ~2% of lookups pay a \
        trap.")]
    Watch(WatchArgs),
    /// Watch a CPython 3.11-3.14 program's dicts: a `d[k]` KeyError raised while another thread has
    /// emptied `d` with `clear()` and not yet refilled it with `update()` (or `|=`).
    #[command(after_help = "Examples:\n  \
        racewatch python -- python3 worker.py\n  \
        racewatch python --json -d 60 -p 1234\n  \
        racewatch python --provoke 5ms --interval 2 -- python3 worker.py\n  \
        racewatch python --interpreter /srv/root/usr/bin/python3.13 -- chroot /srv/root python3.13 app.py\n\n\
        Only clear, refill and the KeyError path are probed, so ordinary dict lookups run \
        at full speed. The hazard report's lookup rates are sampled: the dict lookup is probed \
        20 ms of every second, so ~2% of dict lookups pay a trap. Distribution builds without \
        debug information work (what racewatch needs is read from PyDict_Type, _PyRuntime and \
        _Py_DebugOffsets); --provoke needs the interpreter's DWARF.")]
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
    /// and the fix for each failure. Exits 0 when everything racewatch offers can run here, 2
    /// otherwise.
    Info {
        /// Print one JSON object instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Measure what one probe hit costs on this machine, by probed instruction and probe kind
    /// (the figures racewatch's placement and its end-of-run estimate rely on).
    Calibrate {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a completion script for SHELL (e.g. `racewatch completions bash >
    /// /etc/bash_completion.d/racewatch`).
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Write racewatch's manual pages (racewatch.1 and one per subcommand) into DIR; packaging
    /// runs it (`cargo xtask dist`).
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    #[command(name = crate::process::launch::HELD_EXEC, hide = true)]
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
    /// Watch the windows FILE names (TOML, one `[[window]]` table each: name, open, close,
    /// access, and optionally binary, object_arg, miss_ret), several in one run, instead of the
    /// one --clear, --update and --lookup name.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["clear", "update", "lookup", "miss_ret", "cache_arg"])]
    pub config: Option<PathBuf>,
    /// Function that empties the cache (exact symbol, or demangled name with or without its
    /// parameters).
    #[arg(long, value_name = "SYM", required_unless_present = "config")]
    pub clear: Option<String>,
    /// Function that refills it; the window closes when it returns.
    #[arg(long, value_name = "SYM", required_unless_present = "config")]
    pub update: Option<String>,
    /// Function that looks a key up.
    #[arg(long, value_name = "SYM", required_unless_present = "config")]
    pub lookup: Option<String>,
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
    /// Hold the writer inside each window up to DURATION longer (e.g. 500us, 2ms; at most 50ms), so the
    /// collision the hazard report predicts happens now. Bounded: all holds together stay within
    /// 10% of the time since attach (windows beyond the budget are left alone and counted). Off
    /// by default.
    #[arg(long, value_name = "DURATION", value_parser = parse_provoke)]
    pub provoke: Option<std::time::Duration>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Args, Debug)]
pub struct PythonArgs {
    /// Keep each window open up to DURATION longer (e.g. 500us, 2ms; at most 50ms): the writer
    /// waits after clear() until a reader asks for the GIL, hands it over inside the window, and
    /// is kept from taking it back until DURATION has passed, so readers run while the dict is
    /// empty. Bounded: all holds together stay within 10% of the time since attach. Off by
    /// default; while on, dict_clear's return and take_gil are probed too (a trap at each GIL
    /// switch).
    #[arg(long, value_name = "DURATION", value_parser = parse_provoke)]
    pub provoke: Option<std::time::Duration>,
    /// Count every dict lookup for the hazard report (exact reader rates and distances to the
    /// windows) instead of sampling them 20 ms of every second: each `d[k]` then pays a trap.
    #[arg(long)]
    pub every_lookup: bool,
    /// Also count the quiet misses in a window: `d.get(k)` returning its default, `k in d` false,
    /// `d[k]` answered by a subclass's `__missing__` (Counter, defaultdict), for keys the refill
    /// brings back; and a list's windows (`clear()` to `extend()` or `+=`) with the `lst[i]` out
    /// of range in them. Probes every `.get`, `in` and subclass `d[k]` on a dict, and the
    /// `lst[i]` that leave the specialised path (a trap each, which a reader doing little else
    /// pays in speed: see docs/BENCHMARKS.md); off, only the `d[k]` that raise KeyError are
    /// counted.
    #[arg(long)]
    pub quiet_misses: bool,
    /// The interpreter file to probe (the python executable, or the libpython it links), for a
    /// command that is not python itself: a wrapper that execs it (`chroot`, `env`) or a server
    /// that embeds it (uwsgi). Without it, racewatch asks the command's python where it lives.
    #[arg(long, value_name = "FILE")]
    pub interpreter: Option<PathBuf>,
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
    /// Serve the counts as Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
    /// Stop after SECS seconds.
    #[arg(short, long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Also print the hazard report every SECS seconds (it is always printed at the end).
    #[arg(long, value_name = "SECS")]
    pub interval: Option<f64>,
    /// What racewatch may add to the watched processes, in percent of their CPU time. The window
    /// and miss probes always run; the hazard report's lookup sampling gets what they leave.
    #[arg(long, value_name = "PERCENT", default_value_t = crate::engine::budget::DEFAULT_PERCENT,
          value_parser = parse_budget, allow_negative_numbers = true)]
    pub budget: f64,
    /// Say where each probe goes.
    #[arg(short, long)]
    pub verbose: bool,
    /// Resolve, load and attach, then exit without running.
    #[arg(long)]
    pub dry_run: bool,
    /// Attach to this running process (and the workers it forked) until Ctrl-C, SIGTERM or
    /// --duration. With neither --pid nor a command, racewatch watches the whole host.
    #[arg(short, long, value_name = "PID", conflicts_with = "command")]
    pub pid: Option<u32>,
    /// Command to launch, held until every probe is attached; racewatch ends when it exits.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,
}

/// `--budget`'s PERCENT: above 0, at most 100.
pub fn parse_budget(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|p| *p > 0.0 && *p <= 100.0)
        .ok_or_else(|| {
            format!("{text:?} is not a percentage above 0 and at most 100: write e.g. 1 or 0.5")
        })
}

/// `--provoke`'s DURATION: a number and a unit among ns, us (or µs), ms, s; at most
/// [`detector_common::PROVOKE_MAX_NS`].
pub fn parse_provoke(text: &str) -> Result<std::time::Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit: write e.g. 500us or 2ms"))?;
    let (num, unit) = t.split_at(split);
    let per_unit = match unit.trim() {
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        u => {
            return Err(format!(
                "unknown unit {u:?} in {text:?}: use ns, us, ms or s"
            ));
        }
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number: write e.g. 500us or 2ms"))?;
    let ns = (n * per_unit).round();
    let max = detector_common::PROVOKE_MAX_NS;
    if ns < 1.0 {
        return Err(format!("{text:?} is no time at all: give at least 1ns"));
    }
    if ns > max as f64 {
        return Err(format!(
            "{text:?} is more than the {} ms racewatch holds a window at most",
            max / 1_000_000
        ));
    }
    Ok(std::time::Duration::from_nanos(ns as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn provoke_durations_as_users_write_them() {
        assert_eq!(parse_provoke("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_provoke("500µs"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_provoke("2ms"), Ok(Duration::from_millis(2)));
        assert_eq!(parse_provoke("1.5ms"), Ok(Duration::from_micros(1_500)));
        assert_eq!(parse_provoke("750ns"), Ok(Duration::from_nanos(750)));
        assert_eq!(parse_provoke("0.01s"), Ok(Duration::from_millis(10)));
        assert_eq!(parse_provoke(" 3 ms "), Ok(Duration::from_millis(3)));
        assert_eq!(parse_provoke("50ms"), Ok(Duration::from_millis(50)));
    }

    #[test]
    fn bad_provoke_durations_say_what_to_write() {
        assert_eq!(
            parse_provoke("2"),
            Err("\"2\" has no unit: write e.g. 500us or 2ms".into())
        );
        assert_eq!(
            parse_provoke("2min"),
            Err("unknown unit \"min\" in \"2min\": use ns, us, ms or s".into())
        );
        assert_eq!(
            parse_provoke("ms"),
            Err("\"ms\" does not start with a number: write e.g. 500us or 2ms".into())
        );
        assert_eq!(
            parse_provoke("1.2.3ms"),
            Err("\"1.2.3ms\" does not start with a number: write e.g. 500us or 2ms".into())
        );
        assert_eq!(
            parse_provoke("0ms"),
            Err("\"0ms\" is no time at all: give at least 1ns".into())
        );
        assert_eq!(
            parse_provoke("51ms"),
            Err("\"51ms\" is more than the 50 ms racewatch holds a window at most".into())
        );
    }

    #[test]
    fn budgets_are_percentages_above_0_and_at_most_100() {
        assert_eq!(parse_budget("1"), Ok(1.0));
        assert_eq!(parse_budget("0.5"), Ok(0.5));
        assert_eq!(parse_budget("100"), Ok(100.0));
        for bad in ["0", "-1", "100.5", "abc", "NaN", "inf", ""] {
            assert_eq!(
                parse_budget(bad),
                Err(format!(
                    "{bad:?} is not a percentage above 0 and at most 100: write e.g. 1 or 0.5"
                )),
            );
        }
    }
}
