//! Caches written the way people write them, built the way compilers build them: racewatch is
//! never blind without saying so (root).
mod common;

use std::{path::PathBuf, process::Command};

use common::*;

/// `demo/zoo/NAME.c` built by gcc with `flags`.
fn build_c(name: &str, flags: &[&str]) -> PathBuf {
    let out = temp_file(name);
    let status = Command::new("gcc")
        .args(flags)
        .args(["-g", "-pthread", "-o"])
        .arg(&out)
        .arg(workspace().join(format!("demo/zoo/{name}.c")))
        .status()
        .expect("run gcc");
    assert!(status.success(), "building {name} failed");
    out
}

#[test]
#[ignore = "root"]
fn copies_the_compiler_made_are_named_and_the_run_is_no_all_clear() {
    // gcc -O3 clones cache_clear and cache_fill for their constant argument, and the threads
    // call the clones: the named functions never run.
    let target = build_c("global_cache", &["-O3"]);
    let out = temp_file("zoo-global.ndjson");
    let o = racewatch(&[
        "watch",
        "--clear",
        "cache_clear",
        "--update",
        "cache_fill",
        "--lookup",
        "cache_lookup",
        "--miss-ret",
        "-1",
        "--json",
        "-o",
        out.to_str().unwrap(),
        "--",
        target.to_str().unwrap(),
        "1",
    ]);
    let err = stderr(&o);
    let (_, misses, _) = demo_truth(&err);
    assert!(misses > 0, "the race did not fire: {err}");
    let (_, summary) = parse_ndjson(&std::fs::read_to_string(&out).unwrap());
    let unwatched: Vec<&str> = summary["unwatched"]
        .as_array()
        .expect("unwatched")
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    for copy in ["cache_clear.constprop.0", "cache_fill.constprop.0"] {
        assert!(
            unwatched.iter().any(|u| u.starts_with(copy)),
            "{copy} not named in {summary}"
        );
    }
    assert_eq!(summary["misses_in_window"], 0, "{summary}");
    assert_eq!(
        o.status.code(),
        Some(4),
        "clean only where it watched: {summary}"
    );
}
