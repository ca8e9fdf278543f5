//! Reports shared by `runtime eval` and the benchmarks: markdown tables and PNG line charts
//! (plotters, rendered into memory with the embedded DejaVu Sans font, encoded with `image`, written
//! atomically).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};
use spherear_core::fsutil::write_atomic;

use crate::error::{QualityError, Result};

/// A markdown table; every row must have as many cells as `headers`.
pub fn markdown_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|{}|\n", headers.join(" | "), vec!["---"; headers.len()].join("|"));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Drawn dashed (e.g. a baseline or a projection).
    pub dashed: bool,
    /// Palette index, so that related lines share a colour (e.g. a mean and its spread); `None`: the series'
    /// position in the chart.
    pub color: Option<usize>,
}

/// A line chart with optional log axes.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub log_x: bool,
    pub log_y: bool,
    pub series: Vec<Series>,
}

static FONT: Once = Once::new();

fn ensure_font() {
    FONT.call_once(|| {
        // The font is embedded (crate `dejavu`), so rendering never depends on system fonts.
        let _ = register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular());
    });
}

fn plot_err(e: impl std::fmt::Display) -> QualityError {
    QualityError::Io(format!("cannot draw the chart: {e}"))
}

fn range(v: impl Iterator<Item = f64>, log: bool) -> (f64, f64) {
    let v: Vec<f64> = v.filter(|x| x.is_finite() && (!log || *x > 0.0)).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    if log {
        (lo / 1.5, hi * 1.5)
    } else {
        let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.05).max(1e-9);
        (lo - pad, hi + pad)
    }
}

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Renders `chart` to a PNG at `path` (written to a temporary name, then renamed).
pub fn write_line_chart(path: &Path, chart: &LineChart) -> Result<()> {
    ensure_font();
    let (w, h) = (960u32, 640u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let all = || chart.series.iter().flat_map(|s| s.points.iter());
        let (x0, x1) = range(all().map(|p| p.0), chart.log_x);
        let (y0, y1) = range(all().map(|p| p.1), chart.log_y);
        let mut b = ChartBuilder::on(&root);
        b.caption(&chart.title, ("sans-serif", 22)).margin(16).x_label_area_size(48).y_label_area_size(72);
        macro_rules! draw {
            ($ctx:expr) => {{
                let mut ctx = $ctx;
                ctx.configure_mesh()
                    .x_desc(chart.x_label.as_str())
                    .y_desc(chart.y_label.as_str())
                    .label_style(("sans-serif", 14))
                    .draw()
                    .map_err(plot_err)?;
                for (i, s) in chart.series.iter().enumerate() {
                    let c = COLORS[s.color.unwrap_or(i) % COLORS.len()];
                    let pts: Vec<(f64, f64)> = s.points.clone();
                    let style = c.stroke_width(2);
                    if s.dashed {
                        ctx.draw_series(DashedLineSeries::new(pts.clone(), 8, 5, style))
                            .map_err(plot_err)?
                            .label(s.label.as_str())
                            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
                    } else {
                        ctx.draw_series(LineSeries::new(pts.clone(), style))
                            .map_err(plot_err)?
                            .label(s.label.as_str())
                            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
                    }
                    ctx.draw_series(pts.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(plot_err)?;
                }
                ctx.configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 13))
                    .position(SeriesLabelPosition::UpperLeft)
                    .draw()
                    .map_err(plot_err)?;
            }};
        }
        match (chart.log_x, chart.log_y) {
            (true, true) => {
                draw!(b.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale()).map_err(plot_err)?)
            }
            (true, false) => draw!(b.build_cartesian_2d((x0..x1).log_scale(), y0..y1).map_err(plot_err)?),
            (false, true) => draw!(b.build_cartesian_2d(x0..x1, (y0..y1).log_scale()).map_err(plot_err)?),
            (false, false) => draw!(b.build_cartesian_2d(x0..x1, y0..y1).map_err(plot_err)?),
        }
        root.present().map_err(plot_err)?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| plot_err("buffer size"))?;
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).map_err(plot_err)?;
    Ok(write_atomic(path, &png)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_layout() {
        let t = markdown_table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n|---|---|\n| 1 | 2 |\n");
    }

    #[test]
    fn chart_renders_lines_and_text() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.png");
        let chart = LineChart {
            title: "throughput".into(),
            x_label: "batch".into(),
            y_label: "images/s".into(),
            log_x: true,
            log_y: true,
            series: vec![
                Series { label: "a".into(), points: vec![(1.0, 1.0), (4.0, 3.0), (32.0, 9.0)], dashed: false, color: None },
                Series { label: "b".into(), points: vec![(1.0, 0.5), (32.0, 4.0)], dashed: true, color: None },
            ],
        };
        write_line_chart(&p, &chart).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (960, 640));
        // The first series' colour is on the canvas, and so is dark text.
        let has = |c: [u8; 3]| img.pixels().any(|px| px.0 == c);
        assert!(has([31, 119, 180]) && has([255, 127, 14]));
        assert!(img.pixels().filter(|px| px.0.iter().all(|&v| v < 60)).count() > 500);
    }
}
