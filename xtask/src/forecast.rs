//! The hazard forecast against what happens: over a sweep of configurations of the native demo
//! and the Python worker (window width, refresh rate, reader rate, readers, switch interval, a
//! sleep inside the window or none), each run once under racewatch, the forecast it printed for
//! the run's length against the window misses racewatch counted in the same run. Written into
//! docs/HAZARD.md, with a log-log chart of the two.
use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context as _, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::demo::DEMO_PROBES;

/// The section's title in docs/HAZARD.md.
const TITLE: &str = "\n## The forecast against what happens";

/// Observed counts of 0 are drawn at this height on the log scale.
const ZERO_AT: f64 = 0.3;

/// One configuration of the sweep.
struct Point {
    target: &'static str,
    args: &'static [&'static str],
}

const NATIVE: [Point; 6] = [
    Point {
        target: "native",
        args: &[
            "--keys",
            "64",
            "--refresh-us",
            "200000",
            "--pause-us",
            "2000",
        ],
    },
    Point {
        target: "native",
        args: &["--keys", "200", "--refresh-us", "5000", "--pause-us", "50"],
    },
    Point {
        target: "native",
        args: &[
            "--keys",
            "2000",
            "--refresh-us",
            "5000",
            "--pause-us",
            "200",
        ],
    },
    Point {
        target: "native",
        args: &[
            "--keys",
            "2000",
            "--refresh-us",
            "2000",
            "--pause-us",
            "20",
            "--readers",
            "2",
        ],
    },
    Point {
        target: "native",
        args: &[
            "--keys",
            "64",
            "--refresh-us",
            "1000",
            "--pause-us",
            "100",
            "--gap-us",
            "50",
        ],
    },
    Point {
        target: "native",
        args: &[
            "--keys",
            "64",
            "--refresh-us",
            "20000",
            "--pause-us",
            "1000",
            "--gap-us",
            "500",
            "--readers",
            "2",
        ],
    },
];

const PYTHON: [Point; 7] = [
    Point {
        target: "python",
        args: &["--keys", "2000"],
    },
    Point {
        target: "python",
        args: &["--keys", "2000", "--switch-interval", "0.0005"],
    },
    Point {
        target: "python",
        args: &["--keys", "2000", "--switch-interval", "0.005"],
    },
    Point {
        target: "python",
        args: &["--keys", "200", "--refresh-ms", "20", "--pause-ms", "0.1"],
    },
    Point {
        target: "python",
        args: &["--keys", "2000", "--gap-ms", "0.05", "--pause-ms", "0.2"],
    },
    Point {
        target: "python",
        args: &["--keys", "50", "--refresh-ms", "200", "--pause-ms", "2"],
    },
    Point {
        target: "python",
        args: &[
            "--keys",
            "500",
            "--refresh-ms",
            "10",
            "--pause-ms",
            "1",
            "--gap-ms",
            "0.5",
        ],
    },
];

/// What one run forecast for itself (None where it counted no reader's lookups: the cost budget
/// left no sampling) and what it saw.
struct Outcome {
    forecast: Option<f64>,
    low: f64,
    high: Option<f64>,
    observed: u64,
    windows: u64,
}

/// Runs `command` under racewatch with `args` and reads its last hazard line and its summary.
fn once(racewatch: &str, args: &[&str], command: &[&str]) -> Result<Outcome> {
    let report =
        std::env::temp_dir().join(format!("racewatch-forecast-{}.ndjson", std::process::id()));
    // A report left by an earlier run must not pass for this one's.
    let _ = std::fs::remove_file(&report);
    let status = Command::new(racewatch)
        .args(args)
        .args(["--json", "-o"])
        .arg(&report)
        .arg("--")
        .args(command)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .with_context(|| format!("cannot run {racewatch}"))?;
    let text = std::fs::read_to_string(&report)
        .with_context(|| format!("racewatch ({status}) wrote no report"))?;
    let _ = std::fs::remove_file(&report);
    let lines: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let summary = lines.last().context("an empty report")?;
    let hazard = lines
        .iter()
        .rev()
        .find(|l| l["type"] == "hazard")
        .context("no hazard line")?;
    let per_run = summary["duration_s"].as_f64().unwrap_or(0.0) / 3600.0;
    let interval = &hazard["expected_interval_per_hour"];
    Ok(Outcome {
        forecast: hazard["expected_collisions_per_hour"]
            .as_f64()
            .map(|f| f * per_run),
        low: interval[0].as_f64().unwrap_or(0.0) * per_run,
        high: interval[1].as_f64().map(|h| h * per_run),
        observed: summary["misses_in_window"].as_u64().unwrap_or(0),
        windows: summary["windows"].as_u64().unwrap_or(0),
    })
}

/// Runs the sweep, `seconds` a run, and writes its table and chart into docs/.
pub fn run(
    racewatch: &str,
    demo: &str,
    interpreter: &str,
    worker: &str,
    seconds: f64,
) -> Result<()> {
    let secs = format!("{seconds}");
    let mut rows = Vec::new();
    for p in NATIVE.iter().chain(&PYTHON) {
        let (watch, command): (Vec<&str>, Vec<&str>) = if p.target == "native" {
            let watch = [&["watch"][..], &DEMO_PROBES, &["--miss-ret", "-1"]].concat();
            (watch, [&[demo, "--seconds", &secs][..], p.args].concat())
        } else {
            (
                vec!["python"],
                [&[interpreter, worker, "--seconds", &secs][..], p.args].concat(),
            )
        };
        let o = once(racewatch, &watch, &command)?;
        eprintln!(
            "forecast: {} {}: forecast {:?}, observed {}",
            p.target,
            p.args.join(" "),
            o.forecast,
            o.observed
        );
        rows.push((p, o));
    }
    let mut section = format!("{TITLE}\n\n");
    writeln!(
        section,
        "Written by `cargo xtask bench --forecast --seconds {seconds}`: each configuration run once \
         for {seconds} s under racewatch (`watch --miss-ret -1` for the native demo, `python` for \
         the worker, on pyenv's CPython 3.11), the forecast of its last hazard line scaled to the \
         run's length, with its 95% interval, against the window misses racewatch counted in the \
         same run (exact against the targets' own counts). Ratio: forecast over observed.\n"
    )?;
    writeln!(
        section,
        "| target | configuration | windows | forecast for the run (95%) | observed | ratio |"
    )?;
    writeln!(section, "|---|---|---|---|---|---|")?;
    for (p, o) in &rows {
        let high = o
            .high
            .map_or_else(|| "?".to_string(), |h| format!("{h:.1}"));
        let (forecast, ratio) = match o.forecast {
            None => (
                "none: no reader's lookups counted".to_string(),
                String::new(),
            ),
            Some(f) if o.observed == 0 => {
                (format!("{f:.1} ({:.1}-{high})", o.low), "none seen".into())
            }
            Some(f) => (
                format!("{f:.1} ({:.1}-{high})", o.low),
                format!("{:.2}", f / o.observed as f64),
            ),
        };
        writeln!(
            section,
            "| {} | `{}` | {} | {forecast} | {} | {ratio} |",
            p.target,
            p.args.join(" "),
            o.windows,
            o.observed
        )?;
    }
    writeln!(section, "\n![forecast against observed](hazard.png)")?;
    let root = crate::workspace_root();
    chart(
        &root.join("docs/hazard.png"),
        &rows
            .iter()
            .filter_map(|(p, o)| Some((p.target, o.forecast?, o.observed)))
            .collect::<Vec<_>>(),
    )?;
    let path = root.join("docs/HAZARD.md");
    let doc = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let kept = doc.find(TITLE).map_or(doc.as_str(), |at| &doc[..at]);
    std::fs::write(
        &path,
        format!("{}{section}", kept.trim_end_matches('\n').to_owned() + "\n"),
    )?;
    eprintln!("forecast: wrote the sweep into {}", path.display());
    print!("{section}");
    Ok(())
}

/// Forecast (x) against observed (y), both on log scales, with the lines of equality and of 3x
/// either way; an observed 0 drawn hollow at [`ZERO_AT`].
fn chart(path: &Path, points: &[(&str, f64, u64)]) -> Result<()> {
    crate::chart::register()?;
    let root = BitMapBackend::new(path, (900, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let top = points
        .iter()
        .map(|&(_, f, o)| f.max(o as f64))
        .fold(10.0, f64::max)
        * 3.0;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Hazard forecast against window misses seen, same run (log-log)",
            ("sans-serif", 20),
        )
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((0.1f64..top).log_scale(), (0.1f64..top).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("forecast for the run")
        .y_desc("window misses seen (0 drawn hollow at the bottom)")
        .label_style(("sans-serif", 14))
        .draw()?;
    for (factor, style) in [
        (1.0, BLACK.mix(0.6)),
        (3.0, BLACK.mix(0.25)),
        (1.0 / 3.0, BLACK.mix(0.25)),
    ] {
        chart.draw_series(LineSeries::new(
            [(0.1, 0.1 / factor), (top, top / factor)],
            style.stroke_width(1),
        ))?;
    }
    for (target, color) in [("native", BLUE), ("python", RED)] {
        let mine = points.iter().filter(|p| p.0 == target);
        chart
            .draw_series(mine.clone().map(|&(_, f, o)| {
                let y = if o == 0 { ZERO_AT } else { o as f64 };
                let style = if o == 0 {
                    color.stroke_width(2)
                } else {
                    color.filled()
                };
                Circle::new((f.max(0.1), y), 6, style)
            }))?
            .label(target)
            .legend(move |(x, y)| Circle::new((x, y), 6, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}
