//! `pgvalve top`'s screen: a header (PostgreSQL, totals, the sort and filter), the table of
//! identities, and a line of keys. Keys: `s`/`S` next/previous sort column, `1`..`6` pick
//! one, `/` or `f` filter to identities containing a text (Enter keeps it, Esc clears it),
//! `q` (or Esc, or Ctrl-C) quits.
//!
//! Part of `top`; no terminal here, so ratatui's TestBackend draws it in tests.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Cell, Paragraph, Row as TableRow, Table};
use ratatui::Frame;

use super::source::{Row, Snapshot};

/// What the table is sorted by (most first, names alphabetically).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sort {
    /// Server connections.
    #[default]
    Servers,
    /// Client connections.
    Clients,
    /// Growth over 10 s.
    Growth,
    /// Waiting clients.
    Waiting,
    /// Refusals.
    Refused,
    /// Identity name.
    Name,
}

const SORTS: [Sort; 6] = [
    Sort::Servers,
    Sort::Clients,
    Sort::Growth,
    Sort::Waiting,
    Sort::Refused,
    Sort::Name,
];

impl Sort {
    fn label(self) -> &'static str {
        match self {
            Sort::Servers => "servers",
            Sort::Clients => "clients",
            Sort::Growth => "growth",
            Sort::Waiting => "waiting",
            Sort::Refused => "refused",
            Sort::Name => "identity",
        }
    }

    fn step(self, by: isize) -> Sort {
        let i = SORTS.iter().position(|s| *s == self).unwrap_or(0) as isize;
        SORTS[(i + by).rem_euclid(SORTS.len() as isize) as usize]
    }
}

/// The view's state.
#[derive(Debug, Default)]
pub struct App {
    /// The last good read.
    pub snapshot: Snapshot,
    /// The last read's error, if it failed (the last good picture stays).
    pub error: Option<String>,
    /// Sort column.
    pub sort: Sort,
    /// Only identities containing this.
    pub filter: String,
    /// Typing a filter.
    pub typing: bool,
}

impl App {
    /// Takes a read.
    pub fn update(&mut self, read: anyhow::Result<Snapshot>) {
        match read {
            Ok(s) => {
                self.snapshot = s;
                self.error = None;
            }
            Err(e) => self.error = Some(format!("{e:#}")),
        }
    }

    /// Handles a key; false to quit.
    pub fn key(&mut self, k: KeyEvent) -> bool {
        if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
            return false;
        }
        if self.typing {
            match k.code {
                KeyCode::Enter => self.typing = false,
                KeyCode::Esc => {
                    self.typing = false;
                    self.filter.clear();
                }
                KeyCode::Backspace => {
                    self.filter.pop();
                }
                KeyCode::Char(c) => self.filter.push(c),
                _ => {}
            }
            return true;
        }
        match k.code {
            KeyCode::Char('q') | KeyCode::Esc => return false,
            KeyCode::Char('s') | KeyCode::Right => self.sort = self.sort.step(1),
            KeyCode::Char('S') | KeyCode::Left => self.sort = self.sort.step(-1),
            KeyCode::Char(c @ '1'..='6') => self.sort = SORTS[c as usize - '1' as usize],
            KeyCode::Char('/' | 'f') => {
                self.typing = true;
                self.filter.clear();
            }
            KeyCode::Char('c') => self.filter.clear(),
            _ => {}
        }
        true
    }

    /// The rows shown: filtered, sorted.
    pub fn rows(&self) -> Vec<&Row> {
        let mut rows: Vec<&Row> = self
            .snapshot
            .rows
            .iter()
            .filter(|r| self.filter.is_empty() || r.identity.contains(&self.filter))
            .collect();
        let key = |r: &Row| -> i64 {
            match self.sort {
                Sort::Servers => r.servers as i64,
                Sort::Clients => r.clients as i64,
                Sort::Growth => r.growth_10s,
                Sort::Waiting => r.waiting as i64,
                Sort::Refused => r.refused as i64,
                Sort::Name => 0,
            }
        };
        rows.sort_by(|a, b| key(b).cmp(&key(a)).then_with(|| a.identity.cmp(&b.identity)));
        rows
    }
}

fn of(n: u64, cap: u64) -> String {
    if cap == 0 {
        n.to_string()
    } else {
        format!("{n}/{cap}")
    }
}

/// An identity's cluster-wide cap as "held here of the cap" ("2 of 5": this instance may
/// hold 2 of the 5 server connections the cluster allows it); "-" without one.
fn cluster(r: &Row) -> String {
    if r.cluster_max == 0 {
        "-".into()
    } else {
        format!("{} of {}", r.cluster_grants, r.cluster_max)
    }
}

fn header(app: &App) -> Line<'static> {
    let rows = &app.snapshot.rows;
    let pg = match app.snapshot.postgres {
        Some(true) => Span::styled("PostgreSQL ok", Style::new().fg(Color::Green)),
        Some(false) => Span::styled(
            "PostgreSQL UNREACHABLE",
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
        ),
        None => Span::raw("PostgreSQL ?"),
    };
    let mut spans = vec![
        Span::styled("pgvalve top  ", Style::new().add_modifier(Modifier::BOLD)),
        pg,
        Span::raw(format!(
            "  clients {}  servers {}  waiting {}  surging {}  sort: {}",
            rows.iter().map(|r| r.clients).sum::<u64>(),
            rows.iter().map(|r| r.servers).sum::<u64>(),
            rows.iter().map(|r| r.waiting).sum::<u64>(),
            rows.iter().filter(|r| r.surging).count(),
            app.sort.label()
        )),
    ];
    if !app.filter.is_empty() || app.typing {
        spans.push(Span::raw(format!(
            "  filter: {}{}",
            app.filter,
            if app.typing { "_" } else { "" }
        )));
    }
    if let Some(e) = &app.error {
        spans.push(Span::styled(format!("  read failed: {e}"), Style::new().fg(Color::Red)));
    }
    Line::from(spans)
}

/// Draws the whole screen.
pub fn draw(f: &mut Frame<'_>, app: &App) {
    let [top, body, keys] =
        Layout::vertical([Constraint::Length(1), Constraint::Min(3), Constraint::Length(1)]).areas(f.area());
    f.render_widget(Paragraph::new(header(app)), top);
    let names = [
        "identity",
        "clients",
        "servers",
        "cluster",
        "growth 10s",
        "waiting",
        "logins/s",
        "refused",
        "locks",
        "p99 ms",
        "",
    ];
    let head = TableRow::new(names.iter().map(|h| {
        let sorted =
            SORTS.iter().any(|s| s.label() == *h && *s == app.sort) || (*h == "growth 10s" && app.sort == Sort::Growth);
        let style = if sorted {
            Style::new().add_modifier(Modifier::BOLD | Modifier::UNDERLINED)
        } else {
            Style::new().add_modifier(Modifier::BOLD)
        };
        Cell::from(*h).style(style)
    }));
    let rows = app.rows().into_iter().map(|r| {
        let style = if r.surging {
            Style::new().fg(Color::Red)
        } else {
            Style::new()
        };
        TableRow::new(vec![
            Cell::from(r.identity.clone()),
            Cell::from(of(r.clients, r.max_clients)),
            Cell::from(of(r.servers, r.max_servers)),
            Cell::from(cluster(r)),
            Cell::from(format!("{:+}", r.growth_10s)),
            Cell::from(r.waiting.to_string()),
            Cell::from(format!("{:.1}", r.login_rate)),
            Cell::from(r.refused.to_string()),
            Cell::from(if r.lock_holders > 0 {
                format!("{} held", r.lock_holders)
            } else {
                "-".into()
            }),
            Cell::from(r.query_p99_ms.map_or("-".into(), |v| format!("{v:.1}"))),
            Cell::from(if r.surging { "SURGE" } else { "" }),
        ])
        .style(style)
    });
    let widths = [
        Constraint::Min(16),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(6),
    ];
    f.render_widget(
        Table::new(rows, widths)
            .header(head)
            .block(Block::bordered().title(" identities ")),
        body,
    );
    let help = "q quit  s/S sort  1-6 sort by column  / filter (Enter keep, Esc clear)  c clear filter";
    f.render_widget(Paragraph::new(help).style(Style::new().fg(Color::DarkGray)), keys);
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn row(id: &str, clients: u64, servers: u64, growth: i64, surging: bool) -> Row {
        Row {
            identity: id.into(),
            clients,
            max_clients: 50,
            servers,
            max_servers: 6,
            growth_10s: growth,
            surging,
            ..Default::default()
        }
    }

    fn screen(app: &App) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(160, 10)).unwrap();
        t.draw(|f| draw(f, app)).unwrap();
        let buf = t.backend().buffer().clone();
        (0..buf.area.height)
            .map(|y| {
                (0..buf.area.width)
                    .map(|x| buf[(x, y)].symbol().to_string())
                    .collect::<String>()
            })
            .collect()
    }

    fn key(app: &mut App, c: KeyCode) -> bool {
        app.key(KeyEvent::new(c, KeyModifiers::NONE))
    }

    #[test]
    fn the_table_sorts_by_server_connections_marks_surges_and_filters() {
        let mut app = App::default();
        app.update(Ok(Snapshot {
            rows: vec![
                row("polite", 2, 1, 0, false),
                row("noisy", 20, 6, 18, true),
                row("batch", 30, 0, -2, false),
            ],
            postgres: Some(true),
        }));
        let s = screen(&app);
        assert!(
            s[0].contains("PostgreSQL ok") && s[0].contains("clients 52") && s[0].contains("sort: servers"),
            "{}",
            s[0]
        );
        let line = |s: &[String], id: &str| {
            s.iter()
                .position(|l| l.contains(id))
                .unwrap_or_else(|| panic!("{id} in {s:#?}"))
        };
        assert!(
            line(&s, "noisy") < line(&s, "polite") && line(&s, "polite") < line(&s, "batch"),
            "{s:#?}"
        );
        let noisy = &s[line(&s, "noisy")];
        assert!(
            noisy.contains("20/50") && noisy.contains("6/6") && noisy.contains("+18") && noisy.contains("SURGE"),
            "{noisy}"
        );
        // Sort by clients with `2`, then by name with `s` from refused.
        assert!(key(&mut app, KeyCode::Char('2')));
        let s = screen(&app);
        assert!(line(&s, "batch") < line(&s, "noisy"), "{s:#?}");
        assert!(s[0].contains("sort: clients"));
        // Filter one identity.
        key(&mut app, KeyCode::Char('/'));
        for c in "noi".chars() {
            key(&mut app, KeyCode::Char(c));
        }
        key(&mut app, KeyCode::Enter);
        let s = screen(&app);
        assert!(
            s.iter().any(|l| l.contains("noisy")) && !s.iter().any(|l| l.contains("polite") || l.contains("batch")),
            "{s:#?}"
        );
        assert!(s[0].contains("filter: noi"));
        key(&mut app, KeyCode::Char('c'));
        assert_eq!(app.rows().len(), 3);
        assert!(!key(&mut app, KeyCode::Char('q')), "q quits");
    }

    #[test]
    fn a_cluster_wide_cap_shows_what_this_instance_holds_of_it() {
        let mut app = App::default();
        let mut capped = row("reports", 10, 2, 0, false);
        (capped.cluster_max, capped.cluster_grants) = (5, 2);
        app.update(Ok(Snapshot {
            rows: vec![capped, row("web", 1, 1, 0, false)],
            postgres: Some(true),
        }));
        let s = screen(&app);
        assert!(
            s.iter().any(|l| l.contains("servers") && l.contains("cluster")),
            "{s:#?}"
        );
        let of = |id: &str| {
            s.iter()
                .find(|l| l.contains(id))
                .unwrap_or_else(|| panic!("{id} in {s:#?}"))
        };
        assert!(of("reports").contains("2 of 5"), "{}", of("reports"));
        assert!(!of("web").contains(" of "), "no cluster cap: {}", of("web"));
    }

    #[test]
    fn a_failed_read_keeps_the_last_picture_and_says_so() {
        let mut app = App::default();
        app.update(Ok(Snapshot {
            rows: vec![row("web", 1, 1, 0, false)],
            postgres: Some(false),
        }));
        app.update(Err(anyhow::anyhow!("connection refused")));
        let s = screen(&app);
        assert!(
            s[0].contains("UNREACHABLE") && s[0].contains("read failed: connection refused"),
            "{}",
            s[0]
        );
        assert!(s.iter().any(|l| l.contains("web")));
    }
}
