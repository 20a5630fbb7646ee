//! racewatch: finds lookups that land in a cache's empty window, through uprobes.

use std::process::ExitCode;

use clap::Parser as _;

use detector_user::{
    cli::{self, Cli, Command, EXIT_RACE, PythonArgs, WatchArgs},
    engine::{correlate::Correlator, summary::Summary},
    probe::{
        calibrate, info,
        plan::{LookupProbe, Plan},
        preflight,
        symbols::SymbolTable,
    },
    process,
    run::{self as session, Failure},
    targets::{StackConfig, native, python},
    text,
};

async fn watch(args: WatchArgs) -> Result<ExitCode, Failure> {
    let start = session::start(&args.run)?;
    let binary = match &args.binary {
        Some(b) => b.clone(),
        None => session::default_binary(&args.run)?,
    };
    if let Some(pid) = args.run.pid {
        process::running_exe(pid).map_err(Failure::usage)?;
    }
    let (plan, stacks) = native::plan(&args, binary).map_err(Failure::usage)?;
    preflight::check().map_err(Failure::usage)?;
    let correlator = Correlator::new(args.miss_ret, None);
    let provoke_ns = args.provoke.map_or(0, |d| d.as_nanos() as u64);
    let summary = session::run(
        &plan,
        &args.run,
        provoke_ns,
        correlator,
        &stacks,
        start,
        Vec::new(),
    )
    .await?;
    Ok(exit_for(summary.as_ref()))
}

/// What to probe in `interp`, and where its threads keep their frames.
fn python_plan(
    interp: &python::Interpreter,
    args: &PythonArgs,
) -> Result<(Plan, python::frames::FrameLayout), Failure> {
    let plan = python::plan(
        interp,
        args.provoke.is_some(),
        args.every_lookup,
        args.run.verbose,
    )
    .map_err(Failure::usage)?;
    let LookupProbe::KeyError {
        function: keyerror, ..
    } = &plan.lookup
    else {
        unreachable!("python::plan probes the KeyError function")
    };
    let frames = python::frames::layout(
        &plan.binary,
        plan.clear.function.address + plan.clear.offset,
        keyerror.function.address + keyerror.offset,
    )
    .map_err(|e| Failure::usage(python::PythonError::from(e)))?;
    Ok((plan, frames))
}

/// A system-wide run: the interpreter file most of the host's CPython processes map that
/// racewatch can watch (every process mapping it, those started later included); the processes
/// that run another interpreter are listed in `unwatched`. With no CPython running, the one
/// `python3` on PATH names, for the processes still to come.
fn python_on_host(
    args: &PythonArgs,
    unwatched: &mut Vec<String>,
) -> Result<(Plan, python::frames::FrameLayout), Failure> {
    let mut chosen = None;
    for found in python::on_host() {
        let pids = format!(
            "process{} {}",
            if found.pids.len() == 1 { "" } else { "es" },
            found
                .pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let planned = found
            .found
            .map_err(Failure::usage)
            .and_then(|interp| python_plan(&interp, args).map(|p| (interp, p)));
        match (planned, &chosen) {
            (Ok((_, plan)), None) => chosen = Some(plan),
            (Ok((interp, _)), Some(_)) => unwatched.push(format!(
                "{pids}: they run {}, another interpreter build (racewatch python \
                 watches one per run: give -p PID to watch them)",
                interp.image.display()
            )),
            (Err(f), _) => unwatched.push(format!("{pids}: {:#}", f.error)),
        }
    }
    match chosen {
        Some(plan) => Ok(plan),
        None => python::for_command(&["python3".into()])
            .map_err(Failure::usage)
            .and_then(|interp| python_plan(&interp, args)),
    }
}

async fn python(args: PythonArgs) -> Result<ExitCode, Failure> {
    let start = session::start(&args.run)?;
    let mut unwatched = Vec::new();
    let (plan, frames) = match args.run.pid {
        Some(pid) => python_plan(&python::for_pid(pid).map_err(Failure::usage)?, &args)?,
        None if args.run.command.is_empty() => python_on_host(&args, &mut unwatched)?,
        None => python_plan(
            &python::for_command(&args.run.command).map_err(Failure::usage)?,
            &args,
        )?,
    };
    preflight::check().map_err(Failure::usage)?;
    let correlator = Correlator::new(None, Some(python::key::render));
    let provoke_ns = args.provoke.map_or(0, |d| d.as_nanos() as u64);
    let summary = session::run(
        &plan,
        &args.run,
        provoke_ns,
        correlator,
        &StackConfig::Python(frames),
        start,
        unwatched,
    )
    .await?;
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
    let mut text = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text::escape_lines(&text)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::HeldExec { command } => {
            return ExitCode::from(process::launch::held_exec(&command) as u8);
        }
        Command::Symbols { path, grep } => symbols(&path, grep.as_deref()),
        Command::Info { json } => Ok(info(json)),
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
