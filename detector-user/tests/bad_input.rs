//! Bad input gets a clear message and the documented exit status, never a panic. Most rows are
//! refused before anything is loaded (no root needed); those marked "root" change user or
//! capabilities with setpriv, or load the probes.
mod common;

use common::*;

fn watch_err(binary: Option<&str>, syms: [&str; 3], target: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["watch"];
    if let Some(b) = binary {
        args.extend(["--binary", b]);
    }
    args.extend(["--clear", syms[0], "--update", syms[1], "--lookup", syms[2]]);
    args.extend(target);
    let o = racewatch(&args);
    (o.status.code(), stderr(&o))
}

/// A pid that surely runs: this test's own.
fn own_pid() -> String {
    std::process::id().to_string()
}

const SYMS: [&str; 3] = ["Cache::clear", "Cache::update", "Cache::lookup"];

#[test]
fn missing_binary() {
    let pid = own_pid();
    let (code, err) = watch_err(Some("/nonexistent/app"), SYMS, &["-p", &pid]);
    assert_eq!(code, Some(2));
    // With -p the file may be the process's: both places are named.
    assert!(
        err.contains(&format!(
            "/nonexistent/app is not there for process {pid}: neither on the host nor in its \
             root (/proc/{pid}/root/nonexistent/app)"
        )),
        "{err}"
    );
}

#[test]
fn non_elf_binary() {
    let (code, err) = watch_err(Some("/etc/hostname"), SYMS, &["-p", &own_pid()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/etc/hostname is not an ELF file"), "{err}");
}

#[test]
fn unknown_symbol_lists_nearest_names() {
    let demo = cache_demo().to_str().unwrap();
    let (code, err) = watch_err(None, ["Cache::clearr", SYMS[1], SYMS[2]], &["--", demo]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no function named `Cache::clearr`"), "{err}");
    assert!(err.contains("nearest names: Cache::clear()"), "{err}");
}

#[test]
fn full_signature_and_raw_symbol_both_match() {
    let demo = cache_demo().to_str().unwrap();
    let o = racewatch(&["symbols", demo, "--grep", "Cache::"]);
    let names = String::from_utf8_lossy(&o.stdout);
    assert!(names.contains("Cache::lookup(long)"), "{names}");
    // A name that resolves gets past symbol lookup; the missing pid is what stops it.
    let (code, err) = watch_err(
        Some(demo),
        ["_ZN5Cache5clearEv", SYMS[1], "Cache::lookup(long)"],
        &["-p", "999999999"],
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("no process with pid 999999999"), "{err}");
}

#[test]
fn ambiguous_symbol_lists_every_match() {
    let src = temp_file("overloads.cpp");
    std::fs::write(
        &src,
        "struct Store { void put(int); void put(double); };\n\
         __attribute__((noinline)) void Store::put(int) {}\n\
         __attribute__((noinline)) void Store::put(double) {}\n\
         int main() { Store s; s.put(1); s.put(2.0); }\n",
    )
    .unwrap();
    let bin = temp_file("overloads");
    let built = std::process::Command::new("g++")
        .arg("-o")
        .arg(&bin)
        .arg(&src)
        .status()
        .unwrap();
    assert!(built.success());
    let bin = bin.to_str().unwrap();
    let (code, err) = watch_err(
        Some(bin),
        ["Store::put", "Store::put(int)", "Store::put(double)"],
        &["-p", &own_pid()],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`Store::put` names 2 functions"), "{err}");
    assert!(
        err.contains("Store::put(int)") && err.contains("Store::put(double)"),
        "{err}"
    );
}

#[test]
fn pid_zero_and_missing_pid() {
    let demo = cache_demo().to_str().unwrap();
    let (code, err) = watch_err(Some(demo), SYMS, &["-p", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("pid 0 is not a process"), "{err}");
    let (code, err) = watch_err(Some(demo), SYMS, &["-p", "999999999"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no process with pid 999999999: is it still running?"),
        "{err}"
    );
}

#[test]
fn command_not_found() {
    let (code, err) = watch_err(None, SYMS, &["--", "no-such-command-racewatch"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("command not found: no-such-command-racewatch"),
        "{err}"
    );
}

#[test]
fn a_command_that_cannot_start_is_bad_input_even_with_a_binary_given() {
    let demo = cache_demo().to_str().unwrap();
    let (code, err) = watch_err(Some(demo), SYMS, &["--", "/nonexistent/cmd"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("command not found: /nonexistent/cmd"), "{err}");
    // There, but not executable: said as such, not as "not found".
    let script = temp_file("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\ntrue\n").unwrap();
    let path = script.to_str().unwrap();
    let (code, err) = watch_err(Some(demo), SYMS, &["--", path]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("{path} is not executable: make it so (chmod +x)")),
        "{err}"
    );
    let (code, err) = watch_err(Some(demo), SYMS, &["--", "/tmp"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/tmp is a directory, not a command"), "{err}");
}

#[test]
#[ignore = "root"]
fn a_command_whose_exec_fails_is_bad_input_that_says_why() {
    // The file is there and executable, so racewatch launches it; the exec fails.
    use std::os::unix::fs::PermissionsExt as _;
    let demo = cache_demo().to_str().unwrap();
    let script = |name: &str, text: &str| {
        let path = temp_file(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_string()
    };
    let no_interpreter = script("no-interpreter.sh", "#!/nonexistent/sh\ntrue\n");
    let (code, err) = watch_err(Some(demo), SYMS, &["--", &no_interpreter]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "cannot run {no_interpreter}: its interpreter /nonexistent/sh (the #! line) is not \
             there: install it or fix that line"
        )),
        "{err}"
    );
    // An interpreter that may not be executed (mode 644).
    let interpreter = temp_file("not-executable-interpreter");
    std::fs::write(&interpreter, "#!/bin/sh\n").unwrap();
    let denied = script(
        "denied-interpreter.sh",
        &format!("#!{}\n", interpreter.display()),
    );
    let (code, err) = watch_err(Some(demo), SYMS, &["--", &denied]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "cannot run {denied}: permission denied: this user may not execute it or its \
             interpreter"
        )),
        "{err}"
    );
}

#[test]
#[ignore = "root"]
fn a_command_this_user_may_not_execute_is_permission_denied_not_missing() {
    use std::os::unix::fs::PermissionsExt as _;
    let demo = cache_demo().to_str().unwrap();
    // Executable by its owner (root) only, and in a directory only root may search.
    let dir = temp_file("private");
    std::fs::create_dir_all(&dir).unwrap();
    let owners_only = temp_file("owners-only");
    std::fs::copy(demo, &owners_only).unwrap();
    std::fs::set_permissions(&owners_only, std::fs::Permissions::from_mode(0o700)).unwrap();
    let hidden = dir.join("app");
    std::fs::copy(demo, &hidden).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    for cmd in [&owners_only, &hidden] {
        let cmd = cmd.to_str().unwrap();
        let mut args = vec!["watch", "--binary", demo];
        args.extend(DEMO_PROBES);
        args.extend(["--", cmd]);
        let o = racewatch_as(&NOBODY, &args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!(
                "permission denied: this user may not execute {cmd} (see its owner and mode"
            )),
            "{err}"
        );
    }
}

#[test]
fn neither_binary_pid_nor_command_is_a_usage_error() {
    // Without a target, `watch` watches every process that maps --binary: it needs one.
    let (code, err) = watch_err(None, SYMS, &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains(
            "give --binary PATH to watch every process that maps it, -p PID, or -- COMMAND"
        ),
        "{err}"
    );
}

#[test]
fn stripped_binary_says_so() {
    let stripped = temp_file("stripped_demo");
    std::fs::copy(cache_demo(), &stripped).unwrap();
    assert!(
        std::process::Command::new("strip")
            .arg("--strip-all")
            .arg(&stripped)
            .status()
            .unwrap()
            .success()
    );
    let (code, err) = watch_err(Some(stripped.to_str().unwrap()), SYMS, &["-p", &own_pid()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("no function named `Cache::clear`") || err.contains("has no symbol table"),
        "{err}"
    );
}

#[test]
fn symbols_lists_demangled_names_filtered_by_a_regex() {
    let demo = cache_demo().to_str().unwrap();
    let o = racewatch(&["symbols", demo, "--grep", "^Cache::(clear|update)"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let names = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        names,
        "Cache::clear()\nCache::update(std::vector<std::pair<long, long>, std::allocator<std::pair<long, long> > > const&)\n"
    );
    // Unanchored: text without regex syntax matches anywhere in the name.
    let o = racewatch(&["symbols", demo, "--grep", "e::look"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "Cache::lookup(long)\n");
}

#[test]
fn symbols_rejects_a_bad_regex() {
    let o = racewatch(&["symbols", "/bin/true", "--grep", "Cache::(clear"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--grep is not a valid regular expression"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Asserts racewatch refused with exit status 2, said `message`, and did not panic.
fn assert_refused(code: Option<i32>, err: &str, message: &str) {
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(message), "expected {message:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn truncated_elf_says_so() {
    let whole = std::fs::read(cache_demo()).unwrap();
    let cut = temp_file("truncated_demo");
    std::fs::write(&cut, &whole[..4096]).unwrap();
    let cut = cut.to_str().unwrap();
    let (code, err) = watch_err(Some(cut), SYMS, &["-p", &own_pid()]);
    assert_refused(
        code,
        &err,
        &format!("{cut} is a truncated or corrupt ELF file ("),
    );
}

/// A 64-byte ELF header for `machine`, with no sections: what an object for another
/// architecture looks like to racewatch's parser before anything else.
fn elf_header(class64: bool, machine: u16) -> Vec<u8> {
    let mut h = vec![0x7f, b'E', b'L', b'F', if class64 { 2 } else { 1 }, 1, 1];
    h.resize(16, 0);
    h.extend(2u16.to_le_bytes()); // ET_EXEC
    h.extend(machine.to_le_bytes());
    h.extend(1u32.to_le_bytes()); // EV_CURRENT
    if class64 {
        h.extend([0u8; 24]); // entry, phoff, shoff
        h.extend(0u32.to_le_bytes()); // flags
        for v in [64u16, 56, 0, 64, 0, 0] {
            h.extend(v.to_le_bytes());
        }
    } else {
        h.extend([0u8; 12]);
        h.extend(0u32.to_le_bytes());
        for v in [52u16, 32, 0, 40, 0, 0] {
            h.extend(v.to_le_bytes());
        }
    }
    h
}

#[test]
fn wrong_architecture_elf_says_which() {
    for (name, class64, machine, arch) in [
        ("aarch64_app", true, 183u16, "Aarch64"),
        ("i386_app", false, 3u16, "I386"),
    ] {
        let path = temp_file(name);
        std::fs::write(&path, elf_header(class64, machine)).unwrap();
        let path = path.to_str().unwrap();
        let (code, err) = watch_err(Some(path), SYMS, &["-p", &own_pid()]);
        assert_refused(
            code,
            &err,
            &format!("{path} is an ELF file for {arch}, not for this machine (x86_64)"),
        );
    }
}

#[test]
fn data_symbol_is_not_a_function() {
    let demo = cache_demo().to_str().unwrap();
    // `g_stop` is a static bool (mangled `_ZL6g_stop`): named demangled and raw.
    for name in ["g_stop", "_ZL6g_stop"] {
        let (code, err) = watch_err(Some(demo), [name, SYMS[1], SYMS[2]], &["-p", &own_pid()]);
        assert_refused(
            code,
            &err,
            &format!("`{name}` in {demo} is a data symbol, not a function"),
        );
    }
}

#[test]
fn cache_arg_out_of_range() {
    let demo = cache_demo().to_str().unwrap();
    let mut args = vec!["watch", "--cache-arg", "6"];
    args.extend(DEMO_PROBES);
    args.extend(["--", demo]);
    let o = racewatch(&args);
    assert_refused(
        o.status.code(),
        &stderr(&o),
        "invalid value '6' for '--cache-arg <N>': 6 is not in 0..=5",
    );
}

#[test]
fn zombie_pid_has_nothing_to_watch() {
    // A child that exits and is not reaped stays a zombie until this test waits for it.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    let stat = format!("/proc/{pid}/stat");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !std::fs::read_to_string(&stat).is_ok_and(|s| s.contains(") Z ")) {
        assert!(
            std::time::Instant::now() < deadline,
            "{pid} never became a zombie"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let demo = cache_demo().to_str().unwrap();
    let (code, err) = watch_err(Some(demo), SYMS, &["-p", &pid.to_string()]);
    child.wait().unwrap();
    assert_refused(
        code,
        &err,
        &format!("process {pid} has exited (zombie): nothing left to watch"),
    );
}

/// racewatch under setpriv with `setpriv` options before it.
fn racewatch_as(setpriv: &[&str], args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(setpriv)
        .arg(RACEWATCH)
        .args(args)
        .output()
        .expect("setpriv (util-linux)")
}

const NOBODY: [&str; 4] = [
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
];

#[test]
#[ignore = "root"]
fn unreadable_binary() {
    // Root reads any file: the refusal is only seen by another user.
    let dir = temp_file("unreadable");
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("app");
    std::fs::copy(cache_demo(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o000)).unwrap();
    let bin = bin.to_str().unwrap();
    let mut args = vec!["watch", "--binary", bin];
    args.extend(DEMO_PROBES);
    args.extend(["--", "true"]);
    let o = racewatch_as(&NOBODY, &args);
    assert_refused(
        o.status.code(),
        &stderr(&o),
        &format!("racewatch: error: cannot read {bin}: Permission denied (os error 13)\n"),
    );
}

#[test]
#[ignore = "root"]
fn root_without_bpf_capabilities() {
    let demo = cache_demo().to_str().unwrap();
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["--", demo]);
    let o = racewatch_as(
        &[
            "--inh-caps=-bpf,-perfmon,-sys_admin",
            "--bounding-set=-bpf,-perfmon,-sys_admin",
        ],
        &args,
    );
    assert_refused(
        o.status.code(),
        &stderr(&o),
        "racewatch needs root, or the capabilities CAP_BPF and CAP_PERFMON (missing: CAP_BPF, \
         CAP_PERFMON): run it with sudo",
    );
}

#[test]
#[ignore = "root"]
fn command_that_exits_at_once() {
    let demo = cache_demo().to_str().unwrap();
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["--", demo, "--no-such-option"]);
    let o = racewatch(&args);
    let err = stderr(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("cache_demo: unknown option --no-such-option"),
        "{err}"
    );
    assert!(
        out.contains("racewatch: no cache was emptied (0 windows), 0 lookups in a window")
            && out.ends_with("target exited (exit status: 2)\n"),
        "{out}"
    );
    assert_eq!(o.status.code(), Some(0), "no lookup in a window exits 0");
}

#[test]
#[ignore = "root"]
fn pid_that_exits_mid_run() {
    // Longer than racewatch takes to attach (up to 3 s, a debug build): it exits mid-run.
    let demo = std::process::Command::new(cache_demo())
        .args(["--fixed", "--seconds", "5"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = demo.id().to_string();
    let mut args = vec!["watch"];
    args.extend(DEMO_PROBES);
    args.extend(["-p", &pid]);
    let o = racewatch(&args);
    let demo_out = demo.wait_with_output().unwrap();
    let (lookups, _, _) = demo_truth(&String::from_utf8_lossy(&demo_out.stderr));
    let err = stderr(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(&format!("watching pid {pid}")), "{err}");
    assert!(lookups > 0);
    assert!(out.ends_with(", target exited\n"), "{out}");
    assert!(!out.contains("not watched"), "{out}");
    assert_eq!(o.status.code(), Some(0), "{err}");
}

#[test]
fn provoke_duration_without_a_unit() {
    let (code, err) = watch_err(None, SYMS, &["--provoke", "2", "-p", &own_pid()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("invalid value '2' for '--provoke <DURATION>': \"2\" has no unit: write e.g. 500us or 2ms"),
        "{err}"
    );
}

#[test]
fn provoke_longer_than_the_cap() {
    let (code, err) = watch_err(None, SYMS, &["--provoke", "1s", "-p", &own_pid()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("\"1s\" is more than the 50 ms racewatch holds a window at most"),
        "{err}"
    );
}

#[test]
fn interval_must_be_positive() {
    let (code, err) = watch_err(None, SYMS, &["--interval", "0", "-p", &own_pid()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--interval must be a positive number of seconds, got 0"),
        "{err}"
    );
}

#[test]
fn python_provoke_duration_must_have_a_unit() {
    let o = racewatch(&["python", "--provoke", "5", "--", "python3", "-c", "pass"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("\"5\" has no unit: write e.g. 500us or 2ms"),
        "{err}"
    );
}

#[test]
fn budget_outside_0_to_100_says_what_to_write() {
    for bad in ["0", "-1", "101", "lots"] {
        let (code, err) = watch_err(None, SYMS, &["--budget", bad, "-p", &own_pid()]);
        assert_eq!(code, Some(2), "--budget {bad}: {err}");
        assert!(
            err.contains(&format!(
                "invalid value '{bad}' for '--budget <PERCENT>': \"{bad}\" is not a percentage \
                 above 0 and at most 100: write e.g. 1 or 0.5"
            )),
            "{err}"
        );
    }
}

#[test]
fn an_output_file_that_cannot_be_written_says_what_to_give() {
    let (code, err) = watch_err(
        None,
        SYMS,
        &[
            "-o",
            "/nonexistent/dir/out.ndjson",
            "--",
            cache_demo().to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "cannot write /nonexistent/dir/out.ndjson (give -o a file in a directory that \
             exists, which racewatch may create or append to): No such file or directory"
        ),
        "{err}"
    );
}
