//! Console tables of what went wrong and who caused it: SHOW DEADLOCKS (both sides of each
//! deadlock) and SHOW LONG_TRANSACTIONS, with the sqlcommenter tags (route, controller, action, traceparent) of the
//! statements pgvalve recorded.
//!
//! Part of the admin console, beside `show` (the command table dispatches here).

use super::show::{s, time, Table};
use super::Admin;
use crate::protocol::messages::ColumnType::{Float8, Int8, Text};
use crate::protocol::sqlcomment::Tags;

/// The tag columns every table of recorded statements ends with (before the statement).
pub(super) const TAG_COLUMNS: [(&str, crate::protocol::messages::ColumnType); 4] = [
    ("route", Text),
    ("controller", Text),
    ("action", Text),
    ("traceparent", Text),
];

/// The values of [`TAG_COLUMNS`] for `t`.
pub(super) fn tag_values(t: &Tags) -> [Option<String>; 4] {
    [
        t.route.clone(),
        t.controller.clone(),
        t.action.clone(),
        t.traceparent.clone(),
    ]
}

/// SHOW DEADLOCKS: one row per backend of each recorded deadlock, oldest deadlock first.
pub(super) fn deadlocks(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(
        &[
            &[
                ("deadlock", Int8),
                ("time", Text),
                ("pid", Int8),
                ("role", Text),
                ("session_id", Int8),
                ("identity", Text),
                ("application_name", Text),
                ("client_addr", Text),
                ("waited_for", Text),
                ("blocked_by", Int8),
            ][..],
            &TAG_COLUMNS,
            &[("statement", Text)],
        ]
        .concat(),
    );
    let d = shared.locks.deadlocks();
    for (n, e) in d.history.iter().enumerate() {
        for p in &e.parties {
            let mut row = vec![
                s(n + 1),
                time(e.at),
                s(p.pid),
                s(if p.loser { "rolled back" } else { "went on" }),
                p.session_id.map(|i| i.to_string()),
                s(&p.identity),
                s(&p.application_name),
                s(&p.addr),
                Some(p.waited_for.clone()).filter(|w| !w.is_empty()),
                p.blocked_by.map(|b| b.to_string()),
            ];
            row.extend(tag_values(&p.tags));
            row.push(s(&p.statement));
            t.rows.push(row);
        }
    }
    t
}

/// SHOW LONG_TRANSACTIONS: transactions open longer than `long_transaction_after`, those
/// open now first, then the recently ended ones (oldest first).
pub(super) fn long_transactions(shared: &Admin<'_>) -> Table {
    let mut t = Table::new(
        &[
            &[
                ("session_id", Int8),
                ("identity", Text),
                ("application_name", Text),
                ("client_addr", Text),
                ("pid", Int8),
                ("began", Text),
                ("open_seconds", Float8),
                ("state", Text),
                ("ended", Text),
            ][..],
            &TAG_COLUMNS,
            &[("last_statement", Text)],
        ]
        .concat(),
    );
    let l = shared.locks.long_transactions();
    for x in l.open.iter().chain(l.history.iter()) {
        let mut row = vec![
            x.session_id.map(|i| i.to_string()),
            s(&x.identity),
            s(&x.application_name),
            s(&x.addr),
            s(x.pid),
            time(x.began),
            s(format!("{:.1}", x.open_for.as_secs_f64())),
            s(&x.state),
            x.ended.and_then(time),
        ];
        row.extend(tag_values(&x.tags));
        row.push(s(&x.query));
        t.rows.push(row);
    }
    t
}
