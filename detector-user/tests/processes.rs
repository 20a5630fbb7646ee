//! Every process of a service: racewatch follows the workers a pool forks or spawns, counts each
//! one's misses against its own ground truth, and never reports clean for a process it did not
//! watch (root).
mod common;

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use serde_json::Value;

/// The pool's workers under racewatch python, launched: (exit code, each worker's truth, alerts,
/// summary, the launched pid).
fn watch_pool(pool_args: &[&str]) -> (i32, Vec<HashMap<String, u64>>, Vec<Value>, Value, u64) {
    let out = temp_file("pool.ndjson");
    let worker = worker();
    let mut args = vec!["python", "--json", "-o", out.to_str().unwrap(), "--"];
    args.extend(["python3", &worker]);
    args.extend(pool_args);
    let o = racewatch(&args);
    let err = stderr(&o);
    let text =
        std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("no output ({e}); stderr:\n{err}"));
    let (alerts, summary) = parse_ndjson(&text);
    let launched = err
        .lines()
        .find_map(|l| l.strip_prefix("racewatch: launched pid "))
        .and_then(|l| l.split(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no launched pid in:\n{err}"));
    (
        o.status.code().unwrap_or(-1),
        workers_truth(&err),
        alerts,
        summary,
        launched,
    )
}

/// Checks the summary's per-process entries against each worker's own count, exactly;
/// `racy_from_start`: every refresh of the workers opened a window.
fn assert_per_process(
    truths: &[HashMap<String, u64>],
    summary: &Value,
    parent: Option<u64>,
    racy_from_start: bool,
) {
    let processes = summary["processes"].as_array().expect("processes");
    let total: u64 = truths.iter().map(|t| t["keyerrors"]).sum();
    assert!(total > 0, "the workers raised no KeyError: {summary}");
    assert_eq!(summary["misses_in_window"], total, "{summary}");
    assert_eq!(summary["lost_events"], 0, "{summary}");
    assert_eq!(summary["unwatched"], serde_json::json!([]), "{summary}");
    for t in truths {
        let pid = t["pid"];
        let entry = processes
            .iter()
            .find(|p| p["pid"] == pid)
            .unwrap_or_else(|| panic!("worker {pid} is not in the summary: {summary}"));
        assert_eq!(entry["misses_in_window"], t["keyerrors"], "{entry}");
        // Every racy refresh is a window; the interpreter clears a few dicts of its own at a
        // fork.
        if racy_from_start {
            assert!(
                entry["windows"].as_u64().unwrap() >= t["refreshes"],
                "{entry}"
            );
        }
        assert_eq!(entry["comm"], "python3", "{entry}");
        if let Some(parent) = parent {
            assert_eq!(entry["parent"], parent, "{entry}");
        }
    }
}

#[test]
#[ignore = "root"]
fn every_forked_worker_of_a_pool_is_watched_and_counted_apart() {
    // Two workers forked after the cache was built: their caches share one address, each in its
    // own process.
    let (code, truths, alerts, summary, launched) =
        watch_pool(&[&["--workers", "2"][..], &RACY_WORKER].concat());
    assert_eq!(truths.len(), 2, "{summary}");
    assert_per_process(&truths, &summary, Some(launched), true);
    // Two workers, and whatever a launcher (a pyenv shim) forked before it exec'd python.
    assert!(summary["forks"].as_u64().unwrap() >= 2, "{summary}");
    let pids: Vec<u64> = truths.iter().map(|t| t["pid"]).collect();
    for a in &alerts {
        assert!(pids.contains(&a["pid"].as_u64().unwrap()), "{a}");
    }
    assert_eq!(code, 1);
}

#[test]
#[ignore = "root"]
fn every_spawned_worker_of_a_pool_is_watched() {
    // Fork then exec of the same interpreter, as multiprocessing's spawn start method does.
    let (code, truths, _, summary, launched) =
        watch_pool(&[&["--workers", "2", "--spawn"][..], &RACY_WORKER].concat());
    assert_eq!(truths.len(), 2, "{summary}");
    assert_per_process(&truths, &summary, Some(launched), true);
    assert_eq!(code, 1);
}

#[test]
#[ignore = "root"]
fn a_fixed_pool_reports_nothing() {
    let (code, truths, alerts, summary, _) =
        watch_pool(&["--workers", "2", "--seconds", "1", "--fixed"]);
    assert_eq!(truths.len(), 2);
    // The interpreter clears a few dicts of its own at a fork (threading's bookkeeping): those
    // windows are real, but no lookup falls in them.
    assert!(alerts.is_empty(), "{alerts:?}");
    assert_eq!(summary["lookups_in_window"], 0, "{summary}");
    assert_eq!(summary["unwatched"], serde_json::json!([]), "{summary}");
    assert_eq!(code, 0, "{summary}");
}

/// The children of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
#[ignore = "root"]
fn attaching_to_a_pool_master_watches_the_workers_it_already_forked() {
    // The workers exist before racewatch attaches to their master; each starts its race on
    // SIGUSR1, sent once racewatch is attached, so every KeyError is one racewatch can see.
    let master = Command::new("python3")
        .args([&worker(), "--workers", "2", "--bug-on-signal"])
        .args(RACY_WORKER)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let workers = loop {
        let c = children(master.id());
        if c.len() == 2 || std::time::Instant::now() > deadline {
            break c;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(workers.len(), 2, "the pool did not fork its workers");
    std::thread::sleep(Duration::from_millis(300));
    let out = temp_file("pool-pid.ndjson");
    let pid = master.id().to_string();
    let (mut rw, _) =
        spawn_attached(&["python", "--json", "-o", out.to_str().unwrap(), "-p", &pid]);
    for w in &workers {
        // SAFETY: plain kill(2) of the test's own grandchildren.
        unsafe { libc::kill(*w as i32, libc::SIGUSR1) };
    }
    let master_pid = u64::from(master.id());
    let master_out = master.wait_with_output().unwrap();
    let status = rw.wait().unwrap();
    let truths = workers_truth(&String::from_utf8_lossy(&master_out.stderr));
    let (_, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(truths.len(), 2, "{summary}");
    assert_per_process(&truths, &summary, Some(master_pid), false);
    assert_eq!(summary["forks"], 0, "forked before the attach: {summary}");
    assert_eq!(status.code(), Some(1), "{summary}");
}

/// Each worker's own counts, once it has ended.
fn truths_of(workers: Vec<std::process::Child>) -> Vec<HashMap<String, u64>> {
    workers
        .into_iter()
        .map(|w| {
            worker_truth(&String::from_utf8_lossy(
                &w.wait_with_output().unwrap().stderr,
            ))
        })
        .collect()
}

#[test]
#[ignore = "root"]
fn system_wide_python_watches_processes_started_after_it() {
    // Two unrelated workers started after racewatch, neither its child.
    let run = HostRun::start(&["python"], "host-python.ndjson");
    let workers: Vec<_> = (0..2)
        .map(|_| {
            Command::new("python3")
                .arg(worker())
                .args(RACY_WORKER)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let truths = truths_of(workers);
    let (code, summary) = run.stop();
    assert_eq!(summary["ended"], "interrupted (SIGINT)", "{summary}");
    assert_per_process(&truths, &summary, None, true);
    assert_eq!(code, Some(1), "{summary}");
}

#[test]
#[ignore = "root"]
fn system_wide_python_meets_each_interpreter_started_after_it() {
    // Workers on three interpreter files, started after racewatch: each file is met as its
    // process starts, and the workers race only once racewatch says it watches their file.
    let run = HostRun::start(&["python"], "host-interpreters.ndjson");
    let interpreters = [
        "python3",
        "/root/.pyenv/versions/3.12.1/bin/python3.12",
        "/usr/bin/python3.11",
    ];
    let workers: Vec<_> = interpreters
        .iter()
        .map(|python| {
            Command::new(python)
                .arg(worker())
                .args(RACY_WORKER)
                .arg("--bug-on-signal")
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{python}: {e}"))
        })
        .collect();
    // python3 is the interpreter racewatch planned at its start (none ran then); the others are
    // met later.
    let met: Vec<String> = (0..2)
        .map(|_| run.wait_for("now also watching every process that maps"))
        .collect();
    for w in &workers {
        // SAFETY: plain kill(2) of the test's own child.
        unsafe { libc::kill(w.id() as i32, libc::SIGUSR1) };
    }
    let truths = truths_of(workers);
    let (code, summary) = run.stop();
    assert_eq!(summary["lost_events"], 0, "{summary}");
    // Each file met after the start says its first processes ran unwatched for a while.
    let unwatched = summary["unwatched"].as_array().expect("unwatched");
    assert_eq!(unwatched.len(), met.len(), "{summary}");
    for t in &truths[1..] {
        let said = format!("process {} ran", t["pid"]);
        assert!(
            unwatched.iter().any(|l| {
                let l = l.as_str().unwrap_or("");
                l.contains(&said) && l.contains("before racewatch met that file")
            }),
            "no line for worker {}: {summary}",
            t["pid"]
        );
    }
    let processes = summary["processes"].as_array().expect("processes");
    for t in &truths {
        assert!(t["keyerrors"] > 0, "worker {t:?} did not race");
        let entry = processes
            .iter()
            .find(|p| p["pid"] == t["pid"])
            .unwrap_or_else(|| panic!("worker {} is not in the summary: {summary}", t["pid"]));
        assert_eq!(entry["misses_in_window"], t["keyerrors"], "{entry}");
    }
    let total: u64 = truths.iter().map(|t| t["keyerrors"]).sum();
    assert_eq!(summary["misses_in_window"], total, "{summary}");
    assert_eq!(code, Some(1), "{summary}");
}

#[test]
#[ignore = "root"]
fn system_wide_watch_counts_each_process_that_maps_the_binary() {
    let demo = cache_demo().to_str().unwrap();
    let mut args = vec!["watch", "--binary", demo];
    args.extend(DEMO_PROBES);
    args.extend(["--miss-ret", "-1"]);
    let run = HostRun::start(&args, "host-watch.ndjson");
    let demos: Vec<_> = (0..2)
        .map(|_| {
            Command::new(demo)
                // Readers that pause between lookups: two demos racing flat out on two CPUs
                // leave the debug build racewatch is tested as too little time to read.
                .args(["--seconds", "1", "--gap-us", "100", "--pause-us", "20"])
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let truths: Vec<(u32, (u64, u64, u64))> = demos
        .into_iter()
        .map(|d| {
            let pid = d.id();
            (
                pid,
                demo_truth(&String::from_utf8_lossy(
                    &d.wait_with_output().unwrap().stderr,
                )),
            )
        })
        .collect();
    let (code, summary) = run.stop();
    assert_eq!(summary["lost_events"], 0, "{summary}");
    let processes = summary["processes"].as_array().expect("processes");
    let mut total = 0;
    for (pid, (_, misses, refreshes)) in &truths {
        let entry = processes
            .iter()
            .find(|p| p["pid"] == *pid)
            .unwrap_or_else(|| panic!("demo {pid} is not in the summary: {summary}"));
        assert_eq!(entry["misses_in_window"], *misses, "{entry}");
        assert_eq!(entry["windows"], *refreshes, "{entry}");
        total += misses;
    }
    assert!(total > 0, "{summary}");
    assert_eq!(summary["misses_in_window"], total, "{summary}");
    assert_eq!(summary["lost_events"], 0, "{summary}");
    assert_eq!(code, Some(1), "{summary}");
}

/// racewatch's resident memory, from /proc.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[test]
#[ignore = "root"]
fn churn_of_short_lived_processes_leaves_memory_flat_and_a_long_one_exact() {
    // System-wide on the native demo: a long racy process beside hundreds of short ones, each
    // with windows of its own, started and ended one after another.
    let demo = cache_demo().to_str().unwrap();
    let mut args = vec!["watch", "--binary", demo];
    args.extend(DEMO_PROBES);
    args.extend(["--miss-ret", "-1"]);
    let run = HostRun::start(&args, "churn.ndjson");
    let long = Command::new(demo)
        // A reader that pauses between lookups: the debug build racewatch is tested as keeps up
        // with its misses beside the churn.
        .args(["--seconds", "12", "--gap-us", "100", "--pause-us", "20"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let spawn_batch = |n: usize| {
        for _ in 0..n {
            let status = Command::new(demo)
                .args(["--seconds", "0.02", "--gap-us", "50"])
                .stderr(Stdio::null())
                .status()
                .unwrap();
            assert!(status.success());
        }
    };
    spawn_batch(50);
    let early = rss_kib(run.child.id());
    spawn_batch(250);
    let late = rss_kib(run.child.id());
    let (_, long_misses, _) = demo_truth(&String::from_utf8_lossy(
        &long.wait_with_output().unwrap().stderr,
    ));
    let long_pid = {
        let (_, summary) = {
            let (code, summary) = run.stop();
            assert_eq!(code, Some(1), "{summary}");
            (code, summary)
        };
        let processes = summary["processes"].as_array().unwrap();
        assert!(
            processes.len() >= 250,
            "the short ones had windows too: {}",
            processes.len()
        );
        assert_eq!(summary["lost_events"], 0, "{summary}");
        processes
            .iter()
            .find(|p| p["misses_in_window"] == long_misses)
            .map(|p| p["pid"].clone())
    };
    assert!(
        long_pid.is_some(),
        "no process has the long one's {long_misses} misses"
    );
    // Each ended process leaves only its counts: 250 more processes grow racewatch by far less
    // than a mebibyte.
    assert!(
        late < early + 1024,
        "racewatch grew from {early} KiB to {late} KiB over 250 processes"
    );
}

#[test]
#[ignore = "root"]
fn left_on_the_output_file_is_reopened_on_sighup_for_logrotate() {
    // System-wide, as a service runs it: logrotate moves the file away and sends SIGHUP.
    let run = HostRun::start(&["python"], "rotated.ndjson");
    let moved = run.out.with_extension("1");
    std::fs::rename(&run.out, &moved).unwrap();
    // SAFETY: plain kill(2) of the test's own child.
    unsafe { libc::kill(run.child.id() as i32, libc::SIGHUP) };
    // The reopen happens at the next write: the worker's race makes some.
    let worker = Command::new("python3")
        .args([
            &worker(),
            "--seconds",
            "1",
            "--gap-ms",
            "0.1",
            "--refresh-ms",
            "20",
        ])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        run.out.exists(),
        "SIGHUP did not reopen {}",
        run.out.display()
    );
    let truth = worker_truth(&String::from_utf8_lossy(&worker.stderr));
    let (code, summary) = run.stop();
    assert_eq!(
        summary["ended"], "interrupted (SIGINT)",
        "SIGHUP did not end it: {summary}"
    );
    assert_eq!(summary["misses_in_window"], truth["keyerrors"], "{summary}");
    assert_eq!(code, Some(1), "{summary}");
}

#[test]
#[ignore = "root"]
fn a_process_that_exits_while_the_probes_go_in_is_not_reported_clean() {
    let mut target = Command::new("python3")
        .args(["-c", "import time; time.sleep(60)"])
        .spawn()
        .unwrap();
    // Once the interpreter maps its files.
    std::thread::sleep(Duration::from_millis(500));
    let out = temp_file("exited-early.ndjson");
    let rw = Command::new(RACEWATCH)
        .args(["python", "--json", "-o", out.to_str().unwrap(), "-p"])
        .arg(target.id().to_string())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // racewatch holds the target's pidfd from before its probes go in, which take a second or
    // more (verifying and calibrating them): the target ends in between.
    let pidfd = || {
        std::fs::read_dir(format!("/proc/{}/fd", rw.id()))
            .into_iter()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .any(|l| l.to_string_lossy().contains("pidfd"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !pidfd() {
        assert!(
            std::time::Instant::now() < deadline,
            "racewatch never opened a pidfd"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    target.kill().unwrap();
    let o = rw.wait_with_output().unwrap();
    target.wait().unwrap();
    let err = stderr(&o);
    let (_, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    let unwatched = summary["unwatched"].to_string();
    assert!(
        unwatched.contains("exited before every probe was attached"),
        "{summary}\n{err}"
    );
    assert_eq!(o.status.code(), Some(4), "{summary}\n{err}");
}
