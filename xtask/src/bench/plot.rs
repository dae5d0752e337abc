//! The report's PNG: per workload, bars of requests/s and of p99 latency per target, drawn with
//! plotters' bitmap backend and a TTF font read at run time (no fontconfig on the machine).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::report::{Plot, PlotBar};
use super::tools;

pub const WIDTH: u32 = 1200;
pub const HEIGHT: u32 = 800;
/// The family name the font is registered under.
const FAMILY: &str = "sans-serif";

/// Whether a plot can be drawn: plotters' `ab_glyph` text needs the TTF file.
pub fn can_draw() -> bool {
    Path::new(tools::FONT).exists()
}

/// Registers the TTF once per process (plotters keeps a `'static` reference to its bytes).
fn register_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes =
            std::fs::read(tools::FONT).map_err(|e| format!("cannot read {}: {e}", tools::FONT))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FAMILY, FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a font plotters can read", tools::FONT))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Writes `plots` as one PNG at `path`. Returns `false` (after saying why on stderr) when there is
/// nothing to plot or no font to write the labels with.
pub fn write_png(plots: &[&Plot], path: &Path) -> Result<bool> {
    let plots: Vec<&Plot> = plots
        .iter()
        .copied()
        .filter(|p| !p.bars.is_empty())
        .collect();
    if plots.is_empty() {
        return Ok(false);
    }
    if !can_draw() {
        eprintln!(
            "no plot: the font {} is missing (apt-get install fonts-dejavu-core)",
            tools::FONT
        );
        return Ok(false);
    }
    register_font()?;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    draw(&root, &plots).map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    root.present()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

type DrawResult<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn draw(root: &DrawingArea<BitMapBackend<'_>, Shift>, plots: &[&Plot]) -> DrawResult<()> {
    root.fill(&WHITE)?;
    let (title, body) = root.split_vertically(44);
    title.draw(&Text::new(
        "requests/s (higher is better) and p99 latency (lower is better) per target; \
         bars: median of the rounds, lines: min..max (▲: the max is above the chart)",
        (16, 14),
        (FAMILY, 17).into_font().color(&BLACK),
    ))?;
    let rows = body.split_evenly((2, plots.len()));
    for (i, plot) in plots.iter().enumerate() {
        panel(
            &rows[i],
            &format!("{}: requests/s", plot.workload),
            &plot.bars,
            |b| (b.rps, b.rps_range),
            |v| {
                if v >= 1000.0 {
                    format!("{:.1}k", v / 1000.0)
                } else {
                    format!("{v:.0}")
                }
            },
        )?;
        panel(
            &rows[plots.len() + i],
            &format!("{}: p99 ms", plot.workload),
            &plot.bars,
            |b| (b.p99_ms, b.p99_range),
            |v| {
                if v >= 10.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                }
            },
        )?;
    }
    Ok(())
}

/// Colour of a target's bars, the same in every panel.
fn colour(target: &str) -> RGBColor {
    let t = target.to_ascii_lowercase();
    if t.starts_with("direct") {
        RGBColor(150, 150, 150)
    } else if t.contains("no-stick") || t.contains("no stick") {
        RGBColor(140, 180, 230)
    } else if t.starts_with("proxyd") {
        RGBColor(31, 100, 190)
    } else if t.starts_with("haproxy") {
        RGBColor(230, 120, 20)
    } else if t.starts_with("nginx") {
        RGBColor(40, 150, 70)
    } else {
        RGBColor(150, 80, 160)
    }
}

/// One bar chart: a bar per target with its value on top and a min..max line.
fn panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: &str,
    bars: &[PlotBar],
    value: impl Fn(&PlotBar) -> (f64, Option<(f64, f64)>),
    label: impl Fn(f64) -> String,
) -> DrawResult<()> {
    // plotters' integer ranges are inclusive: 0..n-1 makes n segments, one per bar (a lone bar
    // gets a second, empty segment: 0..0 would be a range of width zero).
    let n = bars.len() as u32;
    let last = n.saturating_sub(1).max(1);
    let finite_max =
        |it: &mut dyn Iterator<Item = f64>| it.filter(|v| v.is_finite()).fold(0.0_f64, f64::max);
    let medians = finite_max(&mut bars.iter().map(|b| value(b).0));
    let highs = finite_max(&mut bars.iter().map(|b| {
        let (v, range) = value(b);
        range.map_or(v, |(_, hi)| hi.max(v))
    }));
    // One stalled round (a p99 of 300 ms beside medians of 15) must not flatten every bar: lines
    // stop at 2.5x the largest median and say where they would have ended.
    let clip = highs.min(medians * 2.5);
    let top = if clip > 0.0 { clip * 1.18 } else { 1.0 };
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 16))
        .margin(10)
        .x_label_area_size(28)
        .y_label_area_size(52)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..top)?;
    let names: Vec<String> = bars.iter().map(|b| b.target.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        // Only the labelled grid lines: the fine ones drown the bars.
        .light_line_style(TRANSPARENT)
        .x_labels(bars.len())
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .y_label_formatter(&|v| label(*v))
        .label_style((FAMILY, 12))
        .draw()?;
    let bar_gap = ((area.dim_in_pixel().0 as f64 / f64::from(last + 1)) * 0.15) as u32;
    for (i, b) in bars.iter().enumerate() {
        let i = i as u32;
        let (v, range) = value(b);
        if !v.is_finite() {
            continue;
        }
        let mut rect = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), v),
            ],
            colour(&b.target).filled(),
        );
        rect.set_margin(0, 0, bar_gap, bar_gap);
        chart.draw_series(std::iter::once(rect))?;
        if let Some((lo, hi)) = range.filter(|(lo, hi)| hi > lo) {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![
                    (SegmentValue::CenterOf(i), lo.min(clip)),
                    (SegmentValue::CenterOf(i), hi.min(clip)),
                ],
                BLACK.stroke_width(2),
            )))?;
        }
        let hi = range.map_or(v, |(_, hi)| hi.max(v));
        let at = hi.min(clip);
        if hi > clip {
            // The line goes on past the top of the chart.
            chart.draw_series(std::iter::once(TriangleMarker::new(
                (SegmentValue::CenterOf(i), clip),
                5,
                BLACK.filled(),
            )))?;
        }
        chart.draw_series(std::iter::once(Text::new(
            label(v),
            (SegmentValue::CenterOf(i), at),
            (FAMILY, 13)
                .into_font()
                .color(&BLACK)
                .pos(Pos::new(HPos::Center, VPos::Bottom)),
        )))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_png_of_the_right_size() {
        if !can_draw() {
            eprintln!("skipped: no font at {}", tools::FONT);
            return;
        }
        let bar = |t: &str, rps: f64, p99: f64| PlotBar {
            target: t.to_owned(),
            rps,
            p99_ms: p99,
            rps_range: Some((rps * 0.9, rps * 1.1)),
            p99_range: Some((p99, p99 * 40.0)),
        };
        let plot = Plot {
            workload: "keep-alive".to_owned(),
            bars: vec![bar("direct", 30000.0, 3.0), bar("HAProxy", 12000.0, 9.5)],
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p.png");
        assert!(write_png(&[&plot], &path).expect("plot"));
        let bytes = std::fs::read(&path).expect("png");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        // IHDR: width and height, big-endian, right after the 8-byte signature and 8-byte header.
        let dim = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        assert_eq!((dim(16), dim(20)), (WIDTH, HEIGHT));
        assert!(!write_png(&[], &path).expect("nothing to plot"));
        // A single bar per panel is a degenerate range for the axis; it must still draw.
        let one = Plot {
            workload: "one".to_owned(),
            bars: vec![bar("proxyd", 1.0, 0.0)],
        };
        assert!(write_png(&[&one, &plot], &path).expect("plot"));
    }
}
