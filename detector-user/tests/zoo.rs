//! Caches written the way people write them, built the way compilers build them: racewatch is
//! never blind without saying so (root).
mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use common::*;

/// `demo/zoo/NAME.c` built by gcc with `flags`, as `out_name`.
fn build_c(name: &str, out_name: &str, flags: &[&str]) -> PathBuf {
    let out = temp_file(out_name);
    let status = Command::new("gcc")
        .args(flags)
        .args(["-pthread", "-o"])
        .arg(&out)
        .arg(workspace().join(format!("demo/zoo/{name}.c")))
        .status()
        .expect("run gcc");
    assert!(status.success(), "building {name} failed");
    out
}

/// Watches the global cache's functions in `target`: the program's ground truth and the summary.
fn watch_global_cache(target: &Path) -> (u64, serde_json::Value, Option<i32>) {
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
    (misses, summary, o.status.code())
}

#[test]
#[ignore = "root"]
fn copies_the_compiler_made_for_a_global_are_probed_with_the_global_from_dwarf() {
    // gcc -O3 clones cache_clear and cache_fill for their constant argument, and the threads
    // call the clones: the named functions never run. The clones' DWARF names the global.
    let target = build_c("global_cache", "global_cache-O3-g", &["-O3", "-g"]);
    let (misses, summary, status) = watch_global_cache(&target);
    assert_eq!(summary["unwatched"], serde_json::json!([]), "{summary}");
    assert_eq!(summary["misses_in_window"], misses, "{summary}");
    assert_eq!(summary["lost_events"], 0, "{summary}");
    assert_eq!(status, Some(1), "misses in windows: {summary}");
}

#[test]
#[ignore = "root"]
fn copies_whose_object_cannot_be_told_are_named_and_the_run_is_no_all_clear() {
    // Without DWARF nothing says which object the clones were made for.
    let target = build_c("global_cache", "global_cache-O3", &["-O3"]);
    let (_, summary, status) = watch_global_cache(&target);
    let unwatched: Vec<&str> = summary["unwatched"]
        .as_array()
        .expect("unwatched")
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    for copy in ["cache_clear.constprop.0", "cache_fill.constprop.0"] {
        assert!(
            unwatched
                .iter()
                .any(|u| u.starts_with(copy) && u.contains("has no DWARF")),
            "{copy} not named in {summary}"
        );
    }
    assert_eq!(summary["misses_in_window"], 0, "{summary}");
    assert_eq!(status, Some(4), "clean only where it watched: {summary}");
}

/// Runs racewatch on the cache whose lookup the compiler inlined: its exit status, stderr and
/// summary (None when it wrote none).
fn watch_inlined(target: &Path) -> (Option<i32>, String, Option<serde_json::Value>) {
    let out = temp_file("zoo-inlined.ndjson");
    let _ = std::fs::remove_file(&out);
    let o = racewatch(&[
        "watch",
        "--clear",
        "cache_reset",
        "--update",
        "cache_load",
        "--lookup",
        "cache_get",
        "--miss-ret",
        "-1",
        "--json",
        "-o",
        out.to_str().unwrap(),
        "--",
        target.to_str().unwrap(),
        "1",
    ]);
    let summary = std::fs::read_to_string(&out)
        .ok()
        .map(|text| parse_ndjson(&text).1);
    (o.status.code(), stderr(&o), summary)
}

#[test]
#[ignore = "root"]
fn a_lookup_inlined_into_its_caller_is_named_and_the_run_is_no_all_clear() {
    // The exported cache_get is kept, but the reader runs an inlined copy: no probe on the
    // function sees a lookup. The DWARF says where the copy is.
    for compiler in ["gcc", "clang"] {
        let target = temp_file(&format!("inlined_lookup-{compiler}"));
        let status = Command::new(compiler)
            .args(["-O2", "-g", "-pthread", "-o"])
            .arg(&target)
            .arg(workspace().join("demo/zoo/inlined_lookup.c"))
            .status()
            .unwrap();
        assert!(status.success());
        let (code, err, summary) = watch_inlined(&target);
        let summary = summary.unwrap_or_else(|| panic!("no summary: {err}"));
        let (_, misses, _) = demo_truth(&err);
        assert!(misses > 0, "the race did not fire: {err}");
        let unwatched = summary["unwatched"].to_string();
        assert!(
            unwatched.contains(
                "the lookup function cache_get where the compiler inlined it, into reader at 0x"
            ),
            "{compiler}: {summary}"
        );
        assert_eq!(summary["misses_in_window"], 0, "{compiler}: {summary}");
        assert_eq!(
            code,
            Some(4),
            "{compiler}: clean only where it watched: {summary}"
        );
    }
}

#[test]
#[ignore = "root"]
fn a_lookup_with_no_copy_of_its_own_is_refused_with_where_it_was_inlined() {
    let target = temp_file("inlined_lookup-static");
    let status = Command::new("gcc")
        .args(["-O2", "-g", "-pthread", "-DLOOKUP_LINKAGE=static", "-o"])
        .arg(&target)
        .arg(workspace().join("demo/zoo/inlined_lookup.c"))
        .status()
        .unwrap();
    assert!(status.success());
    let (code, err, _) = watch_inlined(&target);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("`cache_get` has no copy of its own in")
            && err.contains("the compiler inlined every call to it (into reader at 0x")
            && err.contains("__attribute__((noinline))"),
        "{err}"
    );
}

/// One cache of the zoo, as `demo/zoo/caches.toml` lists it: its source under `demo/zoo`, its
/// clear, update and lookup functions as a user names them, and the value its lookup returns for
/// "not found" (None: racewatch reads it from the DWARF return type, a bool, a pointer or an
/// Option).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Cache {
    source: String,
    functions: [String; 3],
    miss_ret: Option<String>,
}

/// Every cache of the zoo.
fn caches() -> &'static [Cache] {
    #[derive(serde::Deserialize)]
    struct Manifest {
        cache: Vec<Cache>,
    }
    static CACHES: std::sync::OnceLock<Vec<Cache>> = std::sync::OnceLock::new();
    CACHES.get_or_init(|| {
        let path = workspace().join("demo/zoo/caches.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        toml::from_str::<Manifest>(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .cache
    })
}

/// The code-generation variants a C or C++ build gets besides its optimisation level, in turn:
/// CET on and off, frame pointers kept, position-dependent and position-independent executables.
const VARIANTS: [(&str, &[&str]); 4] = [
    ("cet", &["-fcf-protection=full"]),
    (
        "nocet-fp",
        &["-fcf-protection=none", "-fno-omit-frame-pointer"],
    ),
    (
        "cet-nopie",
        &["-fcf-protection=full", "-fno-pie", "-no-pie"],
    ),
    ("nocet-pie", &["-fcf-protection=none", "-fPIE", "-pie"]),
];

/// One build of one cache: its name (source, compiler, flags) and the command that makes it.
struct Build {
    name: String,
    cache: &'static Cache,
    compiler: &'static str,
    flags: Vec<&'static str>,
}

impl Build {
    /// The executable, kept under cargo's test scratch directory by its name (flags included),
    /// so that a later run builds only what is missing or older than its source.
    fn binary(&self) -> PathBuf {
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("zoo")
            .join(self.name.replace([' ', '='], "_"))
    }

    fn source(&self) -> PathBuf {
        workspace().join("demo/zoo").join(&self.cache.source)
    }

    /// Builds the executable unless a current one is there; the compiler's complaint if it fails.
    fn make(&self) -> Result<PathBuf, String> {
        let bin = self.binary();
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if modified(&bin).is_some() && modified(&bin) >= modified(&self.source()) {
            return Ok(bin);
        }
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        let mut cmd = Command::new(self.compiler);
        match self.compiler {
            "rustc" => cmd.args(["--edition", "2021", "-g"]),
            "g++" | "clang++" => cmd.args(["-std=c++17", "-g", "-pthread"]),
            _ => cmd.args(["-g", "-pthread"]),
        };
        let o = cmd
            .args(&self.flags)
            .arg("-o")
            .arg(&bin)
            .arg(self.source())
            .output()
            .map_err(|e| {
                format!(
                    "cannot run {} (cargo xtask setup installs it): {e}",
                    self.compiler
                )
            })?;
        if !o.status.success() {
            return Err(format!("build failed: {}", stderr(&o).trim()));
        }
        Ok(bin)
    }
}

/// Every build of the matrix: each C and C++ cache by gcc and clang at -O0, -O2 and -O3, the
/// variants in turn (so each compiler and level meets each variant on some cache), and each Rust
/// cache at opt-level 0, 2 and 3.
fn matrix() -> Vec<Build> {
    let mut builds = Vec::new();
    for (i, cache) in caches().iter().enumerate() {
        let compilers = match cache.source.rsplit_once('.').map(|(_, ext)| ext) {
            Some("rs") => {
                for opt in ["opt-level=0", "opt-level=2", "opt-level=3"] {
                    builds.push(Build {
                        name: format!("{} rustc {opt}", cache.source),
                        cache,
                        compiler: "rustc",
                        flags: vec!["-C", opt],
                    });
                }
                continue;
            }
            Some("cpp") => ["g++", "clang++"],
            _ => ["gcc", "clang"],
        };
        for (j, compiler) in compilers.into_iter().enumerate() {
            for (k, opt) in ["-O0", "-O2", "-O3"].into_iter().enumerate() {
                let (variant, flags) = VARIANTS[(i + j + k) % VARIANTS.len()];
                builds.push(Build {
                    name: format!("{} {compiler} {opt} {variant}", cache.source),
                    cache,
                    compiler,
                    flags: [&[opt][..], flags].concat(),
                });
            }
        }
    }
    builds
}

/// What racewatch says when it cannot place the probe on the miss path.
const FALLBACK: &str = "probing every lookup's entry and return";
const EVERY_LOOKUP_ONCE: &str = "probing every lookup once, where its result is known";

/// Runs racewatch on one build as a user would and checks the contract: every miss the program
/// counted is a miss in a window (the refill always brings the keys back), none lost, the miss
/// path probed, and the exit status says so.
/// How racewatch watched a build's misses.
#[derive(Debug, PartialEq)]
enum Watched {
    /// On the instructions that return the miss value: misses alone trap.
    MissPath,
    /// The code has no instruction on misses alone: once per lookup where its result is known.
    EveryLookupOnce,
    /// The return is wider than a register, or a std::optional whose code does not show where
    /// it returns one empty: its misses are named in unwatched, and only the lookups in windows
    /// are counted.
    MissesUnread,
}

/// Where the refill's window closed.
#[derive(Debug)]
enum Closes {
    /// At the refill's last call, with no probe at its entry (`closing`).
    AtLastCall,
    /// Where the entry probe learnt the cache: the return or the tail calls.
    AfterEntry,
}

fn watch(build: &Build, bin: &Path) -> Result<(Watched, Closes), String> {
    let c = build.cache;
    let out = temp_file("zoo.ndjson");
    let _ = std::fs::remove_file(&out);
    let [clear, update, lookup] = &c.functions;
    let mut args = vec![
        "watch", "--clear", clear, "--update", update, "--lookup", lookup,
    ];
    if let Some(miss) = &c.miss_ret {
        args.extend(["--miss-ret", miss]);
    }
    args.extend([
        "--json",
        "-o",
        out.to_str().unwrap(),
        "--",
        bin.to_str().unwrap(),
        "2",
    ]);
    let o = racewatch(&args);
    let err = stderr(&o);
    // racewatch's own warnings and errors, with the lines an error goes on with.
    let mut said: Vec<&str> = Vec::new();
    for line in err.lines() {
        let continued =
            line.starts_with("  ") && said.last().is_some_and(|l| !l.contains("warning"));
        if continued
            || line.starts_with("racewatch: warning")
            || line.starts_with("racewatch: error")
        {
            said.push(line.trim());
        }
    }
    let fail = |what: String| Err(format!("{what}; racewatch said: {}", said.join(" | ")));
    if !err.contains("cache_demo: lookups=") {
        return fail(format!(
            "exit {:?}, the program printed no ground truth",
            o.status.code()
        ));
    }
    let (_, misses, refreshes) = demo_truth(&err);
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let Some(summary) = text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|s| s["type"] == "summary")
    else {
        return fail(format!("exit {:?}, no summary", o.status.code()));
    };
    let got = summary["misses_in_window"].as_u64().unwrap_or(0);
    let lost = summary["lost_events"].as_u64().unwrap_or(0);
    let unwatched = summary["unwatched"].to_string();
    let watched = if unwatched.contains("wider than the one register")
        || unwatched.contains("cannot tell from its code where it returns one empty")
    {
        Watched::MissesUnread
    } else if err.contains(EVERY_LOOKUP_ONCE) {
        Watched::EveryLookupOnce
    } else {
        Watched::MissPath
    };
    // Lookups landing in windows are a finding (exit 1) even where their misses are not counted;
    // a run that saw none is still no all-clear (exit 4).
    let in_window = summary["lookups_in_window"].as_u64().unwrap_or(0);
    let (expected_misses, expected_status) = match watched {
        Watched::MissesUnread => (0, if in_window > 0 { 1 } else { 4 }),
        _ => (misses, if misses > 0 { 1 } else { 0 }),
    };
    let mut wrong = Vec::new();
    if got != expected_misses {
        wrong.push(format!(
            "misses_in_window {got}, expected {expected_misses}"
        ));
    }
    if lost != 0 {
        wrong.push(format!("{lost} events lost"));
    }
    // Every refresh opens a window and its refill closes it (a window left open would swallow
    // the next clear), whether the refill is probed at its last call or at its entry.
    if summary["windows"] != refreshes {
        wrong.push(format!(
            "{} windows, expected one per refresh ({refreshes})",
            summary["windows"]
        ));
    }
    if o.status.code() != Some(expected_status) {
        wrong.push(format!(
            "exit {:?}, expected {expected_status} (unwatched: {unwatched})",
            o.status.code(),
        ));
    }
    if err.contains(FALLBACK) {
        wrong.push("racewatch fell back to probing every lookup's entry and return".to_string());
    }
    let closes = if summary["probe_hits"]["refill_entry"] == 0 {
        Closes::AtLastCall
    } else {
        Closes::AfterEntry
    };
    if wrong.is_empty() {
        Ok((watched, closes))
    } else {
        fail(wrong.join(", "))
    }
}

#[test]
#[ignore = "root"]
fn every_build_of_every_cache_counts_every_miss_without_probing_entry_and_return() {
    let builds = matrix();
    // Built first, on every CPU, each once (kept between runs).
    let made: Vec<Result<PathBuf, String>> = std::thread::scope(|s| {
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let chunk = builds.len().div_ceil(cpus);
        let workers: Vec<_> = builds
            .chunks(chunk)
            .map(|part| s.spawn(|| part.iter().map(Build::make).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    // Then watched one at a time, every failure kept for the end.
    let failures: Vec<String> = builds
        .iter()
        .zip(made)
        .filter_map(|(build, bin)| {
            let result = bin.and_then(|bin| watch(build, &bin));
            match &result {
                Ok((watched, closes)) => {
                    eprintln!("zoo: {}: ok, {watched:?}, {closes:?}", build.name)
                }
                Err(_) => eprintln!("zoo: {}: FAILED", build.name),
            }
            result.err().map(|e| format!("{}: {e}", build.name))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} builds broke the contract:\n{}",
        failures.len(),
        builds.len(),
        failures.join("\n")
    );
}
