//! The `pgvalve` binary: a thin command line over the library.
//!
//! Validates configuration before binding anything (exit 64 on a bad config), maps
//! SIGTERM/SIGINT to a graceful drain and a second signal to a fast stop, SIGUSR2 to a
//! successor that takes the process over (`run --takeover`).

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
        /// Server connections across all pools (0 = no cap), "auto" (what PostgreSQL's
        /// max_connections allows, read at start and reload) or a percentage of that ("80%").
        #[arg(long, env = "PGVALVE_MAX_SERVER_CONNECTIONS")]
        max_server_connections: Option<config::ServerCap>,
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
        /// Address of /metrics, /healthz, /readyz and the status page, e.g. 127.0.0.1:9930.
        #[arg(long, env = "PGVALVE_HTTP_LISTEN")]
        http_listen: Option<String>,
        /// Load balancers (CIDR,...) whose connections start with a PROXY protocol header
        /// carrying the client's address. [proxy] proxy_protocol_trusted.
        #[arg(long, env = "PGVALVE_PROXY_PROTOCOL_TRUSTED")]
        proxy_protocol_trusted: Option<config::Cidrs>,
        /// Share one budget of server connections with every instance of this name in front
        /// of the same PostgreSQL ([cluster] name; needs --cluster-max-server-connections).
        #[arg(long, env = "PGVALVE_CLUSTER_NAME")]
        cluster_name: Option<String>,
        /// Server connections of all instances of the cluster together ([cluster]
        /// max_server_connections).
        #[arg(long, env = "PGVALVE_CLUSTER_MAX_SERVER_CONNECTIONS")]
        cluster_max_server_connections: Option<u32>,
        /// host:port where the other instances of the cluster reach this one to forward
        /// cancel requests, e.g. the pod IP ([cluster] advertise).
        #[arg(long, env = "PGVALVE_CLUSTER_ADVERTISE")]
        cluster_advertise: Option<String>,
        #[command(flatten)]
        tls: TlsArgs,
        /// Take over from the pgvalve running with the same takeover socket: its listening
        /// sockets and its clients, none dropped (see README "Upgrading without dropping
        /// clients").
        #[arg(long)]
        takeover: bool,
    },
    /// Validate a config file and exit (64: invalid). With --against, also read that
    /// PostgreSQL's max_connections and warn when the pools could open more server
    /// connections than it allows (exit 0 with warnings; 1 with --strict; 69 when it cannot
    /// be read).
    Check {
        /// Config file (TOML).
        #[arg(short, long, env = "PGVALVE_CONFIG")]
        config: PathBuf,
        /// A PostgreSQL to check the pools against: postgres://USER:PASSWORD@HOST:PORT/DB.
        #[arg(long)]
        against: Option<String>,
        /// With --against: exit 1 when there is a warning.
        #[arg(long, requires = "against")]
        strict: bool,
    },
    /// Write a PgBouncer configuration as a pgvalve one (TOML on stdout); what is not mapped
    /// is listed at its end and on stderr.
    Import {
        /// PgBouncer's pgbouncer.ini.
        ini: PathBuf,
        /// PgBouncer's userlist.txt (default: the file auth_file names).
        #[arg(long)]
        userlist: Option<PathBuf>,
    },
    /// Print a SCRAM-SHA-256 verifier for a password (read from stdin when not given).
    Passwd {
        /// The password.
        password: Option<String>,
    },
    /// Drive a load scenario against any PostgreSQL endpoint and report per client identity.
    Loadtest(Box<loadtest::Args>),
    /// Watch a running pgvalve in the terminal: identities by server connections, growth,
    /// waiting, refusals, lock holders, refreshed every second.
    Top(Box<pgvalve::top::Args>),
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
        proxy_protocol_trusted,
        cluster_name,
        cluster_max_server_connections,
        cluster_advertise,
        tls,
        takeover: _,
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
        proxy_protocol_trusted: proxy_protocol_trusted.clone(),
        cluster_name: cluster_name.clone(),
        cluster_max_server_connections: *cluster_max_server_connections,
        cluster_advertise: cluster_advertise.clone(),
        tls: config::TlsSettings {
            client_tls_cert_file: tls.client_tls_cert.clone(),
            client_tls_key_file: tls.client_tls_key.clone(),
            client_tls_mode: tls.client_tls_mode,
            server_tls_mode: tls.server_tls_mode,
            server_tls_ca_file: tls.server_tls_ca.clone(),
            client_tls_ca_file: None,
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
            Cmd::Run { takeover, .. } => match loaded {
                Some((config, path, ov)) => run(config, path, ov, takeover).await,
                None => ExitCode::FAILURE,
            },
            Cmd::Check {
                config,
                against,
                strict,
            } => pgvalve::check::command(&config, against.as_deref(), strict).await,
            Cmd::Passwd { password } => passwd(password),
            Cmd::Import { ini, userlist } => import(&ini, userlist.as_deref()),
            Cmd::Loadtest(args) => loadtest_main(*args).await,
            Cmd::Top(args) => match pgvalve::top::run(*args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("pgvalve top: {e:#}");
                    ExitCode::FAILURE
                }
            },
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

async fn run(config: pgvalve::Config, path: Option<PathBuf>, ov: Overrides, takeover: bool) -> ExitCode {
    let started = if takeover {
        ProxyHandle::start_takeover(config).await
    } else {
        ProxyHandle::start(config).await
    };
    let handle = match started {
        Ok(h) => h,
        Err(e) if takeover => {
            eprintln!("pgvalve: cannot take over: {e}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("pgvalve: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        eprintln!("pgvalve: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    let (Ok(mut hup), Ok(mut usr2)) = (signal(SignalKind::hangup()), signal(SignalKind::user_defined2())) else {
        eprintln!("pgvalve: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    handle.set_reload_source(path, ov);
    // Under systemd (Type=notify): listening, so ready (a successor is the main process now;
    // the unit's NotifyAccess=all lets it say so).
    let mut ready = vec![
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("accepting clients"),
    ];
    if takeover {
        ready.push(sd_notify::NotifyState::MainPid(std::process::id()));
    }
    notify(&ready);
    // SIGTERM and the console's SHUTDOWN drain; SIGINT (Ctrl-C) stops at once.
    let fast = loop {
        tokio::select! {
            _ = term.recv() => break false,
            _ = int.recv() => break true,
            () = handle.shutdown_requested() => break false,
            // A successor took the listeners and the clients over.
            () = handle.handed_over() => break false,
            // SIGUSR2: the binary (as installed now) takes this process over.
            _ = usr2.recv() => spawn_successor(),
            // Built and validated off to the side; applied only when all of it is valid.
            _ = hup.recv() => reload(&handle).await,
        }
    };
    notify(&[sd_notify::NotifyState::Stopping]);
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

/// Starts `pgvalve` as this process was started (argv[0], so an upgraded binary at the same
/// path) with the same arguments and `--takeover`: it takes the listeners and the clients
/// over, and this process exits once empty. Its exit is logged (a takeover it could not do
/// leaves this process as it was).
fn spawn_successor() {
    let mut args = std::env::args_os();
    let Some(program) = args.next() else {
        return;
    };
    let mut args: Vec<std::ffi::OsString> = args.collect();
    if !args.iter().any(|a| a == "--takeover") {
        args.push("--takeover".into());
    }
    match tokio::process::Command::new(&program).args(&args).spawn() {
        Ok(mut child) => {
            tracing::info!(pid = child.id(), "SIGUSR2: started a successor to take over");
            tokio::spawn(async move {
                if let Ok(status) = child.wait().await {
                    tracing::info!(%status, "the successor started on SIGUSR2 exited");
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, program = ?program, "SIGUSR2: cannot start a successor"),
    }
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) a state change; a failure is only logged.
fn notify(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// SIGHUP: RELOADING=1, the reload, then READY=1 with the outcome as STATUS (systemd's
/// `ExecReload` waits for it with Type=notify-reload, and `systemctl status` shows it).
async fn reload(handle: &ProxyHandle) {
    let mut states = vec![sd_notify::NotifyState::Reloading];
    states.extend(sd_notify::NotifyState::monotonic_usec_now().ok());
    notify(&states);
    let status = match handle.reload_from_source().await {
        Ok(r) if r.warnings.is_empty() => "accepting clients; configuration reloaded".to_string(),
        Ok(r) => format!("accepting clients; configuration reloaded; {}", r.warnings.join("; ")),
        Err(e) => format!("accepting clients; reload refused, previous configuration kept: {e}"),
    };
    notify(&[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Status(&status)]);
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

/// `pgvalve import`: the TOML on stdout; notes, and a failed check, on stderr.
fn import(ini: &std::path::Path, userlist: Option<&std::path::Path>) -> ExitCode {
    let imported = match pgvalve::import::import(ini, userlist) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("pgvalve import: {e}");
            return ExitCode::from(65);
        }
    };
    print!("{}", imported.toml);
    if !imported.notes.is_empty() {
        eprintln!(
            "pgvalve import: {} settings not mapped (also listed at the end of the output):",
            imported.notes.len()
        );
        for n in &imported.notes {
            eprintln!("  {n}");
        }
    }
    if let Err(e) = imported.check {
        eprintln!("pgvalve import: warning: the result does not pass `pgvalve check` on this machine: {e}");
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
