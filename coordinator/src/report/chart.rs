//! The ε-against-rounds plot of a hospital's charges (SVG, drawn by plotters; no script).

use plotters::prelude::*;

use super::model::Charges;
use super::render::esc;

/// An SVG plot of ε against rounds for each plan, with the cap as a dashed line.
pub(super) fn epsilon_plot(title: &str, series: &Charges) -> String {
    let mut svg = String::new();
    let rounds = series.values().flatten().map(|c| c.0).max().unwrap_or(1).max(1);
    let cap = series.values().flatten().filter_map(|c| c.2).fold(0.0f64, f64::max);
    let top = series.values().flatten().map(|c| c.1).fold(cap, f64::max).max(1e-3) * 1.15;
    {
        let root = SVGBackend::with_string(&mut svg, (640, 300)).into_drawing_area();
        let draw = || -> Result<(), Box<dyn std::error::Error + '_>> {
            root.fill(&WHITE)?;
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 16))
                .margin(12)
                .x_label_area_size(32)
                .y_label_area_size(48)
                .build_cartesian_2d(0u64..rounds, 0f64..top)?;
            chart.configure_mesh().x_desc("round").y_desc("ε spent").draw()?;
            let palette = [BLUE, RED, GREEN, MAGENTA, CYAN];
            for (i, (plan, points)) in series.iter().enumerate() {
                let color = palette[i % palette.len()];
                let pts: Vec<(u64, f64)> = std::iter::once((0, 0.0)).chain(points.iter().map(|c| (c.0, c.1))).collect();
                chart
                    .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
                    .label(format!("plan {plan}"))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
                chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled())))?;
            }
            if cap > 0.0 {
                chart
                    .draw_series(DashedLineSeries::new(vec![(0, cap), (rounds, cap)], 6, 4, BLACK.stroke_width(1)))?
                    .label(format!("policy.max_epsilon = {cap}"))
                    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], BLACK));
            }
            chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
            root.present()?;
            Ok(())
        };
        if let Err(e) = draw() {
            return format!("<p>plot unavailable: {}</p>", esc(&e.to_string()));
        }
    }
    svg
}
