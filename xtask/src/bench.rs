//! `cargo xtask bench`: racewatch's cost, as ratios to the same workload unobserved in the same
//! run. Configurations are interleaved (A B C, A B C, ...) so drift on a noisy machine hits them
//! alike; each figure is the median over repetitions of the per-repetition ratio.
use std::{
    collections::HashMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    build_racewatch,
    demo::{DEMO_PROBES, build_demos},
    workspace_root,
};

/// One way of running a workload.
struct Config {
    name: &'static str,
    /// Program and arguments placed before the workload's command line.
    prefix: Vec<String>,
}

struct Workload {
    title: &'static str,
    /// The command, without any observer.
    command: Vec<String>,
    /// Name of the ground-truth line's prefix and its rate counters.
    truth_prefix: &'static str,
    lookups: &'static str,
    misses: &'static str,
    configs: Vec<Config>,
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs `w` under every configuration `runs` times, interleaved; returns per configuration the
/// (lookups/s, misses/s) of each repetition.
fn measure(w: &Workload, runs: usize, seconds: f64) -> Result<Vec<Vec<(f64, f64)>>> {
    let mut results = vec![Vec::new(); w.configs.len()];
    for rep in 0..runs {
        for (i, c) in w.configs.iter().enumerate() {
            let argv: Vec<&String> = c.prefix.iter().chain(&w.command).collect();
            let out = Command::new(argv[0])
                .args(&argv[1..])
                .output()
                .with_context(|| format!("cannot run {argv:?}"))?;
            let stderr = String::from_utf8_lossy(&out.stderr);
            let t = truth(&stderr, w.truth_prefix)
                .with_context(|| format!("{} under {}", w.title, c.name))?;
            let rate = |k: &str| t.get(k).copied().unwrap_or(f64::NAN) / seconds;
            results[i].push((rate(w.lookups), rate(w.misses)));
            eprintln!(
                "bench: {} [{}] rep {}: {:.0} lookups/s",
                w.title,
                c.name,
                rep + 1,
                rate(w.lookups)
            );
        }
    }
    Ok(results)
}

fn table(w: &Workload, results: &[Vec<(f64, f64)>], out: &mut String) -> Result<()> {
    writeln!(out, "\n### {}\n", w.title)?;
    writeln!(
        out,
        "| configuration | lookups/s (median) | ratio to unobserved | {}/s (median) |",
        w.misses
    )?;
    writeln!(out, "|---|---|---|---|")?;
    let base = &results[0];
    for (c, r) in w.configs.iter().zip(results) {
        let ratio = median(r.iter().zip(base).map(|(a, b)| a.0 / b.0).collect());
        let lookups = median(r.iter().map(|x| x.0).collect());
        let misses = median(r.iter().map(|x| x.1).collect());
        writeln!(
            out,
            "| {} | {:.0} | {:.3} | {:.1} |",
            c.name, lookups, ratio, misses
        )?;
    }
    Ok(())
}

fn tool(name: &str) -> Option<PathBuf> {
    which::which(name).ok()
}

fn string_vec(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

pub fn run(runs: usize, seconds: f64) -> Result<()> {
    if !crate::is_root() {
        bail!("the benchmark loads BPF programs: run it as root");
    }
    let racewatch = build_racewatch()?.to_string_lossy().into_owned();
    let demo = build_demos()?.to_string_lossy().into_owned();
    let secs = seconds.to_string();
    let worker = workspace_root()
        .join("demo/worker.py")
        .to_string_lossy()
        .into_owned();
    let rw = |args: &[&str]| Config {
        name: "",
        prefix: [
            &[racewatch.as_str()][..],
            args,
            &["-o", "/dev/null", "--json", "--"],
        ]
        .concat()
        .iter()
        .map(|s| s.to_string())
        .collect(),
    };
    let named = |name, c: Config| Config { name, ..c };
    let probes = DEMO_PROBES;
    let mut native = vec![
        Config {
            name: "unobserved",
            prefix: vec![],
        },
        named(
            "racewatch watch (lookup entry)",
            rw(&[&["watch"][..], &probes].concat()),
        ),
        named(
            "racewatch watch --miss-ret -1 (entry + return)",
            rw(&[&["watch"][..], &probes, &["--miss-ret", "-1"]].concat()),
        ),
    ];
    let mut python = vec![
        Config {
            name: "unobserved",
            prefix: vec![],
        },
        named("racewatch python", rw(&["python"])),
    ];
    if let Some(strace) = tool("strace") {
        let s = strace.to_string_lossy().into_owned();
        python.push(Config {
            name: "strace -f",
            prefix: vec![s.clone(), "-f".into(), "-o".into(), "/dev/null".into()],
        });
        native.push(Config {
            name: "strace -f",
            prefix: vec![s, "-f".into(), "-o".into(), "/dev/null".into()],
        });
    }
    let workloads = [
        Workload {
            title: "Python worker (demo/worker.py, the seed's clear()+update() cache)",
            command: string_vec(&["python3", &worker, "--seconds", &secs]),
            truth_prefix: "worker: ",
            lookups: "lookups",
            misses: "keyerrors",
            configs: python,
        },
        Workload {
            title: "Native demo (demo/cache_demo.cpp, a locked C++ cache)",
            command: string_vec(&[&demo, "--seconds", &secs]),
            truth_prefix: "cache_demo: ",
            lookups: "lookups",
            misses: "misses",
            configs: native,
        },
    ];
    let mut doc = header(runs, seconds)?;
    for w in &workloads {
        let results = measure(w, runs, seconds)?;
        table(w, &results, &mut doc)?;
    }
    doc.push_str(FOOTER);
    let path = workspace_root().join("docs/BENCHMARKS.md");
    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
    std::fs::write(&path, &doc)?;
    eprintln!("bench: wrote {}", path.display());
    print!("{doc}");
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
        "Written by `cargo xtask bench --runs {runs} --seconds {seconds}` (kernel {}, {cpus} CPUs).",
        kernel.trim()
    )?;
    writeln!(
        s,
        "Each figure is the median over {runs} interleaved repetitions of {seconds} s runs; the ratio is"
    )?;
    writeln!(
        s,
        "the median of per-repetition ratios of the workload's own lookup rate to the unobserved run of"
    )?;
    writeln!(
        s,
        "the same repetition. Rates come from each workload's own ground-truth line."
    )?;
    Ok(s)
}

const FOOTER: &str = "
## Reading the numbers

- `racewatch python` probes only `dict_clear`, the refill's entry and return (`dict_update`,
  `dict_ior`) and `_PyErr_SetKeyError`: ordinary dict lookups never trap, which is why the
  worker's lookup rate stays at the unobserved rate.
- `racewatch watch` probes every lookup of the native cache (entry, and return with
  `--miss-ret`), so each lookup pays one or two uprobe traps; in-window lookups alone cross
  to userspace.
- strace rows show what the seed's engineer saw: the observed program slows down enough that
  the race stops happening (compare the miss rates).
";
