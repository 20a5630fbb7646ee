//! racewatch installed the way people install it, on a clean Debian trixie root that has no Rust
//! toolchain, entered with a mount namespace of its own (tests/common/container.rs) and the host's
//! pids, as a pod with `hostPID`: the .deb with `apt install ./racewatch_….deb`, the wheel with
//! the root's own pip into a venv. Each time the installed binary names its version, passes
//! `racewatch info` and counts the Python demo's KeyErrors exactly, on the root's own CPython.
//!
//! The packages are `cargo xtask dist`'s: `cargo xtask test` makes them first and names their
//! directory in `RACEWATCH_DIST` (else `<target>/dist`).
mod common;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use common::{RACY_WORKER, container, parse_ndjson, temp_file, worker_truth};

/// The first line of `racewatch --version` for this build.
const VERSION_LINE: &str = concat!(
    "racewatch ",
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RACEWATCH_COMMIT"),
    ")"
);

/// The one package in the dist directory whose name starts with `prefix` and ends with `suffix`.
fn package(prefix: &str, suffix: &str) -> PathBuf {
    let dir = std::env::var_os("RACEWATCH_DIST").map_or_else(
        // CARGO_TARGET_TMPDIR is <target>/tmp.
        || Path::new(env!("CARGO_TARGET_TMPDIR")).with_file_name("dist"),
        PathBuf::from,
    );
    let found: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    let matching: Vec<&PathBuf> = found
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix))
        })
        .collect();
    match matching.as_slice() {
        [one] => (*one).clone(),
        _ => panic!(
            "expected one {prefix}*{suffix} in {} (found {found:?}): run `cargo xtask dist` \
             (`cargo xtask test` runs it), or name its directory in RACEWATCH_DIST",
            dir.display()
        ),
    }
}

/// What one step of the script in the root did.
struct Step {
    status: i32,
    stdout: String,
    stderr: String,
}

/// Runs `steps` (name, shell command) in order on a fresh overlay of the trixie root, with
/// `package`'s directory at /dist, the demo at /demo, a directory of the host's at /out and the
/// host's /sys (BTF, the uprobe PMU), in a clean environment; returns each step's status and
/// output by name, and the host's side of /out. Every step runs, whatever the ones before it
/// did, so that a failure shows what came after it too.
fn in_clean_root(package: &Path, steps: &[(&str, String)]) -> (HashMap<String, Step>, PathBuf) {
    let out = temp_file(&format!(
        "install-{}",
        package.file_name().unwrap().to_string_lossy()
    ));
    std::fs::create_dir_all(&out).unwrap();
    let mut script = String::from(
        "step() { n=$1; shift; sh -c \"$1\" >/out/$n.out 2>/out/$n.err; echo $? >/out/$n.status; }\n",
    );
    for (name, command) in steps {
        script += &format!("step {name} '{}'\n", command.replace('\'', r"'\''"));
    }
    let demo = common::workspace().join("demo");
    let o = container::run_with_host_pids(
        &container::debian_root("trixie"),
        &[
            (package.parent().unwrap(), "/dist"),
            (&demo, "/demo"),
            (&out, "/out"),
            (Path::new("/sys"), "/sys"),
        ],
        &[
            "/usr/bin/env",
            "-i",
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME=/root",
            "LANG=C.UTF-8",
            "/bin/sh",
            "-c",
            &script,
        ],
    );
    assert!(
        o.status.success(),
        "the root did not run the script: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    let read = |name: &str, ext: &str| {
        std::fs::read_to_string(out.join(format!("{name}.{ext}")))
            .unwrap_or_else(|e| panic!("step {name} left no .{ext}: {e}"))
    };
    let results = steps
        .iter()
        .map(|(name, _)| {
            let step = Step {
                status: read(name, "status").trim().parse().unwrap(),
                stdout: read(name, "out"),
                stderr: read(name, "err"),
            };
            (name.to_string(), step)
        })
        .collect();
    (results, out)
}

/// The steps every installed racewatch must pass, with `man1` where its pages should be.
fn checks(man1: &str) -> Vec<(&'static str, String)> {
    vec![
        // The root has no Rust: what runs below is the package alone.
        (
            "no_toolchain",
            "! command -v cargo && ! command -v rustc".into(),
        ),
        ("version", "racewatch --version".into()),
        ("info", "racewatch info".into()),
        ("man", format!("gzip -dc {man1}/racewatch-python.1.gz")),
        (
            "demo",
            format!(
                "racewatch python --json -o /out/demo.ndjson -- python3.13 /demo/worker.py {}",
                RACY_WORKER.join(" ")
            ),
        ),
    ]
}

/// The results of [`checks`] (`out`: the host's side of /out): what an installed racewatch must
/// show.
fn assert_checks(r: &HashMap<String, Step>, out: &Path, how: &str) {
    let step = |name: &str| &r[name];
    let show = |name: &str| {
        let s = step(name);
        format!(
            "{how}: step {name} exited {}:\n{}{}",
            s.status, s.stdout, s.stderr
        )
    };
    assert_eq!(step("no_toolchain").status, 0, "{}", show("no_toolchain"));
    let version = &step("version").stdout;
    assert_eq!(step("version").status, 0, "{}", show("version"));
    assert_eq!(
        version.lines().next(),
        Some(VERSION_LINE),
        "{}",
        show("version")
    );
    assert!(
        version.contains("kernel: Linux 5.15+") && version.contains("CPython: 3.11 to 3.14"),
        "{}",
        show("version")
    );
    assert_eq!(step("info").status, 0, "{}", show("info"));
    assert_eq!(
        step("info").stdout.lines().last(),
        Some("racewatch can run here"),
        "{}",
        show("info")
    );
    assert_eq!(step("man").status, 0, "{}", show("man"));
    assert!(
        step("man").stdout.contains(".TH racewatch-python 1"),
        "{}",
        show("man")
    );
    let demo = step("demo");
    assert_eq!(demo.status, 1, "{}", show("demo"));
    let truth = worker_truth(&demo.stderr);
    let (_, summary) = parse_ndjson(
        &std::fs::read_to_string(out.join("demo.ndjson"))
            .unwrap_or_else(|e| panic!("{e}: {}", show("demo"))),
    );
    assert!(truth["keyerrors"] > 0, "{}", show("demo"));
    assert_eq!(
        summary["misses_in_window"], truth["keyerrors"],
        "{how}: {summary}"
    );
    assert_eq!(summary["unplaced_keyerrors"], 0, "{how}: {summary}");
    assert_eq!(summary["lost_events"], 0, "{how}: {summary}");
}

#[test]
#[ignore = "root"]
fn the_deb_installs_with_apt_and_counts_exactly() {
    let deb = package("racewatch_", "_amd64.deb");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    let mut steps = vec![("install", format!("apt-get install -y /dist/{name}"))];
    steps.extend(checks("/usr/share/man/man1"));
    steps.push((
        "files",
        "ls /usr/bin/racewatch /usr/lib/systemd/system/racewatch.service \
         /usr/share/bash-completion/completions/racewatch \
         /usr/share/zsh/vendor-completions/_racewatch \
         /usr/share/fish/vendor_completions.d/racewatch.fish"
            .into(),
    ));
    let (r, out) = in_clean_root(&deb, &steps);
    let install = &r["install"];
    assert_eq!(
        install.status, 0,
        "apt install: {}{}",
        install.stdout, install.stderr
    );
    assert_eq!(r["files"].status, 0, "{}", r["files"].stderr);
    assert_checks(&r, &out, "the .deb");
}

#[test]
#[ignore = "root"]
fn the_wheel_installs_with_pip_into_a_venv_and_counts_exactly() {
    let wheel = package("racewatch-", ".whl");
    let name = wheel.file_name().unwrap().to_string_lossy().into_owned();
    let mut steps = vec![
        ("venv", "python3.13 -m venv /opt/rw".to_string()),
        (
            "install",
            format!("/opt/rw/bin/pip install --no-index /dist/{name}"),
        ),
    ];
    // As an activated venv: its bin first on PATH.
    steps.extend(
        checks("/opt/rw/share/man/man1")
            .into_iter()
            .map(|(n, c)| (n, format!("PATH=/opt/rw/bin:$PATH; {c}"))),
    );
    steps.push((
        "which",
        "PATH=/opt/rw/bin:$PATH; command -v racewatch".into(),
    ));
    let (r, out) = in_clean_root(&wheel, &steps);
    for name in ["venv", "install"] {
        let s = &r[name];
        assert_eq!(s.status, 0, "{name}: {}{}", s.stdout, s.stderr);
    }
    assert_eq!(r["which"].stdout.trim(), "/opt/rw/bin/racewatch");
    assert_checks(&r, &out, "the wheel");
}
