//! `racewatch info` against this kernel (root), and with the privileges taken away.
mod common;

use std::process::Command;

use common::*;

fn info_json(o: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("bad JSON {text:?}: {e}"))
}

#[test]
#[ignore = "root"]
fn every_check_passes_on_this_machine() {
    let o = racewatch(&["info", "--json"]);
    let v = info_json(&o);
    assert_eq!(o.status.code(), Some(0), "{v}");
    assert_eq!(v["ok"], true);
    let checks = v["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    for name in [
        "capabilities",
        "bpf syscall",
        "memlock",
        "uprobe programs",
        "uprobe PMU",
        "ring buffer",
        "bpf_for_each_map_elem",
        "attach cookies",
        "bpf_loop",
        "BTF",
    ] {
        assert!(names.contains(&name), "no {name} check in {v}");
    }
    // This machine has every feature (FACTS.md): a failing check here is a broken probe.
    for c in checks {
        assert_eq!(c["ok"], true, "{c}");
        assert!(c["fix"].is_null(), "{c}");
    }
    let human = racewatch(&["info"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert_eq!(human.status.code(), Some(0));
    assert!(
        text.contains("ok   ring buffer: creating a ring buffer map works"),
        "{text}"
    );
    assert!(text.ends_with("racewatch can run here\n"), "{text}");
}

/// `racewatch info` run by setpriv with `args` before it.
fn info_as(setpriv: &[&str]) -> (Option<i32>, String) {
    let o = Command::new("setpriv")
        .args(setpriv)
        .args([RACEWATCH, "info"])
        .output()
        .expect("setpriv (util-linux)");
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

#[test]
#[ignore = "root"]
fn not_root_fails_with_the_fix() {
    let (code, text) = info_as(&[
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
    ]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("FAIL capabilities: missing CAP_BPF, CAP_PERFMON\n     fix: run racewatch as root (sudo)"),
        "{text}"
    );
    assert!(
        text.contains("FAIL bpf syscall: the kernel refused to answer: Operation not permitted"),
        "{text}"
    );
    assert!(
        text.contains("racewatch cannot run here: capabilities, bpf syscall"),
        "{text}"
    );
}

#[test]
#[ignore = "root"]
fn root_without_bpf_capabilities_fails() {
    let (code, text) = info_as(&[
        "--inh-caps=-bpf,-perfmon,-sys_admin",
        "--bounding-set=-bpf,-perfmon,-sys_admin",
    ]);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("FAIL capabilities: missing CAP_BPF, CAP_PERFMON"),
        "{text}"
    );
    assert!(text.contains("ok   uprobe PMU"), "{text}");
}
