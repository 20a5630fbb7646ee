//! Time to the first finding: on targets that race about once an hour unobserved (as the seed's
//! worker did), how long a user waits, from starting racewatch, for the hazard line that names
//! the race (`--interval 1`) and for a real miss that `--provoke` makes happen and flags.
use std::{
    fmt::Write as _,
    io::{BufRead as _, BufReader},
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::Value;

use crate::{
    bench::{median, strings},
    demo::DEMO_PROBES,
};

/// The section's title in docs/BENCHMARKS.md.
pub const TITLE: &str = "\n### Time to the first finding";

/// How long one run may wait for both findings.
const LIMIT: Duration = Duration::from_secs(60);

/// A target that races about once an hour unobserved, and racewatch's arguments for it.
struct Rare {
    what: &'static str,
    racewatch: Vec<String>,
    command: Vec<String>,
}

/// When, from racewatch's start, each finding came (None: not within [`LIMIT`]).
#[derive(Default)]
struct Found {
    hazard: Option<Duration>,
    miss: Option<Duration>,
}

/// Runs `rare` under racewatch once, reading its NDJSON as it comes.
fn once(racewatch: &str, rare: &Rare) -> Result<Found> {
    let start = Instant::now();
    let mut child = Command::new(racewatch)
        .args(&rare.racewatch)
        .args(["--json", "--interval", "1", "--"])
        .args(&rare.command)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        // Its own group, so that racewatch and the target it launched end together.
        .process_group(0)
        .spawn()
        .with_context(|| format!("cannot run {racewatch}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((start.elapsed(), line)).is_err() {
                break;
            }
        }
    });
    let mut found = Found::default();
    while found.hazard.is_none() || found.miss.is_none() {
        let Some(left) = LIMIT.checked_sub(start.elapsed()) else {
            break;
        };
        let Ok((at, line)) = rx.recv_timeout(left) else {
            break;
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match v["type"].as_str() {
            // A hazard line that forecasts: the race is named before it fired.
            Some("hazard") if v["expected_collisions_per_hour"].is_number() => {
                found.hazard.get_or_insert(at);
            }
            Some("alert") if v["miss"] == true => {
                found.miss.get_or_insert(at);
            }
            _ => {}
        }
    }
    // The group this function started: racewatch and its target.
    crate::kill(-(child.id() as i32), 15);
    child.wait()?;
    Ok(found)
}

fn seconds(v: &[Option<Duration>]) -> String {
    let got: Vec<f64> = v.iter().flatten().map(Duration::as_secs_f64).collect();
    if got.is_empty() {
        return format!("none within {} s in {} runs", LIMIT.as_secs(), v.len());
    }
    format!(
        "{:.1} s (max {:.1} s), {} of {} runs",
        median(got.clone()),
        got.iter().copied().fold(0.0, f64::max),
        got.len(),
        v.len()
    )
}

/// Measures each rare target `runs` times and writes the section.
pub fn run(
    racewatch: &str,
    demo: &str,
    interpreter: &str,
    worker: &str,
    runs: usize,
    doc: &mut String,
) -> Result<()> {
    let rares = [
        Rare {
            what: "Python worker at CPython's default 5 ms switch interval \
                   (`--keys 50 --refresh-ms 200 --pause-ms 2 --switch-interval 0.005`), \
                   `racewatch python --provoke 1ms`",
            racewatch: strings(&["python", "--provoke", "1ms"]),
            command: strings(&[
                interpreter,
                worker,
                "--seconds",
                "120",
                "--keys",
                "50",
                "--refresh-ms",
                "200",
                "--pause-ms",
                "2",
                "--switch-interval",
                "0.005",
            ]),
        },
        Rare {
            what: "native demo (`--keys 64 --refresh-us 200000 --pause-us 2000`), \
                   `racewatch watch --miss-ret -1 --provoke 2ms`",
            racewatch: strings(
                &[
                    &["watch"][..],
                    &DEMO_PROBES,
                    &["--miss-ret", "-1", "--provoke", "2ms"],
                ]
                .concat(),
            ),
            command: strings(&[
                demo,
                "--seconds",
                "120",
                "--keys",
                "64",
                "--refresh-us",
                "200000",
                "--pause-us",
                "2000",
            ]),
        },
    ];
    writeln!(doc, "{TITLE}\n")?;
    writeln!(
        doc,
        "Targets that race about once an hour unobserved (tests/python.rs and tests/watch.rs \
         check that they raise no miss in 10 s on their own, the Python worker at a 0.1 ms switch \
         interval, which lets its reader in more often than this 5 ms), run under racewatch with \
         `--json --interval 1` and `--provoke`; each figure is from racewatch's start (loading \
         and attaching included) to its first hazard line with a forecast, and to its first \
         flagged miss, over {runs} runs (median, and the slowest).\n"
    )?;
    writeln!(doc, "| target | hazard named | provoked miss flagged |")?;
    writeln!(doc, "|---|---|---|")?;
    for rare in &rares {
        let mut hazards = Vec::new();
        let mut misses = Vec::new();
        for _ in 0..runs {
            let found = once(racewatch, rare)?;
            hazards.push(found.hazard);
            misses.push(found.miss);
        }
        let line = format!(
            "| {} | {} | {} |",
            rare.what,
            seconds(&hazards),
            seconds(&misses)
        );
        eprintln!("bench: {line}");
        writeln!(doc, "{line}")?;
    }
    Ok(())
}
