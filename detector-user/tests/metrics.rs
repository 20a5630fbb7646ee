//! `--metrics`: a real Prometheus server (Debian's `prometheus`, on loopback) scrapes racewatch
//! and holds each worker's KeyErrors exactly (root); a port in use is bad input.
mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use serde_json::Value;

/// A port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET `path` from 127.0.0.1:`port`: (status line, body).
fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// Prometheus's last value of `query` for the series whose `pid` label is `pid`.
fn scraped(prometheus: u16, query: &str, pid: u64) -> Option<u64> {
    let (_, body) = get(prometheus, &format!("/api/v1/query?query={query}"))?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"]
        .as_array()?
        .iter()
        .find(|r| r["metric"]["pid"].as_str() == Some(&pid.to_string()))?["value"][1]
        .as_str()?
        .parse()
        .ok()
}

#[test]
#[ignore = "root"]
fn prometheus_scrapes_each_workers_misses() {
    let (metrics, web) = (free_port(), free_port());
    let dir = temp_file("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 500ms\nscrape_configs:\n  - job_name: racewatch\n    \
             static_configs:\n      - targets: ['127.0.0.1:{metrics}']\n"
        ),
    )
    .unwrap();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus (cargo xtask setup installs it)");
    let addr = format!("127.0.0.1:{metrics}");
    let (mut rw, _) = spawn_attached(&["python", "--metrics", &addr, "-d", "30"]);
    let worker = Command::new("python3")
        .arg(worker())
        .args(RACY_WORKER)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let truth = worker_truth(&String::from_utf8_lossy(&worker.stderr));
    assert!(truth["keyerrors"] > 0, "{truth:?}");
    // The worker is done: its counts no longer change, so a scrape must come to them exactly.
    let deadline = Instant::now() + Duration::from_secs(20);
    let found = loop {
        let v = scraped(web, "racewatch_misses_in_window_total", truth["pid"]);
        if v == Some(truth["keyerrors"]) || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    let direct = get(metrics, "/metrics").map(|(_, body)| body);
    // SAFETY: plain kill(2) of the test's own children.
    unsafe {
        libc::kill(rw.id() as i32, libc::SIGINT);
        libc::kill(prometheus.id() as i32, libc::SIGTERM);
    }
    rw.wait().unwrap();
    prometheus.wait().unwrap();
    assert_eq!(
        found,
        Some(truth["keyerrors"]),
        "Prometheus's value; racewatch serves:\n{direct:?}"
    );
    let direct = direct.expect("racewatch answered /metrics");
    // The by-window series hold the same misses as the by-process ones.
    let sum = |metric: &str| -> u64 {
        direct
            .lines()
            .filter(|l| l.starts_with(&format!("{metric}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let by_window = sum("racewatch_window_misses_in_window_total");
    assert!(by_window >= truth["keyerrors"], "{direct}");
    assert_eq!(
        by_window,
        sum("racewatch_misses_in_window_total"),
        "{direct}"
    );
    for name in [
        "racewatch_windows_total",
        "racewatch_lookups_in_window_total",
        "racewatch_misses_in_window_total",
        "racewatch_events_lost_total",
        "racewatch_processes_watched",
    ] {
        assert!(
            direct.contains(&format!("# TYPE {}", name.trim_end_matches("_total"))),
            "{name}: {direct}"
        );
    }
}

#[test]
fn metrics_on_a_port_in_use_is_bad_input() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let o = racewatch(&["python", "--metrics", &addr, "--", "python3", "-c", "pass"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "racewatch: error: cannot serve --metrics on {addr}: give a free port and a local \
             address: Address already in use"
        )),
        "{}",
        stderr(&o)
    );
    let o = racewatch(&[
        "python",
        "--metrics",
        "localhost",
        "--",
        "python3",
        "-c",
        "pass",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("invalid value 'localhost' for '--metrics <ADDR>'"),
        "{}",
        stderr(&o)
    );
}
