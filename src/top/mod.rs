//! `pgvalve top`: the live picture of a running pgvalve in a terminal — per identity its
//! client and server connections against caps (the cluster-wide one too), growth, waiting
//! clients, refusals and lock holders, sorted by server connections and refreshed every
//! second.
//!
//! A tool beside the proxy (like `loadtest`): it reads a running pgvalve from the outside,
//! through `/status.json` (`--http`) or the admin console (`--console`), never the library's
//! internals. Parts: `source` (the two ways in), `view` (the table, keys, drawing; tested with
//! ratatui's TestBackend, and the binary in a real terminal by tests/it/top_terminal.rs).

mod source;
mod view;

use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyEventKind};
use crossterm::execute;
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

pub use source::{Row, Snapshot, Source};
pub use view::{App, Sort};

/// `pgvalve top`'s options.
#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The HTTP endpoint of a running pgvalve ([http] listen), e.g. http://127.0.0.1:9930.
    #[arg(long, conflicts_with = "console", required_unless_present = "console")]
    pub http: Option<String>,
    /// Bearer token for --http ([http] auth_token), when pgvalve is not on this host.
    #[arg(long, env = "PGVALVE_HTTP_TOKEN")]
    pub token: Option<String>,
    /// The admin console instead, e.g. postgres://admin:pw@127.0.0.1:6432/pgvalve.
    #[arg(long)]
    pub console: Option<String>,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
}

/// Runs the terminal view until `q` (or Ctrl-C); the error when pgvalve cannot be read at
/// all at the start.
///
/// # Errors
/// The first read failed, or the terminal could not be set up.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let source = match (&args.http, &args.console) {
        (Some(url), _) => Source::http(url, args.token.clone())?,
        (None, Some(url)) => Source::console(url),
        (None, None) => anyhow::bail!("give --http URL or --console postgres://..."),
    };
    let first = source.read().await?;
    let mut app = App::default();
    app.update(Ok(first));
    enable_raw_mode()?;
    execute!(std::io::stdout(), EnterAlternateScreen)?;
    let mut term = Terminal::new(CrosstermBackend::new(std::io::stdout()))?;
    let ended = event_loop(
        &mut term,
        &mut app,
        &source,
        Duration::from_secs_f64(args.interval.max(0.2)),
    )
    .await;
    disable_raw_mode()?;
    execute!(std::io::stdout(), LeaveAlternateScreen)?;
    ended
}

async fn event_loop(
    term: &mut Terminal<CrosstermBackend<std::io::Stdout>>,
    app: &mut App,
    source: &Source,
    every: Duration,
) -> anyhow::Result<()> {
    let mut next = Instant::now() + every;
    loop {
        term.draw(|f| view::draw(f, app))?;
        // Keys until the next refresh is due (the poll blocks this thread briefly: fine for a
        // terminal tool on its own runtime).
        while Instant::now() < next {
            if event::poll(Duration::from_millis(50))? {
                if let Event::Key(k) = event::read()? {
                    if k.kind == KeyEventKind::Press && !app.key(k) {
                        return Ok(());
                    }
                    term.draw(|f| view::draw(f, app))?;
                }
            }
        }
        app.update(source.read().await);
        next = Instant::now() + every;
    }
}
