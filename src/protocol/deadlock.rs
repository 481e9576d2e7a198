//! The DETAIL of PostgreSQL's deadlock error (SQLSTATE 40P01): which backends were in the
//! cycle and what each waited for.
//!
//! Bottom layer, pure parsing, cold path only (the relay calls it on a 40P01 and nothing
//! else). PostgreSQL writes one line per process in the cycle:
//! `Process 123 waits for ShareLock on transaction 456; blocked by process 789.`
//! A line of any other shape is skipped; the caller still counts the deadlock.

/// Longest DETAIL read.
const MAX_DETAIL: usize = 16 * 1024;
/// Most processes read from one DETAIL.
const MAX_WAITS: usize = 64;
/// Longest lock description kept, in characters.
const MAX_LOCK: usize = 200;

/// One process of the cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wait {
    /// Its backend pid.
    pub pid: i32,
    /// The lock it waited for: mode and object ("ShareLock on transaction 456").
    pub lock: String,
    /// The backend it waited on.
    pub blocked_by: i32,
}

/// The processes a deadlock DETAIL names, in its order (empty when it has none of the
/// expected shape).
pub fn parse_detail(detail: &str) -> Vec<Wait> {
    let mut end = detail.len().min(MAX_DETAIL);
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    detail[..end].lines().filter_map(parse_line).take(MAX_WAITS).collect()
}

/// `Process <pid> waits for <lock>; blocked by process <pid>.`
fn parse_line(line: &str) -> Option<Wait> {
    let rest = line.trim().strip_prefix("Process ")?;
    let (pid, rest) = rest.split_once(" waits for ")?;
    let (lock, blocker) = rest.rsplit_once("; blocked by process ")?;
    let blocked_by = blocker.trim_end_matches('.').trim().parse().ok()?;
    Some(Wait {
        pid: pid.trim().parse().ok()?,
        lock: lock.chars().filter(|c| !c.is_control()).take(MAX_LOCK).collect(),
        blocked_by,
    })
}

/// The backend pids the waits name, each once, in order of appearance.
pub fn pids(waits: &[Wait]) -> Vec<i32> {
    let mut out = Vec::new();
    for p in waits.iter().flat_map(|w| [w.pid, w.blocked_by]) {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_detail_is_read() {
        let d = "Process 4242 waits for ShareLock on transaction 771; blocked by process 4243.\nProcess 4243 waits for ShareLock on transaction 770; blocked by process 4242.";
        let w = parse_detail(d);
        assert_eq!(w.len(), 2);
        assert_eq!(
            w[0],
            Wait {
                pid: 4242,
                lock: "ShareLock on transaction 771".into(),
                blocked_by: 4243
            }
        );
        assert_eq!(pids(&w), vec![4242, 4243]);
    }

    #[test]
    fn other_shapes_give_nothing() {
        assert!(parse_detail("Prozess 1 wartet").is_empty());
        assert!(parse_detail("Process x waits for A; blocked by process 2.").is_empty());
        assert!(parse_detail("").is_empty());
    }
}
