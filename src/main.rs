//! The `pgvalve` binary: a thin command line over the library.
//!
//! Validates configuration before binding anything (exit 64 on a bad config), maps
//! SIGTERM/SIGINT to a graceful drain and a second signal to a fast stop.

#![forbid(unsafe_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use pgvalve::config::{self, Overrides, PoolMode};

use pgvalve::demo::{self, DemoOptions};
use pgvalve::{loadtest, ProxyHandle};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

/// pgvalve: a connection-limiting PostgreSQL proxy.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "PGVALVE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// TLS of `run` (the `[tls]` settings).
#[derive(clap::Args, Debug, Clone)]
struct TlsArgs {
    /// PEM certificate chain offered to clients (turns TLS towards clients on).
    #[arg(long, env = "PGVALVE_CLIENT_TLS_CERT")]
    client_tls_cert: Option<PathBuf>,
    /// PEM private key of that certificate.
    #[arg(long, env = "PGVALVE_CLIENT_TLS_KEY")]
    client_tls_key: Option<PathBuf>,
    /// Whether clients may or must use TLS.
    #[arg(long, env = "PGVALVE_CLIENT_TLS_MODE", value_enum)]
    client_tls_mode: Option<pgvalve::config::ClientTlsMode>,
    /// TLS to PostgreSQL (libpq's sslmode meanings).
    #[arg(long, env = "PGVALVE_SERVER_TLS_MODE", value_enum)]
    server_tls_mode: Option<pgvalve::config::ServerTlsMode>,
    /// PEM CA certificates for verify-ca / verify-full.
    #[arg(long, env = "PGVALVE_SERVER_TLS_CA")]
    server_tls_ca: Option<PathBuf>,
}

// Parsed once at start: the size of `Run` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the proxy.
    Run {
        /// Config file (TOML). Flags override its values.
        #[arg(short, long, env = "PGVALVE_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address, e.g. 127.0.0.1:6432.
        #[arg(long, env = "PGVALVE_LISTEN")]
        listen: Option<String>,
        /// Quick start without a file: postgres://USER:PASSWORD@HOST:PORT. Clients log in as
        /// that user with that password and may ask for any database on that server.
        #[arg(long, env = "PGVALVE_UPSTREAM")]
        upstream: Option<String>,
        /// Pool mode.
        #[arg(long, env = "PGVALVE_POOL_MODE", value_enum)]
        pool_mode: Option<PoolMode>,
        /// Server connections per (database, user) pool.
        #[arg(long, env = "PGVALVE_POOL_SIZE")]
        pool_size: Option<u32>,
        /// Client connections admitted at once.
        #[arg(long, env = "PGVALVE_MAX_CLIENT_CONNECTIONS")]
        max_client_connections: Option<u32>,
        /// Server connections across all pools (0 = no cap).
        #[arg(long, env = "PGVALVE_MAX_SERVER_CONNECTIONS")]
        max_server_connections: Option<u32>,
        /// Free server connections of a pool kept from an identity holding more than its share
        /// for whole sessions: a count, or "10%" of the pool (0 = off). [admission] headroom.
        #[arg(long, env = "PGVALVE_HEADROOM")]
        headroom: Option<config::Headroom>,
        /// Runtime worker threads (0 = one per CPU core).
        #[arg(long, env = "PGVALVE_WORKER_THREADS")]
        worker_threads: Option<usize>,
        /// Session-mode event loops, one thread each (0 = off; default: one per worker thread).
        #[arg(long, env = "PGVALVE_SESSION_THREADS")]
        session_threads: Option<usize>,
        /// Address of /metrics, /healthz and /readyz, e.g. 127.0.0.1:9930.
        #[arg(long, env = "PGVALVE_HTTP_LISTEN")]
        http_listen: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
    },
    /// Validate a config file and exit.
    Check {
        /// Config file (TOML).
        #[arg(short, long, env = "PGVALVE_CONFIG")]
        config: PathBuf,
    },
    /// Print a SCRAM-SHA-256 verifier for a password (read from stdin when not given).
    Passwd {
        /// The password.
        password: Option<String>,
    },
    /// Drive a load scenario against any PostgreSQL endpoint and report per client identity.
    Loadtest(Box<loadtest::Args>),
    /// Start a throwaway PostgreSQL and pgvalve, fire a surge at both, compare.
    Demo {
        /// Concurrent clients in the surge.
        #[arg(long, default_value_t = 300)]
        clients: usize,
        /// PostgreSQL's max_connections.
        #[arg(long, default_value_t = 20)]
        max_connections: u32,
        /// pgvalve's pool size.
        #[arg(long, default_value_t = 15)]
        pool_size: u32,
    },
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGVALVE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// One worker thread is a current-thread runtime (no cross-thread wakeups, like PgBouncer's
/// single event loop); more use tokio's work-stealing scheduler.
fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = match worker_threads {
        1 => tokio::runtime::Builder::new_current_thread(),
        0 => tokio::runtime::Builder::new_multi_thread(),
        n => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    b.enable_all().build()
}

/// Validates `run`'s configuration before the runtime starts or anything is bound.
fn load_run_config(cmd: &Cmd) -> Result<Option<(pgvalve::Config, Option<PathBuf>, Overrides)>, ExitCode> {
    let Cmd::Run {
        config,
        listen,
        upstream,
        pool_mode,
        pool_size,
        max_client_connections,
        max_server_connections,
        headroom,
        worker_threads,
        session_threads,
        http_listen,
        tls,
    } = cmd
    else {
        return Ok(None);
    };
    if config.is_none() && upstream.is_none() {
        eprintln!(
            "pgvalve: give a config file (-c FILE) or an upstream (--upstream postgres://USER:PASSWORD@HOST:PORT)"
        );
        return Err(ExitCode::from(64));
    }
    let ov = Overrides {
        listen: listen.clone(),
        upstream: upstream.clone(),
        pool_mode: *pool_mode,
        pool_size: *pool_size,
        max_client_connections: *max_client_connections,
        max_server_connections: *max_server_connections,
        headroom: *headroom,
        worker_threads: *worker_threads,
        session_threads: *session_threads,
        http_listen: http_listen.clone(),
        tls: config::TlsSettings {
            client_tls_cert_file: tls.client_tls_cert.clone(),
            client_tls_key_file: tls.client_tls_key.clone(),
            client_tls_mode: tls.client_tls_mode,
            server_tls_mode: tls.server_tls_mode,
            server_tls_ca_file: tls.server_tls_ca.clone(),
        },
    };
    match config::load_with(config.as_deref(), &ov) {
        Ok(c) => Ok(Some((c, config.clone(), ov))),
        Err(e) => {
            eprintln!("pgvalve: {e}");
            Err(ExitCode::from(64))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let loaded = match load_run_config(&cli.command) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rt = match runtime(loaded.as_ref().map_or(0, |(c, ..)| c.proxy.worker_threads)) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pgvalve: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cli.command {
            Cmd::Run { .. } => match loaded {
                Some((config, path, ov)) => run(config, path, ov).await,
                None => ExitCode::FAILURE,
            },
            Cmd::Check { config } => match config::load(&config) {
                Ok(c) => {
                    println!(
                        "{}: ok ({} databases, {} users, listen {})",
                        config.display(),
                        c.databases.len(),
                        c.users.len(),
                        c.listen
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("pgvalve: {e}");
                    ExitCode::from(64)
                }
            },
            Cmd::Passwd { password } => passwd(password),
            Cmd::Loadtest(args) => loadtest_main(*args).await,
            Cmd::Demo {
                clients,
                max_connections,
                pool_size,
            } => {
                let opts = DemoOptions {
                    clients,
                    max_connections,
                    pool_size,
                    ..Default::default()
                };
                demo_main(opts).await
            }
        }
    })
}

async fn run(config: pgvalve::Config, path: Option<PathBuf>, ov: Overrides) -> ExitCode {
    let handle = match ProxyHandle::start(config).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("pgvalve: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        eprintln!("pgvalve: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        eprintln!("pgvalve: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    handle.set_reload_source(path, ov);
    // SIGTERM and the console's SHUTDOWN drain; SIGINT (Ctrl-C) stops at once.
    let fast = loop {
        tokio::select! {
            _ = term.recv() => break false,
            _ = int.recv() => break true,
            () = handle.shutdown_requested() => break false,
            // Built and validated off to the side; applied only when all of it is valid.
            _ = hup.recv() => { let _ = handle.reload_from_source(); }
        }
    };
    if fast {
        tracing::info!("SIGINT: fast shutdown");
        handle.shutdown_now().await;
        return ExitCode::SUCCESS;
    }
    tracing::info!("shutdown requested: draining (a second signal stops at once)");
    let stop = handle.stop_signal();
    let drain = handle.shutdown();
    tokio::pin!(drain);
    tokio::select! {
        _ = &mut drain => {}
        _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
            tracing::info!("second signal: fast shutdown");
            stop.stop_now();
            drain.await;
        }
    }
    ExitCode::SUCCESS
}

/// One run, or two compared.
enum Ran {
    One(Box<loadtest::Outcome>),
    Two(loadtest::compare::Comparison),
}

async fn loadtest_main(args: loadtest::Args) -> ExitCode {
    let plan = match args.plan() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("pgvalve loadtest: {e}");
            return ExitCode::from(64);
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("pgvalve loadtest: stopping (Ctrl-C); reporting what was measured");
                stop.store(true, Ordering::Relaxed);
            }
        })
    };
    let observe = args.observe.as_deref();
    let result = match (args.ephemeral, &args.compare) {
        (true, _) => loadtest::compare::ephemeral(plan, stop).await.map(Ran::Two),
        (false, Some(other)) => loadtest::compare::compare(&plan, other, observe, stop)
            .await
            .map(Ran::Two),
        (false, None) => loadtest::run(&plan, observe, stop).await.map(|o| Ran::One(Box::new(o))),
    };
    ctrl_c.abort();
    let o = match result {
        Ok(Ran::One(o)) => *o,
        Ok(Ran::Two(comparison)) => {
            print!("{}", loadtest::compare::side_by_side(&comparison));
            // The files describe the first run (through pgvalve with --ephemeral).
            comparison
                .runs
                .into_iter()
                .next()
                .map(|(_, o)| o)
                .expect("invariant: two runs")
        }
        Err(e) => {
            eprintln!("pgvalve loadtest: {e}");
            return ExitCode::from(64);
        }
    };
    if !args.ephemeral && args.compare.is_none() {
        print!("{}", loadtest::report::table(&o));
    }
    for (path, text) in [
        (&args.json, args.json.as_ref().map(|_| loadtest::report::json(&o))),
        (&args.report, args.report.as_ref().map(|_| loadtest::report::html(&o))),
    ] {
        if let (Some(p), Some(t)) = (path, text) {
            if let Err(e) = std::fs::write(p, t) {
                eprintln!("pgvalve loadtest: cannot write {}: {e}", p.display());
                return ExitCode::FAILURE;
            }
            eprintln!("wrote {}", p.display());
        }
    }
    ExitCode::SUCCESS
}

fn passwd(password: Option<String>) -> ExitCode {
    let password = match password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            if std::io::stdin().lock().read_line(&mut line).is_err() {
                eprintln!("pgvalve: cannot read a password from stdin");
                return ExitCode::FAILURE;
            }
            line.trim_end_matches(['\n', '\r']).to_string()
        }
    };
    println!("{}", postgres_protocol::password::scram_sha_256(password.as_bytes()));
    ExitCode::SUCCESS
}

async fn demo_main(opts: DemoOptions) -> ExitCode {
    println!(
        "pgvalve demo: a throwaway PostgreSQL with max_connections={}, pgvalve in front with pool_size={}, and a surge of {} concurrent clients (each: connect, one short transaction, disconnect) at both.",
        opts.max_connections, opts.pool_size, opts.clients
    );
    match demo::run(opts).await {
        Ok(report) => {
            println!("{}", report.render());
            if report.proxy_held() {
                println!(
                    "pgvalve absorbed the surge: nobody refused, PostgreSQL never saw more than {} connections.",
                    report.opts.pool_size
                );
                ExitCode::SUCCESS
            } else {
                println!("pgvalve did NOT hold the surge (see above).");
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("pgvalve demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}
