//! racewatch: finds lookups that land in a cache's empty window, through uprobes.

use std::{path::Path, process::ExitCode};

use detector_common::FORM_NAMES;

use clap::{CommandFactory as _, Parser as _};

use detector_user::{
    cli::{self, Cli, Command, EXIT_RACE, PythonArgs, WatchArgs},
    engine::{
        correlate::{Correlator, MissValue},
        summary::Summary,
    },
    probe::{
        calibrate, info,
        plan::{Discover, Plan},
        preflight,
        symbols::SymbolTable,
    },
    process,
    run::{self as session, Failure},
    targets::{
        StackConfig,
        native::{self, Windows, config::Config, window::Window},
        python,
    },
    text,
};

async fn watch(args: WatchArgs) -> Result<ExitCode, Failure> {
    let start = session::start(&args.run)?;
    if let Some(pid) = args.run.pid {
        process::running_exe(pid).map_err(Failure::usage)?;
    }
    let windows = match &args.config {
        Some(path) => Windows::Config(Config::read(path).map_err(Failure::usage)?),
        None => Windows::Flags(Window::from_flags(&args).ok_or_else(|| {
            Failure::usage(anyhow::anyhow!(
                "give --config FILE, or --clear, --update and --lookup"
            ))
        })?),
    };
    // With -p, a file named is the process's path for it (a container's, say).
    let pid = args.run.pid;
    let binary = |named: Option<&Path>| match (named.or(args.binary.as_deref()), pid) {
        (Some(b), Some(pid)) => process::binary_of(pid, b).map_err(Into::into),
        (Some(b), None) => Ok(b.to_path_buf()),
        (None, _) => session::default_binary(&args.run).map_err(|f| f.error),
    };
    let (plans, stacks) = native::plans(&windows, binary, args.probe_returns, args.run.verbose)
        .map_err(Failure::usage)?;
    preflight::check().map_err(Failure::usage)?;
    // Each window's miss value, compared at the width its lookup returns.
    // Each window's miss value, compared at the width its lookup returns.
    let miss_ret = plans
        .iter()
        .map(|plan| {
            plan.lookup
                .miss()
                .map(|(value, bytes)| MissValue { value, bytes })
        })
        .collect();
    let correlator = Correlator::new(miss_ret, None);
    let provoke_ns = args.provoke.map_or(0, |d| d.as_nanos() as u64);
    let front = session::Front {
        plans,
        correlator,
        stacks,
        unwatched: Vec::new(),
        discover: None,
    };
    let summary = session::run(front, &args.run, provoke_ns, start).await?;
    Ok(exit_for(summary.as_ref()))
}

/// What to probe in `interp` as the run's window `window`, and where its threads keep their frames.
fn python_plan(
    interp: &python::Interpreter,
    window: u32,
    args: &PythonArgs,
) -> Result<(Plan, python::layout::Layout), Failure> {
    python::plan(interp, window, &python_options(args)).map_err(Failure::usage)
}

fn python_options(args: &PythonArgs) -> python::Options {
    python::Options {
        provoke: args.provoke.is_some(),
        every_lookup: args.every_lookup,
        quiet_misses: args.quiet_misses,
        verbose: args.run.verbose,
    }
}

/// A system-wide run: every interpreter file the host's CPython processes map, each a window;
/// with none running, the one `python3` on PATH names, for the processes still to come. The
/// returned `Host` meets the files of processes started later.
fn python_on_host(
    args: &PythonArgs,
    unwatched: &mut Vec<String>,
) -> Result<(Vec<Plan>, python::host::Host), Failure> {
    let mut host = python::host::Host::new(python_options(args));
    let (mut plans, refused) = host.scan().map_err(Failure::usage)?;
    unwatched.extend(refused);
    if plans.is_empty() {
        plans.push(host.fallback().map_err(Failure::usage)?);
    }
    Ok((plans, host))
}

async fn python(args: PythonArgs) -> Result<ExitCode, Failure> {
    let start = session::start(&args.run)?;
    let mut unwatched = Vec::new();
    let interpreter = match (&args.interpreter, args.run.pid) {
        (Some(image), _) => Some(python::given(image)),
        (None, Some(pid)) => Some(python::for_pid(pid)),
        (None, None) if args.run.command.is_empty() => None,
        (None, None) => Some(python::for_command(&args.run.command)),
    };
    let (plans, layouts, discover) = match interpreter {
        Some(found) => {
            let (plan, layout) = python_plan(&found.map_err(Failure::usage)?, 0, &args)?;
            let layouts = python::host::Layouts::default();
            layouts.borrow_mut().push(layout);
            (vec![plan], layouts, None)
        }
        None => {
            let (plans, host) = python_on_host(&args, &mut unwatched)?;
            (plans, host.layouts(), Some(host))
        }
    };
    preflight::check().map_err(Failure::usage)?;
    // Each KeyError's key is read with its window's interpreter's object layout.
    let objects = layouts.clone();
    let forms: &[&str] = if args.quiet_misses {
        &FORM_NAMES
    } else {
        &FORM_NAMES[..1]
    };
    let correlator = Correlator::new(
        Vec::new(),
        Some(Box::new(move |k| {
            let layout = *objects.borrow().get(k.window as usize)?;
            python::key::render(k, &layout.objects)
        })),
    )
    .counting_forms(forms);
    let provoke_ns = args.provoke.map_or(0, |d| d.as_nanos() as u64);
    let front = session::Front {
        plans,
        correlator,
        stacks: StackConfig::Python(layouts),
        unwatched,
        discover: discover.map(|h| Box::new(h) as Box<dyn Discover>),
    };
    let summary = session::run(front, &args.run, provoke_ns, start).await?;
    Ok(exit_for(summary.as_ref()))
}

fn exit_for(summary: Option<&Summary>) -> ExitCode {
    match summary {
        Some(s) if s.counts.lookups_in_window > 0 => ExitCode::from(EXIT_RACE),
        Some(s) if !s.unwatched.is_empty() => ExitCode::from(cli::EXIT_INCOMPLETE),
        _ => ExitCode::SUCCESS,
    }
}

fn symbols(path: &std::path::Path, grep: Option<&str>) -> Result<ExitCode, Failure> {
    let pattern = grep.map(regex_lite::Regex::new).transpose().map_err(|e| {
        Failure::usage(anyhow::anyhow!(
            "--grep is not a valid regular expression: {e}"
        ))
    })?;
    let table = SymbolTable::load(path).map_err(Failure::usage)?;
    for name in table
        .names()
        .into_iter()
        .filter(|n| pattern.as_ref().is_none_or(|p| p.is_match(n)))
    {
        println!("{}", text::escape(name));
    }
    Ok(ExitCode::SUCCESS)
}

fn calibrate(json: bool) -> Result<ExitCode, Failure> {
    preflight::check().map_err(Failure::usage)?;
    let (base, rows) = calibrate::table().map_err(Failure::runtime)?;
    let floor = rows
        .iter()
        .filter(|r| r.emulated && r.probe == calibrate::Kind::Entry)
        .map(|r| r.ns_per_hit)
        .fold(f64::INFINITY, f64::min);
    if json {
        let line = serde_json::json!({
            "type": "probe_costs",
            "unprobed_call_ns": base,
            "emulated_floor_ns": floor,
            "rows": rows,
        });
        println!("{line}");
    } else {
        println!("an unprobed call: {base:.1} ns; one probe hit adds:");
        println!(
            "{:<28} {:<7} {:>14} {:>10} {:>9}",
            "first instruction", "probe", "kernel", "ns/hit", "x floor"
        );
        for r in &rows {
            let kernel = if r.emulated {
                "emulates"
            } else {
                "single-steps"
            };
            let probe = if r.probe == calibrate::Kind::Entry {
                "entry"
            } else {
                "return"
            };
            println!(
                "{:<28} {probe:<7} {kernel:>14} {:>10.0} {:>9.2}",
                r.instruction,
                r.ns_per_hit,
                r.ns_per_hit / floor
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn info(json: bool) -> ExitCode {
    let checks = info::run();
    if json {
        println!("{}", info::render_json(&checks));
    } else {
        print!("{}", info::render_human(&checks));
    }
    if info::all_needed_pass(&checks) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(cli::EXIT_USAGE)
    }
}

fn block_on(run: impl Future<Output = Result<ExitCode, Failure>>) -> Result<ExitCode, Failure> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt.block_on(run),
        Err(e) => Err(Failure::runtime(e)),
    }
}

/// The error and its causes on one line, each cause once (a message that already quotes its
/// cause is not followed by it again), with what a target or file controls escaped.
fn error_message(error: &anyhow::Error) -> String {
    text::escape_lines(&text::error_chain(error))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::HeldExec { command } => {
            return ExitCode::from(process::launch::held_exec(&command) as u8);
        }
        Command::Symbols { path, grep } => symbols(&path, grep.as_deref()),
        Command::Info { json } => Ok(info(json)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "racewatch",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => clap_mangen::generate_to(Cli::command(), &dir)
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| {
                Failure::usage(anyhow::Error::new(e).context(format!(
                    "cannot write the manual pages into {}",
                    dir.display()
                )))
            }),
        Command::Calibrate { json } => calibrate(json),
        Command::Watch(args) => block_on(watch(args)),
        Command::Python(args) => block_on(python(args)),
    };
    match result {
        Ok(code) => code,
        Err(Failure { status, error }) => {
            eprintln!("racewatch: error: {}", error_message(&error));
            ExitCode::from(status)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_message_names_each_cause_once_and_escapes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let quoted = anyhow::Error::new(detector_user::probe::symbols::SymbolError::Read {
            path: "/x\x1b[2J".into(),
            source: io,
        });
        assert_eq!(error_message(&quoted), "cannot read /x\\u{1b}[2J: gone");
        let chained = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_message(&chained), "outer: inner");
    }
}
