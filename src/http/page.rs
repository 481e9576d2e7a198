//! The status page (`GET /`): [`Status`] as one self-contained HTML page — inline CSS, SVG
//! sparklines drawn here, no script, no external asset — that reloads itself every 2 seconds
//! and reads on a phone (one column of cards below 700 px).
//!
//! Part of the HTTP endpoint. Everything a client chose (identity names come from
//! application_name) is HTML-escaped.

use std::fmt::Write;

use super::status::{Identity, Status};

/// Seconds between reloads.
const REFRESH: u32 = 2;

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}\
header{background:#1d2330;color:#fff;padding:10px 16px;display:flex;flex-wrap:wrap;gap:12px;align-items:center}\
header h1{font-size:18px;margin:0}.ok{color:#1a7f37}.bad{color:#c62828}header .ok{color:#7ee787}header .bad{color:#ff8a80}\
main{padding:12px 16px}h2{font-size:16px;margin:18px 0 8px}\
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(330px,1fr));gap:10px}\
.identity{background:#fff;border:1px solid #d0d4dc;border-radius:6px;padding:10px}\
.identity.surging{border:2px solid #c62828;background:#fff5f5}\
.identity h3{margin:0 0 6px;font-size:15px;word-break:break-all}\
.badge{display:inline-block;background:#c62828;color:#fff;border-radius:3px;padding:0 6px;font-size:12px;margin-left:6px}\
.badge.lock{background:#8a5a00}.nums{display:grid;grid-template-columns:auto auto;gap:2px 12px;margin-bottom:6px}\
.charts{display:grid;grid-template-columns:1fr 1fr;gap:6px}.chart{font-size:11px;color:#555}\
svg.spark{width:100%;height:34px;background:#f8f9fb;border:1px solid #e3e6eb;display:block}\
svg.spark polyline{fill:none;stroke:#2f6fde;stroke-width:1.5}.surging svg.spark polyline{stroke:#c62828}\
table{border-collapse:collapse;background:#fff;width:100%;font-size:13px}th,td{border:1px solid #d0d4dc;padding:3px 6px;text-align:left}\
th{background:#eceef2}.scroll{overflow-x:auto}.muted{color:#666}\
@media(max-width:700px){.cards{grid-template-columns:1fr}main{padding:8px}}";

/// `s` safe inside HTML text and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A sparkline of `points` (oldest first, one a second) as an inline SVG.
pub(crate) fn sparkline(name: &str, points: &[f32]) -> String {
    let (w, h) = (300.0_f32, 34.0_f32);
    let max = points.iter().copied().fold(0.0_f32, f32::max).max(1.0);
    let step = if points.len() > 1 {
        w / (points.len() - 1) as f32
    } else {
        w
    };
    let mut line = String::new();
    for (i, v) in points.iter().enumerate() {
        let y = h - 2.0 - (v.max(0.0) / max) * (h - 4.0);
        let _ = write!(line, "{:.1},{:.1} ", i as f32 * step, y);
    }
    let last = points.last().copied().unwrap_or(0.0);
    format!(
        "<div class=\"chart\">{} <b>{}</b> <span class=\"muted\">(max {})</span>\
<svg class=\"spark\" data-chart=\"{}\" viewBox=\"0 0 {w} {h}\" preserveAspectRatio=\"none\" role=\"img\" aria-label=\"{} over the last {} s\"><polyline points=\"{}\"/></svg></div>",
        esc(name),
        num(last),
        num(max),
        esc(name),
        esc(name),
        points.len(),
        line.trim_end()
    )
}

fn num(v: f32) -> String {
    if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Server connections against the identity's cap, and its part of a cluster-wide cap.
fn servers(i: &Identity) -> String {
    let here = cap(i.server_connections, i.max_server_connections);
    if i.cluster_max_server_connections == 0 {
        return here;
    }
    format!(
        "{here} · cluster cap {}: {} here",
        i.cluster_max_server_connections, i.cluster_grants
    )
}

fn cap(n: u32, cap: u32) -> String {
    if cap == 0 {
        format!("{n} <span class=\"muted\">(no cap)</span>")
    } else {
        format!("{n} / {cap}")
    }
}

fn identity(out: &mut String, i: &Identity) {
    let id = esc(&i.identity);
    let class = if i.surging { "identity surging" } else { "identity" };
    let _ = write!(out, "<section class=\"{class}\" data-identity=\"{id}\"><h3>{id}");
    if i.surging {
        out.push_str("<span class=\"badge\">SURGING</span>");
    }
    if i.lock_holders > 0 {
        let _ = write!(
            out,
            "<span class=\"badge lock\">holds {} lock(s)</span>",
            i.lock_holders
        );
    }
    if i.deadlocks > 0 {
        let _ = write!(
            out,
            "<span class=\"badge\" data-deadlocks=\"{0}\">{0} deadlock(s)</span>",
            i.deadlocks
        );
    }
    let refused: Vec<String> = i
        .refused
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    let p = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    let _ = write!(
        out,
        "</h3><div class=\"nums\"><span>clients</span><span>{}</span><span>server connections</span><span>{}</span>\
<span>waiting</span><span>{}</span><span>logins/s · growth 10 s</span><span>{:.1} · {:+}</span>\
<span>queries 1 min · p50 · p99</span><span>{} · {} · {}</span><span>refused</span><span>{}</span></div><div class=\"charts\">",
        cap(i.clients, i.max_client_connections),
        servers(i),
        i.waiting,
        i.login_rate,
        i.client_growth_10s,
        i.queries_1m,
        p(i.query_p50_ms),
        p(i.query_p99_ms),
        if refused.is_empty() { "none".to_string() } else { esc(&refused.join(", ")) },
    );
    let h = &i.history;
    out.push_str(&sparkline("clients", &h.clients));
    out.push_str(&sparkline("servers", &h.servers));
    out.push_str(&sparkline("waiting", &h.waiting));
    out.push_str(&sparkline("logins/s", &h.login_rate));
    out.push_str(&sparkline("growth 10 s", &h.growth_10s));
    out.push_str("</div></section>");
}

/// A table with a header row, or a line saying there is nothing.
fn table(out: &mut String, title: &str, head: &[&str], rows: Vec<Vec<String>>, none: &str) {
    let _ = write!(out, "<h2>{}</h2>", esc(title));
    if rows.is_empty() {
        let _ = write!(out, "<p class=\"muted\">{}</p>", esc(none));
        return;
    }
    out.push_str("<div class=\"scroll\"><table><tr>");
    for h in head {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let _ = write!(out, "<td>{}</td>", esc(&c));
        }
        out.push_str("</tr>");
    }
    out.push_str("</table></div>");
}

/// The whole page.
pub(crate) fn render(s: &Status) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let pg = if s.postgres.reachable { "ok" } else { "bad" };
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><meta http-equiv=\"refresh\" content=\"{REFRESH}\">\
<title>pgvalve status</title><style>{STYLE}</style></head><body><header><h1>pgvalve</h1>\
<span>PostgreSQL: <b class=\"{pg}\" id=\"postgres\">{}</b></span><span>clients {} / {}</span>\
<span class=\"muted\">{} · v{} · refreshes every {REFRESH} s · <a style=\"color:#9cc2ff\" href=\"status.json\">status.json</a></span></header><main>",
        esc(s.postgres.detail),
        s.clients,
        s.max_client_connections,
        esc(&s.now),
        s.version,
    );
    let surging = s.identities.iter().filter(|i| i.surging).count();
    let _ = write!(
        out,
        "<h2>Identities ({}{})</h2><div class=\"cards\">",
        s.identities.len(),
        if surging > 0 {
            format!(", {surging} surging")
        } else {
            String::new()
        }
    );
    if s.identities.is_empty() {
        out.push_str("<p class=\"muted\">No client has connected yet.</p>");
    }
    for i in &s.identities {
        identity(&mut out, i);
    }
    out.push_str("</div>");
    tables(&mut out, s);
    out.push_str("<p class=\"muted\">Sparklines: the last 15 minutes, one point a second.</p></main></body></html>\n");
    out
}

fn tables(out: &mut String, s: &Status) {
    let rows = s.lock_holders.iter().map(|h| {
        let blocks: Vec<String> = h
            .blocks
            .iter()
            .map(|b| format!("pid {} ({}, wants {})", b.pid, b.identity, b.mode))
            .collect();
        vec![
            h.identity.clone(),
            h.pid.to_string(),
            h.mode.clone(),
            h.relation.clone().unwrap_or_default(),
            h.state.clone(),
            format!("{:.1}", h.held_seconds),
            if blocks.is_empty() {
                "nobody".into()
            } else {
                format!("{} (total {})", blocks.join("; "), h.blocks_total)
            },
        ]
    });
    table(
        out,
        "Dangerous lock holders",
        &["identity", "pid", "mode", "relation", "state", "held s", "blocks"],
        rows.collect(),
        "None now.",
    );
    history_tables(out, s);
}

/// Surge and lock episodes, pools.
fn history_tables(out: &mut String, s: &Status) {
    let rows = s.surges.iter().map(|e| {
        vec![
            e.identity.clone(),
            e.started.clone(),
            e.ended.clone().unwrap_or_else(|| "ongoing".into()),
            e.trigger.to_string(),
            format!("{:.1}", e.login_rate),
            format!("{:.1}", e.peak_login_rate),
        ]
    });
    table(
        out,
        "Surge episodes (newest first)",
        &["identity", "started", "ended", "trigger", "logins/s", "peak logins/s"],
        rows.collect(),
        "None since start.",
    );
    let rows = s.lock_episodes.iter().map(|e| {
        vec![
            e.identity.clone(),
            e.pid.to_string(),
            e.relation.clone(),
            e.mode.clone(),
            e.started.clone(),
            e.ended.clone().unwrap_or_else(|| "ongoing".into()),
            e.max_blocked.to_string(),
            e.ended_by.clone(),
        ]
    });
    table(
        out,
        "Recent lock episodes",
        &[
            "identity",
            "pid",
            "relation",
            "mode",
            "started",
            "ended",
            "max blocked",
            "ended by",
        ],
        rows.collect(),
        "None since start.",
    );
    deadlock_table(out, s);
    let rows = s.pools.iter().map(|p| {
        vec![
            p.database.clone(),
            p.user.clone(),
            format!("{} / {}", p.active + p.idle + p.own, p.pool_size),
            p.active.to_string(),
            p.idle.to_string(),
            p.own.to_string(),
            p.waiting.to_string(),
        ]
    });
    table(
        out,
        "Pools",
        &["database", "user", "open / size", "active", "idle", "own", "waiting"],
        rows.collect(),
        "No pool yet.",
    );
}

/// Recent deadlocks: one row per side, the rolled-back side first.
fn deadlock_table(out: &mut String, s: &Status) {
    let rows = s.deadlocks.iter().flat_map(|d| {
        d.sides.iter().map(|p| {
            let view = match (&p.route, &p.controller) {
                (Some(r), Some(c)) => format!("{r} ({c})"),
                (Some(v), None) | (None, Some(v)) => v.clone(),
                (None, None) => String::new(),
            };
            vec![
                d.at.clone(),
                p.identity.clone(),
                p.application_name.clone(),
                view,
                p.pid.to_string(),
                p.waited_for.clone(),
                p.blocked_by.map(|b| b.to_string()).unwrap_or_default(),
                if p.rolled_back { "rolled back" } else { "went on" }.to_string(),
            ]
        })
    });
    table(
        out,
        "Recent deadlocks (newest first)",
        &[
            "at",
            "identity",
            "application",
            "view",
            "pid",
            "waited for",
            "blocked by",
            "outcome",
        ],
        rows.collect(),
        "None since start.",
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_chosen_names_are_escaped_and_sparklines_scale() {
        assert_eq!(esc("<b onclick='x'>&\""), "&lt;b onclick=&#39;x&#39;&gt;&amp;&quot;");
        let svg = sparkline("clients", &[0.0, 5.0, 10.0]);
        assert!(
            svg.contains("<polyline points=\"0.0,32.0 150.0,17.0 300.0,2.0\"/>"),
            "{svg}"
        );
        assert!(svg.contains("data-chart=\"clients\""));
        assert!(sparkline("x", &[]).contains("<svg"));
    }
}
