//! Line charts for the status page as inline SVG, drawn by plotters' SVG backend as the audit
//! report's ε plot is (`report/chart.rs`, whose plot is tied to the report's charges); plotters
//! escapes every text it writes, and labels are cut short here before they reach it.

use plotters::prelude::*;

use super::page::esc;

/// Series drawn in one chart at most (the rest are left out and the caption says how many).
pub const SERIES_SHOWN: usize = 12;

/// Points drawn per series at most (the newest).
pub const POINTS_SHOWN: usize = 1000;

/// Characters of a series label at most.
const LABEL_CHARS: usize = 40;

/// One line of a chart.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub label: String,
    /// (x, y), x ascending; non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
    /// Drawn thicker (a mean over the others).
    pub bold: bool,
    /// Drawn dashed, in the colour of the series before it (a hospital's cap after its ε).
    pub dashed: bool,
}

impl Series {
    /// A plain line.
    pub fn line(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self { label: label.into(), points, bold: false, dashed: false }
    }
}

/// An SVG line chart (600 × 260: two side by side on a 1280-pixel screen), or a short paragraph when there is nothing to draw.
pub fn line_chart(title: &str, x_desc: &str, y_desc: &str, series: &[Series]) -> String {
    let shown: Vec<Series> = series
        .iter()
        .take(SERIES_SHOWN)
        .map(|s| {
            let skip = s.points.len().saturating_sub(POINTS_SHOWN);
            Series {
                label: s.label.chars().take(LABEL_CHARS).collect(),
                points: s.points.iter().skip(skip).copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect(),
                bold: s.bold,
                dashed: s.dashed,
            }
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if shown.is_empty() {
        return format!("<p class=\"muted\">{}: nothing to plot yet</p>", esc(title));
    }
    let caption = if series.len() > SERIES_SHOWN {
        format!("{title} (first {SERIES_SHOWN} of {})", series.len())
    } else {
        title.to_string()
    };
    let xs = shown.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = shown.iter().flat_map(|s| s.points.iter().map(|p| p.1));
    let (x0, x1) = bounds(xs);
    let (y0, y1) = bounds(ys);
    let pad = ((y1 - y0) * 0.08).max(1e-6);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (600, 260)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(caption.as_str(), ("sans-serif", 15))
                .margin(10)
                .x_label_area_size(30)
                .y_label_area_size(52)
                .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
            chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).light_line_style(WHITE.mix(0.0)).draw()?;
            let palette = [BLUE, RED, GREEN, MAGENTA, CYAN, RGBColor(255, 140, 0), RGBColor(128, 0, 128)];
            let mut colour = 0;
            for (i, s) in shown.iter().enumerate() {
                if !s.dashed || i == 0 {
                    colour = i;
                }
                let color = if s.bold { BLACK } else { palette[colour % palette.len()] };
                let width = if s.bold { 3 } else { 2 };
                if s.dashed {
                    let style = color.stroke_width(1);
                    chart
                        .draw_series(DashedLineSeries::new(s.points.clone(), 6, 4, style))?
                        .label(s.label.as_str())
                        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
                    continue;
                }
                chart
                    .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(width)))?
                    .label(s.label.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(width)));
                if s.points.len() <= 60 {
                    chart.draw_series(s.points.iter().map(|p| Circle::new(*p, 2, color.filled())))?;
                }
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .draw()?;
            root.present()?;
            Ok(())
        };
        if let Err(e) = draw() {
            return format!("<p>plot unavailable: {}</p>", esc(&e.to_string()));
        }
    }
    svg
}

/// The range of `v`, widened when it is one value (plotters needs a non-empty range).
fn bounds(v: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = v.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 { (lo - 0.5, hi + 0.5) } else { (lo, hi) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_escapes_its_labels_and_bounds_what_it_draws() {
        let evil = Series::line("<script>alert(1)</script>", vec![(1.0, 0.5), (2.0, 0.7)]);
        let svg = line_chart("acc", "round", "accuracy", std::slice::from_ref(&evil));
        assert!(svg.starts_with("<svg") && !svg.contains("<script"), "{svg}");
        let many: Vec<Series> =
            (0..30).map(|i| Series::line(format!("n{i}"), (0..5000).map(|x| (x as f64, 1.0)).collect())).collect();
        let svg = line_chart("acc", "round", "accuracy", &many);
        assert!(svg.contains("first 12 of 30"));
        assert!(svg.len() < 2_000_000, "{} bytes", svg.len());
        assert!(line_chart("acc", "x", "y", &[]).contains("nothing to plot yet"));
        let nan = Series::line("x", vec![(f64::NAN, 1.0)]);
        assert!(line_chart("acc", "x", "y", &[nan]).contains("nothing to plot"));
    }
}
