//! The throughput chart, drawn here as SVG: no library, nothing fetched.

use maud::{Markup, html};

use crate::manager::inspect::Minute;

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 140.0;
const PAD: f64 = 24.0;

/// Starts (bars) and finishes (a line) per minute over the last hour.
pub(super) fn throughput(minutes: &[Minute]) -> Markup {
    let most = minutes
        .iter()
        .map(|m| m.starts.max(m.finishes))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let n = minutes.len().max(1) as f64;
    let step = (WIDTH - 2.0 * PAD) / n;
    let y = |v: i64| HEIGHT - PAD - (v as f64 / most) * (HEIGHT - 2.0 * PAD);
    let x = |i: usize| PAD + i as f64 * step;
    let line: String = minutes
        .iter()
        .enumerate()
        .map(|(i, m)| format!("{:.1},{:.1}", x(i) + step / 2.0, y(m.finishes)))
        .collect::<Vec<_>>()
        .join(" ");
    let starts: i64 = minutes.iter().map(|m| m.starts).sum();
    let finishes: i64 = minutes.iter().map(|m| m.finishes).sum();
    let last = minutes.last().map_or(0, |m| m.finishes);
    html! {
        figure.chart {
            svg viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img"
                aria-label=(format!("{starts} starts and {finishes} finishes in the last hour")) {
                line.axis x1=(PAD) y1=(HEIGHT - PAD) x2=(WIDTH - PAD) y2=(HEIGHT - PAD) {}
                @for (i, m) in minutes.iter().enumerate() {
                    rect.starts x=(format!("{:.1}", x(i) + 1.0)) y=(format!("{:.1}", y(m.starts)))
                        width=(format!("{:.1}", (step - 2.0).max(1.0)))
                        height=(format!("{:.1}", HEIGHT - PAD - y(m.starts))) {
                        title { (m.at.format("%H:%M")) ": " (m.starts) " started, " (m.finishes) " finished" }
                    }
                }
                polyline.finishes points=(line) {}
                text x=(PAD) y="14" { (most as i64) " / min" }
                text x=(WIDTH - PAD) y=(HEIGHT - 6.0) text-anchor="end" { "now" }
                text x=(PAD) y=(HEIGHT - 6.0) { "−60 min" }
            }
            figcaption {
                span.key-starts { "■" } " starts " span data-live="starts-hour" { (starts) }
                " · " span.key-finishes { "—" } " finishes " span data-live="finishes-hour" { (finishes) }
                " in the last hour · " span data-live="finishes-minute" { (last) } " this minute"
            }
        }
    }
}
