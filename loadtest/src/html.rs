//! `--report FILE.html`: a standalone page (no scripts, no external files)
//! with the run's time series as SVG line charts and the per-stream table.

use std::fmt::Write as _;

use crate::scenario::Report;

/// One chart: a polyline of `(x, y)` over the run.
fn chart(title: &str, unit: &str, points: &[(f64, f64)]) -> String {
    const W: f64 = 640.0;
    const H: f64 = 180.0;
    const PAD: f64 = 40.0;
    let max_x = points.iter().map(|p| p.0).fold(1.0, f64::max);
    let max_y = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    let coords: Vec<String> = points
        .iter()
        .map(|(x, y)| {
            format!(
                "{:.1},{:.1}",
                PAD + x / max_x * (W - 2.0 * PAD),
                H - PAD - y / max_y * (H - 2.0 * PAD)
            )
        })
        .collect();
    format!(
        r##"<figure><figcaption>{title} ({unit}), max {max:.1}</figcaption>
<svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{title}">
<line x1="{PAD}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>
<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{bottom}" stroke="#888"/>
<text x="{PAD}" y="{label}" font-size="11">0 s</text><text x="{right}" y="{label}" font-size="11" text-anchor="end">{max_x:.0} s</text>
<polyline fill="none" stroke="#2a6ef5" stroke-width="2" points="{points}"/>
</svg></figure>
"##,
        max = max_y / 1.1,
        bottom = H - PAD,
        right = W - PAD,
        label = H - PAD + 16.0,
        points = coords.join(" "),
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The report page.
pub fn render(report: &Report) -> String {
    let series = |f: fn(&crate::scenario::Progress) -> f64| -> Vec<(f64, f64)> {
        report
            .timeline
            .iter()
            .map(|p| (p.elapsed_s, f(p)))
            .collect()
    };
    let mut out = String::from(
        "<!doctype html><meta charset=utf-8><title>Load test report</title>\
         <style>body{font:14px system-ui,sans-serif;margin:2rem}table{border-collapse:collapse}\
         td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:right}\
         td:first-child,td:nth-child(2),td:nth-child(3){text-align:left}figure{margin:1rem 0}</style>\
         <h1>Load test report</h1>",
    );
    let _ = write!(
        out,
        "<p>{} of {} participants joined, {:.0} s; {} packets sent, {} received; loss {:.2}%; \
         latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms.</p>",
        report.connected,
        report.participants,
        report.seconds,
        report.packets_sent,
        report.packets_received,
        report.loss_pct,
        report.latency_p50_ms,
        report.latency_p95_ms,
        report.latency_p99_ms
    );
    if !report.join_failures.is_empty() {
        out += "<p>Did not join:</p><ul>";
        for f in &report.join_failures {
            let _ = write!(out, "<li>{}</li>", escape(f));
        }
        out += "</ul>";
    }
    out += &chart(
        "Received bitrate",
        "kbit/s",
        &series(|p| p.received_bitrate_bps / 1000.0),
    );
    out += &chart(
        "Packets received",
        "per second",
        &series(|p| p.packets_per_s),
    );
    // Seconds with nothing measured (no stream started yet) are left out.
    let loss: Vec<(f64, f64)> = report
        .timeline
        .iter()
        .filter_map(|p| Some((p.elapsed_s, p.loss_pct?)))
        .collect();
    out += &chart("Loss after retransmission, by second sent", "%", &loss);
    out += &chart("Mean one-way latency", "ms", &series(|p| p.mean_latency_ms));
    out += "<table><tr><th>publisher</th><th>receiver</th><th>kind</th><th>expected</th>\
            <th>received</th><th>loss %</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th>\
            <th>jitter ms</th><th>first packet ms</th><th>kbit/s</th><th>layer</th></tr>";
    for t in &report.tracks {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.2}</td>\
             <td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.2}</td><td>{:.0}</td>\
             <td>{:.0}</td><td>{}</td></tr>",
            escape(&t.publisher),
            escape(&t.receiver),
            escape(&t.kind),
            t.expected,
            t.received,
            t.loss_pct,
            t.latency_p50_ms,
            t.latency_p95_ms,
            t.latency_p99_ms,
            t.jitter_ms,
            t.first_packet_ms,
            t.bitrate_bps / 1000.0,
            escape(t.layer.as_deref().unwrap_or("-"))
        );
    }
    out += "</table>";
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{Progress, Report};

    #[test]
    fn renders_charts_and_rows() {
        let report = Report {
            participants: 3,
            connected: 2,
            join_failures: vec!["room sub2: join refused: <full>".into()],
            seconds: 3.0,
            packets_sent: 10,
            packets_received: 9,
            packets_delivered: 9,
            foreign_packets: 0,
            loss_pct: 10.0,
            latency_p50_ms: 1.0,
            latency_p95_ms: 2.0,
            latency_p99_ms: 3.0,
            received_bitrate_bps: 1e6,
            tracks: vec![],
            timeline: (1..=3)
                .map(|i| Progress {
                    elapsed_s: i as f64,
                    connected: 2,
                    packets_received: i * 3,
                    received_bitrate_bps: 1e6,
                    packets_per_s: 3.0,
                    mean_latency_ms: 0.5 * i as f64,
                    recent_loss_pct: None,
                    loss_pct: (i > 1).then_some(2.5 * i as f64),
                })
                .collect(),
        };
        let html = render(&report);
        assert_eq!(html.matches("<svg").count(), 4);
        assert_eq!(html.matches("<polyline").count(), 4);
        assert!(html.contains("Loss after retransmission, by second sent (%), max 7.5"));
        assert!(html.contains("loss 10.00%"));
        assert!(html.contains("2 of 3 participants joined"));
        assert!(html.contains("<li>room sub2: join refused: &lt;full&gt;</li>"));
        assert!(
            html.contains("max 1.5"),
            "latency chart scaled to its maximum"
        );
    }
}
