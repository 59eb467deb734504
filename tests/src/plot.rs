//! Line charts as SVG, for the figures a reader would rather look at than read (the benchmarks
//! write them into `docs/`). Pure: data in, SVG text out. The x axis is logarithmic (the number of
//! VMs grows by factors), the y axis linear from zero.

use std::fmt::Write as _;

/// One line: a name for the legend and its points (x > 0).
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// One chart: a title, the y axis's name, its lines, and an optional dashed target line.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    pub series: Vec<Series>,
    /// A horizontal reference (a target), drawn dashed.
    pub target: Option<f64>,
}

const W: f64 = 420.0;
const H: f64 = 260.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 40.0;
const LEGEND_LINE: f64 = 16.0;
const COLOURS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

/// The panels side by side, with `x_ticks` marked on every x axis (named `x_label`).
pub fn svg(panels: &[Panel], x_ticks: &[f64], x_label: &str) -> String {
    let legend_rows = panels.iter().map(|p| p.series.len()).max().unwrap_or(0);
    let height = H + legend_rows as f64 * LEGEND_LINE + 8.0;
    let width = W * panels.len() as f64;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (i, panel) in panels.iter().enumerate() {
        draw_panel(&mut out, panel, i as f64 * W, x_ticks, x_label);
    }
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A round upper bound for the y axis: 1, 2 or 5 times a power of ten, at least `max`.
fn nice_max(max: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let p = 10f64.powf(max.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|v| *v >= max)
        .unwrap_or(10.0 * p)
}

fn draw_panel(out: &mut String, panel: &Panel, x0: f64, x_ticks: &[f64], x_label: &str) {
    let (plot_w, plot_h) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let xs = x_ticks.iter().copied().filter(|x| *x > 0.0);
    let (lo, hi) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (lo, hi) = if lo < hi {
        (lo.ln(), hi.ln())
    } else {
        (0.0, 1.0)
    };
    let y_top = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(panel.target)
        .fold(0.0, f64::max);
    let y_top = nice_max(y_top);
    let px = |x: f64| x0 + LEFT + (x.max(1e-9).ln() - lo) / (hi - lo) * plot_w;
    let py = |y: f64| TOP + plot_h - y / y_top * plot_h;
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"16\" font-weight=\"bold\">{}</text>",
        x0 + LEFT,
        escape(&panel.title)
    );
    // Axes, grid and ticks.
    let _ = writeln!(
        out,
        "<rect x=\"{:.1}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#888\"/>",
        x0 + LEFT
    );
    for k in 0..=4 {
        let y = y_top * k as f64 / 4.0;
        let _ = writeln!(
            out,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            x0 + LEFT,
            x0 + LEFT + plot_w,
            py(y),
            py(y),
            x0 + LEFT - 4.0,
            py(y) + 4.0,
            short(y)
        );
    }
    for &x in x_ticks {
        let _ = writeln!(
            out,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            px(x),
            TOP + plot_h + 14.0,
            short(x)
        );
    }
    let _ = writeln!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text transform=\"translate({:.1},{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
        x0 + LEFT + plot_w / 2.0,
        TOP + plot_h + 30.0,
        escape(x_label),
        x0 + 14.0,
        TOP + plot_h / 2.0,
        escape(&panel.y_label)
    );
    if let Some(t) = panel.target {
        let _ = writeln!(
            out,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#555\" stroke-dasharray=\"4 3\"/>",
            x0 + LEFT,
            x0 + LEFT + plot_w,
            py(t),
            py(t)
        );
    }
    for (i, s) in panel.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            out,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>",
            points.join(" ")
        );
        for p in &points {
            let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(
                out,
                "<circle cx=\"{cx}\" cy=\"{cy}\" r=\"3\" fill=\"{colour}\"/>"
            );
        }
        let ly = H + i as f64 * LEGEND_LINE;
        let _ = writeln!(
            out,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"2\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            x0 + LEFT,
            x0 + LEFT + 20.0,
            ly - 4.0,
            ly - 4.0,
            x0 + LEFT + 26.0,
            ly,
            escape(&s.name)
        );
    }
}

/// A tick's label: 0.25, 8, 1.5k, 20k.
fn short(v: f64) -> String {
    if v >= 1000.0 {
        let k = v / 1000.0;
        if k.fract() == 0.0 {
            format!("{k:.0}k")
        } else {
            format!("{k:.1}k")
        }
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_has_its_lines_legend_and_target() {
        let panel = Panel {
            title: "a <b>".into(),
            y_label: "requests/s".into(),
            series: vec![
                Series {
                    name: "one".into(),
                    points: vec![(1.0, 10.0), (100.0, 20.0)],
                },
                Series {
                    name: "two".into(),
                    points: vec![(1.0, 5.0)],
                },
            ],
            target: Some(15.0),
        };
        let s = svg(&[panel.clone(), panel], &[1.0, 8.0, 100.0], "VMs");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline").count(), 4);
        assert_eq!(s.matches("stroke-dasharray").count(), 2);
        assert!(s.contains("a &lt;b&gt;") && !s.contains("a <b>"));
        // The highest point (20) sits at the top of a 0..20 axis; x = 1 at the left edge.
        assert!(s.contains(&format!("{:.1},{:.1}", LEFT + (W - LEFT - RIGHT), TOP)));
        assert!(s.contains(&format!(
            "{:.1},{:.1}",
            LEFT,
            TOP + (H - TOP - BOTTOM) / 2.0
        )));
    }

    #[test]
    fn round_axis_bounds_and_labels() {
        assert_eq!(nice_max(0.0), 1.0);
        assert_eq!(nice_max(0.93), 1.0);
        assert_eq!(nice_max(1.2), 2.0);
        assert_eq!(nice_max(3100.0), 5000.0);
        assert_eq!(nice_max(f64::NAN), 1.0);
        assert_eq!(short(1500.0), "1.5k");
        assert_eq!(short(20000.0), "20k");
        assert_eq!(short(8.0), "8");
        assert_eq!(short(0.25), "0.25");
    }
}
