//! The wire vocabulary: every message tag the proxy reads or writes, by name, and the one
//! bounded C-string reader. Sits at the bottom of `protocol/` beside `frame`; the relay, the
//! statement tracker, the console and the server login read tags from here instead of
//! spelling bytes.

// The whole vocabulary is named once, here; not every tag is read by the proxy yet.
#![allow(dead_code)]

/// Message tags a client (frontend) sends.
pub(crate) mod frontend {
    /// Bind.
    pub(crate) const BIND: u8 = b'B';
    /// Close (a statement or portal).
    pub(crate) const CLOSE: u8 = b'C';
    /// CopyData (also sent by the server).
    pub(crate) const COPY_DATA: u8 = b'd';
    /// CopyDone (also sent by the server).
    pub(crate) const COPY_DONE: u8 = b'c';
    /// CopyFail.
    pub(crate) const COPY_FAIL: u8 = b'f';
    /// Describe (a statement or portal).
    pub(crate) const DESCRIBE: u8 = b'D';
    /// Execute.
    pub(crate) const EXECUTE: u8 = b'E';
    /// Flush.
    pub(crate) const FLUSH: u8 = b'H';
    /// FunctionCall.
    pub(crate) const FUNCTION_CALL: u8 = b'F';
    /// Parse.
    pub(crate) const PARSE: u8 = b'P';
    /// PasswordMessage, SASLInitialResponse and SASLResponse share this tag.
    pub(crate) const PASSWORD: u8 = b'p';
    /// Query (simple protocol).
    pub(crate) const QUERY: u8 = b'Q';
    /// Sync.
    pub(crate) const SYNC: u8 = b'S';
    /// Terminate.
    pub(crate) const TERMINATE: u8 = b'X';
}

/// Message tags a server (backend) sends.
pub mod backend {
    /// Authentication (Ok, SASL, MD5, cleartext ...).
    pub(crate) const AUTHENTICATION: u8 = b'R';
    /// BackendKeyData.
    pub(crate) const BACKEND_KEY_DATA: u8 = b'K';
    /// BindComplete.
    pub(crate) const BIND_COMPLETE: u8 = b'2';
    /// CloseComplete.
    pub(crate) const CLOSE_COMPLETE: u8 = b'3';
    /// CommandComplete.
    pub(crate) const COMMAND_COMPLETE: u8 = b'C';
    /// CopyBothResponse.
    pub(crate) const COPY_BOTH_RESPONSE: u8 = b'W';
    /// CopyData (also sent by the client).
    pub(crate) const COPY_DATA: u8 = b'd';
    /// CopyDone (also sent by the client).
    pub(crate) const COPY_DONE: u8 = b'c';
    /// CopyInResponse.
    pub(crate) const COPY_IN_RESPONSE: u8 = b'G';
    /// CopyOutResponse.
    pub(crate) const COPY_OUT_RESPONSE: u8 = b'H';
    /// DataRow.
    pub(crate) const DATA_ROW: u8 = b'D';
    /// EmptyQueryResponse.
    pub(crate) const EMPTY_QUERY_RESPONSE: u8 = b'I';
    /// ErrorResponse.
    pub(crate) const ERROR_RESPONSE: u8 = b'E';
    /// FunctionCallResponse.
    pub(crate) const FUNCTION_CALL_RESPONSE: u8 = b'V';
    /// NegotiateProtocolVersion.
    pub(crate) const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
    /// NoData.
    pub(crate) const NO_DATA: u8 = b'n';
    /// NoticeResponse.
    pub(crate) const NOTICE_RESPONSE: u8 = b'N';
    /// NotificationResponse.
    pub(crate) const NOTIFICATION_RESPONSE: u8 = b'A';
    /// ParameterDescription.
    pub(crate) const PARAMETER_DESCRIPTION: u8 = b't';
    /// ParameterStatus.
    pub(crate) const PARAMETER_STATUS: u8 = b'S';
    /// ParseComplete.
    pub(crate) const PARSE_COMPLETE: u8 = b'1';
    /// PortalSuspended.
    pub(crate) const PORTAL_SUSPENDED: u8 = b's';
    /// ReadyForQuery.
    pub(crate) const READY_FOR_QUERY: u8 = b'Z';
    /// RowDescription.
    pub(crate) const ROW_DESCRIPTION: u8 = b'T';
}

/// The transaction status byte of ReadyForQuery.
pub mod status {
    /// Idle: not in a transaction block.
    pub(crate) const IDLE: u8 = b'I';
    /// In a transaction block.
    pub(crate) const IN_TRANSACTION: u8 = b'T';
    /// In a failed transaction block.
    pub(crate) const FAILED: u8 = b'E';
}

/// The one unframed byte that answers an SSLRequest or GSSENCRequest, before any message.
pub(crate) mod encryption {
    /// SSLRequest accepted: the TLS handshake follows.
    pub(crate) const SSL_ACCEPTED: u8 = b'S';
    /// Encryption refused: the session goes on in plain text (or the client gives up).
    pub(crate) const REFUSED: u8 = b'N';
}

/// What a Describe or Close names: the byte before the name.
pub mod target {
    /// A prepared statement.
    pub(crate) const STATEMENT: u8 = b'S';
    /// A portal.
    pub(crate) const PORTAL: u8 = b'P';
}

/// Field codes of an ErrorResponse or NoticeResponse.
pub mod field {
    /// Severity, localized.
    pub(crate) const SEVERITY: u8 = b'S';
    /// Severity, never localized (9.6+).
    pub(crate) const SEVERITY_V: u8 = b'V';
    /// SQLSTATE code.
    pub(crate) const CODE: u8 = b'C';
    /// Primary message.
    pub(crate) const MESSAGE: u8 = b'M';
    /// Detail.
    pub(crate) const DETAIL: u8 = b'D';
    /// Hint.
    pub(crate) const HINT: u8 = b'H';
}

/// The C string at the start of `b` and what follows its NUL, or `None` when `b` holds no
/// NUL (a malformed or cut message). Never allocates, never reads past `b`.
pub(crate) fn split_cstr(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let nul = b.iter().position(|&c| c == 0)?;
    Some((&b[..nul], &b[nul + 1..]))
}

/// [`split_cstr`] with the text decoded (invalid UTF-8 replaced), for display and matching.
pub(crate) fn read_cstr(b: &[u8]) -> Option<(std::borrow::Cow<'_, str>, &[u8])> {
    let (text, rest) = split_cstr(b)?;
    Some((String::from_utf8_lossy(text), rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cstr_splits_at_the_first_nul_and_refuses_without_one() {
        assert_eq!(split_cstr(b"ab\0cd\0"), Some((&b"ab"[..], &b"cd\0"[..])));
        assert_eq!(split_cstr(b"\0"), Some((&b""[..], &b""[..])));
        assert_eq!(split_cstr(b"no nul"), None);
        assert_eq!(split_cstr(b""), None);
        let (s, rest) = read_cstr(b"x\xffy\0z").expect("has a nul");
        assert_eq!(s, "x\u{fffd}y");
        assert_eq!(rest, b"z");
    }
}
