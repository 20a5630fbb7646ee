//! One racewatch run, the same for every front end: launch or find the target, load and attach
//! the probes, collect until the end, report.
use std::{io, path::PathBuf, time::Duration};

use anyhow::Context as _;

use crate::{
    cli::RunArgs,
    engine::{budget::Budget, correlate::Correlator, cost::Costs, summary::Summary},
    probe::{
        loader::{Loaded, Options},
        plan::{Discover, Plan},
    },
    process::{
        launch::Held,
        target::{PidWatch, Target},
    },
    report::{
        HumanSink, JsonSink, Sink,
        file::{LogFile, Reopen},
        human::pid_text,
    },
    targets::StackConfig,
};

pub mod collector;

use collector::{Run, Signals};

/// Ring buffer size: overridable for tests that prove lost events are counted. Stack records
/// are large (8 KiB native), so runs that take stacks get a larger ring.
fn ring_bytes(stacks: &StackConfig) -> u32 {
    let default = match stacks {
        StackConfig::None => detector_common::EVENTS_BYTES_DEFAULT,
        _ => detector_common::EVENTS_BYTES_STACKS,
    };
    std::env::var("RACEWATCH_RING_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A failure, with the exit status it maps to.
pub struct Failure {
    pub status: u8,
    pub error: anyhow::Error,
}

impl Failure {
    pub fn usage(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            status: crate::cli::EXIT_USAGE,
            error: error.into(),
        }
    }
    pub fn runtime(error: impl Into<anyhow::Error>) -> Failure {
        Failure {
            status: crate::cli::EXIT_FAILURE,
            error: error.into(),
        }
    }
}

/// Where findings go, and with `-o FILE`, how to have the file reopened.
fn sink(args: &RunArgs) -> Result<(Box<dyn Sink>, Option<Reopen>), Failure> {
    let (out, reopen): (Box<dyn io::Write>, _) = match &args.output {
        Some(path) => {
            let (file, reopen) = LogFile::create(path.clone())
                .with_context(|| {
                    format!(
                        "cannot write {} (give -o a file in a directory that exists, which \
                         racewatch may create or append to)",
                        crate::text::escape(&path.to_string_lossy())
                    )
                })
                .map_err(Failure::usage)?;
            (Box::new(io::BufWriter::new(file)), Some(reopen))
        }
        None => (Box::new(io::BufWriter::new(io::stdout().lock())), None),
    };
    let sink: Box<dyn Sink> = if args.json {
        Box::new(JsonSink::new(out))
    } else {
        Box::new(HumanSink::new(out))
    };
    Ok((sink, reopen))
}

fn seconds(flag: &str, secs: Option<f64>) -> Result<Option<Duration>, Failure> {
    secs.map(|s| {
        Duration::try_from_secs_f64(s)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                Failure::usage(anyhow::anyhow!(
                    "{flag} must be a positive number of seconds, got {s}"
                ))
            })
    })
    .transpose()
}

pub fn duration(args: &RunArgs) -> Result<Option<Duration>, Failure> {
    seconds("--duration", args.duration)
}

pub fn interval(args: &RunArgs) -> Result<Option<Duration>, Failure> {
    seconds("--interval", args.interval)
}

/// What a run sets up before it reads any file.
pub struct Start {
    signals: Signals,
    /// `--metrics`'s listening socket, bound at once so a port in use is bad input.
    metrics: Option<std::net::TcpListener>,
}

/// Starts a run: catches SIGINT, SIGTERM and SIGHUP from now, so that one arriving while
/// racewatch still reads symbols and DWARF also ends the run with a summary; starts reading the
/// kernel's BTF; checks every argument that needs no file read (durations, the command,
/// `--metrics`).
pub fn start(args: &RunArgs) -> Result<Start, Failure> {
    let signals = Signals::catch()
        .context("cannot catch SIGINT, SIGTERM and SIGHUP")
        .map_err(Failure::runtime)?;
    crate::probe::kernel::prefetch();
    duration(args)?;
    interval(args)?;
    check_command(args)?;
    let metrics = args
        .metrics
        .map(|addr| {
            let listener = std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .with_context(|| {
                    format!(
                        "cannot serve --metrics on {addr}: give a free port and a local address"
                    )
                })
                .map_err(Failure::usage)?;
            Ok(listener)
        })
        .transpose()?;
    Ok(Start { signals, metrics })
}

/// What a front end hands a run: what to attach, how to read what comes back, and what it
/// already knows it cannot watch.
pub struct Front {
    /// One per window; the first sets what is fixed for the whole run, such as how `--provoke`
    /// hands the GIL over.
    pub plans: Vec<Plan>,
    pub correlator: Correlator,
    pub stacks: StackConfig,
    pub unwatched: Vec<String>,
    /// What else to watch as the run goes on (a run on the host).
    pub discover: Option<Box<dyn Discover>>,
}

/// Runs `front`'s plans against the target of `args`; returns the summary (None for a dry run).
pub async fn run(
    front: Front,
    args: &RunArgs,
    provoke_ns: u64,
    start: Start,
) -> Result<Option<Summary>, Failure> {
    let Front {
        plans,
        correlator,
        stacks,
        unwatched,
        discover,
    } = front;
    let (plans, stacks) = (&plans[..], &stacks);
    let duration = duration(args)?;
    let interval = interval(args)?;
    let (mut sink, reopen) = sink(args)?;
    // Neither a pid nor a command: every process on the host that maps the probed file.
    let host = args.pid.is_none() && args.command.is_empty();
    let held = match (&args.pid, args.dry_run) {
        (None, false) if !host => Some(Held::spawn(&args.command).map_err(Failure::usage)?),
        _ => None,
    };
    // Held from before the probes go in, so a process that exits while they do ends the run
    // with its summary rather than leaving nothing to watch.
    let watch = match (args.pid, args.dry_run) {
        (Some(pid), false) => Some(PidWatch::new(pid).map_err(Failure::usage)?),
        _ => None,
    };
    let pid = args.pid.or(held.as_ref().map(Held::pid)).unwrap_or(0);
    // The processes the target forks are watched too, where the kernel tells a fork's child.
    let tgid_offset = crate::probe::kernel::task_tgid_offset();
    let already_forked = match args.pid {
        Some(pid) => crate::process::descendants(pid),
        None => Vec::new(),
    };
    let mut forks_unfollowed = tgid_offset.as_ref().err().cloned();
    let lock_edges = plans.iter().any(|p| p.lock_edges.is_some());
    let costs = (!args.dry_run)
        .then(|| per_hit_costs(args.verbose, lock_edges))
        .flatten();
    let attached = Loaded::load(
        &Options {
            task_tgid_offset: tgid_offset.ok(),
            watch_all: host,
            ring_bytes: ring_bytes(stacks),
            provoke_ns,
            stack_mode: stacks.mode(),
        },
        &plans[0],
    )
    .map_err(anyhow::Error::from)
    .and_then(|mut loaded| {
        if forks_unfollowed.is_none()
            && let Err(e) = loaded.follow_forks()
        {
            forks_unfollowed = Some(format!("{:#}", anyhow::Error::from(e)));
        }
        if pid != 0 {
            loaded.watch(pid)?;
            // Its workers forked before racewatch started are part of it too.
            for &(child, _) in &already_forked {
                loaded.watch(child)?;
            }
        }
        for plan in plans {
            loaded.attach(plan)?;
        }
        let events = loaded.take_events()?;
        Ok((loaded, events))
    });
    let (mut loaded, events) = match attached {
        Ok(ok) => ok,
        Err(e) => {
            if let Some(h) = held {
                h.abandon();
            }
            return Err(Failure::usage(e));
        }
    };
    let who = crate::process::container::Identity::of(pid);
    let what = match (args.pid, args.dry_run) {
        (_, true) => "dry run".to_string(),
        (Some(pid), _) => format!("watching {}", pid_text(pid, &who)),
        (None, _) if host => "watching every process that maps it".to_string(),
        (None, _) => format!("launched {}", pid_text(pid, &who)),
    };
    // Several windows may share a file.
    let mut files: Vec<String> = Vec::new();
    for p in plans {
        let file = crate::text::escape(&p.binary.to_string_lossy());
        if !files.contains(&file) {
            files.push(file);
        }
    }
    eprintln!(
        "racewatch: {what}: {} probes attached to {}",
        loaded.probes,
        files.join(", ")
    );
    if args.dry_run {
        return Ok(None);
    }
    let mut target = match (held, watch) {
        (Some(h), _) => Target::Launched(h.release().map_err(Failure::usage)?),
        (None, Some(watch)) => Target::Attached(watch),
        (None, None) => Target::Host,
    };
    // Exited while the probes went in: whatever it did before the last one was in went unseen.
    let exited_early = match &target {
        Target::Attached(watch) if watch.has_exited() => Some(format!(
            "process {pid}: it exited before every probe was attached, so its run was not watched \
             (attach while it runs)"
        )),
        _ => None,
    };
    let metrics = start
        .metrics
        .map(tokio::net::TcpListener::from_std)
        .transpose()
        .context("cannot serve --metrics")
        .map_err(Failure::runtime)?;
    let run = Run {
        signals: start.signals,
        // Left on (system-wide), a run's SIGHUP is logrotate's: the file is reopened, the run
        // goes on. Otherwise SIGHUP ends the run, as a terminal's hangup does.
        reopen: reopen.filter(|_| host),
        metrics,
        loaded: &mut loaded,
        events,
        correlator,
        windows: plans.iter().map(|p| (p.window, p.name.clone())).collect(),
        resolver: stacks.resolver(),
        sink: sink.as_mut(),
        duration,
        interval,
        traps: crate::probe::plan::traps(plans),
        costs,
        discover,
        budget: Budget {
            share: args.budget / 100.0,
        },
        watched_at_start: std::iter::once((pid, None))
            .filter(|_| pid != 0)
            .chain(already_forked.iter().map(|&(c, p)| (c, Some(p))))
            .collect(),
        forks_unfollowed,
        unwatched: plans
            .iter()
            .flat_map(|p| p.unprobed.iter().cloned())
            .chain(unwatched)
            .chain(exited_early)
            .collect(),
    };
    run.run(&mut target)
        .await
        .map(Some)
        .map_err(Failure::runtime)
}

/// What one probe hit costs here, for the budget and the summary: measured (~50 ms) before the
/// probes are attached and before a launched command is released, so that measuring never runs
/// beside a target racewatch started.
fn per_hit_costs(verbose: bool, lock_edges: bool) -> Option<Costs> {
    let costs = crate::probe::calibrate::calibrate(lock_edges)
        .inspect_err(|e| {
            eprintln!(
                "racewatch: cannot estimate what its probes cost ({e}): lookups are sampled in \
                 the shortest bursts, whatever the budget"
            )
        })
        .ok()?;
    if verbose {
        eprintln!(
            "racewatch: one probe hit costs {:.0} ns on an emulated instruction, {:.0} ns \
             single-stepped, {:.0} ns more with the return probed",
            costs.emulated_ns, costs.single_stepped_ns, costs.return_ns
        );
    }
    Some(costs)
}

/// Checks that the command to launch can be started: one that cannot is bad input, said before
/// anything is loaded, not a run that ended at once.
pub fn check_command(args: &RunArgs) -> Result<(), Failure> {
    match (args.pid, args.command.first()) {
        (None, Some(cmd)) => crate::process::resolve_command(cmd)
            .map(drop)
            .map_err(Failure::usage),
        _ => Ok(()),
    }
}

/// The ELF file to probe when the user named none: the command's or the process's executable.
pub fn default_binary(args: &RunArgs) -> Result<PathBuf, Failure> {
    match (args.pid, args.command.first()) {
        (Some(pid), _) => crate::process::running_exe(pid).map_err(Failure::usage),
        (None, Some(cmd)) => crate::process::resolve_command(cmd).map_err(Failure::usage),
        (None, None) => Err(Failure::usage(anyhow::anyhow!(
            "give --binary PATH to watch every process that maps it, -p PID, or -- COMMAND"
        ))),
    }
}
