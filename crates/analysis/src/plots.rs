//! Figures as PNG and SVG: loss curves, learning-rate schedules, singular-value histograms
//! per projection (the paper's Figure 4 style) and counts of small singular values.

use crate::spectrum::SpectrumReport;
use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
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

fn both(
    path_stem: &Path,
    size: (u32, u32),
    draw: impl Fn(DrawingArea<BitMapBackend, Shift>) -> Result<()>,
    draw_svg: impl Fn(DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let png = path_stem.with_extension("png");
    let svg = path_stem.with_extension("svg");
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        draw(root)?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        draw_svg(root)?;
    }
    Ok(())
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("drawing failed: {err:?}")
}

/// One line per run: (label, points).
pub type Series = (String, Vec<(f64, f64)>);

fn lines<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    root.fill(&WHITE).map_err(e)?;
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x1, mut y0, mut y1) = (1.0f64, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x1 = x1.max(x);
        if y.is_finite() {
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if y0 > y1 {
        (y0, y1) = (0.0, 1.0);
    }
    let pad = (y1 - y0).max(1e-9) * 0.05;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..x1, (y0 - pad)..(y1 + pad))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(e)?
            .label(label.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// A line chart (e.g. training loss against tokens seen), written as PNG and SVG.
pub fn line_chart(
    path_stem: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    both(
        path_stem,
        (900, 560),
        |r| lines(r, title, x_label, y_label, series),
        |r| lines(r, title, x_label, y_label, series),
    )
}

/// Every projection type any method has, in first-seen order.
fn projection_names(methods: &[(String, SpectrumReport)]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for (_, r) in methods {
        for p in r.projections.keys() {
            if !names.contains(p) {
                names.push(p.clone());
            }
        }
    }
    names
}

fn histograms<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    methods: &[(String, SpectrumReport)],
) -> Result<()> {
    root.fill(&WHITE).map_err(e)?;
    let projections = projection_names(methods);
    let (title, body) = root.split_vertically(40);
    title
        .draw_text("Singular values of ΔW per projection (normalised histograms; values past the range fall in the last bin)", &("sans-serif", 20).into_font().color(&BLACK), (12, 10))
        .map_err(e)?;
    let cols = projections.len().clamp(1, 4);
    let rows = projections.len().div_ceil(cols).max(1);
    let panels = body.split_evenly((rows, cols));
    for (panel, proj) in panels.iter().zip(&projections) {
        let mut ymax = 0.0f64;
        let mut data = Vec::new();
        for (label, r) in methods {
            if let Some(p) = r.projections.get(proj) {
                let total = p.values.max(1) as f64;
                let width = (r.range.1 - r.range.0) / p.histogram.len() as f64;
                let pts: Vec<(f64, f64)> = p
                    .histogram
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (r.range.0 + (i as f64 + 0.5) * width, c as f64 / total))
                    .collect();
                ymax = ymax.max(pts.iter().map(|p| p.1).fold(0.0, f64::max));
                data.push((label.clone(), pts, r.range));
            }
        }
        let range = data.first().map(|d| d.2).unwrap_or((0.0, 2.0));
        let mut chart = ChartBuilder::on(panel)
            .caption(proj, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(44)
            .build_cartesian_2d(range.0..range.1, 0f64..(ymax * 1.1).max(1e-6))
            .map_err(e)?;
        chart
            .configure_mesh()
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(e)?;
        for (i, (label, pts, _)) in data.into_iter().enumerate() {
            let color = COLORS[i % COLORS.len()];
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(e)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

/// Per-projection histograms of singular values, one line per method.
pub fn svd_histograms(path_stem: &Path, methods: &[(String, SpectrumReport)]) -> Result<()> {
    both(
        path_stem,
        (1200, 700),
        |r| histograms(r, methods),
        |r| histograms(r, methods),
    )
}

fn counts<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    methods: &[(String, SpectrumReport)],
) -> Result<()> {
    root.fill(&WHITE).map_err(e)?;
    let projections = projection_names(methods);
    let threshold = methods.first().map(|m| m.1.threshold).unwrap_or(0.1);
    let ymax = methods
        .iter()
        .flat_map(|(_, r)| r.projections.values().map(|p| p.values))
        .max()
        .unwrap_or(1) as f64;
    let n = methods.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Singular values below {threshold} per projection"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..projections.len() as f64, 0f64..ymax * 1.05)
        .map_err(e)?;
    let names = projections.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(projections.len() * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("count (out of all values)")
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    for (k, (label, r)) in methods.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let bars: Vec<Rectangle<(f64, f64)>> = projections
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let c = r.projections.get(p)?.below_threshold as f64;
                let x0 = i as f64 + 0.1 + 0.8 * k as f64 / n;
                Some(Rectangle::new(
                    [(x0, 0.0), (x0 + 0.8 / n, c)],
                    color.filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(e)?
            .label(label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Bar chart of the count of singular values below the threshold, per projection and method.
pub fn svd_counts(path_stem: &Path, methods: &[(String, SpectrumReport)]) -> Result<()> {
    both(
        path_stem,
        (1000, 560),
        |r| counts(r, methods),
        |r| counts(r, methods),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spectrum::analyse;

    #[test]
    fn plots_are_valid_png_and_svg() {
        let dir = tempfile::tempdir().unwrap();
        let series = vec![
            (
                "full".to_string(),
                (0..50).map(|i| (i as f64, 5.0 - i as f64 * 0.05)).collect(),
            ),
            (
                "relora".to_string(),
                (0..50).map(|i| (i as f64, 5.2 - i as f64 * 0.04)).collect(),
            ),
        ];
        line_chart(
            &dir.path().join("loss"),
            "Training loss",
            "step",
            "loss",
            &series,
        )
        .unwrap();
        let m: Vec<f32> = (0..64).map(|i| ((i * 7) % 13) as f32 / 13.0).collect();
        let r = analyse(
            vec![
                ("layers.0.q_proj".into(), 8, 8, m.clone()),
                ("layers.0.up_proj".into(), 8, 8, m),
            ],
            0.1,
            50,
            (0.0, 2.0),
        )
        .unwrap();
        let methods = vec![("relora".to_string(), r.clone()), ("full".to_string(), r)];
        svd_histograms(&dir.path().join("hist"), &methods).unwrap();
        svd_counts(&dir.path().join("counts"), &methods).unwrap();
        for stem in ["loss", "hist", "counts"] {
            let png = std::fs::read(dir.path().join(format!("{stem}.png"))).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "{stem}.png");
            let svg = std::fs::read_to_string(dir.path().join(format!("{stem}.svg"))).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
                "{stem}.svg"
            );
            assert!(svg.contains("<text"), "{stem}.svg has text");
        }
    }
}
