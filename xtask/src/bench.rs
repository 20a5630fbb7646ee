//! `cargo xtask bench`: racewatch's cost, as ratios to the same workload unobserved in the same
//! run. Configurations are interleaved (A B C, A B C, ...) so drift on a noisy machine hits them
//! alike; each figure is the median over repetitions of the per-repetition ratio. Also: what one
//! probe hit costs by probed instruction (`racewatch calibrate`), where racewatch places its
//! probes on the demos, and how many events a second the collector drains.
use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    build_racewatch,
    demo::{DEMO_PROBES, build_demos},
    workspace_root,
};

/// Builds a configuration's command line around the workload's.
type Wrap = Box<dyn Fn(&[String]) -> Vec<String>>;

/// One way of running a workload.
struct Config {
    name: String,
    wrap: Wrap,
    /// racewatch's NDJSON output, to read its own estimate of what it added.
    report: Option<PathBuf>,
}

struct Workload {
    title: String,
    short: String,
    /// The command, without any observer.
    command: Vec<String>,
    /// Name of the ground-truth line's prefix and its rate counters: the one whose rate is the
    /// workload's speed, and its misses.
    truth_prefix: &'static str,
    rate: &'static str,
    misses: &'static str,
    configs: Vec<Config>,
}

/// One repetition of one configuration.
#[derive(Clone, Copy)]
struct Sample {
    /// The workload's speed: lookups a second, or refreshes for a writer's.
    per_s: f64,
    misses_per_s: f64,
    /// Times a lookup probe fired, per lookup, where racewatch reported it.
    traps_per_lookup: Option<f64>,
    /// racewatch's `added_share` and `lost_events`, where it reported them.
    added_share: Option<f64>,
    lost: Option<f64>,
}

/// Counters from the workload's own ground-truth line on stderr.
fn truth(stderr: &str, prefix: &str) -> Result<HashMap<String, f64>> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with(prefix))
        .with_context(|| format!("no `{prefix}` line in:\n{stderr}"))?;
    Ok(line[prefix.len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The last line of an NDJSON report: racewatch's summary.
fn summary_of(path: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(text.lines().last()?).ok()
}

/// Runs `w` under every configuration `runs` times, interleaved.
fn measure(w: &Workload, runs: usize, seconds: f64) -> Result<Vec<Vec<Sample>>> {
    let mut results = vec![Vec::new(); w.configs.len()];
    for rep in 0..runs {
        for (i, c) in w.configs.iter().enumerate() {
            let argv = (c.wrap)(&w.command);
            let out = Command::new(&argv[0])
                .args(&argv[1..])
                .output()
                .with_context(|| format!("cannot run {argv:?}"))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let t = truth(&stderr, w.truth_prefix)
                .with_context(|| format!("{} under {}", w.title, c.name))?;
            let rate = |k: &str| t.get(k).copied().unwrap_or(f64::NAN) / seconds;
            let summary = c.report.as_deref().and_then(summary_of);
            let field = |f: &dyn Fn(&Value) -> Option<f64>| summary.as_ref().and_then(f);
            let lookups = t.get("lookups").copied().unwrap_or(f64::NAN);
            results[i].push(Sample {
                per_s: rate(w.rate),
                misses_per_s: rate(w.misses),
                traps_per_lookup: field(&|s| {
                    let hits = &s["probe_hits"];
                    let traps: f64 = ["lookup_entry", "lookup_return", "lookup_miss"]
                        .iter()
                        .filter_map(|k| hits[k].as_f64())
                        .sum();
                    Some(traps / lookups)
                }),
                added_share: field(&|s| s["self_cost"]["added_share"].as_f64()),
                lost: field(&|s| s["lost_events"].as_f64()),
            });
            eprintln!(
                "bench: {} [{}] rep {}: {:.0} {}/s",
                w.short,
                c.name,
                rep + 1,
                rate(w.rate),
                w.rate
            );
        }
    }
    Ok(results)
}

/// Per configuration: median speed ratio to unobserved, median miss ratio.
fn ratios(results: &[Vec<Sample>]) -> Vec<(f64, f64)> {
    let base = &results[0];
    results
        .iter()
        .map(|r| {
            let per_rep = |f: fn(&Sample) -> f64| {
                median(r.iter().zip(base).map(|(a, b)| f(a) / f(b)).collect())
            };
            (per_rep(|s| s.per_s), per_rep(|s| s.misses_per_s))
        })
        .collect()
}

fn table(w: &Workload, results: &[Vec<Sample>], out: &mut String) -> Result<()> {
    writeln!(out, "\n### {}\n", w.title)?;
    writeln!(
        out,
        "| configuration | {r}/s | ratio to unobserved | {m}/s | {m} ratio | racewatch's own estimate of its share of the target's CPU | events lost (most in a run) |",
        r = w.rate,
        m = w.misses
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|")?;
    for ((c, r), (ratio, miss_ratio)) in w.configs.iter().zip(results).zip(ratios(results)) {
        let speed = median(r.iter().map(|x| x.per_s).collect());
        let misses = median(r.iter().map(|x| x.misses_per_s).collect());
        let share = median(r.iter().filter_map(|x| x.added_share).collect());
        let share = if share.is_nan() {
            "".to_string()
        } else {
            format!("{:.2}%", share * 100.0)
        };
        let lost = r
            .iter()
            .filter_map(|x| x.lost)
            .reduce(f64::max)
            .map_or_else(String::new, |l| format!("{l:.0}"));
        writeln!(
            out,
            "| {} | {:.0} | {:.3} | {:.1} | {:.2} | {share} | {lost} |",
            c.name, speed, ratio, misses, miss_ratio
        )?;
    }
    Ok(())
}

fn tool(name: &str) -> Option<String> {
    which::which(name)
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

pub(crate) fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn unobserved() -> Config {
    Config {
        name: "unobserved".into(),
        wrap: Box::new(|cmd| cmd.to_vec()),
        report: None,
    }
}

/// racewatch with `args`, its NDJSON report in a file of its own.
fn racewatch_config(racewatch: &str, name: &str, args: &[&str]) -> Config {
    let report = std::env::temp_dir().join(format!(
        "racewatch-bench-{}.ndjson",
        name.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
    ));
    let mut prefix = vec![racewatch.to_string()];
    prefix.extend(strings(args));
    prefix.extend(strings(&["--json", "-o"]));
    prefix.push(report.to_string_lossy().into_owned());
    prefix.push("--".into());
    Config {
        name: name.into(),
        wrap: Box::new(move |cmd| [prefix.clone(), cmd.to_vec()].concat()),
        report: Some(report),
    }
}

fn strace_config(strace: String) -> Config {
    Config {
        name: "strace -f".into(),
        wrap: Box::new(move |cmd| {
            [strings(&[&strace, "-f", "-o", "/dev/null"]), cmd.to_vec()].concat()
        }),
        report: None,
    }
}

/// bpftrace running `script`, the workload launched by bpftrace once its probes are attached.
fn bpftrace_config(bpftrace: String, name: &str, script: String) -> Config {
    Config {
        name: name.into(),
        // -c splits its command on spaces and wants an executable's path: the workloads' are.
        wrap: Box::new(move |cmd| strings(&[&bpftrace, "-q", "-e", &script, "-c", &cmd.join(" ")])),
        report: None,
    }
}

/// The same window logic as racewatch's, written the naive way: every lookup's entry and return
/// probed.
fn native_bpftrace_script(demo: &str) -> String {
    format!(
        "uprobe:{demo}:_ZN5Cache5clearEv {{ @open[arg0] = nsecs; }}
uprobe:{demo}:_ZN5Cache6updateERKSt6vectorISt4pairIllESaIS2_EE {{ @refill[tid] = arg0; }}
uretprobe:{demo}:_ZN5Cache6updateERKSt6vectorISt4pairIllESaIS2_EE {{ delete(@open[@refill[tid]]); }}
uprobe:{demo}:_ZN5Cache6lookupEl {{ @cache[tid] = arg0; }}
uretprobe:{demo}:_ZN5Cache6lookupEl /@open[@cache[tid]] && (int64)retval == -1/ {{ @misses_in_window = count(); }}"
    )
}

/// racewatch's entry-only mode, the naive way: the probe on the lookup's first instruction.
fn native_entry_bpftrace_script(demo: &str) -> String {
    format!(
        "uprobe:{demo}:_ZN5Cache5clearEv {{ @open[arg0] = nsecs; }}
uprobe:{demo}:_ZN5Cache6updateERKSt6vectorISt4pairIllESaIS2_EE {{ @refill[tid] = arg0; }}
uretprobe:{demo}:_ZN5Cache6updateERKSt6vectorISt4pairIllESaIS2_EE {{ delete(@open[@refill[tid]]); }}
uprobe:{demo}:_ZN5Cache6lookupEl /@open[arg0]/ {{ @lookups_in_window = count(); }}"
    )
}

/// Every dict lookup probed, the windows kept as racewatch keeps them.
fn python_bpftrace_script(libpython: &str) -> String {
    format!(
        "uprobe:{libpython}:dict_clear {{ @open[arg0] = nsecs; }}
uprobe:{libpython}:dict_update {{ @refill[tid] = arg0; }}
uretprobe:{libpython}:dict_update {{ delete(@open[@refill[tid]]); }}
uprobe:{libpython}:PyDict_GetItemWithError /@open[arg0]/ {{ @lookups_in_window = count(); }}"
    )
}

/// Asks python3 a question (version managers put scripts, not interpreters, on PATH).
fn ask_python(code: &str) -> Result<String> {
    let out = Command::new("python3")
        .args(["-c", code])
        .output()
        .context("cannot run python3")?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn run(runs: usize, seconds: f64, baseline: Option<&Path>, soak_minutes: f64) -> Result<()> {
    if !crate::is_root() {
        bail!("the benchmark loads BPF programs: run it as root");
    }
    // The observers racewatch is compared with.
    crate::setup::ensure_apt("bpftrace", "bpftrace", "to compare with")?;
    crate::setup::ensure_apt("strace", "strace", "to compare with")?;
    let racewatch = build_racewatch()?.to_string_lossy().into_owned();
    let demo = build_demos()?.to_string_lossy().into_owned();
    let secs = seconds.to_string();
    let worker = workspace_root()
        .join("demo/worker.py")
        .to_string_lossy()
        .into_owned();
    let interpreter = ask_python("import sys; print(sys.executable)")?;
    let probes = DEMO_PROBES;
    let watch = |name: &str, extra: &[&str]| {
        racewatch_config(&racewatch, name, &[&["watch"][..], &probes, extra].concat())
    };
    let mut native = vec![
        unobserved(),
        watch(
            "racewatch watch --miss-ret -1 (miss path only)",
            &["--miss-ret", "-1"],
        ),
        watch("racewatch watch (every lookup's entry)", &[]),
        watch(
            "racewatch watch --miss-ret -1 --probe-returns (every lookup's entry and return)",
            &["--miss-ret", "-1", "--probe-returns"],
        ),
    ];
    let mut python = vec![
        unobserved(),
        racewatch_config(&racewatch, "racewatch python", &["python"]),
        racewatch_config(
            &racewatch,
            "racewatch python --every-lookup (every dict lookup counted)",
            &["python", "--every-lookup"],
        ),
        racewatch_config(
            &racewatch,
            "racewatch python --quiet-misses (every d.get and `in` trapped)",
            &["python", "--quiet-misses"],
        ),
    ];
    if let Some(base) = baseline {
        let base = base.to_string_lossy().into_owned();
        native.insert(
            2,
            racewatch_config(
                &base,
                "baseline build: racewatch watch --miss-ret -1",
                &[&["watch"][..], &probes, &["--miss-ret", "-1"]].concat(),
            ),
        );
        python.insert(
            2,
            racewatch_config(&base, "baseline build: racewatch python", &["python"]),
        );
    }
    if let Some(bpftrace) = tool("bpftrace") {
        native.push(bpftrace_config(
            bpftrace.clone(),
            "bpftrace, every lookup's entry",
            native_entry_bpftrace_script(&demo),
        ));
        native.push(bpftrace_config(
            bpftrace.clone(),
            "bpftrace, every lookup's entry and return",
            native_bpftrace_script(&demo),
        ));
        python.push(bpftrace_config(
            bpftrace,
            "bpftrace, every dict lookup",
            python_bpftrace_script(&ask_python(
                "import os,sysconfig as s; print(os.path.join(s.get_config_var('LIBDIR'), s.get_config_var('INSTSONAME')))",
            )?),
        ));
    }
    let mut writer = vec![
        unobserved(),
        watch(
            "racewatch watch --miss-ret -1 (miss path only)",
            &["--miss-ret", "-1"],
        ),
    ];
    if let Some(base) = baseline {
        writer.push(racewatch_config(
            &base.to_string_lossy(),
            "baseline build: racewatch watch --miss-ret -1",
            &[&["watch"][..], &probes, &["--miss-ret", "-1"]].concat(),
        ));
    }
    if let Some(strace) = tool("strace") {
        python.push(strace_config(strace.clone()));
        native.push(strace_config(strace));
    }
    let workloads = [
        Workload {
            title: "Python worker (demo/worker.py, the seed's clear()+update() cache)".into(),
            short: "python worker".into(),
            command: strings(&[&interpreter, &worker, "--seconds", &secs]),
            truth_prefix: "worker: ",
            rate: "lookups",
            misses: "keyerrors",
            configs: python,
        },
        Workload {
            title: "Native demo (demo/cache_demo.cpp, a locked C++ cache built with CET)".into(),
            short: "native demo".into(),
            command: strings(&[&demo, "--seconds", &secs]),
            truth_prefix: "cache_demo: ",
            rate: "lookups",
            misses: "misses",
            configs: native,
        },
        Workload {
            title: "Native demo's writer, its windows back to back (--refresh-us 0: the refresher \
                    clears and refills without a pause; its refreshes/s is the speed)"
                .into(),
            short: "native writer".into(),
            command: strings(&[&demo, "--seconds", &secs, "--refresh-us", "0"]),
            truth_prefix: "cache_demo: ",
            rate: "refreshes",
            misses: "misses",
            configs: writer,
        },
    ];
    let workloads: Vec<Workload> = workloads
        .into_iter()
        .chain([quiet_workload(&racewatch, &interpreter, &secs)])
        .chain(interpreter_workloads(&racewatch, &worker, &secs)?)
        .collect();
    let mut doc = header(runs, seconds)?;
    let mut chart = Vec::new();
    for w in &workloads {
        let results = measure(w, runs, seconds)?;
        table(w, &results, &mut doc)?;
        let bars = w
            .configs
            .iter()
            .zip(ratios(&results))
            .map(|(c, (r, _))| (c.name.clone(), r))
            .collect();
        chart.push((w.short.as_str(), bars));
    }
    crate::first_finding::run(&racewatch, &demo, &interpreter, &worker, runs, &mut doc)?;
    zoo(&racewatch, baseline, runs, seconds, &mut doc)?;
    probe_costs(&racewatch, &mut doc)?;
    placements(&racewatch, &demo, &worker, &mut doc)?;
    capacity(&racewatch, &demo, &mut doc)?;
    if soak_minutes > 0.0 {
        crate::soak::run(&racewatch, &demo, soak_minutes, &mut doc)?;
    }
    doc.push_str(FOOTER);
    let docs = workspace_root().join("docs");
    std::fs::create_dir_all(&docs)?;
    crate::chart::draw(&docs.join("benchmarks.png"), &chart)?;
    let path = docs.join("BENCHMARKS.md");
    // The hand-kept history of before/after figures outlives each run.
    if let Some(history) = std::fs::read_to_string(&path)
        .ok()
        .and_then(|old| old.find(HISTORY).map(|i| old[i..].to_string()))
    {
        doc.push('\n');
        doc.push_str(&history);
    }
    std::fs::write(&path, &doc)?;
    eprintln!("bench: wrote {} and docs/benchmarks.png", path.display());
    print!("{doc}");
    // The hazard forecast against what happens, in docs/HAZARD.md.
    crate::forecast::run(&racewatch, &demo, &interpreter, &worker, FORECAST_SECONDS)?;
    Ok(())
}

/// The worker on every other interpreter build the tests run it on, unobserved and under
/// `racewatch python`'s default mode: (what, its command before the worker, the worker's path
/// as it sees it, the file for `--interpreter`).
fn interpreter_workloads(racewatch: &str, worker: &str, secs: &str) -> Result<Vec<Workload>> {
    let roots = crate::setup::roots_dir();
    let root = |suite: &str| roots.join(suite).to_string_lossy().into_owned();
    let (trixie, sid) = (root("trixie"), root("sid"));
    for r in [&trixie, &sid] {
        std::fs::copy(worker, format!("{r}/tmp/worker.py"))
            .with_context(|| format!("cannot copy the worker into {r}: run `cargo xtask setup`"))?;
    }
    let builds: [(&str, Vec<String>, &str, Option<String>); 5] = [
        (
            "pyenv's CPython 3.12.1",
            strings(&["/root/.pyenv/versions/3.12.1/bin/python3.12"]),
            worker,
            None,
        ),
        (
            "pyenv's CPython 3.13.0",
            strings(&["/root/.pyenv/versions/3.13.0/bin/python3.13"]),
            worker,
            None,
        ),
        (
            "Debian 12's CPython 3.11 (stripped, LTO)",
            strings(&["/usr/bin/python3.11"]),
            worker,
            None,
        ),
        (
            "Debian 13's CPython 3.13 (stripped, LTO, run through chroot)",
            strings(&["chroot", &trixie, "python3.13"]),
            "/tmp/worker.py",
            Some(format!("{trixie}/usr/bin/python3.13")),
        ),
        (
            "Debian sid's CPython 3.14 (stripped, LTO, run through chroot)",
            strings(&["chroot", &sid, "python3.14"]),
            "/tmp/worker.py",
            Some(format!("{sid}/usr/bin/python3.14")),
        ),
    ];
    Ok(builds
        .into_iter()
        .map(|(what, run, worker, interpreter)| {
            let mut args = vec!["python"];
            if let Some(i) = &interpreter {
                args.extend(["--interpreter", i]);
            }
            Workload {
                title: format!("Python worker on {what}"),
                short: what.to_string(),
                command: [run, strings(&[worker, "--seconds", secs])].concat(),
                truth_prefix: "worker: ",
                rate: "lookups",
                misses: "keyerrors",
                configs: vec![
                    unobserved(),
                    racewatch_config(racewatch, &format!("racewatch python on {what}"), &args),
                ],
            }
        })
        .collect())
}

/// How the zoo's programs are run for a table: its title and what it measures, and the
/// arguments after SECONDS (`READER_PAUSE_US [GAP_US [WORK_NS]]`).
struct ZooLoad {
    title: &'static str,
    what: &'static str,
    args: &'static [&'static str],
}

const ZOO_LOADS: [ZooLoad; 2] = [
    ZooLoad {
        title: "The zoo (demo/zoo): lock-guarded caches in C, C++ and Rust",
        what: "Its readers never sleep and do 1 µs of their own work after each lookup, as a \
               service's request handlers would; the refresher refills right after emptying, \
               as the seed's code did.",
        args: &["0", "0", "1000"],
    },
    ZooLoad {
        title: "The zoo under stress: readers that only look up",
        what: "Its readers look up as fast as they can, and the refresher waits 20-30 µs \
               between emptying and refilling (see Reading the numbers).",
        args: &["0"],
    },
];

const QUIET_TITLE: &str = "Python quiet readers (demo/quiet.py: `d.get` and `in`, no KeyError)";

/// demo/quiet.py, whose readers miss only quietly, unobserved, under `racewatch python` and with
/// `--quiet-misses`, which traps every `.get` and `in`.
fn quiet_workload(racewatch: &str, interpreter: &str, secs: &str) -> Workload {
    let quiet = workspace_root().join("demo/quiet.py");
    Workload {
        title: QUIET_TITLE.into(),
        short: "python quiet readers".into(),
        command: strings(&[interpreter, &quiet.to_string_lossy(), "--seconds", secs]),
        truth_prefix: "worker: ",
        rate: "get_lookups",
        misses: "get_misses",
        configs: vec![
            unobserved(),
            racewatch_config(racewatch, "racewatch python", &["python"]),
            racewatch_config(
                racewatch,
                "racewatch python --quiet-misses (every d.get and `in` trapped)",
                &["python", "--quiet-misses"],
            ),
        ],
    }
}

/// `cargo xtask bench --quiet`: the quiet readers' table alone, put in docs/BENCHMARKS.md in
/// place of the one there (or before the time to the first finding).
pub fn run_quiet(runs: usize, seconds: f64) -> Result<()> {
    if !crate::is_root() {
        bail!("the benchmark loads BPF programs: run it as root");
    }
    let racewatch = build_racewatch()?.to_string_lossy().into_owned();
    let interpreter = ask_python("import sys; print(sys.executable)")?;
    let w = quiet_workload(&racewatch, &interpreter, &seconds.to_string());
    let mut section = String::new();
    table(&w, &measure(&w, runs, seconds)?, &mut section)?;
    let path = workspace_root().join("docs/BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let next = doc.find(crate::first_finding::TITLE).context(
        "docs/BENCHMARKS.md has no time to the first finding to put the table before: run the \
         whole bench",
    )?;
    // In place of the table there, else before the time to the first finding.
    let (start, end) = match doc.find(&format!("\n### {QUIET_TITLE}")) {
        Some(start) => (
            start,
            doc[start + 1..]
                .find("\n### ")
                .map_or(next, |i| start + 1 + i),
        ),
        None => (next, next),
    };
    std::fs::write(&path, format!("{}{section}{}", &doc[..start], &doc[end..]))?;
    eprintln!(
        "bench: wrote the quiet readers' table into {}",
        path.display()
    );
    print!("{section}");
    Ok(())
}

/// `cargo xtask bench --zoo`: the zoo's tables alone, put in docs/BENCHMARKS.md in place of the
/// ones there.
pub fn run_zoo(runs: usize, seconds: f64, baseline: Option<&Path>) -> Result<()> {
    if !crate::is_root() {
        bail!("the benchmark loads BPF programs: run it as root");
    }
    let racewatch = build_racewatch()?.to_string_lossy().into_owned();
    let commit = String::from_utf8(
        Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(workspace_root())
            .output()?
            .stdout,
    )?;
    let mut tables = format!(
        "\n### The zoo, measured apart\n\n\
         The zoo's tables below were measured by `cargo xtask bench --zoo --runs {runs} --seconds \
         {seconds}` at commit {}, after the rest of this page.\n",
        commit.trim()
    );
    zoo(&racewatch, baseline, runs, seconds, &mut tables)?;
    let path = workspace_root().join("docs/BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let start = doc
        .find("\n### The zoo")
        .context("docs/BENCHMARKS.md has no zoo table to replace: run the whole bench")?;
    let end = start
        + doc[start..]
            .find(PROBE_COSTS_TITLE)
            .context("docs/BENCHMARKS.md has no probe cost table after the zoo")?;
    std::fs::write(&path, format!("{}{tables}{}", &doc[..start], &doc[end..]))?;
    eprintln!("bench: wrote the zoo's tables into {}", path.display());
    print!("{tables}");
    Ok(())
}

/// What the sections measured apart (first finding, forecast) run: racewatch's release build,
/// the native demo, the Python interpreter and the seed-like worker.
struct Targets {
    racewatch: String,
    demo: String,
    interpreter: String,
    worker: String,
}

impl Targets {
    fn build() -> Result<Targets> {
        if !crate::is_root() {
            bail!("the benchmark loads BPF programs: run it as root");
        }
        let racewatch = build_racewatch()?.to_string_lossy().into_owned();
        let demo = build_demos()?.to_string_lossy().into_owned();
        let worker = workspace_root()
            .join("demo/worker.py")
            .to_string_lossy()
            .into_owned();
        let interpreter = ask_python("import sys; print(sys.executable)")?;
        Ok(Targets {
            racewatch,
            demo,
            interpreter,
            worker,
        })
    }
}

/// `cargo xtask bench --first-finding`: the time-to-first-finding table alone, put in
/// docs/BENCHMARKS.md in place of the one there (or before the zoo's tables).
pub fn run_first_finding(runs: usize) -> Result<()> {
    let Targets {
        racewatch,
        demo,
        interpreter,
        worker,
    } = Targets::build()?;
    let mut section = String::new();
    crate::first_finding::run(&racewatch, &demo, &interpreter, &worker, runs, &mut section)?;
    let path = workspace_root().join("docs/BENCHMARKS.md");
    let doc = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let zoo = doc.find("\n### The zoo").context(
        "docs/BENCHMARKS.md has no zoo table to put the section before: run the whole bench",
    )?;
    let start = doc.find(crate::first_finding::TITLE).unwrap_or(zoo);
    std::fs::write(&path, format!("{}{section}{}", &doc[..start], &doc[zoo..]))?;
    eprintln!(
        "bench: wrote the time to the first finding into {}",
        path.display()
    );
    print!("{section}");
    Ok(())
}

/// Seconds of each run of the forecast's sweep: long enough for a few hundred windows.
const FORECAST_SECONDS: f64 = 8.0;

/// `cargo xtask bench --forecast`: the hazard forecast against what happens, into
/// docs/HAZARD.md.
pub fn run_forecast(seconds: f64) -> Result<()> {
    let Targets {
        racewatch,
        demo,
        interpreter,
        worker,
    } = Targets::build()?;
    crate::forecast::run(&racewatch, &demo, &interpreter, &worker, seconds)
}

/// Every zoo cache, unobserved and under `racewatch watch` given its three functions alone (and
/// `--miss-ret` for a sentinel integer), and under the `baseline` build too when given, in one
/// table per load.
fn zoo(
    racewatch: &str,
    baseline: Option<&Path>,
    runs: usize,
    seconds: f64,
    doc: &mut String,
) -> Result<()> {
    let builds = crate::zoo::builds()?;
    let baseline = baseline.map(|b| b.to_string_lossy().into_owned());
    // The baseline is measured on the first load, where a service would see a change; the
    // stress table alone keeps the bench's length.
    for (i, load) in ZOO_LOADS.iter().enumerate() {
        let baseline = baseline.as_deref().filter(|_| i == 0);
        zoo_table(racewatch, baseline, &builds, load, runs, seconds, doc)?;
    }
    Ok(())
}

fn zoo_table(
    racewatch: &str,
    baseline: Option<&str>,
    builds: &[crate::zoo::Build],
    load: &ZooLoad,
    runs: usize,
    seconds: f64,
    doc: &mut String,
) -> Result<()> {
    let (base_head, base_rule) = if baseline.is_some() {
        (
            " baseline build: ratio | baseline build: traps per lookup |",
            "---|---|",
        )
    } else {
        ("", "")
    };
    writeln!(
        doc,
        "\n### {}\n\n\
         Each cache as a release build makes it, watched as a user would: `racewatch watch` given \
         its clear, update and lookup functions. {} Traps per lookup: lookup probe hits per \
         lookup (a miss path traps on misses alone; where a lookup's code has no instruction \
         only misses reach, racewatch probes it once where its result is known).\n\n\
         | build | lookups/s unobserved | lookups/s watched | ratio to unobserved | misses ratio | traps per lookup | events lost (most in a run) |{base_head}\n\
         |---|---|---|---|---|---|---|{base_rule}",
        load.title, load.what
    )?;
    let secs = seconds.to_string();
    for b in builds {
        let w = Workload {
            title: b.name.clone(),
            short: b.name.clone(),
            command: [b.binary.to_string_lossy().into_owned(), secs.clone()]
                .into_iter()
                .chain(load.args.iter().map(|a| a.to_string()))
                .collect(),
            truth_prefix: "cache_demo: ",
            rate: "lookups",
            misses: "misses",
            configs: std::iter::once(unobserved())
                .chain(
                    [("racewatch", Some(racewatch)), ("baseline build", baseline)]
                        .into_iter()
                        .filter_map(|(who, rw)| {
                            Some(racewatch_config(
                                rw?,
                                &format!("{who}: racewatch watch on {}", b.name),
                                &b.watch.iter().map(String::as_str).collect::<Vec<_>>(),
                            ))
                        }),
                )
                .collect(),
        };
        let results = measure(&w, runs, seconds)?;
        let ratios = ratios(&results);
        let (ratio, miss_ratio) = ratios[1];
        let speed = |r: &[Sample]| median(r.iter().map(|x| x.per_s).collect());
        let traps_of = |r: &[Sample]| median(r.iter().filter_map(|x| x.traps_per_lookup).collect());
        let traps = traps_of(&results[1]);
        let base = match (results.get(2), ratios.get(2)) {
            (Some(r), Some((ratio, _))) => format!(" {ratio:.3} | {:.4} |", traps_of(r)),
            _ => String::new(),
        };
        let lost = results[1]
            .iter()
            .filter_map(|x| x.lost)
            .reduce(f64::max)
            .unwrap_or(f64::NAN);
        writeln!(
            doc,
            "| {} | {:.0} | {:.0} | {ratio:.3} | {miss_ratio:.2} | {traps:.4} | {lost:.0} |{base}",
            b.name,
            speed(&results[0]),
            speed(&results[1]),
        )?;
    }
    Ok(())
}

const PROBE_COSTS_TITLE: &str = "\n### What one probe hit costs, by probed instruction";

/// `racewatch calibrate --json`, as a table.
fn probe_costs(racewatch: &str, doc: &mut String) -> Result<()> {
    let out = Command::new(racewatch)
        .args(["calibrate", "--json"])
        .output()
        .context("cannot run racewatch calibrate")?;
    let v: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "racewatch calibrate: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let floor = v["emulated_floor_ns"].as_f64().unwrap_or(f64::NAN);
    writeln!(doc, "{PROBE_COSTS_TITLE}\n")?;
    writeln!(
        doc,
        "From `racewatch calibrate` (racewatch's own programs on functions of its own, each opening \
         with the instruction shown; medians of 7 batches of ~20 ms; an unprobed call takes {:.1} ns). \
         The floor is the cheapest instruction the kernel emulates.\n",
        v["unprobed_call_ns"].as_f64().unwrap_or(f64::NAN)
    )?;
    writeln!(
        doc,
        "| first instruction | probe | the kernel | ns per hit | x emulated floor |"
    )?;
    writeln!(doc, "|---|---|---|---|---|")?;
    for r in v["rows"].as_array().into_iter().flatten() {
        let ns = r["ns_per_hit"].as_f64().unwrap_or(f64::NAN);
        writeln!(
            doc,
            "| `{}` | {} | {} | {:.0} | {:.2} |",
            r["instruction"].as_str().unwrap_or("?"),
            r["probe"].as_str().unwrap_or("?"),
            if r["emulated"] == true {
                "emulates it"
            } else {
                "single-steps it"
            },
            ns,
            ns / floor
        )?;
    }
    Ok(())
}

/// Where racewatch places each probe on the two demos (`-v --dry-run`).
fn placements(racewatch: &str, demo: &str, worker: &str, doc: &mut String) -> Result<()> {
    writeln!(doc, "\n### Where racewatch places its probes\n")?;
    writeln!(
        doc,
        "`racewatch ... -v --dry-run` on each demo: every probe sits on an instruction the kernel \
         emulates, past the single-stepped `endbr64` (native) or `sub` (CPython's `dict_clear`).\n"
    )?;
    let mut watch = vec!["watch", "-v", "--dry-run", "--miss-ret", "-1"];
    watch.extend(DEMO_PROBES);
    watch.extend(["--", demo]);
    let python = ["python", "-v", "--dry-run", "--", "python3", worker];
    for args in [&watch[..], &python[..]] {
        let out = Command::new(racewatch).args(args).output()?;
        writeln!(doc, "```")?;
        for line in String::from_utf8_lossy(&out.stderr).lines().filter(|l| {
            l.contains(" at 0x") || l.contains(" at its entry") || l.contains("closes its window")
        }) {
            writeln!(doc, "{line}")?;
        }
        writeln!(doc, "```")?;
    }
    Ok(())
}

/// The collector's capacity: the native demo with a window open almost all the time, so every
/// lookup (entry probed) is an event for userspace; more readers, more events a second.
fn capacity(racewatch: &str, demo: &str, doc: &mut String) -> Result<()> {
    writeln!(doc, "\n### The collector's capacity\n")?;
    writeln!(
        doc,
        "`racewatch watch` (every lookup's entry) on `cache_demo --gap-us 20000 --refresh-us 0`: the \
         cache is empty ~all the time, so nearly every lookup is an event the collector must drain \
         (2 MiB ring, drained every 10 ms or when half full). 3 s runs.\n"
    )?;
    writeln!(
        doc,
        "| readers | events delivered/s | events lost | lost share |"
    )?;
    writeln!(doc, "|---|---|---|---|")?;
    let report = std::env::temp_dir().join("racewatch-bench-capacity.ndjson");
    for readers in ["1", "2", "4", "8"] {
        let mut args = vec!["watch"];
        args.extend(DEMO_PROBES);
        let report_s = report.to_string_lossy().into_owned();
        args.extend(["--json", "-o", &report_s, "--", demo]);
        args.extend([
            "--seconds",
            "3",
            "--gap-us",
            "20000",
            "--refresh-us",
            "0",
            "--readers",
            readers,
        ]);
        Command::new(racewatch).args(&args).output()?;
        let s = summary_of(&report).context("no racewatch summary")?;
        let delivered = s["lookups_in_window"].as_f64().unwrap_or(f64::NAN);
        let lost = s["lost_events"].as_f64().unwrap_or(f64::NAN);
        let secs = s["duration_s"].as_f64().unwrap_or(f64::NAN);
        eprintln!("bench: capacity with {readers} readers: {delivered} delivered, {lost} lost");
        writeln!(
            doc,
            "| {readers} | {:.0} | {lost:.0} | {:.3}% |",
            delivered / secs,
            100.0 * lost / (delivered + lost)
        )?;
    }
    Ok(())
}

fn header(runs: usize, seconds: f64) -> Result<String> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mut s = String::new();
    writeln!(s, "# Benchmarks\n")?;
    writeln!(
        s,
        "Written by `cargo xtask bench --runs {runs} --seconds {seconds}` (kernel {}, {cpus} CPUs), with \
         the chart `docs/benchmarks.png`.",
        kernel.trim()
    )?;
    writeln!(
        s,
        "Each figure is the median over {runs} interleaved repetitions of {seconds} s runs; a ratio is \
         the median of per-repetition ratios to the unobserved run of the same repetition. Rates come \
         from each workload's own ground-truth line.\n"
    )?;
    writeln!(s, "![lookup rate as a ratio to unobserved](benchmarks.png)")?;
    Ok(s)
}

/// Where the hand-kept part of docs/BENCHMARKS.md begins.
const HISTORY: &str = "## History";

const FOOTER: &str = "
## Reading the numbers

- `racewatch python` probes `dict_clear` (past its single-stepped `sub`), the refill's entry and
  return (`dict_update`, `dict_ior`; `OrderedDict`'s own clear and refills too) and
  `_PyErr_SetKeyError`; the hazard report counts dict
  lookups in one burst a second, as long as the cost budget (`--budget`, 1% of the target's CPU
  time) allows. Ordinary dict lookups otherwise never trap, which is why the worker keeps near
  its unobserved rate; bpftrace probing every dict lookup does not.
- `racewatch watch --miss-ret` probes the lookup's miss path only (the jump after the miss value
  is set, found by decoding the function), so lookups that find their key never trap. Without
  `--miss-ret`, or with `--probe-returns`, every lookup traps once or twice: on this demo, built
  with CET, racewatch places the entry probe on the `push` after `endbr64` (emulated) where
  bpftrace probes the `endbr64` itself (single-stepped).
- The miss columns show the heisenbug: the more an observer slows the reader, the fewer misses
  it has to find. strace rows show what the seed's engineer saw.
- The last column is racewatch's own report (`self_cost.added_share` in its summary): per-hit
  costs measured on its own functions before the probes are attached, times each probe's hits,
  over the target's CPU time.
- `nopl` (5 bytes) is cheaper than any trap on kernels that optimize uprobes on it (6.16+ turn
  such a probe into a call); racewatch does not rely on it, since older kernels single-step it.
- The first zoo table is the cost a service would see. A build probed once per lookup (traps
  per lookup 1.0: code with no instruction that only misses reach, clang's
  default-then-overwrite shapes) pays a trap at every lookup and keeps 0.18-0.44 of its rate. On
  the miss path, readers keep 0.72-1.02: what remains is the race itself made more frequent (the
  misses ratio, most often 15-460 times the unobserved misses). A miss probe traps inside the lookup's
  critical section, before the unlock, so that the window it reads is the one the miss saw; the
  refill waits behind it for the lock, the window lasts longer, and the other reader misses too
  (a single-stepped miss site, a `mov` where the compiler put nothing else on the miss path,
  costs ~15 µs there). The refill no longer adds to it: its window closes at its last call, and
  with no trap at its entry (the baseline build's) the gcc builds went from 0.27-0.56 to
  0.73-0.85. The Rust refills, whose unlock is inlined, are still probed at their entry.
- The second zoo table is a stress case more than a cost figure. Unobserved, readers that only
  look up take the cache's lock so often that the refill waits for it and the empty window
  lasts until it gets it: those runs miss millions of times a second, each miss a cheap lookup
  of an empty table. A miss probe sits before the unlock (so that the window it reads is the
  one the miss saw), and its trap inside the lock lets the refill in: windows shrink, misses
  fall to a few percent of the unobserved count (the misses ratio), and the readers spend their
  time on hits, which cost more than misses. The lookup rate then moves with the race's
  dynamics as much as with racewatch's cost.
";
