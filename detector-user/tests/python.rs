//! `racewatch python` against the seed-like worker, in the kernel (root), and its bad input.
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use common::*;

/// Runs the worker under racewatch: (exit code, worker truth, alerts, summary).
fn watch_worker(
    worker_args: &[&str],
) -> (
    i32,
    std::collections::HashMap<String, u64>,
    Vec<serde_json::Value>,
    serde_json::Value,
) {
    let out = temp_file("python.ndjson");
    let worker = worker();
    let mut args = vec![
        "python",
        "--json",
        "-o",
        out.to_str().unwrap(),
        "--",
        "python3",
        &worker,
    ];
    args.extend(worker_args);
    let o = racewatch(&args);
    let err = stderr(&o);
    let text =
        std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("no output ({e}); stderr:\n{err}"));
    let (alerts, summary) = parse_ndjson(&text);
    (
        o.status.code().unwrap_or(-1),
        worker_truth(&err),
        alerts,
        summary,
    )
}

#[test]
#[ignore = "root"]
fn every_keyerror_of_the_window_is_reported_with_its_key() {
    let (code, truth, alerts, summary) = watch_worker(&["--seconds", "2"]);
    let keyerrors = truth["keyerrors"];
    assert!(
        keyerrors > 0,
        "the worker raised no KeyError to find; summary: {summary}"
    );
    assert_eq!(summary["misses_in_window"], keyerrors, "summary: {summary}");
    assert_eq!(summary["lost_events"], 0, "summary: {summary}");
    assert_eq!(
        summary["windows"], truth["refreshes"],
        "one window per refresh; summary: {summary}"
    );
    assert_eq!(alerts.len() as u64, keyerrors);
    let cache = &alerts[0]["cache"];
    for a in &alerts {
        assert_eq!(a["miss"], true);
        assert_eq!(&a["cache"], cache, "one dict is the cache: {a}");
        assert_ne!(a["reader_tid"], a["writer_tid"]);
        let key = a["key"].as_str().unwrap_or_else(|| panic!("no key in {a}"));
        assert!(
            key.starts_with("'k")
                && key.ends_with('\'')
                && key[2..key.len() - 1].parse::<u32>().is_ok(),
            "key {key}"
        );
        assert!(a["open_for_ns"].as_u64().unwrap() > 0);
    }
    assert_eq!(code, 1);
}

#[test]
#[ignore = "root"]
fn build_then_swap_has_no_window() {
    let (code, truth, alerts, summary) = watch_worker(&["--seconds", "1", "--fixed"]);
    assert!(truth["lookups"] > 0);
    assert_eq!(truth["keyerrors"], 0);
    assert!(alerts.is_empty(), "{alerts:?}");
    assert_eq!(summary["windows"], 0);
    assert_eq!(code, 0);
}

#[test]
#[ignore = "root"]
fn keyerrors_the_window_did_not_cause_are_not_counted() {
    // Absent keys are looked up all the time, and another dict raises KeyError all the time,
    // also while the cache's window is open.
    let (_, truth, alerts, summary) =
        watch_worker(&["--seconds", "2", "--absent-every", "20", "--other-dict"]);
    assert!(
        truth["absent_keyerrors"] > 0 && truth["other_keyerrors"] > 0,
        "{truth:?}"
    );
    assert_eq!(
        summary["misses_in_window"], truth["keyerrors"],
        "summary: {summary}; truth: {truth:?}"
    );
    assert!(alerts.iter().all(|a| {
        a["key"]
            .as_str()
            .is_some_and(|k| !k.starts_with("'absent-"))
    }));
    assert_eq!(summary["lost_events"], 0);
}

#[test]
#[ignore = "root"]
fn attaches_to_a_running_worker_by_pid() {
    // The worker swaps until SIGUSR1, so every KeyError it counts happens while attached.
    let worker = Command::new("python3")
        .args([
            &worker(),
            "--bug-on-signal",
            "--seconds",
            "2",
            "--gap-ms",
            "0.1",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = worker.id().to_string();
    // Let the interpreter map libpython and start its threads.
    std::thread::sleep(std::time::Duration::from_millis(500));
    let out = temp_file("python-pid.ndjson");
    let mut rw = Command::new(RACEWATCH)
        .args(["python", "--json", "-o", out.to_str().unwrap(), "-p", &pid])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(rw.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        line.contains("probes attached"),
        "racewatch did not attach: {line}"
    );
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(worker.id() as i32, libc::SIGUSR1) };
    let worker_out = worker.wait_with_output().unwrap();
    let status = rw.wait().unwrap();
    let truth = worker_truth(&String::from_utf8_lossy(&worker_out.stderr));
    let (_, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    assert!(truth["keyerrors"] > 0, "the worker raised no KeyError");
    assert_eq!(
        summary["misses_in_window"], truth["keyerrors"],
        "summary: {summary}"
    );
    assert_eq!(summary["lost_events"], 0);
    assert_eq!(summary["ended"], "target exited");
    assert_eq!(status.code(), Some(1));
}

#[test]
fn a_process_that_is_not_python_is_refused() {
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    let pid = sleeper.id().to_string();
    let o = racewatch(&["python", "-p", &pid]);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("process {pid} is not a CPython process")),
        "{err}"
    );
}

#[test]
fn a_stripped_interpreter_names_what_is_missing() {
    let stripped = "/usr/bin/python3.11";
    if !std::path::Path::new(stripped).exists() {
        eprintln!("skipped: {stripped} is not installed");
        return;
    }
    let o = racewatch(&["python", "--", stripped, "-c", "pass"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("lacks the function `dict_clear`"), "{err}");
    assert!(err.contains("use a CPython built with symbols"), "{err}");
}

#[test]
fn a_missing_script_is_named() {
    let o = racewatch(&["python", "--", "python3", "/nonexistent/worker.py"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("script not found: /nonexistent/worker.py"),
        "{err}"
    );
}
