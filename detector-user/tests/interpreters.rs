//! `racewatch python` on every CPython build this machine has: pyenv's 3.11, 3.12 and 3.13 (with
//! symbols and DWARF), Debian 12's stripped link-time-optimised 3.11, and Debian 13's 3.13 and
//! sid's 3.14 (stripped, LTO, in the throwaway roots `cargo xtask setup` builds). Each runs the
//! seed's worker with both decoys (absent keys, another dict), attached by pid once its threads
//! run; the counts must equal the worker's own, with both sides' frames named. (Launched runs
//! are in tests/python.rs.)
mod common;

use std::process::{Command, Stdio};

use common::{
    parse_ndjson, spawn_attached, spawn_attached_with_lines, temp_file, worker, worker_truth,
};

/// One lookup in this many is of a key that never exists: enough decoys to prove them uncounted.
const ABSENT_EVERY: &str = "500";
/// The reader sleeps this long between lookups, handing the GIL back each time. Without it, a
/// reader that got into a window kept the GIL raising KeyErrors (each a record with its frames)
/// faster than the debug-build collector these tests run could drain them on 2 CPUs; the
/// collector took a core from the writer, whose window then stayed open 150 ms, and events were
/// lost (counted as such), so the exact count could not hold.
const READER_PAUSE_MS: &str = "0.005";

/// The worker's arguments in a container (after its `--seconds`): racing from SIGUSR1 on, with
/// both decoys.
const CONTAINER_WORKER: [&str; 8] = [
    "--bug-on-signal",
    "--gap-ms",
    "0.05",
    "--pause-ms",
    READER_PAUSE_MS,
    "--absent-every",
    ABSENT_EVERY,
    "--other-dict",
];

/// Debian 13's python3.13 running the worker at /app in a container of its own (own mount and
/// pid namespaces, pivot_root into the trixie root) for `seconds` from SIGUSR1 on.
fn worker_in_container(seconds: &str) -> common::container::Container {
    let demo = common::workspace().join("demo");
    common::container::Container::start(
        &common::container::debian_root("trixie"),
        &[(demo.as_path(), "/app")],
        &[
            &[
                "/usr/bin/python3.13",
                "/app/worker.py",
                "--seconds",
                seconds,
            ][..],
            &CONTAINER_WORKER,
        ]
        .concat(),
    )
}

/// An interpreter: how to start the worker under it.
struct Build {
    name: &'static str,
    /// The command before the worker's path, and the worker's path as it sees it.
    run: Vec<String>,
    worker: String,
    /// The interpreter's file, for a command that is not python itself (`chroot`).
    interpreter: Option<String>,
}

fn pyenv(version: &str, minor: &str) -> Build {
    Build {
        name: "pyenv",
        run: vec![format!("/root/.pyenv/versions/{version}/bin/python{minor}")],
        worker: worker(),
        interpreter: None,
    }
}

/// Debian's interpreter in `root`, run there with the worker copied in.
fn debian(root: &str, python: &str) -> Build {
    let root = common::container::debian_root(root).display().to_string();
    let interpreter = format!("{root}/usr/bin/{python}");
    assert!(
        std::path::Path::new(&interpreter).exists(),
        "{root} has no {python}: run `cargo xtask setup`"
    );
    std::fs::copy(worker(), format!("{root}/tmp/worker.py")).expect("copy the worker in");
    Build {
        name: "debian",
        run: vec!["chroot".into(), root, python.into()],
        worker: "/tmp/worker.py".into(),
        interpreter: Some(interpreter),
    }
}

/// Runs the worker with `extra` flags under `build`, attached by pid; with `racy`, its bug
/// starts at SIGUSR1, sent once racewatch is attached: (worker's truth, alerts, summary, exit
/// status).
fn attached(
    build: &Build,
    racy: bool,
    extra: &[&str],
) -> (
    std::collections::HashMap<String, u64>,
    Vec<serde_json::Value>,
    serde_json::Value,
    Option<i32>,
) {
    let mut cmd = Command::new(&build.run[0]);
    cmd.args(&build.run[1..])
        .arg(&build.worker)
        .args([
            // racewatch takes up to 3 s to verify its probes and attach (a debug build).
            "--seconds",
            "6",
            "--gap-ms",
            "0.05",
            "--pause-ms",
            READER_PAUSE_MS,
        ])
        .args(racy.then_some("--bug-on-signal"))
        .args(extra)
        .stderr(Stdio::piped());
    let worker = cmd.spawn().expect("start the worker");
    let pid = worker.id();
    // The interpreter maps its files and starts its threads.
    std::thread::sleep(std::time::Duration::from_millis(700));
    // chroot execs the interpreter in the same process, so the pid is the worker's.
    let out = temp_file(&format!("interp-{}-{pid}.ndjson", build.name));
    let (mut rw, line, lines) = spawn_attached_with_lines(&[
        "python",
        "--json",
        "-o",
        out.to_str().unwrap(),
        "-p",
        &pid.to_string(),
    ]);
    assert!(line.contains(&format!("pid {pid}")), "{line}");
    if racy {
        // SAFETY: plain kill(2) of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    }
    let worker_out = worker.wait_with_output().unwrap();
    let status = rw.wait().unwrap();
    let truth = worker_truth(&String::from_utf8_lossy(&worker_out.stderr));
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        !text.is_empty(),
        "racewatch wrote nothing and exited with {status}: {}",
        lines.iter().collect::<Vec<_>>().join("\n")
    );
    let (alerts, summary) = parse_ndjson(&text);
    (truth, alerts, summary, status.code())
}

/// Exact counts with both decoys, frames on both sides, and nothing unplaced.
fn exact_with_decoys(build: Build) {
    let (truth, alerts, summary, code) = attached(
        &build,
        true,
        &["--absent-every", ABSENT_EVERY, "--other-dict"],
    );
    assert!(
        truth["keyerrors"] > 0,
        "the worker raised no KeyError: {summary}"
    );
    assert!(truth["absent_keyerrors"] > 0 && truth["other_keyerrors"] > 0);
    assert_eq!(
        summary["misses_in_window"],
        truth["keyerrors"],
        "{}: summary {summary}; truth {truth:?}",
        build.run.join(" ")
    );
    assert_eq!(summary["unplaced_keyerrors"], 0, "{summary}");
    assert_eq!(summary["unjudged_keys"], 0, "{summary}");
    assert_eq!(summary["lost_events"], 0, "{summary}");
    assert_eq!(summary["ended"], "target exited", "{summary}");
    let first = alerts.first().expect("an alert");
    let frame = |side: &str| {
        let f = &first[side][0];
        (
            f["function"].as_str().unwrap_or_default().to_string(),
            f["file"].as_str().unwrap_or_default().to_string(),
            f["line"].as_u64().unwrap_or(0),
        )
    };
    let (reader, rfile, rline) = frame("reader_stack");
    let (writer, wfile, wline) = frame("writer_stack");
    assert_eq!(reader, "Cache.get", "{first}");
    assert_eq!(writer, "Cache.refresh", "{first}");
    assert!(
        rfile.ends_with("worker.py") && wfile.ends_with("worker.py"),
        "{first}"
    );
    assert!(rline > 0 && wline > rline, "{first}");
    assert_eq!(code, Some(1));
}

#[test]
#[ignore = "root"]
fn pyenv_3_11_is_exact() {
    exact_with_decoys(pyenv("3.11.7", "3.11"));
}

#[test]
#[ignore = "root"]
fn pyenv_3_12_is_exact() {
    exact_with_decoys(pyenv("3.12.1", "3.12"));
}

#[test]
#[ignore = "root"]
fn pyenv_3_13_is_exact() {
    exact_with_decoys(pyenv("3.13.0", "3.13"));
}

#[test]
#[ignore = "root"]
fn debian_12_stripped_3_11_is_exact() {
    exact_with_decoys(Build {
        name: "debian",
        run: vec!["/usr/bin/python3.11".into()],
        worker: worker(),
        interpreter: None,
    });
}

#[test]
#[ignore = "root"]
fn debian_13_stripped_3_13_is_exact() {
    exact_with_decoys(debian("trixie", "python3.13"));
}

#[test]
#[ignore = "root"]
fn debian_sid_stripped_3_14_is_exact() {
    exact_with_decoys(debian("sid", "python3.14"));
}

#[test]
#[ignore = "root"]
fn build_then_swap_is_clean_on_debian_13() {
    let (truth, _, summary, code) = attached(&debian("trixie", "python3.13"), false, &["--fixed"]);
    assert_eq!(truth["keyerrors"], 0);
    assert_eq!(summary["misses_in_window"], 0, "{summary}");
    assert_eq!(code, Some(0), "{summary}");
}

/// Launches `script` (as `build`'s interpreter sees it) with `script_args` under `racewatch python
/// --json` and `flags` (through `--interpreter` where the command is `chroot`): its exit status,
/// the script's ground truth and racewatch's summary.
fn launched(
    build: &Build,
    tag: &str,
    flags: &[&str],
    script: &str,
    script_args: &[&str],
) -> (
    Option<i32>,
    std::collections::HashMap<String, u64>,
    serde_json::Value,
) {
    let out = temp_file(&format!(
        "interp-{tag}-{}.ndjson",
        build.run.join("_").replace('/', "_")
    ));
    let mut args = vec!["python", "--json", "-o", out.to_str().unwrap()];
    args.extend(flags);
    if let Some(i) = &build.interpreter {
        args.extend(["--interpreter", i]);
    }
    args.push("--");
    args.extend(build.run.iter().map(String::as_str));
    args.push(script);
    args.extend(script_args);
    let o = common::racewatch(&args);
    let truth = worker_truth(&common::stderr(&o));
    let (_, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    (o.status.code(), truth, summary)
}

/// Launched under racewatch, with both decoys: exact from the first instruction on.
fn launched_exact(build: Build) {
    let (code, truth, summary) = launched(
        &build,
        "launched",
        &[],
        &build.worker,
        // Racing from the start (the container's arguments less --bug-on-signal).
        &[&["--seconds", "2"][..], &CONTAINER_WORKER[1..]].concat(),
    );
    assert!(truth["keyerrors"] > 0, "no KeyError: {summary}");
    assert_eq!(summary["misses_in_window"], truth["keyerrors"], "{summary}");
    assert_eq!(summary["unplaced_keyerrors"], 0, "{summary}");
    assert_eq!(summary["lost_events"], 0, "{summary}");
    assert_eq!(code, Some(1));
}

/// `script` from demo/, copied into `build`'s root when it runs in one, as its interpreter sees it.
fn demo_script(build: &Build, script: &str) -> String {
    let path = common::workspace().join("demo").join(script);
    match build.interpreter.as_deref() {
        Some(interpreter) => {
            let root = interpreter.split("/usr/bin/").next().unwrap();
            std::fs::copy(&path, format!("{root}/tmp/{script}")).expect("copy the script in");
            format!("/tmp/{script}")
        }
        None => path.display().to_string(),
    }
}

/// demo/decoys.py under `build`: the writer's own KeyErrors, another dict's with the same key
/// objects, a KeyError caught and re-raised, and three windows open at once (a dict, an instance
/// of a dict subclass, an OrderedDict), exact.
fn decoys_exact(build: Build) {
    let script = demo_script(&build, "decoys.py");
    let (code, truth, summary) = launched(&build, "decoys", &[], &script, &["2"]);
    let what = format!("{}: {truth:?}; {summary}", build.run.join(" "));
    assert!(
        truth["window_keyerrors"] > 0 && truth["writer_keyerrors"] > 0,
        "{what}"
    );
    assert_eq!(
        summary["misses_in_window"], truth["window_keyerrors"],
        "{what}"
    );
    assert_eq!(summary["windows"], 3 * truth["refreshes"], "{what}");
    for zero in [
        "unrefilled_keyerrors",
        "unplaced_keyerrors",
        "unjudged_keys",
        "lost_events",
    ] {
        assert_eq!(summary[zero], 0, "{zero}: {what}");
    }
    assert_eq!(code, Some(1), "{what}");
}

/// The six interpreters: pyenv's source builds with symbols, Debian's stripped LTO builds.
fn every_interpreter() -> [Build; 6] {
    [
        pyenv("3.11.7", "3.11"),
        pyenv("3.12.1", "3.12"),
        pyenv("3.13.0", "3.13"),
        Build {
            name: "debian",
            run: vec!["/usr/bin/python3.11".into()],
            worker: worker(),
            interpreter: None,
        },
        debian("trixie", "python3.13"),
        debian("sid", "python3.14"),
    ]
}

#[test]
#[ignore = "root"]
fn the_decoys_are_exact_on_every_interpreter() {
    for build in every_interpreter() {
        decoys_exact(build);
    }
}

/// demo/quiet.py under `build` with `--quiet-misses`, its cache a `kind` (dict, counter,
/// defaultdict), its `.pop` and `.setdefault` read from OrderedDicts (their own methods, by
/// position and by keyword) if `ordered`: every `d.get`, `d.pop` and `d.setdefault` that took its default, every `k in d` and `k in s`
/// that said no, every `d[k]` that raised KeyError or got `__missing__`'s 0 and every `values[i]`
/// that raised IndexError, for a key or an index the refill brought back, is counted, each by its
/// form, and lookups of keys never there are not; with build-then-swap, nothing.
fn quiet_exact(build: &Build, kind: &str, ordered: bool) {
    let script = demo_script(build, "quiet.py");
    let flags = ["--quiet-misses"];
    // A short sleep inside each window keeps the race firing on a loaded machine.
    let mut args = vec![
        "--seconds",
        "2",
        "--gap-ms",
        "0.1",
        "--absent-every",
        "10",
        "--kind",
        kind,
    ];
    if ordered {
        args.push("--ordered");
    }
    let (code, truth, summary) = launched(build, "quiet", &flags, &script, &args);
    let what = format!(
        "{} --kind {kind} (ordered: {ordered}): {truth:?}; {summary}",
        build.run.join(" ")
    );
    // The demo's readers, each with the form its misses count as: `in` on the set is a contains.
    let readers = [
        ("get", "get"),
        ("contains", "contains"),
        ("member", "contains"),
        ("subscript", "subscript"),
        ("index", "index"),
        ("pop", "pop"),
        ("setdefault", "setdefault"),
    ];
    let mut want: std::collections::BTreeMap<&str, u64> = Default::default();
    for (reader, form) in readers {
        let misses = truth[&format!("{reader}_misses")];
        assert!(misses > 0, "no {reader} miss: {what}");
        *want.entry(form).or_default() += misses;
    }
    let forms = &summary["misses_by_form"];
    for (form, misses) in &want {
        assert_eq!(forms[form], *misses, "{form}: {what}");
    }
    assert_eq!(
        summary["misses_in_window"],
        want.values().sum::<u64>(),
        "{what}"
    );
    for zero in [
        "unjudged_quiet_lookups",
        "unrefilled_keyerrors",
        "lost_events",
    ] {
        assert_eq!(summary[zero], 0, "{zero}: {what}");
    }
    assert_eq!(code, Some(1), "{what}");
    if kind != "dict" {
        return;
    }
    let (code, truth, summary) = launched(
        build,
        "quiet-fixed",
        &flags,
        &script,
        &["--seconds", "1", "--fixed"],
    );
    let what = format!("--fixed {}: {truth:?}; {summary}", build.run.join(" "));
    assert!(
        truth["get_lookups"] > 0 && truth["contains_lookups"] > 0 && truth["member_lookups"] > 0,
        "{what}"
    );
    assert_eq!(summary["misses_in_window"], 0, "{what}");
    // The demo's objects open none; the interpreter's exit may: 3.11 and 3.12's
    // `threading._shutdown` empties its `_shutdown_locks` set.
    assert!(summary["windows"].as_u64() <= Some(1), "{what}");
    assert_eq!(code, Some(0), "{what}");
}

#[test]
#[ignore = "root"]
fn quiet_misses_are_exact_on_every_interpreter() {
    // Debian sid's 3.14 included: its `.get` calls not yet specialised, and every `.get` on a
    // dict subclass, run a copy of `dict_get` that profile-guided optimisation inlined behind a
    // check of the function pointer, watched at its lookup calls.
    for build in every_interpreter() {
        // The Counter runs read `.pop` and `.setdefault` from OrderedDicts.
        for (kind, ordered) in [("dict", false), ("counter", true), ("defaultdict", false)] {
            quiet_exact(&build, kind, ordered);
        }
    }
}

#[test]
#[ignore = "root"]
fn debian_12_stripped_3_11_launched_is_exact() {
    launched_exact(Build {
        name: "debian",
        run: vec!["/usr/bin/python3.11".into()],
        worker: worker(),
        interpreter: None,
    });
}

#[test]
#[ignore = "root"]
fn debian_13_launched_through_chroot_is_exact() {
    launched_exact(debian("trixie", "python3.13"));
}

#[test]
#[ignore = "root"]
fn debian_sid_launched_through_chroot_is_exact() {
    launched_exact(debian("sid", "python3.14"));
}

#[test]
fn an_interpreter_racewatch_does_not_know_is_named() {
    let python = "/root/.pyenv/versions/3.10.13/bin/python3.10";
    let o = common::racewatch(&["python", "--", python, "-c", "pass"]);
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is CPython 3.10: racewatch python knows CPython 3.11 to 3.14"),
        "{err}"
    );
}

/// The done-when of racewatch python: Debian 13's stripped python3.13 in a container (its own
/// mount and pid namespaces, root switched by pivot_root, the worker at a path only the container
/// has), attached by its host pid: the same exact report as on pyenv's 3.11, frames included.
#[test]
#[ignore = "root"]
fn debian_13_in_a_container_is_exact() {
    let c = worker_in_container("3");
    let pid = c.worker();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let out = temp_file(&format!("interp-container-{pid}.ndjson"));
    let (mut rw, line) = spawn_attached(&[
        "python",
        "--json",
        "-o",
        out.to_str().unwrap(),
        "-p",
        &pid.to_string(),
    ]);
    assert!(
        line.contains(&format!(
            "watching pid {pid} (pid 1 in its pid namespace): 13 probes attached to \
             /proc/{pid}/root/usr/bin/python3.13"
        )),
        "{line}"
    );
    c.signal(libc::SIGUSR1);
    let (exit, err) = c.wait();
    assert!(exit.success(), "the worker failed: {exit}: {err}");
    let status = rw.wait().unwrap();
    let truth = worker_truth(&err);
    let (alerts, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    assert!(truth["keyerrors"] > 0, "no KeyError: {summary}");
    assert_eq!(summary["misses_in_window"], truth["keyerrors"], "{summary}");
    assert_eq!(summary["unplaced_keyerrors"], 0, "{summary}");
    assert_eq!(summary["lost_events"], 0, "{summary}");
    let first = alerts.first().expect("an alert");
    assert_eq!((&first["pid"], &first["ns_pid"]), (&pid.into(), &1.into()));
    let reader = &first["reader_stack"][0];
    assert_eq!(reader["function"], "Cache.get", "{first}");
    assert_eq!(reader["file"], "/app/worker.py", "{first}");
    assert_eq!(
        first["writer_stack"][0]["function"], "Cache.refresh",
        "{first}"
    );
    assert_eq!(status.code(), Some(1));
}

#[test]
#[ignore = "root"]
fn on_the_host_a_container_started_later_is_met_and_exact() {
    // racewatch left on for the host; then a container starts Debian 13's python3.13, a file the
    // host does not run. Within racewatch's next look, its interpreter is probed through the
    // container's root, and the worker races only once racewatch says so.
    let run = common::HostRun::start(&["python"], "interp-host-container.ndjson");
    let c = worker_in_container("2");
    let pid = c.worker();
    run.wait_for(&format!(
        "now also watching every process that maps /proc/{pid}/root/usr/bin/python3.13"
    ));
    c.signal(libc::SIGUSR1);
    let (exit, err) = c.wait();
    assert!(exit.success(), "the worker failed: {exit}: {err}");
    let truth = worker_truth(&err);
    let (_, alerts, summary) = run.stop_with_alerts();
    assert!(truth["keyerrors"] > 0, "no KeyError: {summary}");
    let entry = summary["processes"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["pid"] == pid))
        .unwrap_or_else(|| panic!("the container's worker is not in the summary: {summary}"));
    assert_eq!(entry["misses_in_window"], truth["keyerrors"], "{entry}");
    assert_eq!(entry["ns_pid"], 1, "{entry}");
    // It ran before racewatch met its interpreter, racing only after: said, not hidden.
    assert_eq!(
        summary["unwatched"],
        serde_json::json!([format!(
            "process {pid} ran /proc/{pid}/root/usr/bin/python3.13 for up to 2 s before \
             racewatch met that file (it looks for new interpreter files that often): what ran \
             before is not counted"
        )]),
        "{summary}"
    );
    assert_eq!(summary["unplaced_keyerrors"], 0, "{summary}");
    assert_eq!(summary["lost_events"], 0, "{summary}");
    let first = alerts
        .iter()
        .find(|a| a["pid"] == pid)
        .expect("an alert in the container");
    assert_eq!(first["reader_stack"][0]["function"], "Cache.get", "{first}");
    assert_eq!(
        first["reader_stack"][0]["file"], "/app/worker.py",
        "{first}"
    );
}

/// `--provoke` on `build`: a rare race (no KeyError in 10 s unobserved, see tests/python.rs) is
/// provoked and every KeyError flagged.
fn provoke_flags_every_keyerror(build: Build) {
    let out = temp_file(&format!(
        "interp-provoke-{}.ndjson",
        build.run[0].replace('/', "_")
    ));
    let mut args = vec![
        "python",
        "--json",
        "-o",
        out.to_str().unwrap(),
        "--provoke",
        "5ms",
        "--",
    ];
    args.extend(build.run.iter().map(String::as_str));
    args.extend([
        build.worker.as_str(),
        "--seconds",
        "5",
        "--keys",
        "50",
        "--refresh-ms",
        "200",
        "--pause-ms",
        "2",
    ]);
    let o = common::racewatch(&args);
    let truth = worker_truth(&common::stderr(&o));
    let (_, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    assert!(
        truth["keyerrors"] > 0,
        "--provoke raised no KeyError: {summary}"
    );
    assert_eq!(summary["misses_in_window"], truth["keyerrors"], "{summary}");
    assert!(
        summary["provoke"]["windows"].as_u64().unwrap() > 0,
        "{summary}"
    );
    assert_eq!(o.status.code(), Some(1));
}

/// 3.12 keeps the main interpreter's drop request static in `_PyRuntime`, as 3.11 does.
#[test]
#[ignore = "root"]
fn provoke_on_3_12_flags_every_keyerror() {
    provoke_flags_every_keyerror(pyenv("3.12.1", "3.12"));
}

/// 3.13 asks for the GIL in bit 0 of the holder's own `eval_breaker`.
#[test]
#[ignore = "root"]
fn provoke_on_3_13_flags_every_keyerror() {
    provoke_flags_every_keyerror(pyenv("3.13.0", "3.13"));
}

#[test]
fn provoke_without_dwarf_is_refused_with_the_reason() {
    let o = common::racewatch(&[
        "python",
        "--provoke",
        "5ms",
        "--",
        "/usr/bin/python3.11",
        "-c",
        "pass",
    ]);
    let err = common::stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--provoke needs the interpreter's DWARF and its static take_gil")
            && err.contains("/usr/bin/python3.11 (CPython 3.11) has no DWARF"),
        "{err}"
    );
}

/// A libpython stripped of its DWARF (its symbol table kept, as distributions ship them) is read
/// from racewatch's checked table; with `DEBUGINFOD_URLS` naming a real debuginfod server (on
/// loopback) that serves its split-off debug file, from that DWARF instead.
#[test]
#[ignore = "root"]
fn a_debug_file_from_debuginfod_is_used() {
    let dir = temp_file("debuginfod");
    let _ = std::fs::remove_dir_all(&dir);
    let (lib, srv, cache) = (dir.join("lib"), dir.join("srv"), dir.join("cache"));
    for d in [&lib, &srv, &cache] {
        std::fs::create_dir_all(d).unwrap();
    }
    let full = "/root/.pyenv/versions/3.12.1/lib/libpython3.12.so.1.0";
    let stripped = lib.join("libpython3.12.so.1.0");
    let debug = srv.join("libpython3.12.so.1.0.debug");
    let objcopy = |args: &[&std::ffi::OsStr]| {
        assert!(
            Command::new("objcopy")
                .args(args)
                .status()
                .unwrap()
                .success()
        );
    };
    objcopy(&[
        "--only-keep-debug".as_ref(),
        full.as_ref(),
        debug.as_os_str(),
    ]);
    objcopy(&[
        "--strip-debug".as_ref(),
        full.as_ref(),
        stripped.as_os_str(),
    ]);
    let port = 18000 + std::process::id() % 1000;
    let mut server = Command::new("debuginfod")
        .args(["-F", srv.to_str().unwrap(), "-p", &port.to_string(), "-d"])
        .arg(dir.join("index.sqlite"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run debuginfod (cargo xtask setup installs it)");
    // A cache of its own each time: the client remembers a miss for ten minutes.
    let mut asked = 0;
    let mut layout_from = |urls: Option<&str>| {
        asked += 1;
        let mut cmd = Command::new(common::RACEWATCH);
        cmd.args(["python", "-v", "--dry-run", "--interpreter"])
            .arg(&stripped)
            .args(["--", "true"])
            .env("DEBUGINFOD_CACHE_PATH", cache.join(asked.to_string()))
            .env_remove("DEBUGINFOD_URLS");
        if let Some(u) = urls {
            cmd.env("DEBUGINFOD_URLS", u);
        }
        let o = cmd.output().unwrap();
        let err = common::stderr(&o);
        assert!(o.status.success(), "{err}");
        err.lines()
            .find_map(|l| {
                l.split_once("its layout is from ")
                    .map(|(_, s)| s.to_string())
            })
            .unwrap_or_else(|| panic!("no layout line: {err}"))
    };
    assert!(layout_from(None).starts_with("racewatch's table"));
    // The server indexes its directory in the background: asked until it serves the file.
    let url = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let found = loop {
        let from = layout_from(Some(&url));
        if from == "its DWARF" || started.elapsed().as_secs() > 30 {
            break from;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    server.kill().unwrap();
    server.wait().unwrap();
    assert_eq!(found, "its DWARF");
    let _ = std::fs::remove_dir_all(&dir);
}
