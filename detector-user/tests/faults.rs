//! However a run ends (a signal, the target's exit, racewatch killed), nothing of racewatch stays
//! in the kernel, the launched target never holds racewatch's kernel objects, and a process
//! racewatch attached to by pid keeps running after it detaches (root).
//!
//! Other racewatch runs may share the machine: only the kernel ids this run's racewatch held are
//! checked, never names.
mod common;

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, ChildStderr, Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// Kernel objects by id, read from a process's fdinfo.
#[derive(Debug, Default)]
struct Ids {
    progs: BTreeSet<u32>,
    maps: BTreeSet<u32>,
    links: BTreeSet<u32>,
}

fn held_ids(pid: u32) -> Ids {
    let mut ids = Ids::default();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{dir}: {e}")) {
        let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue; // closed meanwhile
        };
        for line in info.lines() {
            let Some((key, value)) = line.split_once(':') else {
                continue;
            };
            let Ok(id) = value.trim().parse() else {
                continue;
            };
            match key {
                "prog_id" => ids.progs.insert(id),
                "map_id" => ids.maps.insert(id),
                "link_id" => ids.links.insert(id),
                _ => false,
            };
        }
    }
    ids
}

/// The ids of `ids` the kernel still lists.
fn still_loaded(ids: &Ids) -> Ids {
    Ids {
        progs: aya::programs::loaded_programs()
            .filter_map(Result::ok)
            .map(|p| p.id())
            .filter(|id| ids.progs.contains(id))
            .collect(),
        maps: aya::maps::loaded_maps()
            .filter_map(Result::ok)
            .map(|m| m.id())
            .filter(|id| ids.maps.contains(id))
            .collect(),
        links: aya::programs::loaded_links()
            .filter_map(Result::ok)
            .map(|l| l.id())
            .filter(|id| ids.links.contains(id))
            .collect(),
    }
}

/// Waits for the kernel to free every object of `ids` (it frees them after an RCU grace period,
/// so not at the very moment the last fd closes).
fn assert_released(ids: &Ids) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = still_loaded(ids);
        if left.progs.is_empty() && left.maps.is_empty() && left.links.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left in the kernel after racewatch exited: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Names of racewatch's programs by id, as the kernel lists them.
fn program_names(ids: &Ids) -> BTreeSet<String> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.progs.contains(&p.id()))
        .filter_map(|p| p.name_as_str().map(str::to_string))
        .collect()
}

/// Fd targets of `pid` that are BPF objects or perf events.
fn kernel_fds(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .filter(|l| l.contains("bpf") || l.contains("perf_event"))
                .collect()
        })
        .unwrap_or_default()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// CPU time of `pid` in clock ticks (utime + stime).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: plain kill(2).
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0, "kill {pid}");
}

/// A racewatch run on the native demo, attached and running.
struct Running {
    racewatch: Child,
    stderr: BufReader<ChildStderr>,
    out: PathBuf,
    target: u32,
    ids: Ids,
}

/// Starts racewatch on the demo (launched, or attached to `pid`) and waits until it has attached.
fn start(pid: Option<u32>, tag: &str) -> Running {
    let out = temp_file(&format!("{tag}.ndjson"));
    let out_s = out.to_string_lossy().into_owned();
    let pid_s = pid.map(|p| p.to_string()).unwrap_or_default();
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["--miss-ret", "-1", "--json", "-o", &out_s]);
    let demo = cache_demo().to_str().unwrap();
    match pid {
        Some(_) => args.extend(["-p", &pid_s]),
        None => args.extend(["--", demo, "--fixed", "--seconds", "60"]),
    }
    // The demo's probes: clear past endbr64, the refill's tail call to the unlock (its last
    // call, where its window closes), and the lookup's miss path.
    let programs = ["on_clear", "on_refill_close", "on_lookup_miss"];
    attach(&args, pid, out, &programs)
}

/// Starts racewatch with `args` and waits until it has attached to `pid` (or the command it
/// launches), checking what it holds in the kernel (`programs` among it: the kernel keeps 15
/// bytes of a name) and that the target holds none of it.
fn attach(args: &[&str], pid: Option<u32>, out: PathBuf, programs: &[&str]) -> Running {
    let mut racewatch = Command::new(RACEWATCH)
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(racewatch.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.contains("probes attached"), "not attached: {line}");
    let target = match pid {
        Some(p) => p,
        None => line
            .split_whitespace()
            .nth(3)
            .and_then(|p| p.trim_end_matches(':').parse().ok())
            .unwrap_or_else(|| panic!("no pid in {line}")),
    };
    let ids = held_ids(racewatch.id());
    assert!(
        ids.progs.len() >= 4 && ids.links.len() >= 4 && !ids.maps.is_empty(),
        "racewatch holds too few kernel objects: {ids:?}"
    );
    let names = program_names(&ids);
    for &name in programs {
        assert!(names.contains(name), "{name} not among {names:?}");
    }
    assert!(names.iter().all(|n| n.starts_with("on_")), "{names:?}");
    assert_eq!(
        kernel_fds(target),
        Vec::<String>::new(),
        "the target holds racewatch's kernel objects"
    );
    Running {
        racewatch,
        stderr,
        out,
        target,
        ids,
    }
}

impl Running {
    /// Adds what racewatch holds now: probes attached for a while (lookup sampling) come and go.
    fn record_more(&mut self) {
        let now = held_ids(self.racewatch.id());
        self.ids.progs.extend(now.progs);
        self.ids.maps.extend(now.maps);
        self.ids.links.extend(now.links);
    }

    /// Waits for racewatch to exit: its exit code and the summary it wrote.
    fn finish(mut self) -> (Option<i32>, serde_json::Value, Ids) {
        let status = self.racewatch.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut self.stderr, &mut rest).unwrap();
        assert!(!rest.contains("panicked"), "{rest}");
        let text = std::fs::read_to_string(&self.out).unwrap();
        let (_, summary) = parse_ndjson(&text);
        (status.code(), summary, self.ids)
    }
}

/// A demo racewatch did not start, for `-p`: race-free, running until told to stop.
fn own_demo() -> Child {
    Command::new(cache_demo())
        .args(["--fixed", "--seconds", "120"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Stops the demo and checks it ran to a clean end with its own count of lookups.
fn stop_demo(demo: Child) {
    signal(demo.id(), libc::SIGTERM);
    let out = demo.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let (lookups, _, _) = demo_truth(&String::from_utf8_lossy(&out.stderr));
    assert!(lookups > 0);
}

const SIGNALS: [(i32, &str); 3] = [
    (libc::SIGINT, "interrupted (SIGINT)"),
    (libc::SIGTERM, "terminated (SIGTERM)"),
    (libc::SIGHUP, "hung up (SIGHUP)"),
];

#[test]
#[ignore = "root"]
fn each_signal_ends_a_launched_run_with_the_summary_and_frees_everything() {
    for (sig, ended) in SIGNALS {
        let mut run = start(None, "signal-launched");
        let target = run.target;
        std::thread::sleep(Duration::from_millis(300));
        run.record_more();
        std::thread::sleep(Duration::from_millis(300));
        signal(run.racewatch.id(), sig);
        let (code, summary, ids) = run.finish();
        assert_eq!(summary["ended"], ended, "{summary}");
        assert!(
            summary["probe_hits"]["refill_return"].as_u64().unwrap() > 0,
            "{summary}"
        );
        assert_eq!(code, Some(0), "{summary}");
        assert_released(&ids);
        // racewatch started the command, so it ends it.
        assert!(!alive(target), "the launched demo outlived racewatch");
    }
}

#[test]
#[ignore = "root"]
fn each_signal_detaches_from_a_pid_which_keeps_running() {
    for (sig, ended) in SIGNALS {
        let demo = own_demo();
        let mut run = start(Some(demo.id()), "signal-pid");
        std::thread::sleep(Duration::from_millis(300));
        run.record_more();
        std::thread::sleep(Duration::from_millis(300));
        signal(run.racewatch.id(), sig);
        let (code, summary, ids) = run.finish();
        assert_eq!(summary["ended"], ended, "{summary}");
        assert!(
            summary["probe_hits"]["refill_return"].as_u64().unwrap() > 0,
            "{summary}"
        );
        assert_eq!(code, Some(0));
        assert_released(&ids);
        assert!(alive(demo.id()), "the demo died with racewatch");
        let before = cpu_ticks(demo.id());
        std::thread::sleep(Duration::from_millis(300));
        assert!(cpu_ticks(demo.id()) > before, "the demo stopped running");
        assert_eq!(kernel_fds(demo.id()), Vec::<String>::new());
        stop_demo(demo);
    }
}

#[test]
#[ignore = "root"]
fn a_killed_racewatch_leaves_nothing_in_the_kernel() {
    // Launched: the command outlives a killed racewatch (nothing is left to stop it).
    let mut run = start(None, "kill-launched");
    let target = run.target;
    std::thread::sleep(Duration::from_millis(300));
    run.record_more();
    std::thread::sleep(Duration::from_millis(200));
    signal(run.racewatch.id(), libc::SIGKILL);
    let mut racewatch = run.racewatch;
    assert_eq!(racewatch.wait().unwrap().code(), None);
    assert_released(&run.ids);
    assert_eq!(kernel_fds(target), Vec::<String>::new());
    signal(target, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    while alive(target) {
        assert!(Instant::now() < deadline, "the orphaned demo did not stop");
        std::thread::sleep(Duration::from_millis(20));
    }

    // Attached by pid: the process keeps running without its probes.
    let demo = own_demo();
    let mut run = start(Some(demo.id()), "kill-pid");
    std::thread::sleep(Duration::from_millis(300));
    run.record_more();
    std::thread::sleep(Duration::from_millis(200));
    signal(run.racewatch.id(), libc::SIGKILL);
    let mut racewatch = run.racewatch;
    racewatch.wait().unwrap();
    assert_released(&run.ids);
    let before = cpu_ticks(demo.id());
    std::thread::sleep(Duration::from_millis(300));
    assert!(cpu_ticks(demo.id()) > before, "the demo stopped running");
    stop_demo(demo);
}

#[test]
#[ignore = "root"]
fn the_targets_exit_frees_everything_too() {
    let demo = own_demo();
    let run = start(Some(demo.id()), "target-exit");
    stop_demo(demo);
    let (code, summary, ids) = run.finish();
    assert_eq!(summary["ended"], "target exited", "{summary}");
    assert_eq!(code, Some(0));
    assert_released(&ids);
}

#[test]
#[ignore = "root"]
fn a_signal_while_loading_still_ends_with_the_summary() {
    // Sent as soon as racewatch has started the command (the held child exists), which is
    // before the probes are loaded: the run still attaches, then ends at once and reports.
    for (sig, ended) in SIGNALS {
        let out = temp_file("early.ndjson");
        let mut args = vec!["watch"];
        args.extend(DEMO_PROBES);
        let out_s = out.to_string_lossy().into_owned();
        let demo = cache_demo().to_str().unwrap();
        args.extend([
            "--json",
            "-o",
            &out_s,
            "--",
            demo,
            "--fixed",
            "--seconds",
            "60",
        ]);
        let mut racewatch = Command::new(RACEWATCH)
            .args(&args)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !has_child(racewatch.id(), demo) {
            assert!(
                Instant::now() < deadline,
                "racewatch never started the command"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        signal(racewatch.id(), sig);
        let status = racewatch.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut racewatch.stderr.take().unwrap(), &mut err).unwrap();
        assert!(!err.contains("panicked"), "{err}");
        let (_, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
        assert_eq!(summary["ended"], ended, "{summary}");
        assert_eq!(status.code(), Some(0), "{err}");
    }
}

/// Whether `pid` has a child process (from /proc/PID/task/*/children).
/// Whether process `pid` has a child whose command line holds `needle` (racewatch python asks
/// the interpreter where it lives through a child of its own, which is not the command).
fn has_child(pid: u32, needle: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks.filter_map(Result::ok).any(|t| {
                std::fs::read_to_string(t.path().join("children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .any(|child| {
                        std::fs::read(format!("/proc/{child}/cmdline"))
                            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
                    })
            })
        })
        .unwrap_or(false)
}

#[test]
#[ignore = "root"]
fn a_python_run_frees_everything_too() {
    // `racewatch python` loads more (KeyError sites, pending keys): signalled, then killed.
    for sig in [libc::SIGINT, libc::SIGKILL] {
        let out = temp_file("python-faults.ndjson");
        let worker = worker();
        let args = [
            "python",
            "--json",
            "-o",
            out.to_str().unwrap(),
            "--",
            "python3",
            &worker,
            "--seconds",
            "60",
        ];
        let programs = ["on_clear", "on_refill", "on_refill_retur", "on_keyerror"];
        let mut run = attach(&args, None, out.clone(), &programs);
        let target = run.target;
        std::thread::sleep(Duration::from_millis(500));
        run.record_more();
        signal(run.racewatch.id(), sig);
        if sig == libc::SIGKILL {
            let mut racewatch = run.racewatch;
            racewatch.wait().unwrap();
            assert_released(&run.ids);
            signal(target, libc::SIGTERM);
            continue;
        }
        let (code, summary, ids) = run.finish();
        assert_eq!(summary["ended"], "interrupted (SIGINT)", "{summary}");
        assert!(matches!(code, Some(0 | 1)), "{code:?}");
        assert_released(&ids);
    }
}

#[test]
#[ignore = "root"]
fn a_signal_while_reading_dwarf_still_ends_with_the_summary() {
    // racewatch python spends its first second or so reading libpython's DWARF, before it loads
    // anything or starts the command: a signal then still ends the run with a summary.
    let out = temp_file("dwarf.ndjson");
    let out_s = out.to_string_lossy().into_owned();
    let worker = worker();
    let mut racewatch = Command::new(RACEWATCH)
        .args(["python", "--json", "-o", &out_s, "--", "python3", &worker])
        .args(["--seconds", "30", "--fixed"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !has_child(racewatch.id(), &worker),
        "racewatch started the command within 200 ms: the signal would not land while it reads DWARF"
    );
    signal(racewatch.id(), libc::SIGINT);
    let status = racewatch.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut racewatch.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!err.contains("panicked"), "{err}");
    let text = std::fs::read_to_string(&out).unwrap_or_else(|e| panic!("no report ({e}): {err}"));
    let (_, summary) = parse_ndjson(&text);
    assert_eq!(summary["ended"], "interrupted (SIGINT)", "{summary}");
    assert_eq!(summary["windows"], 0, "{summary}");
    assert_eq!(status.code(), Some(0), "{err}");
}
