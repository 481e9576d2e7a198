//! `pgvalve check [--against postgres://...]`: whether a configuration is valid and whether its
//! pools fit in what that PostgreSQL allows ([`command`] is the whole subcommand).
//!
//! A tool beside the proxy (it runs no proxy). It reads PostgreSQL's limits as the proxy
//! does for `max_server_connections = "auto"` (`server::sizing`), bounds the server
//! connections the configuration may open, and says what could exceed the limits. pgvalve's
//! own connections (the lock monitor's, auth_query look-ups, LISTEN connections) each hold a
//! slot of a pool's `pool_size` and of `max_server_connections`, so they are inside that
//! bound; a `[cluster]`'s coordination connection is one more per instance.

use std::process::ExitCode;

use crate::config::{Config, PgLimits, ServerCap};

/// What the check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fit {
    /// What was read and computed, one line each.
    pub lines: Vec<String>,
    /// What could exceed PostgreSQL's limits, one sentence each.
    pub warnings: Vec<String>,
}

/// Server connections the pools may open: the sum of `pool_size` over every configured
/// (database, user), or None when the pools are unbounded (a `"*"` database routes any
/// name; auth_query users are not listed), with why.
fn pools(config: &Config) -> (Option<u64>, String) {
    if config.databases.contains_key("*") {
        return (None, "a \"*\" database routes any database name".into());
    }
    if config.proxy.auth_user.is_some() {
        return (None, "auth_user looks up users not listed in [users]".into());
    }
    let mut pairs = 0u64;
    let mut sum = 0u64;
    for db in config.databases.keys() {
        for user in config.users.keys() {
            if let Some(r) = config.route(db, user) {
                pairs += 1;
                sum += u64::from(r.pool_size);
            }
        }
    }
    (
        Some(sum),
        format!(
            "{} databases x {} users = {pairs} pools, pool_size summed",
            config.databases.len(),
            config.users.len()
        ),
    )
}

/// Checks `config` against `limits` (see the module docs).
pub fn fit(config: &Config, limits: &PgLimits) -> Fit {
    let mut f = Fit::default();
    let allowed = u64::from(limits.available());
    f.lines.push(format!("PostgreSQL: {}", limits.describe()));
    let (sum, how) = pools(config);
    f.lines.push(match sum {
        Some(n) => format!("pools: {n} server connections ({how})"),
        None => format!("pools: unbounded ({how})"),
    });
    let setting = config.pool.max_server_connections;
    let cap = u64::from(setting.of(limits));
    f.lines.push(match setting {
        ServerCap::Connections(0) => "max_server_connections = 0 (no cap across pools)".to_string(),
        ServerCap::Connections(n) => format!("max_server_connections = {n}"),
        s => format!("max_server_connections = \"{s}\": {cap} on this PostgreSQL"),
    });
    let own = u64::from(config.cluster.is_some());
    let bound = match (sum, cap) {
        (s, 0) => s,
        (Some(s), c) => Some(s.min(c)),
        (None, c) => Some(c),
    }
    .map(|b| b + own);
    let own_note = if own > 0 {
        " (with the lock monitor, auth_query and LISTEN connections inside the pools, and 1 cluster coordination connection)"
    } else {
        " (with the lock monitor, auth_query and LISTEN connections, which take slots of the pools)"
    };
    match bound {
        Some(b) => f.lines.push(format!("pgvalve opens at most {b} server connections{own_note}")),
        None => f.warnings.push(format!(
            "nothing bounds pgvalve's server connections ({how}, and max_server_connections = 0) while PostgreSQL allows {allowed}: set max_server_connections = \"auto\" (or a number up to {allowed})"
        )),
    }
    if let Some(b) = bound.filter(|b| *b > allowed) {
        f.warnings.push(format!(
            "pgvalve may open {b} server connections, more than the {allowed} PostgreSQL allows ({}): lower pool_size, or set max_server_connections = \"auto\" (or a number up to {})",
            limits.describe(),
            allowed.saturating_sub(own)
        ));
    }
    if let ServerCap::Connections(n) = setting {
        if u64::from(n) > allowed {
            f.warnings.push(format!(
                "max_server_connections = {n} is more than the {allowed} connections PostgreSQL allows: use \"auto\" or at most {allowed}"
            ));
        }
    }
    if let Some(cl) = config
        .cluster
        .as_ref()
        .filter(|c| u64::from(c.max_server_connections) > allowed)
    {
        f.warnings.push(format!(
            "[cluster] max_server_connections = {} is more than the {allowed} connections PostgreSQL allows",
            cl.max_server_connections
        ));
    }
    f
}

/// Reads the limits of the PostgreSQL at `url` and checks `config` against them.
///
/// # Errors
/// The URL is not postgres://, or PostgreSQL could not be read.
pub async fn against(config: &Config, url: &str) -> Result<Fit, String> {
    let limits = crate::server::sizing::read_url(config, url).await?;
    Ok(fit(config, &limits))
}

/// `pgvalve check`: validates; with `against`, checks the pools against that PostgreSQL.
pub async fn command(path: &std::path::Path, against: Option<&str>, strict: bool) -> ExitCode {
    let c = match crate::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("pgvalve: {e}");
            return ExitCode::from(64);
        }
    };
    println!(
        "{}: ok ({} databases, {} users, listen {})",
        path.display(),
        c.databases.len(),
        c.users.len(),
        c.listen
    );
    let Some(url) = against else {
        if c.pool.max_server_connections.from_postgres() {
            println!(
                "max_server_connections = \"{}\": sized from PostgreSQL's max_connections at start and at each reload",
                c.pool.max_server_connections
            );
        }
        return ExitCode::SUCCESS;
    };
    let fit = match self::against(&c, url).await {
        Ok(f) => f,
        Err(e) => {
            eprintln!("pgvalve check: cannot read PostgreSQL's limits: {e}");
            return ExitCode::from(69);
        }
    };
    for l in &fit.lines {
        println!("{l}");
    }
    for w in &fit.warnings {
        println!("warning: {w}");
    }
    match (fit.warnings.is_empty(), strict) {
        (true, _) => println!("ok: the pools fit in what PostgreSQL allows"),
        (false, true) => return ExitCode::FAILURE,
        (false, false) => {}
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pool: &str) -> Config {
        let text = format!(
            "[databases.a]\n[databases.b]\n[users.x]\npassword = \"p\"\n[users.y]\npassword = \"p\"\n[pool]\n{pool}\n"
        );
        Config::validate(crate::config::parse_toml("t", &text).unwrap(), "t").unwrap()
    }

    fn limits(max: u32) -> PgLimits {
        PgLimits {
            server: "pg:5432".into(),
            max_connections: max,
            superuser_reserved_connections: 3,
            reserved_connections: 0,
        }
    }

    #[test]
    fn pools_that_fit_give_no_warning() {
        let f = fit(&config("pool_size = 5\nmax_server_connections = 0"), &limits(100));
        assert!(f.warnings.is_empty(), "{f:?}");
        assert!(
            f.lines.iter().any(|l| l.contains("at most 20 server connections")),
            "{f:?}"
        );
    }

    #[test]
    fn pools_or_a_cap_beyond_postgres_are_warned() {
        let f = fit(&config("pool_size = 20\nmax_server_connections = 0"), &limits(50));
        assert_eq!(f.warnings.len(), 1, "{f:?}");
        assert!(
            f.warnings[0].contains("may open 80 server connections, more than the 47"),
            "{f:?}"
        );
        let f = fit(&config("pool_size = 5\nmax_server_connections = 90"), &limits(50));
        assert_eq!(f.warnings.len(), 1, "{f:?}");
        assert!(
            f.warnings[0].contains("max_server_connections = 90 is more than the 47"),
            "{f:?}"
        );
        // "auto" caps the pools at what PostgreSQL allows.
        let f = fit(
            &config("pool_size = 20\nmax_server_connections = \"auto\""),
            &limits(50),
        );
        assert!(f.warnings.is_empty(), "{f:?}");
        let f = fit(&config("pool_size = 20\nmax_server_connections = \"50%\""), &limits(50));
        assert!(f.lines.iter().any(|l| l.contains("at most 23 server")), "{f:?}");
    }

    #[test]
    fn a_wildcard_without_a_cap_is_unbounded() {
        let text = "[databases.\"*\"]\n[users.x]\npassword = \"p\"\n[pool]\nmax_server_connections = 0\n";
        let c = Config::validate(crate::config::parse_toml("t", text).unwrap(), "t").unwrap();
        let f = fit(&c, &limits(50));
        assert!(f.warnings[0].contains("nothing bounds"), "{f:?}");
    }
}
