//! The HTML report of a load test: one self-contained page, inline CSS and SVG charts.
//!
//! Part of `pgvalve loadtest`'s reports. The page is well-formed XML (XHTML syntax): every
//! element closed, every text and attribute escaped; nothing is fetched from the network.

use std::fmt::Write as _;

use super::report::{fairness, table};
use super::run::Outcome;

const COLORS: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
const W: f64 = 720.0;
const H: f64 = 240.0;
const PAD_L: f64 = 56.0;
const PAD_B: f64 = 28.0;
const PAD_T: f64 = 12.0;

/// Escapes text for HTML/XML.
pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of a chart.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    dashed: bool,
}

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

/// A line chart over the run's `span` seconds.
fn line_chart(title: &str, y_label: &str, span: f64, series: &[Series]) -> String {
    let x_max = span.max(1.0);
    let y_max = nice_max(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(0.0, f64::max),
    );
    let (pw, ph) = (W - PAD_L - 10.0, H - PAD_B - PAD_T);
    let x = |v: f64| PAD_L + v / x_max * pw;
    let y = |v: f64| PAD_T + ph - v / y_max * ph;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\">\n",
        esc(title)
    );
    y_grid(&mut svg, y_max, "");
    for i in 0..=5 {
        let v = x_max * f64::from(i) / 5.0;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"middle\">{}s</text>",
            x(v),
            H - 8.0,
            fmt_num(v)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"12\" y=\"{:.1}\" class=\"axis\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        PAD_T + ph / 2.0,
        PAD_T + ph / 2.0,
        esc(y_label)
    );
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(a, b)| format!("{:.1},{:.1}", x(a), y(b)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{}><title>{}</title></polyline>",
            pts.join(" "),
            COLORS[i % COLORS.len()],
            if s.dashed { " stroke-dasharray=\"6 4\"" } else { "" },
            esc(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    format!(
        "<figure><figcaption>{}</figcaption>\n{svg}{}</figure>\n",
        esc(title),
        legend(series)
    )
}

/// Horizontal grid lines with their values, 0 to `y_max`.
fn y_grid(svg: &mut String, y_max: f64, unit: &str) {
    let ph = H - PAD_B - PAD_T;
    for i in 0..=4 {
        let v = y_max * f64::from(i) / 4.0;
        let y = PAD_T + ph - v / y_max * ph;
        let _ = writeln!(
            svg,
            "<line x1=\"{PAD_L}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" class=\"grid\" /><text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"end\">{}{unit}</text>",
            W - 10.0,
            PAD_L - 4.0,
            y + 4.0,
            fmt_num(v)
        );
    }
}

fn legend(series: &[Series]) -> String {
    let mut l = String::from("<p class=\"legend\">");
    for (i, s) in series.iter().enumerate() {
        let _ = write!(
            l,
            "<span><span class=\"swatch\" style=\"background:{}\"></span>{}</span> ",
            COLORS[i % COLORS.len()],
            esc(&s.name)
        );
    }
    l.push_str("</p>\n");
    l
}

fn fmt_num(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Latency per identity: bars for p50, p90, p99, p99.9 (milliseconds).
fn latency_bars(o: &Outcome) -> String {
    let qs = [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p99.9")];
    let y_max = nice_max(o.groups.iter().map(|g| g.ms(0.999)).fold(0.0, f64::max));
    let ph = H - PAD_B - PAD_T;
    let slot = (W - PAD_L - 10.0) / o.groups.len().max(1) as f64;
    let bar = slot / (qs.len() as f64 + 1.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"latency per identity\">\n"
    );
    y_grid(&mut svg, y_max, " ms");
    for (gi, g) in o.groups.iter().enumerate() {
        let x0 = PAD_L + gi as f64 * slot;
        for (qi, (q, name)) in qs.iter().enumerate() {
            let v = g.ms(*q);
            let h = v / y_max * ph;
            let _ = writeln!(
                svg,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"{}\"><title>{} {name}: {v:.2} ms</title></rect>",
                x0 + bar * (qi as f64 + 0.5),
                PAD_T + ph - h,
                bar * 0.9,
                COLORS[qi % COLORS.len()],
                esc(&g.name)
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{:.1}\" class=\"tick\" text-anchor=\"middle\">{}</text>",
            x0 + slot / 2.0,
            H - 8.0,
            esc(&g.name)
        );
    }
    svg.push_str("</svg>\n");
    let names: Vec<Series> = qs
        .iter()
        .map(|(_, n)| Series {
            name: (*n).into(),
            points: Vec::new(),
            dashed: false,
        })
        .collect();
    format!(
        "<figure><figcaption>Latency per identity (ms)</figcaption>\n{svg}{}</figure>\n",
        legend(&names)
    )
}

fn per_group(o: &Outcome, f: impl Fn(&super::measure::Second) -> f64) -> Vec<Series> {
    o.groups
        .iter()
        .map(|g| Series {
            name: g.name.clone(),
            points: g
                .timeline
                .iter()
                .enumerate()
                .map(|(i, s)| (i as f64 + 0.5, f(s)))
                .collect(),
            dashed: false,
        })
        .collect()
}

/// The whole report page.
pub fn html(o: &Outcome) -> String {
    let mut body = String::new();
    let span = o.elapsed.as_secs_f64();
    body += &line_chart(
        "Throughput over time",
        "transactions/s",
        span,
        &per_group(o, |s| s.transactions as f64),
    );
    body += &line_chart(
        "p99 latency over time",
        "ms",
        span,
        &per_group(o, |s| s.latency.value_at_quantile(0.99) as f64 / 1000.0),
    );
    let mut conns = vec![Series {
        name: "clients in a transaction".into(),
        points: o.in_flight.iter().map(|&(t, n)| (t, n as f64)).collect(),
        dashed: false,
    }];
    if !o.samples.is_empty() {
        conns.push(Series {
            name: "server connections (pg_stat_activity)".into(),
            points: o.samples.iter().map(|s| (s.at, s.server_connections as f64)).collect(),
            dashed: false,
        });
        conns.push(Series {
            name: "dangerous locks (pg_locks)".into(),
            points: o.samples.iter().map(|s| (s.at, s.dangerous_locks as f64)).collect(),
            dashed: false,
        });
    }
    if let Some(max) = o.max_connections {
        let end = o.elapsed.as_secs_f64();
        conns.push(Series {
            name: format!("cap: max_connections = {max}"),
            points: vec![(0.0, max as f64), (end, max as f64)],
            dashed: true,
        });
    }
    body += &line_chart(
        "Server connections over time against the cap",
        "connections",
        span,
        &conns,
    );
    body += &line_chart("Errors over time", "errors/s", span, &per_group(o, |s| s.errors as f64));
    body += &latency_bars(o);
    format!(
        "<!DOCTYPE html>\n<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\">\n<head>\n<meta charset=\"utf-8\" />\n<title>pgvalve loadtest: {scenario}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<h1>pgvalve loadtest: {scenario}</h1>\n<p>Target {target}; {secs:.1} s; Jain fairness index {jain:.3}{stopped}.</p>\n<pre>{table}</pre>\n{body}</body>\n</html>\n",
        scenario = esc(&o.plan.scenario),
        target = esc(&super::report::targets(o)),
        secs = o.elapsed.as_secs_f64(),
        jain = fairness(&o.groups),
        stopped = if o.stopped { " (stopped early)" } else { "" },
        table = esc(&table(o)),
    )
}

const CSS: &str = "body{font-family:sans-serif;margin:2em;max-width:780px;color:#222}\
figure{margin:1.5em 0}figcaption{font-weight:bold;margin-bottom:.3em}\
.grid{stroke:#ddd;stroke-width:1}.tick,.axis{font-size:11px;fill:#555}\
.legend span{margin-right:1em;font-size:12px}.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}\
pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}";
