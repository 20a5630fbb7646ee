//! racewatch under load (root): every lookup the kernel found in a window is either reported or
//! counted lost, exactly, and a long run at the demo's highest event rate keeps racewatch's memory
//! flat.
mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

#[test]
#[ignore = "root"]
fn a_tiny_ring_loses_events_and_counts_every_one() {
    // One page of ring (the smallest the kernel takes: ~50 lookup events) and long windows that
    // two readers fill with misses: far more than the ring holds between two drains.
    let out = temp_file("tiny-ring.ndjson");
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["--miss-ret", "-1", "--json", "-o", out.to_str().unwrap()]);
    let demo = cache_demo().to_str().unwrap();
    args.extend([
        "--",
        demo,
        "--seconds",
        "2",
        "--readers",
        "2",
        "--gap-us",
        "2000",
    ]);
    let o = Command::new(RACEWATCH)
        .args(&args)
        .env("RACEWATCH_RING_BYTES", "4096")
        .output()
        .unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    let (_, misses, refreshes) = demo_truth(&err);
    let (alerts, s) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or_else(|| panic!("not a count: {s}"));
    let lost_lookups = n(&s["lost_by_kind"]["lookup"]);
    assert!(lost_lookups > 0, "the tiny ring lost nothing: {s}");
    // Exact: the kernel's own count of lookups it found in a window.
    assert_eq!(
        n(&s["lookups_in_window"]) + lost_lookups,
        n(&s["kernel_lookups_in_window"]),
        "{s}"
    );
    // One alert per stack pair, the pairs' counts adding up to every lookup reported.
    let pairs = s["pairs"].as_array().expect("pairs in the summary");
    assert_eq!(alerts.len(), pairs.len(), "{s}");
    let reported: u64 = pairs.iter().map(|p| n(&p["lookups"])).sum();
    assert_eq!(reported, n(&s["lookups_in_window"]), "{s}");
    // With --miss-ret only misses are probed, and the demo misses only while its cache is
    // empty, in a window: each of its misses was reported or lost.
    assert!(
        n(&s["probe_hits"]["lookup_miss"]) > 0,
        "not probing the miss path: {s}"
    );
    assert_eq!(n(&s["misses_in_window"]) + lost_lookups, misses, "{s}");
    // Every clear opened a window: the probe saw each refresh the demo counted.
    assert_eq!(n(&s["probe_hits"]["clear"]), refreshes, "{s}");
    assert_eq!(
        n(&s["lost_events"]),
        lost_lookups
            + n(&s["lost_by_kind"]["window_open"])
            + n(&s["lost_by_kind"]["window_close"])
            + n(&s["lost_by_kind"]["near"])
            // An 8 KiB stack record never fits a one-page ring.
            + n(&s["lost_by_kind"]["native_stack"]),
        "{s}"
    );
    // Stacks give way first: none is copied while the ring is over half full.
    assert!(n(&s["stacks_shed"]) > 0, "no stack was shed: {s}");
    assert_eq!(n(&s["decode_errors"]), 0);
}

/// Resident memory of `pid` in KiB, from /proc/PID/status.
fn rss_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .ok()
}

#[test]
#[ignore = "root"]
fn a_minute_at_the_highest_event_rate_keeps_memory_flat() {
    // Windows back to back (no pause between refreshes) and two readers: every lookup of theirs
    // is in a window, so each crosses the ring and the correlator.
    let seconds = 60;
    let out = temp_file("soak.ndjson");
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["--miss-ret", "-1", "--json", "-o", out.to_str().unwrap()]);
    let demo = cache_demo().to_str().unwrap();
    let secs = seconds.to_string();
    args.extend([
        "--",
        demo,
        "--seconds",
        &secs,
        "--readers",
        "2",
        "--refresh-us",
        "0",
    ]);
    let mut rw = Command::new(RACEWATCH)
        .args(&args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = rw.id();
    let started = Instant::now();
    let mut samples = Vec::new();
    while let Some(kib) = rss_kib(pid) {
        samples.push((started.elapsed(), kib));
        if rw.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let o = rw.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    let (_, misses, _) = demo_truth(&err);
    let (_, s) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    // After a 10 s warm-up (maps and correlator tables at their working size), memory stays put.
    let warm: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= Duration::from_secs(10))
        .map(|(_, k)| *k)
        .collect();
    assert!(warm.len() >= 40, "too few samples: {samples:?}");
    let (first, max) = (warm[0], *warm.iter().max().unwrap());
    let n = |v: &serde_json::Value| v.as_f64().unwrap() as u64;
    eprintln!(
        "soak: {:.1} s, {} lookups in a window, {} lost, RSS {first} KiB after warm-up, max \
         {max} KiB",
        n(&s["duration_s"]),
        s["lookups_in_window"],
        s["lost_events"]
    );
    assert!(
        max - first < 10 * 1024 && max < first + first / 5 + 1024,
        "RSS grew from {first} to {max} KiB: {samples:?}"
    );
    assert!(n(&s["lookups_in_window"]) > 100_000, "not a load: {s}");
    assert_eq!(
        n(&s["lookups_in_window"]) + n(&s["lost_by_kind"]["lookup"]),
        n(&s["kernel_lookups_in_window"]),
        "{s}"
    );
    assert_eq!(
        n(&s["misses_in_window"]) + n(&s["lost_by_kind"]["lookup"]),
        misses,
        "{s}"
    );
}
