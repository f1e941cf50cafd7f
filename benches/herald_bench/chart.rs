//! Small multiples in hand-written SVG: a grid of line charts sharing one time axis in minutes,
//! one panel per figure (a panel may overlay a few related lines, accepted and pushed, p50 and
//! p99). The soak draws its samples with it. SVG is text, and the figures are a few hundred points,
//! so a plotting crate would only add build time; any browser opens the file.
//!
//! A missing value breaks its line rather than being drawn as zero: a gap in the chart is a
//! sample that could not be read, never a measurement of nothing.

use std::fmt::Write;

/// One line: `(minute, value)` points in time order; `None` where the value is missing.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, Option<f64>)>,
}

/// One panel: a title (with its unit) and its lines, drawn from zero up.
pub struct Panel {
    pub title: String,
    pub lines: Vec<Line>,
}

/// The whole figure.
pub struct Chart {
    pub title: String,
    pub subtitle: String,
    /// The time axis runs from 0 to this many minutes in every panel.
    pub x_max: f64,
    /// A dashed vertical line at this minute in every panel, with its label (the verdicts'
    /// reference point).
    pub marker: Option<(f64, String)>,
    pub panels: Vec<Panel>,
    /// Lines of text under the grid (what is not drawn, and why).
    pub notes: Vec<String>,
}

const COLUMNS: usize = 3;
const PANEL_W: f64 = 380.0;
const PANEL_H: f64 = 210.0;
/// Inside a panel: room for the y labels on the left, the title above, the x labels below.
const PLOT_LEFT: f64 = 58.0;
const PLOT_RIGHT: f64 = 14.0;
const PLOT_TOP: f64 = 34.0;
const PLOT_BOTTOM: f64 = 40.0;
const HEADER_H: f64 = 56.0;
const NOTE_H: f64 = 18.0;
/// Colour-blind-safe (Okabe-Ito), in line order.
const COLOURS: [&str; 5] = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00"];

impl Chart {
    /// The figure as a standalone SVG document.
    pub fn svg(&self) -> String {
        let rows = self.panels.len().div_ceil(COLUMNS).max(1);
        let width = PANEL_W * COLUMNS as f64;
        let height = HEADER_H + PANEL_H * rows as f64 + NOTE_H * self.notes.len() as f64 + 10.0;
        let mut out = String::new();
        let _ = writeln!(
            out,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(
            out,
            r#"<rect width="{width}" height="{height}" fill="white"/>"#
        );
        let _ = writeln!(
            out,
            r#"<text x="12" y="22" font-size="16" font-weight="bold">{}</text>"#,
            escape(&self.title)
        );
        let _ = writeln!(
            out,
            r##"<text x="12" y="42" fill="#444">{}</text>"##,
            escape(&self.subtitle)
        );
        for (i, panel) in self.panels.iter().enumerate() {
            let x = PANEL_W * (i % COLUMNS) as f64;
            let y = HEADER_H + PANEL_H * (i / COLUMNS) as f64;
            self.panel(&mut out, panel, x, y);
        }
        let notes_top = HEADER_H + PANEL_H * rows as f64;
        for (i, note) in self.notes.iter().enumerate() {
            let _ = writeln!(
                out,
                r##"<text x="12" y="{:.1}" fill="#444">{}</text>"##,
                notes_top + NOTE_H * (i as f64 + 0.8),
                escape(note)
            );
        }
        out.push_str("</svg>\n");
        out
    }

    fn panel(&self, out: &mut String, panel: &Panel, left: f64, top: f64) {
        let (x0, x1) = (left + PLOT_LEFT, left + PANEL_W - PLOT_RIGHT);
        let (y0, y1) = (top + PANEL_H - PLOT_BOTTOM, top + PLOT_TOP);
        // Title, then each line's label in its colour.
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{:.1}" font-weight="bold">{}"#,
            left + 10.0,
            top + 16.0,
            escape(&panel.title)
        );
        for (i, line) in panel.lines.iter().enumerate() {
            let _ = write!(
                out,
                r#"<tspan dx="10" font-weight="normal" fill="{}">■ {}</tspan>"#,
                COLOURS[i % COLOURS.len()],
                escape(&line.label)
            );
        }
        out.push_str("</text>\n");

        let values = || {
            panel
                .lines
                .iter()
                .flat_map(|l| l.points.iter().filter_map(|p| p.1))
        };
        let y_top = values().fold(0.0_f64, f64::max);
        let (y_step, y_max) = ticks(y_top);
        let x_max = self.x_max.max(f64::MIN_POSITIVE);
        let (x_step, _) = ticks(x_max);
        let sx = |m: f64| x0 + (x1 - x0) * (m / x_max).clamp(0.0, 1.0);
        let sy = |v: f64| y0 - (y0 - y1) * (v / y_max).clamp(0.0, 1.0);

        // Axes, horizontal grid and y labels, x ticks and labels.
        let _ = writeln!(
            out,
            r##"<path d="M{x0:.1},{y1:.1} V{y0:.1} H{x1:.1}" stroke="#888" fill="none"/>"##
        );
        let mut v = 0.0;
        while v <= y_max * (1.0 + 1e-9) {
            let y = sy(v);
            let _ = writeln!(
                out,
                r##"<line x1="{x0:.1}" y1="{y:.1}" x2="{x1:.1}" y2="{y:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{}</text>"##,
                x0 - 4.0,
                y + 4.0,
                compact(v)
            );
            v += y_step;
        }
        let mut m = 0.0;
        while m <= x_max * (1.0 + 1e-9) {
            let x = sx(m);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{y0:.1}" x2="{x:.1}" y2="{:.1}" stroke="#888"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="#444">{}</text>"##,
                y0 + 4.0,
                y0 + 16.0,
                compact(m)
            );
            m += x_step;
        }
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#444">minutes</text>"##,
            (x0 + x1) / 2.0,
            y0 + 31.0
        );
        if let Some((at, label)) = &self.marker {
            let x = sx(*at);
            let _ = writeln!(
                out,
                r##"<line x1="{x:.1}" y1="{y0:.1}" x2="{x:.1}" y2="{y1:.1}" stroke="#999" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#999" font-size="9">{}</text>"##,
                x + 3.0,
                y1 + 9.0,
                escape(label)
            );
        }
        if values().next().is_none() {
            let _ = writeln!(
                out,
                r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#999">no value measured</text>"##,
                (x0 + x1) / 2.0,
                (y0 + y1) / 2.0
            );
        }

        // Each line: a path whose runs of present values are joined; a lone value is a dot.
        for (i, line) in panel.lines.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            for run in runs(&line.points) {
                if let [(m, v)] = run[..] {
                    let _ = writeln!(
                        out,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="2" fill="{colour}"/>"#,
                        sx(m),
                        sy(v)
                    );
                    continue;
                }
                let mut d = String::new();
                for (k, (m, v)) in run.iter().enumerate() {
                    let _ = write!(
                        d,
                        "{}{:.1},{:.1} ",
                        if k == 0 { "M" } else { "L" },
                        sx(*m),
                        sy(*v)
                    );
                }
                let _ = writeln!(
                    out,
                    r#"<path d="{}" stroke="{colour}" stroke-width="1.5" fill="none"/>"#,
                    d.trim_end()
                );
            }
        }
    }
}

/// The runs of consecutive present values of `points`.
fn runs(points: &[(f64, Option<f64>)]) -> Vec<Vec<(f64, f64)>> {
    let mut runs = vec![Vec::new()];
    for &(m, v) in points {
        match v {
            Some(v) if v.is_finite() => {
                if let Some(run) = runs.last_mut() {
                    run.push((m, v));
                }
            }
            _ => runs.push(Vec::new()),
        }
    }
    runs.retain(|r| !r.is_empty());
    runs
}

/// A step of 1, 2 or 5 times a power of ten giving about four intervals up to `top`, and the axis
/// maximum (a multiple of the step at or above `top`; 1 when there is nothing above zero).
fn ticks(top: f64) -> (f64, f64) {
    if top <= 0.0 || !top.is_finite() {
        return (0.25, 1.0);
    }
    let rough = top / 4.0;
    let power = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * power)
        .find(|s| *s >= rough)
        .unwrap_or(10.0 * power);
    (step, (top / step).ceil().max(1.0) * step)
}

/// 1234 -> "1.2k", 2500000 -> "2.5M", 0.5 -> "0.5", 12 -> "12".
fn compact(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    let a = v.abs();
    if a >= 1e9 {
        trim(format!("{:.1}", v / 1e9)) + "G"
    } else if a >= 1e6 {
        trim(format!("{:.1}", v / 1e6)) + "M"
    } else if a >= 1e4 {
        trim(format!("{:.0}", v / 1e3)) + "k"
    } else if a >= 1e3 {
        trim(format!("{:.1}", v / 1e3)) + "k"
    } else {
        trim(format!("{v:.2}"))
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
