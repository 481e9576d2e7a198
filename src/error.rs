//! Errors that reach a client, classified by side and SQLSTATE.
//!
//! Every failure in the flow (client session, admission, pool, server connection) ends up as
//! a [`PgError`]: what the client is told, as an ErrorResponse with the SQLSTATE PostgreSQL
//! itself would use. [`Side`] says whose fault it was, which picks the log level. Every
//! error type of the flow answers both through [`Sided`], decided where the error is made:
//! an error that wraps another asks it instead of deciding again.

use std::fmt;

/// SQLSTATE codes the proxy itself sends (PostgreSQL Appendix A).
pub(crate) mod sqlstate {
    /// too_many_connections: every refusal for lack of capacity.
    pub(crate) const TOO_MANY_CONNECTIONS: &str = "53300";
    /// invalid_password.
    pub(crate) const INVALID_PASSWORD: &str = "28P01";
    /// invalid_authorization_specification.
    pub(crate) const INVALID_AUTHORIZATION: &str = "28000";
    /// invalid_catalog_name: unknown database.
    pub(crate) const INVALID_CATALOG_NAME: &str = "3D000";
    /// protocol_violation.
    pub(crate) const PROTOCOL_VIOLATION: &str = "08P01";
    /// connection_failure: the server cannot be reached.
    pub(crate) const CONNECTION_FAILURE: &str = "08006";
    /// query_canceled.
    pub(crate) const QUERY_CANCELED: &str = "57014";
    /// admin_shutdown.
    pub(crate) const ADMIN_SHUTDOWN: &str = "57P01";
    /// feature_not_supported.
    pub(crate) const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// syntax_error: an unknown console command.
    pub(crate) const SYNTAX_ERROR: &str = "42601";
    /// insufficient_privilege.
    pub(crate) const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// object_not_in_prerequisite_state: RESUME of what is not paused.
    pub(crate) const OBJECT_NOT_IN_PREREQUISITE_STATE: &str = "55000";
    /// undefined_object: KILL_CLIENT of an unknown id.
    pub(crate) const UNDEFINED_OBJECT: &str = "42704";
    /// config_file_error: RELOAD refused.
    pub(crate) const CONFIG_FILE_ERROR: &str = "F0000";
    /// A limit of the proxy's was exceeded (a client that does not read its notifications).
    pub(crate) const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
}

/// Whose fault a failure is: decides log level and whether the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// The client misbehaved or went away.
    Client,
    /// PostgreSQL failed or refused.
    Server,
    /// A limit of the proxy (capacity, timeout, shutdown) or a bug.
    Proxy,
    /// The operator's configuration: a file that cannot be used, or a setting the server
    /// needs and does not have.
    Config,
}

/// An error that knows whose fault it is and the SQLSTATE the client is told.
pub(crate) trait Sided {
    /// Whose fault it is.
    fn side(&self) -> Side;

    /// The SQLSTATE of the ErrorResponse the client is sent for it (or would be, when the
    /// client is gone or the error is never sent to one).
    fn sqlstate(&self) -> &str;
}

/// ErrorResponse severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends.
    Fatal,
}

impl Severity {
    /// The severity string on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An error as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// ERROR or FATAL.
    pub severity: Severity,
    /// Five-character SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional DETAIL.
    pub(crate) detail: Option<String>,
    /// Optional HINT.
    pub hint: Option<String>,
}

impl PgError {
    /// A FATAL error with a code and message.
    pub(crate) fn fatal(code: &str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Fatal,
            code: code.to_string(),
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// An ERROR (statement-level) with a code and message.
    pub fn error(code: &str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            ..Self::fatal(code, message)
        }
    }

    /// Adds a HINT.
    pub(crate) fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Adds a DETAIL.
    pub(crate) fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity.as_str(), self.code, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for PgError {}
