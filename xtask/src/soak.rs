//! `cargo xtask bench`'s soak: racewatch left on system-wide for minutes while short-lived
//! processes come and go every few milliseconds, each with windows of its own, beside one
//! long-running racy process. Reports racewatch's resident memory over time, its growth per hour,
//! and whether the long process's counts stayed exact.
use std::{
    fmt::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::demo::DEMO_PROBES;

/// racewatch's resident memory, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The slope of the least-squares line through `points` (x in seconds, y in KiB), in KiB/hour.
fn growth_per_hour(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (sxy, sxx) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if sxx == 0.0 { 0.0 } else { sxy / sxx * 3600.0 }
}

/// Runs the soak for `minutes` and appends its section to `doc`.
pub fn run(racewatch: &str, demo: &str, minutes: f64, doc: &mut String) -> Result<()> {
    let seconds = minutes * 60.0;
    let out = std::env::temp_dir().join("racewatch-soak.ndjson");
    let mut args = vec!["watch", "--binary", demo];
    args.extend(DEMO_PROBES);
    args.extend(["--miss-ret", "-1", "--json", "-o"]);
    let mut rw = Command::new(racewatch)
        .args(&args)
        .arg(&out)
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {racewatch}"))?;
    std::thread::sleep(Duration::from_secs(3));
    let long = Command::new(demo)
        .args(["--seconds", &(seconds + 2.0).to_string()])
        .args(["--gap-us", "100", "--pause-us", "20"])
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the long-running demo")?;
    let start = Instant::now();
    let mut rss = Vec::new();
    let mut next_sample = start;
    let mut short = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        if Instant::now() >= next_sample {
            if let Some(kib) = rss_kib(rw.id()) {
                rss.push((start.elapsed().as_secs_f64(), kib as f64));
            }
            next_sample += Duration::from_secs(10);
        }
        let status = Command::new(demo)
            .args(["--seconds", "0.02", "--gap-us", "50"])
            .stderr(Stdio::null())
            .status()
            .context("cannot start a short-lived demo")?;
        if !status.success() {
            bail!("a short-lived demo failed: {status}");
        }
        short += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    let long_pid = long.id();
    let long_out = long.wait_with_output()?;
    let long_truth = String::from_utf8_lossy(&long_out.stderr);
    let long_misses: u64 = long_truth
        .lines()
        .find_map(|l| l.strip_prefix("cache_demo: "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("misses="))
        })
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no ground truth from the long demo: {long_truth}"))?;
    crate::kill(rw.id() as i32, 2);
    rw.wait()?;
    let text = std::fs::read_to_string(&out)?;
    let summary: Value = serde_json::from_str(text.lines().last().context("no summary")?)?;
    let long_counted = summary["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"] == long_pid))
        .and_then(|p| p["misses_in_window"].as_u64());
    // Past the first half (files read, the tables of ended processes filled to their caps),
    // memory should stay flat.
    let at = |t: f64| {
        rss.iter()
            .find(|(s, _)| *s >= t)
            .or(rss.last())
            .map_or(0.0, |p| p.1)
    };
    let (early, middle, last) = (at(30.0), at(seconds / 2.0), at(f64::INFINITY));
    let second_half: Vec<(f64, f64)> = rss
        .iter()
        .copied()
        .filter(|(t, _)| *t >= seconds / 2.0)
        .collect();
    writeln!(
        doc,
        "\n### Soak: {minutes} minutes system-wide, short-lived processes beside a long racy one\n\n\
         `racewatch watch --binary cache_demo --miss-ret -1` system-wide (release build), while \
         short-lived demos (20 ms each, windows 50 µs apart) run one after another with a 5 ms \
         pause, beside one demo that runs throughout.\n\n\
         | what | value |\n|---|---|\n\
         | short-lived processes | {short} |\n\
         | racewatch RSS at 30 s / half-way / at the end | {early:.0} / {middle:.0} / {last:.0} KiB |\n\
         | growth per hour over the second half (least squares) | {:.0} KiB |\n\
         | processes in the summary / dropped to bound memory | {} / {} |\n\
         | events lost | {} |\n\
         | the long process's misses: its own count / racewatch's | {long_misses} / {} |\n",
        growth_per_hour(&second_half),
        summary["processes"].as_array().map_or(0, Vec::len),
        summary["processes_dropped"],
        summary["lost_events"],
        long_counted.map_or("not found".to_string(), |m| m.to_string()),
    )?;
    eprintln!(
        "bench: soak: {short} short-lived processes; RSS {early:.0} -> {middle:.0} -> {last:.0} KiB; long one {long_misses} misses, racewatch {long_counted:?}"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_is_the_least_squares_slope_per_hour() {
        let flat = [(0.0, 100.0), (10.0, 100.0), (20.0, 100.0)];
        assert_eq!(growth_per_hour(&flat), 0.0);
        // 1 KiB every 10 s: 360 KiB an hour.
        let rising = [(0.0, 100.0), (10.0, 101.0), (20.0, 102.0)];
        assert!((growth_per_hour(&rising) - 360.0).abs() < 1e-9);
    }
}
