//! Plots rendered by saelab itself (plotters, SVG), embedded into the HTML report.
//! Each function returns a complete `<svg>` document as a string; nothing is read from
//! or written to disk here.

use plotters::prelude::*;

/// One named series of (x, y) points.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A point with optional symmetric error bars.
#[derive(Clone, Debug)]
pub struct ErrPoint {
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub xerr: f64,
    pub yerr: f64,
}

const W: u32 = 640;
const H: u32 = 400;

fn color(i: usize) -> RGBColor {
    const P: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    P[i % P.len()]
}

fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return None;
    }
    if hi - lo < 1e-12 {
        let pad = if lo.abs() > 0.0 { lo.abs() * 0.05 } else { 1.0 };
        return Some((lo - pad, hi + pad));
    }
    let pad = (hi - lo) * 0.05;
    Some((lo - pad, hi + pad))
}

fn empty_svg(title: &str, why: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"60\"><text x=\"10\" y=\"25\" font-family=\"sans-serif\" font-size=\"14\">{}</text><text x=\"10\" y=\"48\" font-family=\"sans-serif\" font-size=\"12\" fill=\"#888\">{}</text></svg>",
        html_escape(title),
        html_escape(why)
    )
}

pub fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Line chart of several series (training curves, histograms over bins, curves vs k/N).
/// `log_x` plots x on a log10 axis (values <= 0 are dropped).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> String {
    let tx = |x: f64| if log_x { x.log10() } else { x };
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_x || p.0 > 0.0))
    };
    let (Some((x0, x1)), Some((y0, y1))) =
        (bounds(pts().map(|p| tx(p.0))), bounds(pts().map(|p| p.1)))
    else {
        return empty_svg(title, "no data recorded");
    };
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (W, H)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let mut chart = match ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
        {
            Ok(c) => c,
            Err(_) => return empty_svg(title, "could not lay out the chart"),
        };
        let (xs, ys) = (x1 - x0, y1 - y0);
        let xfmt = |v: &f64| {
            if log_x {
                format_tick(10f64.powf(*v), f64::NAN)
            } else {
                format_tick(*v, xs)
            }
        };
        let _ = chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&xfmt)
            .y_label_formatter(&|v| format_tick(*v, ys))
            .light_line_style(RGBColor(235, 235, 235))
            .draw();
        for (i, s) in series.iter().enumerate() {
            let c = color(i);
            let data: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite() && p.1.is_finite() && (!log_x || p.0 > 0.0))
                .map(|p| (tx(p.0), p.1))
                .collect();
            if let Ok(a) = chart.draw_series(LineSeries::new(data.clone(), c.stroke_width(2))) {
                a.label(s.name.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                });
            }
            if data.len() <= 30 {
                let _ = chart.draw_series(data.iter().map(|p| Circle::new(*p, 3, c.filled())));
            }
        }
        if series.len() > 1 {
            let _ = chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .position(SeriesLabelPosition::UpperRight)
                .draw();
        }
        let _ = root.present();
    }
    out
}

/// Scatter plot with error bars and a label per point (sparsity-fidelity frontier).
pub fn scatter_errors(title: &str, x_label: &str, y_label: &str, points: &[ErrPoint]) -> String {
    let xs = points
        .iter()
        .flat_map(|p| [p.x - p.xerr.clamp(0.0, 1e9), p.x + p.xerr.clamp(0.0, 1e9)])
        .map(|v| if v.is_finite() { v } else { f64::NAN });
    let ys = points
        .iter()
        .flat_map(|p| [p.y - fin(p.yerr), p.y + fin(p.yerr)]);
    let (Some((x0, x1)), Some((y0, y1))) = (
        bounds(xs.chain(points.iter().map(|p| p.x))),
        bounds(ys.chain(points.iter().map(|p| p.y))),
    ) else {
        return empty_svg(title, "no data recorded");
    };
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (W, H)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let Ok(mut chart) = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
        else {
            return empty_svg(title, "could not lay out the chart");
        };
        let (xs, ys) = (x1 - x0, y1 - y0);
        let _ = chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc(y_label)
            .x_label_formatter(&|v| format_tick(*v, xs))
            .y_label_formatter(&|v| format_tick(*v, ys))
            .light_line_style(RGBColor(235, 235, 235))
            .draw();
        for (i, p) in points.iter().enumerate() {
            let c = color(i);
            if p.yerr.is_finite() && p.yerr > 0.0 {
                let _ = chart.draw_series(std::iter::once(PathElement::new(
                    vec![(p.x, p.y - p.yerr), (p.x, p.y + p.yerr)],
                    c.stroke_width(1),
                )));
            }
            if p.xerr.is_finite() && p.xerr > 0.0 {
                let _ = chart.draw_series(std::iter::once(PathElement::new(
                    vec![(p.x - p.xerr, p.y), (p.x + p.xerr, p.y)],
                    c.stroke_width(1),
                )));
            }
            if let Ok(a) =
                chart.draw_series(std::iter::once(Circle::new((p.x, p.y), 5, c.filled())))
            {
                a.label(p.label.clone())
                    .legend(move |(x, y)| Circle::new((x + 8, y), 5, c.filled()));
            }
        }
        let _ = chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .position(SeriesLabelPosition::LowerRight)
            .draw();
        let _ = root.present();
    }
    out
}

fn fin(v: f64) -> f64 {
    if v.is_finite() {
        v
    } else {
        0.0
    }
}

/// A tick label with enough decimals to tell ticks apart over an axis of width `span`
/// (NaN: choose by magnitude alone).
fn format_tick(v: f64, span: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    // Scientific only for huge values, or tiny ones the axis cannot resolve otherwise.
    let resolvable = span.is_finite() && span > 0.0 && a >= span;
    if a >= 1e5 || (a < 1e-3 && !resolvable) {
        return format!("{v:.1e}");
    }
    let digits = if span.is_finite() && span > 0.0 {
        ((-(span / 10.0).log10()).ceil().max(0.0) as usize).min(8)
    } else if a >= 100.0 {
        0
    } else if a >= 1.0 {
        2
    } else {
        3
    };
    format!("{v:.digits$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_svg_with_title_and_legend() {
        let s = vec![
            Series {
                name: "topk".into(),
                points: (0..20)
                    .map(|i| (i as f64 / 19.0, (i as f64).sqrt()))
                    .collect(),
            },
            Series {
                name: "ortho".into(),
                points: (0..20).map(|i| (i as f64 / 19.0, i as f64 * 0.2)).collect(),
            },
        ];
        let svg = line_chart("FVU over training", "p", "fvu", &s, false);
        assert!(
            svg.starts_with("<svg") && svg.contains("FVU over training") && svg.contains("ortho")
        );
        let e = scatter_errors(
            "frontier",
            "L0",
            "EV",
            &[ErrPoint {
                label: "a".into(),
                x: 32.0,
                y: 0.8,
                xerr: 0.0,
                yerr: 0.01,
            }],
        );
        assert!(e.contains("<svg") && e.contains("frontier"));
        let none = line_chart("empty", "x", "y", &[], false);
        assert_eq!(format_tick(0.4491, 0.002), "0.4491");
        assert_eq!(format_tick(0.4491, 0.5), "0.45");
        assert_eq!(format_tick(32.0, 3.0), "32.0");
        assert!(none.contains("no data recorded"));
    }
}
