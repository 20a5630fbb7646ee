//! `racewatch watch --config`: several windows in one run, against the two-window demo (root),
//! and every config it refuses, with the file, line and key named (no root needed: refused
//! before anything is loaded).
mod common;

use std::collections::HashMap;

use common::*;
use serde_json::Value;

fn config() -> String {
    workspace()
        .join("demo/two_windows.toml")
        .to_string_lossy()
        .into_owned()
}

/// The demo's ground truth by window name: (lookups, misses, refreshes).
type Truth = HashMap<String, (u64, u64, u64)>;

/// The demo's ground truth, from its line per window.
fn truth(stderr: &str) -> Truth {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("two_windows: "))
        .map(|line| {
            let field = |name: &str| -> &str {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {line}"))
            };
            let count = |name: &str| -> u64 { field(name).parse().unwrap() };
            (
                field("window=").to_string(),
                (count("lookups="), count("misses="), count("refreshes=")),
            )
        })
        .collect()
}

/// Runs the demo under `racewatch watch WATCH_ARGS --json`: (exit code, demo truth, alerts,
/// summary).
fn watch_two_windows(watch_args: &[&str]) -> (i32, Truth, Vec<Value>, Value) {
    let out = temp_file("config.ndjson");
    let out_s = out.to_string_lossy().into_owned();
    let mut args = vec!["watch"];
    args.extend(watch_args);
    args.extend([
        "--json",
        "-o",
        &out_s,
        "--",
        two_windows().to_str().unwrap(),
    ]);
    // A short gap in each prices window keeps the race firing on a loaded machine; readers that
    // pause leave the CPUs to racewatch.
    args.extend(["--seconds", "2", "--gap-us", "20", "--pause-us", "10"]);
    let o = racewatch(&args);
    let err = stderr(&o);
    let text = std::fs::read_to_string(&out)
        .unwrap_or_else(|e| panic!("no output file ({e}); stderr:\n{err}"));
    let (alerts, summary) = parse_ndjson(&text);
    // Each hazard line (one per cache, at the end) names its window, as the summary does.
    let hazards: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["type"] == "hazard")
        .collect();
    assert!(!hazards.is_empty(), "no hazard line:\n{text}");
    for h in &hazards {
        let name = h["window"].as_str().unwrap_or_default();
        assert!(
            summary["windows_by_name"].get(name).is_some(),
            "a hazard line names no window of the run: {h}"
        );
    }
    let truth = truth(&err);
    assert_eq!(
        truth.len(),
        2,
        "no ground truth in the demo's stderr:\n{err}"
    );
    (o.status.code().unwrap_or(-1), truth, alerts, summary)
}

#[test]
#[ignore = "root"]
fn each_window_is_counted_apart_and_the_swapped_one_never_misses() {
    let (code, truth, alerts, summary) = watch_two_windows(&["--config", &config()]);
    let by_name = summary["windows_by_name"]
        .as_object()
        .unwrap_or_else(|| panic!("no windows_by_name: {summary}"));
    let names: Vec<&str> = by_name.keys().map(String::as_str).collect();
    assert_eq!(names, ["prices", "rates"], "summary: {summary}");
    assert_eq!(summary["lost_events"], 0, "summary: {summary}");

    let (prices, rates) = (&by_name["prices"], &by_name["rates"]);
    let (_, misses, refreshes) = truth["prices"];
    assert!(misses > 0, "the demo produced no miss to find: {summary}");
    assert_eq!(prices["misses_in_window"], misses, "summary: {summary}");
    assert_eq!(
        summary["misses_in_window"], misses,
        "only prices misses: {summary}"
    );
    assert_eq!(
        prices["windows"], refreshes,
        "a window per refresh: {summary}"
    );
    let with_misses = prices["windows_with_misses"].as_u64().unwrap();
    assert!(
        with_misses > 0 && with_misses <= refreshes,
        "summary: {summary}"
    );

    let (_, misses, refreshes) = truth["rates"];
    assert_eq!(misses, 0, "build-then-swap missed by the demo's own count");
    assert_eq!(
        rates["windows"], refreshes,
        "a window per rebuild: {summary}"
    );
    assert_eq!(rates["misses_in_window"], 0, "summary: {summary}");
    assert_eq!(rates["windows_with_misses"], 0, "summary: {summary}");

    assert!(!alerts.is_empty(), "no alert; summary: {summary}");
    for a in &alerts {
        assert_eq!(a["window"], "prices", "{a}");
        assert_eq!(a["reader_name"], "prices-reader", "{a}");
        assert_eq!(a["writer_name"], "prices-refresh", "{a}");
        assert_eq!(a["miss"], true, "{a}");
    }
    assert_eq!(code, 1, "a race found exits 1");
}

#[test]
#[ignore = "root"]
fn the_flags_window_is_named_after_the_lookup() {
    let (code, truth, alerts, summary) = watch_two_windows(&[
        "--clear",
        "Prices::reset",
        "--update",
        "Prices::load",
        "--lookup",
        "Prices::price",
        "--miss-ret",
        "-1",
    ]);
    let by_name = summary["windows_by_name"].as_object().unwrap();
    assert_eq!(by_name.len(), 1, "summary: {summary}");
    assert_eq!(
        by_name["Prices::price"]["misses_in_window"], truth["prices"].1,
        "summary: {summary}"
    );
    assert!(alerts.iter().all(|a| a["window"] == "Prices::price"));
    assert_eq!(code, 1);
}

/// `racewatch watch --config` with a file of `text` against the demo: (exit code, stderr, the
/// file's path).
fn refused(name: &str, text: &str) -> (Option<i32>, String, String) {
    let path = temp_file(name);
    std::fs::write(&path, text).unwrap();
    let path = path.to_string_lossy().into_owned();
    let demo = two_windows().to_str().unwrap();
    let o = racewatch(&["watch", "--config", &path, "--", demo]);
    (o.status.code(), stderr(&o), path)
}

/// The demo's config with `from` replaced by `to`.
fn demo_config_with(from: &str, to: &str) -> String {
    let text = std::fs::read_to_string(config()).unwrap();
    assert!(text.contains(from), "{from:?} is not in the demo's config");
    text.replacen(from, to, 1)
}

/// The line of the demo's config that holds `text`, after `from` was replaced by `to`.
fn line_of(from: &str, to: &str, text: &str) -> usize {
    demo_config_with(from, to)
        .lines()
        .position(|l| l.contains(text))
        .unwrap_or_else(|| panic!("no {text:?} in the config"))
        + 1
}

fn assert_names(code: Option<i32>, err: &str, path: &str, line: usize, key: &str, what: &str) {
    assert_eq!(code, Some(2), "{err}");
    let at = format!("racewatch: error: {path}:{line}: key `{key}`: {what}");
    assert!(err.contains(&at), "expected {at:?} in:\n{err}");
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let (from, to) = ("miss_ret = -1", "miss_value = -1");
    let (code, err, path) = refused("unknown.toml", &demo_config_with(from, to));
    let line = line_of(from, to, to);
    assert_names(
        code,
        &err,
        &path,
        line,
        "miss_value",
        "unknown field `miss_value`",
    );
}

#[test]
fn a_value_of_the_wrong_type_is_named_with_its_line() {
    let (from, to) = ("miss_ret = -1", "miss_ret = \"-1\"");
    let (code, err, path) = refused("type.toml", &demo_config_with(from, to));
    let line = line_of(from, to, to);
    assert_names(
        code,
        &err,
        &path,
        line,
        "miss_ret",
        "invalid type: string \"-1\"",
    );
}

#[test]
fn a_duplicate_name_is_named_with_its_line() {
    let (from, to) = ("name = \"rates\"", "name = \"prices\"");
    let (code, err, path) = refused("duplicate.toml", &demo_config_with(from, to));
    let first = line_of(from, to, "name = \"prices\"");
    let line = line_of(from, to, "open = \"Rates::rebuild\"") - 1;
    let what = format!("the name \"prices\" is already the window's at line {first}");
    assert_names(code, &err, &path, line, "name", &what);
}

#[test]
fn text_that_is_not_toml_is_named_with_its_line() {
    let (from, to) = ("close = \"Prices::load\"", "close = Prices::load");
    let (code, err, path) = refused("syntax.toml", &demo_config_with(from, to));
    let line = line_of(from, to, to);
    assert_names(
        code,
        &err,
        &path,
        line,
        "close",
        "string values must be quoted",
    );
}

#[test]
fn a_function_that_is_not_there_is_named_with_its_line() {
    let (from, to) = ("access = \"Rates::rate\"", "access = \"Rates::rat\"");
    let (code, err, path) = refused("symbol.toml", &demo_config_with(from, to));
    let line = line_of(from, to, to);
    assert_names(
        code,
        &err,
        &path,
        line,
        "access",
        "no function named `Rates::rat`",
    );
}

#[test]
fn a_file_that_is_not_there_is_named_with_its_line() {
    let (from, to) = (
        "name = \"rates\"",
        "name = \"rates\"\nbinary = \"/nonexistent/librates.so\"",
    );
    let (code, err, path) = refused("binary.toml", &demo_config_with(from, to));
    let line = line_of(from, to, "binary = ");
    assert_names(
        code,
        &err,
        &path,
        line,
        "binary",
        "cannot read /nonexistent/librates.so",
    );
    // The config file itself.
    let demo = two_windows().to_str().unwrap();
    let o = racewatch(&["watch", "--config", "/nonexistent/w.toml", "--", demo]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("racewatch: error: /nonexistent/w.toml: cannot read it: "),
        "{}",
        stderr(&o)
    );
}

#[test]
fn config_and_the_window_flags_exclude_each_other() {
    let o = racewatch(&[
        "watch",
        "--config",
        &config(),
        "--clear",
        "Prices::reset",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cannot be used with"), "{}", stderr(&o));
    // Neither: the flags are asked for.
    let o = racewatch(&["watch", "--", "true"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--clear <SYM>"), "{}", stderr(&o));
}
