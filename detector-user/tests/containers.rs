//! racewatch on processes in containers: their files are the container's (paths the host does
//! not have, or names of other files there) and their pids are not the host's. Each container
//! is the test's own (tests/common/container.rs), on the Debian trixie root `cargo xtask setup`
//! keeps.
mod common;

use std::path::{Path, PathBuf};

use common::{
    DEMO_PROBES, cache_demo,
    container::{Container, debian_root},
    demo_truth, parse_ndjson, spawn_attached, temp_file,
};

/// A directory holding only a copy of the native demo, to be mounted in a container.
fn demo_dir(name: &str) -> PathBuf {
    let dir = temp_file(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(cache_demo(), dir.join("cache_demo")).unwrap();
    dir
}

/// The demo in a container at `inside` (a directory), racing for 2 s from SIGUSR1 on.
fn demo_in_container(app: &Path, inside: &str) -> Container {
    let program = format!("{inside}/cache_demo");
    Container::start(
        &debian_root("trixie"),
        &[(app, inside)],
        &[&program, "--bug-on-signal", "--seconds", "2"],
    )
}

#[test]
#[ignore = "root"]
fn a_container_maps_its_own_paths_and_has_its_own_pids() {
    let app = demo_dir("own-paths");
    assert!(!Path::new("/app").exists(), "the host has an /app");
    let c = demo_in_container(&app, "/app");
    let pid = c.worker();
    // The command has exec'd; its loader may still be mapping its libraries.
    let libstdcxx = "/usr/lib/x86_64-linux-gnu/libstdc++.so.6.0.33";
    let started = std::time::Instant::now();
    let maps = loop {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        if maps.contains(libstdcxx) || started.elapsed() > std::time::Duration::from_secs(10) {
            break maps;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(maps.contains(" /app/cache_demo\n"), "maps:\n{maps}");
    assert!(
        maps.contains(libstdcxx),
        "the root's libstdc++, not the host's:\n{maps}"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert_eq!(
        nspid.split_whitespace().collect::<Vec<_>>(),
        ["NSpid:", &pid.to_string(), "1"]
    );
    c.signal(libc::SIGTERM);
    let (exit, err) = c.wait();
    assert!(exit.success(), "{exit}: {err}");
    demo_truth(&err);
}

/// `racewatch watch -p PID` (with `extra` arguments) on the demo racing in container `c`: its
/// attached line, the demo's misses and racewatch's NDJSON (alerts, summary).
fn watch_in_container(
    c: Container,
    extra: &[&str],
) -> (String, u64, Vec<serde_json::Value>, serde_json::Value) {
    let pid = c.worker().to_string();
    let out = temp_file(&format!("container-{pid}.ndjson"));
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["--miss-ret", "-1", "--json", "-o", out.to_str().unwrap()]);
    args.extend(extra);
    args.extend(["-p", &pid]);
    let (mut rw, line) = spawn_attached(&args);
    c.signal(libc::SIGUSR1);
    let (exit, err) = c.wait();
    assert!(exit.success(), "the demo failed: {exit}: {err}");
    let status = rw.wait().unwrap();
    let (_, misses, _) = demo_truth(&err);
    let (alerts, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    assert_eq!(status.code(), Some(1), "racewatch found no race: {line}");
    (line, misses, alerts, summary)
}

#[test]
#[ignore = "root"]
fn watch_finds_every_miss_of_a_process_in_a_container() {
    let app = demo_dir("watch");
    let c = demo_in_container(&app, "/app");
    let pid = c.worker();
    let (line, misses, alerts, summary) = watch_in_container(c, &[]);
    // The program is found through the process's root: the host has no /app. Five probes: the
    // clear, the refill's unlock, the lookup's miss path, and the cache's lock released by the
    // clear and taken again by the refill.
    assert!(
        line.contains(&format!(
            "watching pid {pid} (pid 1 in its pid namespace): 5 probes attached to /proc/{pid}/root/app/cache_demo"
        )),
        "{line}"
    );
    assert!(misses > 0, "the demo produced no miss to find");
    assert_eq!(summary["lost_events"], 0, "summary: {summary}");
    assert_eq!(summary["misses_in_window"], misses, "summary: {summary}");
    assert_eq!(summary["ended"], "target exited");
    let processes = summary["processes"].as_array().expect("processes");
    assert_eq!(processes.len(), 1, "{summary}");
    assert_eq!(processes[0]["pid"], pid);
    assert_eq!(processes[0]["ns_pid"], 1);
    assert!(processes[0]["container"].is_null(), "no runtime named it");
    let first = alerts.first().expect("an alert");
    assert_eq!((&first["pid"], &first["ns_pid"]), (&pid.into(), &1.into()));
    // Both stacks come from the container's files.
    let frames = first["reader_stack"]
        .as_array()
        .expect("the reader's stack");
    assert!(
        frames.iter().any(|f| f["function"]
            .as_str()
            .is_some_and(|n| n.starts_with("Cache::lookup"))),
        "{frames:?}"
    );
}

#[test]
#[ignore = "root"]
fn binary_names_the_container_s_file_over_the_host_s_at_the_same_path() {
    // The container's path exists on the host too, holding another program: the probes must go
    // to the file the process maps, not to the host's.
    let inside = temp_file("shadowed");
    std::fs::create_dir_all(&inside).unwrap();
    std::fs::copy("/bin/true", inside.join("cache_demo")).unwrap();
    let inside = inside.to_str().unwrap().to_string();
    let app = demo_dir("shadowing");
    let c = demo_in_container(&app, &inside);
    let pid = c.worker();
    let binary = format!("{inside}/cache_demo");
    let (line, misses, _, summary) = watch_in_container(c, &["--binary", &binary]);
    assert!(
        line.contains(&format!("probes attached to /proc/{pid}/root{binary}")),
        "{line}"
    );
    assert!(misses > 0, "the demo produced no miss to find");
    assert_eq!(summary["lost_events"], 0, "summary: {summary}");
    assert_eq!(summary["misses_in_window"], misses, "summary: {summary}");
}

#[test]
#[ignore = "root"]
fn a_binary_in_neither_place_is_named_in_both() {
    let app = demo_dir("missing");
    let c = demo_in_container(&app, "/app");
    let pid = c.worker().to_string();
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["--binary", "/app/no-such-demo", "-p", &pid]);
    let out = common::racewatch(&args);
    let err = common::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "/app/no-such-demo is not there for process {pid}: neither on the host nor in its root (/proc/{pid}/root/app/no-such-demo)"
        )),
        "{err}"
    );
}
