//! Bad input gets a clear message and exit status 2, before anything is loaded (no root needed).
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
    let (code, err) = watch_err(Some("/nonexistent/app"), SYMS, &["-p", &own_pid()]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("cannot read /nonexistent/app: No such file or directory"),
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
fn neither_pid_nor_command_is_a_usage_error() {
    let (code, err) = watch_err(Some("/bin/true"), SYMS, &[]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("--pid <PID>") || err.contains("COMMAND"),
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
