//! Minimal SVG line charts for the report: axes with ticks, one polyline per
//! series, a legend. No dependencies; the output opens in any browser.

use std::fmt::Write as _;

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];
const W: f64 = 760.0;
const H: f64 = 380.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 180.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;

/// One named line.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Renders a chart; with `log_x` the x axis is logarithmic (latency CDFs).
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
) -> String {
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    let fx = |x: f64| if log_x { x.max(1e-3).log10() } else { x };
    let (mut x0, mut x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| {
        (a.min(fx(p.0)), b.max(fx(p.0)))
    });
    let mut y1 = all.iter().fold(0.0f64, |m, p| m.max(p.1));
    if all.is_empty() || x0 >= x1 {
        x0 = 0.0;
        x1 = x1.max(1.0);
    }
    if y1 <= 0.0 {
        y1 = 1.0;
    }
    y1 *= 1.05;
    let px = |x: f64| LEFT + (fx(x) - x0) / (x1 - x0) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - y / y1 * (H - TOP - BOTTOM);

    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        (W - RIGHT + LEFT) / 2.0,
        escape(title)
    );
    let (bx0, by0, bx1, by1) = (LEFT, TOP, W - RIGHT, H - BOTTOM);
    let _ = write!(
        svg,
        r##"<rect x="{bx0}" y="{by0}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        bx1 - bx0,
        by1 - by0
    );
    for i in 0..=5 {
        let t = i as f64 / 5.0;
        let xv = x0 + t * (x1 - x0);
        let label = if log_x {
            fmt_num(10f64.powf(xv))
        } else {
            fmt_num(xv)
        };
        let x = LEFT + t * (W - LEFT - RIGHT);
        let _ = write!(
            svg,
            r##"<line x1="{x}" y1="{by1}" x2="{x}" y2="{}" stroke="#444"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>"##,
            by1 + 5.0,
            by1 + 18.0
        );
        let yv = t * y1;
        let y = py(yv);
        let _ = write!(
            svg,
            r##"<line x1="{bx0}" y1="{y}" x2="{bx1}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
            bx0 - 6.0,
            y + 4.0,
            fmt_num(yv)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (bx0 + bx1) / 2.0,
        H - 12.0,
        escape(x_label)
    );
    let _ = write!(
        svg,
        r#"<text x="16" y="{}" transform="rotate(-90 16 {})" text-anchor="middle">{}</text>"#,
        (by0 + by1) / 2.0,
        (by0 + by1) / 2.0,
        escape(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            pts.join(" ")
        );
        let ly = TOP + 10.0 + i as f64 * 18.0;
        let _ = write!(
            svg,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            bx1 + 10.0,
            bx1 + 30.0,
            bx1 + 36.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 10.0 || a == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_series_and_point() {
        let svg = line_chart(
            "t <1>",
            "x",
            "y",
            &[Series {
                name: "a".into(),
                points: vec![(1.0, 2.0), (2.0, 4.0), (3.0, 1.0)],
            }],
            false,
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("t &lt;1&gt;"));
        let poly = svg.split("<polyline").nth(1).unwrap();
        let points = poly
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(points.split(' ').count(), 3);
    }
}
