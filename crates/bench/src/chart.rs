//! The benchmark's chart, drawn from the JSON files of a run: lag over time
//! in the live scenario (fixed rate and full speed, both systems), and
//! throughput per system and scenario. `bench all` draws it at the end;
//! `bench chart` redraws it from the files.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::all::{med, read};
use crate::live::{NATIVE, OURS};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 900;
/// ab_glyph needs a font file; Debian's `fonts-dejavu-core` has this one.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One system's throughput in one scenario.
struct Bar {
    system: &'static str,
    changes_per_second: f64,
}

/// A scenario's JSON, if that scenario ran.
fn load(dir: &Path, name: &str) -> Option<Value> {
    read(&dir.join(name)).ok()
}

/// Source changes per second of each system in a scenario's JSON.
fn bars(v: &Value) -> Vec<Bar> {
    let changes = v["changes"].as_f64().unwrap_or(0.0);
    // `min` skips a NaN (a variant that did not run).
    let native = med(v, "native_streaming_off_seconds").min(med(v, "native_streaming_on_seconds"));
    let mut out = Vec::new();
    for (system, secs) in [
        ("PostgreSQL (better of streaming off/on)", native),
        ("heliosdb", med(v, "ours_seconds")),
        ("capture ceiling", med(v, "capture_ceiling_seconds")),
    ] {
        if secs.is_finite() && secs > 0.0 {
            out.push(Bar {
                system,
                changes_per_second: changes / secs,
            });
        }
    }
    out
}

fn series(v: &Value, system: &str, key: &str) -> Vec<(f64, f64)> {
    v[system][key]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| Some((p[0].as_f64()?, p[1].as_f64()?)))
                .collect()
        })
        .unwrap_or_default()
}

fn palette(system: &str) -> RGBColor {
    if system.starts_with("heliosdb") || system == OURS {
        RGBColor(200, 60, 40)
    } else if system.starts_with("capture") {
        RGBColor(150, 150, 150)
    } else {
        RGBColor(40, 90, 170)
    }
}

/// Draw `chart.png` in `dir` from the scenario files found there.
pub fn draw(dir: &Path) -> Result<PathBuf> {
    let font = std::fs::read(FONT).with_context(|| {
        format!("reading the chart font {FONT} (apt-get install fonts-dejavu-core)")
    })?;
    plotters::style::register_font("sans-serif", FontStyle::Normal, font.leak())
        .map_err(|_| anyhow!("{FONT} is not a usable font"))?;
    let mut pixels = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (top, bottom) = root.split_vertically(HEIGHT / 2);
        let lag_areas = top.split_evenly((1, 2));
        if let Some(live) = load(dir, "live.json") {
            let rate = live["fixed_tps"].as_f64().unwrap_or(0.0);
            let phases = [
                (
                    "fixed_rate_lag_p99_ms_per_half_second",
                    format!("Live, {rate:.0} tps (~{:.0} events/s)", rate * 12.5),
                ),
                (
                    "full_speed_lag_p99_ms_per_half_second",
                    "Live, source at full speed".to_string(),
                ),
            ];
            for ((key, title), area) in phases.iter().zip(&lag_areas) {
                lag_panel(area, &live, key, title)?;
            }
        }
        let scenarios: Vec<(&str, Vec<Bar>)> = [
            ("1: drain, ~2 KB rows", "wide.json"),
            ("2: drain, reference rows", "drain.json"),
            ("3: one big transaction", "big-txn.json"),
        ]
        .into_iter()
        .filter_map(|(name, file)| load(dir, file).map(|v| (name, bars(&v))))
        .collect();
        throughput_panel(&bottom, &scenarios)?;
        root.present().map_err(plot_err)?;
    }
    let path = dir.join("chart.png");
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder
        .write_header()
        .and_then(|mut w| w.write_image_data(&pixels))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

fn lag_panel(area: &Area<'_>, live: &Value, key: &str, title: &str) -> Result<()> {
    let lines: Vec<(&str, Vec<(f64, f64)>)> = [NATIVE, OURS]
        .into_iter()
        .map(|s| (s, series(live, s, key)))
        .collect();
    let x_max = lines
        .iter()
        .flat_map(|(_, l)| l.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let y_max = lines
        .iter()
        .flat_map(|(_, l)| l.iter().map(|p| p.1))
        .fold(10.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max + 0.5, 0.0..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc("seconds (source commit time)")
        .y_desc("lag p99 per 0.5 s, ms")
        .draw()
        .map_err(plot_err)?;
    for (system, points) in lines {
        let color = palette(system);
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(plot_err)?
            .label(if system == OURS {
                "heliosdb"
            } else {
                "PostgreSQL"
            })
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

fn throughput_panel(area: &Area<'_>, scenarios: &[(&str, Vec<Bar>)]) -> Result<()> {
    // Each scenario relative to PostgreSQL's own replication in it (= 1).
    let baseline = |bars: &[Bar]| {
        bars.first()
            .map(|b| b.changes_per_second)
            .filter(|v| *v > 0.0)
            .unwrap_or(1.0)
    };
    let y_max = scenarios
        .iter()
        .flat_map(|(_, b)| b.iter().map(|x| x.changes_per_second / baseline(b)))
        .fold(1.0, f64::max)
        * 1.25;
    let groups = scenarios.len().max(1) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Throughput relative to PostgreSQL's own replication in the same run (medians)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..groups, 0.0..y_max)
        .map_err(plot_err)?;
    let names: Vec<String> = scenarios.iter().map(|(n, _)| n.to_string()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(scenarios.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("x PostgreSQL (label: thousand source changes/s)")
        .draw()
        .map_err(plot_err)?;
    let mut labelled = std::collections::HashSet::new();
    for (g, (_, bars)) in scenarios.iter().enumerate() {
        let width = 0.8 / bars.len().max(1) as f64;
        for (i, bar) in bars.iter().enumerate() {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            let value = bar.changes_per_second / baseline(bars);
            let color = palette(bar.system);
            let drawn = chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (x0 + width * 0.9, value)],
                    color.filled(),
                )))
                .map_err(plot_err)?;
            if labelled.insert(bar.system) {
                drawn.label(bar.system).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 14, y + 5)], color.filled())
                });
            }
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{value:.2}x ({:.1}k/s)", bar.changes_per_second / 1000.0),
                    (x0, value + y_max * 0.02),
                    ("sans-serif", 14),
                )))
                .map_err(plot_err)?;
        }
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
}

/// The coordinates of every panel.
type Coords =
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>;

/// A panel's legend box at `position`.
fn legend<'a, 'b: 'a>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, Coords>,
    position: SeriesLabelPosition,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}
