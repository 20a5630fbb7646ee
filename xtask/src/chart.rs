//! The benchmark's chart: each workload's lookup rate under each observer, as a ratio to the same
//! run unobserved, on a log scale (strace sits two orders of magnitude below the rest).
use std::path::Path;

use anyhow::{Context as _, Result, anyhow};
use plotters::{
    prelude::*,
    style::{FontStyle, register_font},
};

/// Where Debian's fonts-dejavu-core puts the font the chart is lettered in.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers the font the charts are lettered in, as "sans-serif".
pub fn register() -> Result<()> {
    crate::setup::ensure_font(FONT)?;
    let font = std::fs::read(FONT).with_context(|| format!("cannot read {FONT}"))?;
    // The font must outlive every drawing: leak it once for the process.
    register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow!("{FONT} is not a font plotters can read"))
}

/// One panel per workload: (title, [(configuration, ratio)]).
pub fn draw(path: &Path, panels: &[(&str, Vec<(String, f64)>)]) -> Result<()> {
    register()?;
    let rows: usize = panels.iter().map(|(_, bars)| bars.len()).sum();
    let height = 120 + 44 * rows as u32 + 60 * panels.len() as u32;
    let root = BitMapBackend::new(path, (1200, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let sizes: Vec<u32> = panels
        .iter()
        .map(|(_, bars)| 60 + 44 * bars.len() as u32)
        .collect();
    let mut rest = root.titled(
        "Lookup rate under each observer, as a ratio to the same run unobserved (log scale)",
        ("sans-serif", 22),
    )?;
    for ((title, bars), size) in panels.iter().zip(sizes) {
        let (area, below) = rest.split_vertically(size + 40);
        rest = below;
        let mut chart = ChartBuilder::on(&area)
            .caption(*title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(520)
            .build_cartesian_2d(
                (0.001f64..2.0).log_scale(),
                (0..bars.len()).into_segmented(),
            )?;
        let names: Vec<String> = bars.iter().map(|(n, _)| n.clone()).collect();
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(bars.len() + 1)
            .y_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .x_label_formatter(&|x| format!("{x}"))
            .label_style(("sans-serif", 13))
            .draw()?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (name, ratio))| {
            let color = if name.starts_with("racewatch") {
                BLUE.mix(0.7)
            } else if name == "unobserved" {
                BLACK.mix(0.4)
            } else {
                RED.mix(0.6)
            };
            let (lo, hi) = (SegmentValue::Exact(i), SegmentValue::Exact(i + 1));
            Rectangle::new([(0.001, lo), (ratio.max(0.001), hi)], color.filled())
        }))?;
        chart.draw_series(bars.iter().enumerate().map(|(i, (_, ratio))| {
            Text::new(
                format!("{ratio:.3}"),
                (ratio.max(0.001) * 1.05, SegmentValue::CenterOf(i)),
                ("sans-serif", 13),
            )
        }))?;
    }
    root.present()?;
    Ok(())
}
