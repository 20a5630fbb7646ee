//! Helpers shared by the integration tests: build the demos, run racewatch, read its output.
#![allow(dead_code)] // each test file uses its own subset

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::OnceLock,
};

use serde_json::Value;

pub mod container;

pub const RACEWATCH: &str = env!("CARGO_BIN_EXE_racewatch");

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The C++ demo `demo/NAME.cpp`, compiled into the test scratch directory.
fn build_demo(name: &str) -> PathBuf {
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let status = Command::new("g++")
        // CET on, as distributions build by default: functions open with endbr64, which the
        // kernel single-steps under a uprobe (racewatch probes past it).
        .args(["-O2", "-g", "-pthread", "-fcf-protection=full", "-o"])
        .arg(&out)
        .arg(workspace().join(format!("demo/{name}.cpp")))
        .status()
        .expect("run g++ (cargo xtask setup installs it)");
    assert!(status.success(), "building demo/{name}.cpp failed");
    out
}

/// The native demo, compiled once per test binary.
pub fn cache_demo() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_demo("cache_demo"))
}

/// The demo of two windows in one process (`demo/two_windows.toml`), compiled once per test
/// binary.
pub fn two_windows() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| build_demo("two_windows"))
}

pub const DEMO_PROBES: [&str; 6] = [
    "--clear",
    "Cache::clear",
    "--update",
    "Cache::update",
    "--lookup",
    "Cache::lookup",
];

/// The demo's own ground truth from its last stderr line: (lookups, misses, refreshes).
pub fn demo_truth(stderr: &str) -> (u64, u64, u64) {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("cache_demo: lookups="))
        .unwrap_or_else(|| panic!("no ground truth line in the demo's stderr:\n{stderr}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (field("lookups="), field("misses="), field("refreshes="))
}

/// The native demo's rare race: a 64-key cache refreshed twice a second, one reader pausing
/// 2 ms between lookups. The cache is empty only between clear's unlock and update's lock, a few
/// hundred nanoseconds unless the refresher is preempted there, so a 10 s run (20 windows)
/// unobserved sees no miss.
pub const RARE_DEMO: [&str; 6] = [
    "--keys",
    "64",
    "--refresh-us",
    "500000",
    "--pause-us",
    "2000",
];

/// racewatch's NDJSON hazard lines.
pub fn hazard_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "hazard")
        .collect()
}

/// racewatch's periodic reports of stack pairs from its NDJSON output.
pub fn pair_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "pair")
        .collect()
}

/// racewatch's NDJSON output: (alerts, summary); hazard and pair lines are left out.
pub fn parse_ndjson(text: &str) -> (Vec<Value>, Value) {
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect();
    let (summary, alerts) = lines
        .split_last()
        .unwrap_or_else(|| panic!("no output at all"));
    assert_eq!(
        summary["type"], "summary",
        "last line is not the summary: {summary}"
    );
    assert!(
        alerts
            .iter()
            .all(|a| ["alert", "hazard", "pair"].contains(&a["type"].as_str().unwrap_or(""))),
        "a line that is neither alert, hazard nor pair before the summary"
    );
    let alerts = alerts.iter().filter(|a| a["type"] == "alert").cloned();
    (alerts.collect(), summary.clone())
}

pub fn racewatch(args: &[&str]) -> Output {
    Command::new(RACEWATCH)
        .args(args)
        .output()
        .expect("run racewatch")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A per-process path under cargo's test scratch directory; the extension is kept.
pub fn temp_file(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}", std::process::id()))
}

/// The worker racing for 2 s with refreshes spaced so that busy workers on two CPUs leave the
/// debug build racewatch is tested as time to read; a short sleep inside each window keeps the
/// race firing on a loaded machine.
pub const RACY_WORKER: [&str; 6] = ["--seconds", "2", "--gap-ms", "0.1", "--refresh-ms", "20"];

/// The seed-like Python worker.
pub fn worker() -> String {
    workspace()
        .join("demo/worker.py")
        .to_string_lossy()
        .into_owned()
}

/// The worker's ground truth line, as name → count.
pub fn worker_truth(stderr: &str) -> std::collections::HashMap<String, u64> {
    let line = stderr
        .lines()
        .rev()
        .find(|l| l.starts_with("worker: "))
        .unwrap_or_else(|| panic!("no ground truth line in the worker's stderr:\n{stderr}"));
    line["worker: ".len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| {
            (
                k.to_string(),
                v.parse().unwrap_or_else(|_| panic!("bad count in {line}")),
            )
        })
        .collect()
}

/// Every worker's ground truth line (a pool prints one per worker), as name -> count each.
pub fn workers_truth(stderr: &str) -> Vec<std::collections::HashMap<String, u64>> {
    stderr
        .lines()
        .filter(|l| l.starts_with("worker: "))
        .map(worker_truth)
        .collect()
}

/// racewatch started with `args`, once its first status line says its probes are attached
/// (that line is returned).
pub fn spawn_attached(args: &[&str]) -> (std::process::Child, String) {
    let (child, line, _) = spawn_attached_with_lines(args);
    (child, line)
}

/// As [`spawn_attached`], with racewatch's later status lines as they come.
pub fn spawn_attached_with_lines(
    args: &[&str],
) -> (
    std::process::Child,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::BufRead as _;
    let mut child = Command::new(RACEWATCH)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run racewatch");
    let mut line = String::new();
    let mut err = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
    err.read_line(&mut line)
        .expect("racewatch's first status line");
    assert!(
        line.contains("probes attached"),
        "racewatch did not attach: {line}"
    );
    // The rest is drained, so racewatch's later status lines always have somewhere to go.
    let (lines, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in err.lines().map_while(Result::ok) {
            let _ = lines.send(l);
        }
    });
    (child, line, rx)
}

/// racewatch watching the whole host with `args`, writing NDJSON to a file of its own, from the
/// moment its status line says it is attached until [`HostRun::stop`] sends it SIGINT.
pub struct HostRun {
    pub child: std::process::Child,
    pub out: PathBuf,
    lines: std::sync::mpsc::Receiver<String>,
}

impl HostRun {
    pub fn start(args: &[&str], name: &str) -> HostRun {
        let out = temp_file(name);
        let args = [args, &["--json", "-o", out.to_str().unwrap()]].concat();
        let (child, line, lines) = spawn_attached_with_lines(&args);
        assert!(
            line.contains("watching every process that maps it"),
            "racewatch did not attach: {line}"
        );
        HostRun { child, out, lines }
    }

    /// Waits (20 s at most) for racewatch's next status line that contains `needle`.
    pub fn wait_for(&self, needle: &str) -> String {
        loop {
            let line = self
                .lines
                .recv_timeout(std::time::Duration::from_secs(20))
                .unwrap_or_else(|e| panic!("racewatch never said {needle:?}: {e}"));
            if line.contains(needle) {
                return line;
            }
        }
    }

    /// Ends the run: (exit code, alerts, summary).
    pub fn stop_with_alerts(mut self) -> (Option<i32>, Vec<Value>, Value) {
        // SAFETY: plain kill(2) of the test's own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let status = self.child.wait().unwrap();
        let (alerts, summary) = parse_ndjson(&std::fs::read_to_string(&self.out).unwrap());
        (status.code(), alerts, summary)
    }

    /// Ends the run: (exit code, summary).
    pub fn stop(self) -> (Option<i32>, Value) {
        let (code, _, summary) = self.stop_with_alerts();
        (code, summary)
    }
}
