//! `racewatch watch` against the native demo, in the kernel (root).
mod common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use common::*;

/// Runs the demo under racewatch with `watch_args` and returns (racewatch exit code, demo truth,
/// alerts, summary).
fn watch_demo(
    demo_args: &[&str],
    watch_args: &[&str],
) -> (
    i32,
    (u64, u64, u64),
    Vec<serde_json::Value>,
    serde_json::Value,
) {
    let out = temp_file("watch.ndjson");
    let out_s = out.to_string_lossy().into_owned();
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(watch_args);
    args.extend(["--json", "-o", &out_s, "--", cache_demo().to_str().unwrap()]);
    args.extend(demo_args);
    let o = racewatch(&args);
    let err = stderr(&o);
    let text = std::fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("no output file ({e}); stderr:\n{err}"));
    let (alerts, summary) = parse_ndjson(&text);
    (
        o.status.code().unwrap_or(-1),
        demo_truth(&err),
        alerts,
        summary,
    )
}

#[test]
#[ignore = "root"]
fn every_miss_in_a_window_is_reported_exactly() {
    // A short gap in each window keeps the race firing on a loaded machine.
    let (code, (_, misses, refreshes), alerts, summary) =
        watch_demo(&["--seconds", "2", "--gap-us", "20"], &["--miss-ret", "-1"]);
    assert!(
        misses > 0,
        "the demo produced no miss to find; summary: {summary}"
    );
    assert_eq!(summary["misses_in_window"], misses, "summary: {summary}");
    assert_eq!(summary["lost_events"], 0, "summary: {summary}");
    assert_eq!(
        summary["windows"], refreshes,
        "one window per refresh; summary: {summary}"
    );
    // One alert per stack pair; the pairs' counts add up to every lookup and miss.
    let pairs = summary["pairs"].as_array().expect("pairs in the summary");
    assert_eq!(alerts.len(), pairs.len(), "one alert per pair: {summary}");
    assert_eq!(sum(pairs, "misses"), misses, "summary: {summary}");
    assert_eq!(sum(pairs, "lookups"), summary["lookups_in_window"]);
    assert!(
        pairs.len() <= 3,
        "the demo has one reader and one writer call site, yet {} pairs: {summary}",
        pairs.len()
    );
    for a in &alerts {
        assert_ne!(
            a["reader_tid"], a["writer_tid"],
            "the writer's own lookup flagged: {a}"
        );
        assert_eq!(a["reader_name"], "reader-0");
        assert_eq!(a["writer_name"], "refresher");
    }
    let hits = &summary["probe_hits"];
    assert_eq!(
        hits["lookup_miss"], misses,
        "only misses pass the miss-path probe; summary: {summary}"
    );
    assert_eq!(hits["lookup_entry"], 0, "no lookup entry probed: {summary}");
    assert_eq!(code, 1, "a race found exits 1");
}

fn sum(pairs: &[serde_json::Value], field: &str) -> u64 {
    pairs.iter().map(|p| p[field].as_u64().unwrap()).sum()
}

/// The demo's line that holds `text`, from its source.
fn demo_line(text: &str) -> u64 {
    let src = std::fs::read_to_string(workspace().join("demo/cache_demo.cpp")).unwrap();
    let lines: Vec<usize> = src
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(text))
        .map(|(i, _)| i + 1)
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "{text:?} must be on exactly one line of the demo"
    );
    lines[0] as u64
}

/// Frame `i` of `stack`: (function, file, line).
fn frame(stack: &serde_json::Value, i: usize) -> (&str, &str, u64) {
    let f = &stack[i];
    (
        f["function"]
            .as_str()
            .unwrap_or_else(|| panic!("no frame {i} in {stack}")),
        f["file"].as_str().unwrap_or(""),
        f["line"].as_u64().unwrap_or(0),
    )
}

/// Checks that an alert names the lookup and its caller in the reader thread, and the clear and
/// the refresher's call of it, with the demo's lines.
fn assert_both_sides(a: &serde_json::Value) {
    let (lookup_fn, lookup_body) = (
        demo_line("long lookup(long key)"),
        demo_line("return it == map_.end()"),
    );
    let (clear_fn, clear_body) = (demo_line("void clear()"), demo_line("map_.clear();"));
    let (f, file, line) = frame(&a["reader_stack"], 0);
    assert_eq!(f, "Cache::lookup(long)", "{a}");
    assert!(file.ends_with("demo/cache_demo.cpp"), "{a}");
    assert!(
        (lookup_fn..=lookup_body).contains(&line),
        "lookup at line {line}: {a}"
    );
    let (f, file, line) = frame(&a["reader_stack"], 1);
    assert!(
        f.starts_with("main::{lambda()#") && f.ends_with("::operator()() const"),
        "reader thread function {f}: {a}"
    );
    assert!(file.ends_with("demo/cache_demo.cpp"), "{a}");
    assert_eq!(line, demo_line("get_current()->lookup(k)"), "{a}");
    let (f, file, line) = frame(&a["writer_stack"], 0);
    assert_eq!(f, "Cache::clear()", "{a}");
    assert!(file.ends_with("demo/cache_demo.cpp"), "{a}");
    assert!(
        (clear_fn..=clear_body).contains(&line),
        "clear at line {line}: {a}"
    );
    // The refresher's lambda is inlined into std::thread's runner at -O2: its frame carries the
    // line of the call whatever name DWARF gives it.
    let (_, file, line) = frame(&a["writer_stack"], 1);
    assert!(file.ends_with("demo/cache_demo.cpp"), "{a}");
    assert_eq!(line, demo_line("c->clear();"), "{a}");
    let writer = a["writer_stack"].as_array().unwrap();
    assert!(
        writer.iter().any(|f| f["function"]
            .as_str()
            .is_some_and(|n| n.contains("main::{lambda()#"))),
        "the refresher thread's function: {a}"
    );
}

#[test]
#[ignore = "root"]
fn alerts_name_both_sides_with_their_lines() {
    // Entry probe (placed past the prologue's first instruction), miss-path probe (deep inside
    // the lookup) and return probe (stack taken in the caller, the lookup's frame put back): all
    // give the same two sides. The gap makes misses certain.
    let modes: [&[&str]; 3] = [
        &[],
        &["--miss-ret", "-1"],
        &["--miss-ret", "-1", "--probe-returns"],
    ];
    for mode in modes {
        let (_, _, alerts, summary) = watch_demo(&["--seconds", "1", "--gap-us", "100"], mode);
        assert!(!alerts.is_empty(), "no alert; summary: {summary}");
        assert_eq!(summary["lost_events"], 0, "summary: {summary}");
        assert_both_sides(&alerts[0]);
        let pairs = summary["pairs"].as_array().unwrap();
        assert_eq!(pairs[0]["reader_stack"], alerts[0]["reader_stack"]);
        assert_eq!(pairs[0]["writer_stack"], alerts[0]["writer_stack"]);
    }
}

#[test]
#[ignore = "root"]
fn human_output_prints_both_stacks() {
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["--", cache_demo().to_str().unwrap(), "--seconds", "1"]);
    let o = racewatch(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    let first = out
        .find("RACE cache")
        .unwrap_or_else(|| panic!("no alert:\n{out}"));
    let text = &out[first..];
    let reader = text.find("looked up the cache here:\n    #0 Cache::lookup(long) ");
    let writer = text.find("had emptied it here:\n    #0 Cache::clear() ");
    assert!(
        reader.is_some() && writer.is_some() && reader < writer,
        "{out}"
    );
    assert!(text.contains("racewatch: pair #1: "), "{out}");
    assert_eq!(o.status.code(), Some(1));
}

#[test]
#[ignore = "root"]
fn probe_returns_sees_every_lookup_and_still_counts_misses_exactly() {
    let (code, (lookups, misses, _), alerts, summary) = watch_demo(
        &["--seconds", "2"],
        &["--miss-ret", "-1", "--probe-returns"],
    );
    assert!(misses > 0, "the demo produced no miss; summary: {summary}");
    assert_eq!(summary["misses_in_window"], misses, "summary: {summary}");
    assert_eq!(summary["lost_events"], 0, "summary: {summary}");
    let hits = &summary["probe_hits"];
    assert_eq!(hits["lookup_entry"], lookups, "summary: {summary}");
    assert_eq!(hits["lookup_return"], lookups, "summary: {summary}");
    assert_eq!(hits["lookup_miss"], 0, "summary: {summary}");
    let pairs = summary["pairs"].as_array().expect("pairs in the summary");
    assert_eq!(sum(pairs, "misses"), misses, "summary: {summary}");
    assert_eq!(alerts.len(), pairs.len(), "one alert per pair: {summary}");
    assert_eq!(code, 1);
}

#[test]
#[ignore = "root"]
fn entry_only_mode_flags_lookups_without_results() {
    let (code, (lookups, _, _), alerts, summary) = watch_demo(&["--seconds", "1"], &[]);
    assert!(!alerts.is_empty(), "no lookup flagged; summary: {summary}");
    assert_eq!(
        summary["probe_hits"]["lookup_entry"], lookups,
        "the probe placed past endbr64 fires once a lookup; summary: {summary}"
    );
    assert!(
        alerts.iter().all(|a| a["miss"].is_null()),
        "miss must be null without --miss-ret"
    );
    assert_eq!(summary["misses_in_window"], 0);
    assert_eq!(summary["lost_events"], 0);
    assert_eq!(code, 1);
}

#[test]
#[ignore = "root"]
fn fixed_mode_has_no_window_and_no_alert() {
    let (code, (lookups, misses, _), alerts, summary) =
        watch_demo(&["--seconds", "1", "--fixed"], &["--miss-ret", "-1"]);
    assert!(lookups > 0);
    assert_eq!(misses, 0);
    assert!(alerts.is_empty(), "alerts on the fixed build: {alerts:?}");
    assert_eq!(summary["windows"], 0);
    assert_eq!(summary["lookups_in_window"], 0);
    assert_eq!(code, 0);
}

#[test]
#[ignore = "root"]
fn attaches_to_a_running_process_by_pid() {
    // The demo runs race-free until SIGUSR1, so every miss it counts happens while attached.
    let demo = Command::new(cache_demo())
        .args(["--bug-on-signal", "--seconds", "2"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = demo.id().to_string();
    let out = temp_file("pid.ndjson");
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend([
        "--miss-ret",
        "-1",
        "--json",
        "-o",
        out.to_str().unwrap(),
        "-p",
        &pid,
    ]);
    let mut rw = Command::new(RACEWATCH)
        .args(&args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut rw_err = BufReader::new(rw.stderr.take().unwrap());
    let mut line = String::new();
    rw_err.read_line(&mut line).unwrap();
    assert!(
        line.contains("probes attached"),
        "racewatch did not attach: {line}"
    );
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(demo.id() as i32, libc::SIGUSR1) };
    let demo_out = demo.wait_with_output().unwrap();
    let status = rw.wait().unwrap();
    let (_, misses, _) = demo_truth(&String::from_utf8_lossy(&demo_out.stderr));
    let (_, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    assert!(misses > 0, "the demo produced no miss to find");
    assert_eq!(summary["misses_in_window"], misses, "summary: {summary}");
    assert_eq!(summary["lost_events"], 0);
    assert_eq!(
        summary["ended"], "target exited",
        "racewatch ends when the pid exits"
    );
    assert_eq!(status.code(), Some(1));
}

#[test]
#[ignore = "root"]
fn without_privileges_says_which_capabilities_are_missing() {
    let demo = cache_demo().to_str().unwrap();
    let mut args = vec![
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        RACEWATCH,
        "watch",
    ];
    args.extend(DEMO_PROBES);
    args.extend(["--", demo]);
    let o = Command::new("setpriv")
        .args(&args)
        .output()
        .expect("setpriv (util-linux)");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(err.contains("needs root, or the capabilities CAP_BPF and CAP_PERFMON (missing: CAP_BPF, CAP_PERFMON)"), "stderr: {err}");
}

#[test]
#[ignore = "root"]
fn a_hostile_thread_name_is_escaped_for_people_and_kept_in_json() {
    use std::{ffi::OsStr, os::unix::ffi::OsStrExt as _};
    // An escape sequence, invalid UTF-8 and a newline, as the reader's thread name.
    let name = OsStr::from_bytes(b"r\x1b[31m\xff\n");
    let run = |json: bool| {
        let mut cmd = Command::new(RACEWATCH);
        cmd.arg("watch")
            .args(DEMO_PROBES)
            .args(["--miss-ret", "-1"]);
        if json {
            cmd.arg("--json");
        }
        // A gap between clear and refill makes the miss certain within the second.
        cmd.args(["--", cache_demo().to_str().unwrap(), "--seconds", "1"])
            .args(["--gap-us", "200"])
            .arg("--reader-name")
            .arg(name);
        let o = cmd.output().unwrap();
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        o.stdout
    };
    let human = run(false);
    let text = String::from_utf8(human).expect("human output is UTF-8");
    let races: Vec<&str> = text.lines().filter(|l| l.starts_with("RACE ")).collect();
    assert!(!races.is_empty(), "no alert:\n{text}");
    for line in text.lines() {
        assert!(
            !line.chars().any(char::is_control),
            "raw control character in {line:?}"
        );
    }
    assert!(
        races[0].contains(" (r\\u{1b}[31m\u{fffd}\\n) looked up while"),
        "{}",
        races[0]
    );
    let (alerts, _) = parse_ndjson(&String::from_utf8_lossy(&run(true)));
    assert!(!alerts.is_empty());
    for a in &alerts {
        assert_eq!(a["reader_name"], "r\x1b[31m\u{fffd}\n", "{a}");
    }
}

/// Runs the demo under racewatch with extra racewatch flags: (exit code, demo truth, NDJSON).
fn watch_demo_with(flags: &[&str], demo_args: &[&str]) -> (i32, (u64, u64, u64), String) {
    let out = temp_file("hazard.ndjson");
    let out_s = out.to_string_lossy().into_owned();
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["--miss-ret", "-1", "--json", "-o", &out_s]);
    args.extend(flags);
    args.extend(["--", cache_demo().to_str().unwrap()]);
    args.extend(demo_args);
    let o = racewatch(&args);
    let err = stderr(&o);
    let text = std::fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("no output file ({e}); stderr:\n{err}"));
    (o.status.code().unwrap_or(-1), demo_truth(&err), text)
}

#[test]
#[ignore = "root"]
fn rare_race_misses_in_few_windows_in_ten_unobserved_seconds() {
    let o = Command::new(cache_demo())
        .args(RARE_DEMO)
        .args(["--seconds", "10"])
        .output()
        .unwrap();
    let (lookups, misses, refreshes) = demo_truth(&stderr(&o));
    assert!(
        lookups > 200 && refreshes > 5,
        "{lookups} lookups, {refreshes} refreshes"
    );
    // A reader lands in a few-microsecond window about once in a few hundred windows, more
    // often when the refresher is preempted inside it: rare, not impossible.
    assert!(
        misses * 10 <= refreshes,
        "{misses} misses in {refreshes} windows unobserved: not rare enough"
    );
}

/// Two readers on a lock-guarded cache refreshed every 2 ms: the race fires hundreds of times a
/// second, and the forecast from the span the lock is free in each window comes within 3x of it
/// (the whole windows would forecast several times more).
#[test]
#[ignore = "root"]
fn a_lock_guarded_cache_is_forecast_from_the_span_its_lock_is_free() {
    let demo = [
        "--seconds",
        "4",
        "--keys",
        "2000",
        "--refresh-us",
        "2000",
        "--pause-us",
        "20",
        "--readers",
        "2",
    ];
    let (_, (_, misses, _), text) = watch_demo_with(&["--interval", "1"], &demo);
    let last = hazard_lines(&text)
        .pop()
        .unwrap_or_else(|| panic!("no hazard line:\n{text}"));
    assert_eq!(last["lock"]["windows"], last["windows"], "{last}");
    assert!(misses > 100, "the race barely fired: {misses} misses");
    let forecast = last["expected_collisions_per_hour"].as_f64().unwrap()
        * last["elapsed_s"].as_f64().unwrap()
        / 3600.0;
    let misses = misses as f64;
    assert!(
        forecast > misses / 3.0 && forecast < misses * 3.0,
        "forecast {forecast:.1} for the run, {misses} happened: {last}"
    );
}

#[test]
#[ignore = "root"]
fn rare_race_gets_a_hazard_line_within_the_run() {
    let mut demo = vec!["--seconds", "10"];
    demo.extend(RARE_DEMO);
    // Every lookup's entry is probed, so the reader's count is exact.
    let (code, (lookups, misses, refreshes), text) =
        watch_demo_with(&["--probe-returns", "--interval", "2"], &demo);
    let (_, summary) = parse_ndjson(&text);
    let hazards = hazard_lines(&text);
    // Four or five interval reports, then the final one: the first comes 2 s into the run.
    assert!(hazards.len() >= 4, "hazard lines: {hazards:?}");
    let first = &hazards[0];
    assert!(first["elapsed_s"].as_f64().unwrap() < 3.0, "{first}");
    assert!(first["windows"].as_u64().unwrap() > 0, "{first}");
    let last = hazards.last().unwrap();
    assert_eq!(last["windows"], refreshes, "one window per refresh: {last}");
    assert_eq!(last["windows"], summary["windows"]);
    assert_eq!(last["window_max_ns"], summary["max_window_ns"]);
    let (p50, p99, max) = (
        last["window_p50_ns"].as_u64().unwrap(),
        last["window_p99_ns"].as_u64().unwrap(),
        last["window_max_ns"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{last}");
    let readers = last["readers"].as_array().unwrap();
    assert_eq!(readers.len(), 1, "the refresher does not look up: {last}");
    let r = &readers[0];
    assert_eq!(r["comm"], "reader-0");
    assert_eq!(r["lookups"], lookups, "every lookup counted: {r}");
    let rate = r["lookups_per_s"].as_f64().unwrap();
    let elapsed = last["elapsed_s"].as_f64().unwrap();
    assert!((rate * elapsed - lookups as f64).abs() < 1.0, "{r}");
    assert!(r["closest_before_ns"].as_u64().is_some(), "{r}");
    assert!(r["closest_after_ns"].as_u64().is_some(), "{r}");
    // The cache's lock is seen released by the clear and taken again by the refill in every
    // window: the estimate rests on the span it was free, a small part of each window.
    let lock = &last["lock"];
    assert_eq!(lock["windows"], last["windows"], "{last}");
    let free_ns = lock["released_ns"].as_f64().unwrap();
    assert!(free_ns > 0.0 && free_ns < p50 as f64, "{last}");
    // The estimate is the formula of docs/HAZARD.md on the line's own numbers.
    let reachable = free_ns * refreshes as f64 / 1e9 / elapsed;
    let expected = rate * reachable * 3600.0;
    let got = last["expected_collisions_per_hour"].as_f64().unwrap();
    assert!(
        got > 0.0 && (got - expected).abs() < 1e-6 * expected,
        "{last}"
    );
    // Its interval, from the windows and lookups counted (docs/HAZARD.md), and the run that
    // would see one collision with 95% odds: three expected.
    let spread = 1.96 * (1.0 / refreshes as f64 + 1.0 / lookups as f64).sqrt();
    let interval = &last["expected_interval_per_hour"];
    for (i, bound) in [got * (-spread).exp(), got * spread.exp()]
        .iter()
        .enumerate()
    {
        let printed = interval[i].as_f64().unwrap();
        assert!((printed - bound).abs() < 1e-6 * bound, "{last}");
    }
    let confirm = last["confirm_s"].as_f64().unwrap();
    assert!(
        (confirm - 3.0 * 3600.0 / got).abs() < 1e-6 * confirm,
        "{last}"
    );
    assert_eq!(last["sampled_fraction"], 1.0);
    assert_eq!(summary["misses_in_window"], misses, "summary: {summary}");
    assert_eq!(summary["lost_events"], 0, "summary: {summary}");
    assert_eq!(
        code,
        if summary["lookups_in_window"] == 0 {
            0
        } else {
            1
        }
    );
}

#[test]
#[ignore = "root"]
fn provoke_makes_the_rare_race_fire_and_every_miss_is_flagged() {
    let mut demo = vec!["--seconds", "5"];
    demo.extend(RARE_DEMO);
    let (code, (_, misses, refreshes), text) = watch_demo_with(&["--provoke", "2ms"], &demo);
    let (alerts, summary) = parse_ndjson(&text);
    assert!(misses > 0, "--provoke made no miss; summary: {summary}");
    assert_eq!(summary["misses_in_window"], misses, "summary: {summary}");
    let pairs = summary["pairs"].as_array().expect("pairs in the summary");
    assert_eq!(sum(pairs, "misses"), misses, "summary: {summary}");
    assert_eq!(alerts.len(), pairs.len(), "one alert per pair: {summary}");
    assert_eq!(summary["lost_events"], 0, "summary: {summary}");
    let p = &summary["provoke"];
    let provoked = p["windows"].as_u64().unwrap();
    assert!(provoked > 0, "summary: {summary}");
    assert_eq!(
        provoked + p["over_budget"].as_u64().unwrap(),
        refreshes,
        "every window provoked or refused: {summary}"
    );
    let added = p["added_ns"].as_u64().unwrap();
    assert!(
        added >= provoked * 2_000_000,
        "each hold lasts 2 ms: {summary}"
    );
    let wall_ns = summary["duration_s"].as_f64().unwrap() * 1e9;
    assert!(
        (added as f64) <= 0.1 * wall_ns,
        "over the 10% budget: {summary}"
    );
    assert_eq!(code, 1);
}

#[test]
#[ignore = "root"]
fn fixed_mode_has_no_hazard_and_no_miss_under_provoke() {
    let mut demo = vec!["--seconds", "2", "--fixed"];
    demo.extend(RARE_DEMO);
    let (code, (lookups, misses, _), text) =
        watch_demo_with(&["--provoke", "2ms", "--interval", "1"], &demo);
    let (alerts, summary) = parse_ndjson(&text);
    assert!(lookups > 0);
    assert_eq!(misses, 0);
    assert!(alerts.is_empty(), "alerts on the fixed build: {alerts:?}");
    assert!(
        hazard_lines(&text).is_empty(),
        "hazard on the fixed build:\n{text}"
    );
    assert_eq!(summary["windows"], 0);
    assert_eq!(summary["provoke"]["windows"], 0);
    assert_eq!(code, 0);
}

#[test]
#[ignore = "root"]
fn miss_path_mode_samples_lookup_rates_for_the_hazard() {
    let mut demo = vec!["--seconds", "5"];
    demo.extend(RARE_DEMO);
    let (_, (lookups, misses, refreshes), text) = watch_demo_with(&[], &demo);
    let (_, summary) = parse_ndjson(&text);
    let h = hazard_lines(&text);
    let h = h
        .last()
        .unwrap_or_else(|| panic!("no hazard line:\n{text}"));
    assert_eq!(h["windows"], refreshes, "{h}");
    // A burst a second, as long as the 1% budget pays for (20 ms at most), longer when a loaded
    // machine wakes racewatch late to end it; never all of the run.
    let fraction = h["sampled_fraction"].as_f64().unwrap();
    assert!((0.0005..0.3).contains(&fraction), "{h}");
    let r = &h["readers"][0];
    assert_eq!(r["comm"], "reader-0", "{h}");
    assert_eq!(
        r["lookups"], summary["probe_hits"]["lookup_sample"],
        "the reader's count is the sampling probe's hits: {summary}"
    );
    // The scaled rate against the demo's own: within a factor of two over a few bursts.
    let truth = lookups as f64 / h["elapsed_s"].as_f64().unwrap();
    let rate = r["lookups_per_s"].as_f64().unwrap();
    assert!(
        rate > truth / 2.0 && rate < truth * 2.0,
        "sampled {rate}/s, truly {truth}/s: {h}"
    );
    assert_eq!(summary["misses_in_window"], misses, "summary: {summary}");
}

#[test]
#[ignore = "root"]
fn probes_go_past_endbr64_onto_emulated_instructions_and_the_miss_path() {
    let mut args = vec!["watch", "-v", "--dry-run", "--miss-ret", "-1"];
    args.extend(DEMO_PROBES);
    args.extend(["--", cache_demo().to_str().unwrap()]);
    let o = racewatch(&args);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    // The demo is built with CET: every function opens with endbr64, which the kernel
    // single-steps; the push after it is emulated.
    assert!(
        err.contains("clear: Cache::clear() at 0x") && err.contains("+0x4 (push %rbp, emulated)"),
        "{err}"
    );
    // The refill's window closes at its tail call to the unlock, the cache its argument there:
    // no probe at its entry, whose trap would widen every window.
    assert!(
        err.lines().any(|l| l.contains("update: Cache::update(")
            && l.contains("closes its window at its last calls: 0x")
            && l.contains("(jmp ")
            && l.contains("emulated), cache in RDI")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains("lookup miss: Cache::lookup(long) at")
                && l.contains("(jmp")
                && l.contains("emulated), -1 returned in 8 byte(s) of RAX, cache in RBP")),
        "{err}"
    );
}

#[test]
#[ignore = "root"]
fn the_summary_says_what_racewatch_added_to_the_target() {
    let (_, _, _, summary) = watch_demo(&["--seconds", "1"], &["--miss-ret", "-1"]);
    let cost = &summary["self_cost"];
    let per_hit = &cost["per_hit_ns"];
    let (emulated, stepped) = (
        per_hit["emulated_ns"].as_f64().unwrap(),
        per_hit["single_stepped_ns"].as_f64().unwrap(),
    );
    assert!(
        emulated > 0.0 && stepped > emulated,
        "a single-stepped hit costs more than an emulated one: {cost}"
    );
    let hits = &summary["probe_hits"];
    let traps: u64 = [
        "clear",
        "refill_entry",
        "refill_return",
        "lookup_miss",
        "lookup_sample",
        "lock_edge",
    ]
    .iter()
    .map(|k| hits[k].as_u64().unwrap())
    .sum();
    // Every probe of this plan is on an emulated instruction.
    let expected = traps as f64 * emulated;
    let added = cost["added_ns"].as_f64().unwrap();
    assert!(
        (added - expected).abs() <= 1.0 + expected * 1e-9,
        "added_ns {added} != {traps} hits x {emulated} ns: {summary}"
    );
    let share = cost["added_share"].as_f64().unwrap();
    let cpu = cost["target_cpu_ns"].as_f64().unwrap();
    assert!(cpu > 0.0 && (share - added / cpu).abs() < 1e-9, "{cost}");
}

#[test]
#[ignore = "root"]
fn lookup_sampling_stays_within_the_budget() {
    // The demo's tight reader traps on every lookup during a burst: a 5% budget sizes the
    // bursts; a budget below what the windows alone cost leaves none. A refresh every 20 ms
    // keeps the window and miss probes within 1% however the demo races (a window can hold
    // a hundred misses), so the bursts always get room under 5%.
    let demo = ["--seconds", "4", "--refresh-us", "20000"];
    let (_, _, _, summary) = watch_demo(&demo, &["--miss-ret", "-1", "--budget", "5"]);
    let cost = &summary["self_cost"];
    assert_eq!(cost["required_over_budget"], false, "{summary}");
    assert_eq!(cost["budget_share"], 0.05, "{summary}");
    let share = cost["added_share"].as_f64().unwrap();
    assert!(share <= 0.05, "over the 5% budget: {summary}");
    let bursts = summary["sampling"]["bursts"].as_u64().unwrap();
    assert!(bursts >= 2, "the budget left room for bursts: {summary}");
    assert!(cost["sampling_ns"].as_u64().unwrap() > 0, "{summary}");
    let (_, _, _, summary) = watch_demo(&demo, &["--miss-ret", "-1", "--budget", "0.0001"]);
    let cost = &summary["self_cost"];
    assert_eq!(cost["required_over_budget"], true, "{summary}");
    assert_eq!(summary["sampling"]["bursts"], 0, "{summary}");
    assert!(
        summary["sampling"]["skipped"].as_u64().unwrap() >= 3,
        "{summary}"
    );
    assert_eq!(summary["probe_hits"]["lookup_sample"], 0, "{summary}");
}

#[test]
#[ignore = "root"]
fn a_long_run_reports_each_pair_s_repeats_at_each_interval() {
    // Misses in most windows, from one reader's stack: one printed alert, then its counts at
    // each report.
    let (_, (_, misses, _), text) = watch_demo_with(&["--interval", "1"], &["--seconds", "4"]);
    let (alerts, summary) = parse_ndjson(&text);
    assert!(misses > 0, "the demo raced: {summary}");
    let pairs = summary["pairs"].as_array().unwrap();
    assert_eq!(alerts.len(), pairs.len(), "{summary}");
    let reports = pair_lines(&text);
    assert!(reports.len() >= 2, "reports: {reports:?}");
    // Per pair, each report's `new_lookups` is what its count grew by since the one before,
    // and the summary's count is at least the last report's.
    for (i, p) in pairs.iter().enumerate() {
        let mine: Vec<&serde_json::Value> = reports.iter().filter(|r| r["pair"] == i + 1).collect();
        let mut seen = 0;
        for r in &mine {
            seen += r["new_lookups"].as_u64().unwrap();
            assert_eq!(r["lookups"], seen, "{r}");
            assert_eq!(r["printed"], true, "{r}");
        }
        assert!(p["lookups"].as_u64().unwrap() >= seen, "{p}");
    }
    assert_eq!(summary["alerts_held_back"], 0, "{summary}");
    assert_eq!(summary["unkept_pair_lookups"], 0, "{summary}");
    assert_eq!(summary["misses_in_window"], misses, "{summary}");
}
