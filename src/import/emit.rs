//! The pgvalve configuration being written by `pgvalve import`: TOML tables of settings,
//! each with the PgBouncer line it came from, `[[identity]]` rules, and the notes on what was
//! not mapped (and why), rendered as one commented TOML file.
//!
//! Part of `import`; the values are `toml::Value`s, so quoting and escaping are the TOML
//! crate's.

use super::ini::At;

/// One setting to write: `key = value  # comment`.
#[derive(Debug, Clone)]
pub struct Setting {
    /// The pgvalve key.
    pub key: String,
    /// Its value.
    pub value: toml::Value,
    /// Where it came from (PgBouncer's setting and line), or why it was chosen.
    pub comment: String,
}

/// A PgBouncer setting pgvalve does not take as it is, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Where it was written (none for what is missing rather than written).
    pub at: Option<At>,
    /// The setting, e.g. `logfile` or `databases.app: connect_query`.
    pub setting: String,
    /// Why, and what to do instead.
    pub reason: String,
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.at {
            Some(at) => write!(f, "{at}: {}: {}", self.setting, self.reason),
            None => write!(f, "{}: {}", self.setting, self.reason),
        }
    }
}

/// The configuration being built: tables in the order they are written.
#[derive(Debug, Default)]
pub struct Draft {
    /// `[proxy]`, `[pool]`, `[tls]`, `[admin]`, then `[databases.X]` and `[users.X]`, keyed by
    /// their header (without brackets).
    tables: Vec<(String, Vec<Setting>)>,
    /// `[[identity]]` rules, in order.
    pub identities: Vec<Vec<Setting>>,
    /// What was not mapped.
    pub notes: Vec<Note>,
}

impl Draft {
    /// Sets `key` in `[table]` (a later value replaces an earlier one).
    pub fn set(&mut self, table: &str, key: &str, value: impl Into<toml::Value>, comment: impl Into<String>) {
        let s = Setting {
            key: key.to_string(),
            value: value.into(),
            comment: comment.into(),
        };
        let settings = match self.tables.iter_mut().position(|(t, _)| t == table) {
            Some(i) => &mut self.tables[i].1,
            None => {
                self.tables.push((table.to_string(), Vec::new()));
                &mut self.tables.last_mut().expect("just pushed").1
            }
        };
        settings.retain(|old| old.key != s.key);
        settings.push(s);
    }

    /// Makes sure `[table]` is written even when empty (a database with every default).
    pub fn table(&mut self, table: &str) {
        if !self.tables.iter().any(|(t, _)| t == table) {
            self.tables.push((table.to_string(), Vec::new()));
        }
    }

    /// Whether `[table]` is there.
    pub fn has_table(&self, table: &str) -> bool {
        self.tables.iter().any(|(t, _)| t == table)
    }

    /// Records a setting that was not mapped.
    pub fn note(&mut self, at: Option<&At>, setting: impl Into<String>, reason: impl Into<String>) {
        self.notes.push(Note {
            at: at.cloned(),
            setting: setting.into(),
            reason: reason.into(),
        });
    }

    /// The TOML text, with a header naming the sources and the notes at the end.
    pub fn render(&self, sources: &str) -> String {
        let mut out = format!(
            "# pgvalve configuration imported from {sources} by `pgvalve import`.\n\
             # Each setting names the PgBouncer setting and line it comes from; what could not be\n\
             # mapped is listed at the end with the reason. Check it with `pgvalve check -c FILE`.\n"
        );
        let order = |t: &str| match t {
            "proxy" => 0,
            "pool" => 1,
            "admission" => 2,
            "admin" => 3,
            "tls" => 4,
            t if t.starts_with("databases.") => 5,
            _ => 6,
        };
        let mut tables: Vec<_> = self.tables.iter().collect();
        tables.sort_by_key(|(t, _)| order(t));
        for (name, settings) in tables {
            out.push_str(&format!("\n[{name}]\n"));
            write_settings(&mut out, settings);
        }
        if !self.identities.is_empty() {
            out.push_str(
                "\n# PgBouncer's per-user and per-database caps: the clients a rule matches (the first\n\
                 # rule that matches) are one identity with the rule's caps, instead of one identity\n\
                 # per application_name.\n",
            );
        }
        for rule in &self.identities {
            out.push_str("\n[[identity]]\n");
            write_settings(&mut out, rule);
        }
        if !self.notes.is_empty() {
            out.push_str(&format!(
                "\n# Not mapped ({} PgBouncer settings or values), with the reason:\n",
                self.notes.len()
            ));
            let mut notes: Vec<&Note> = self.notes.iter().collect();
            notes.sort_by_key(|n| {
                n.at.as_ref()
                    .map_or((1, String::new(), 0), |a| (0, a.file.clone(), a.line))
            });
            for n in notes {
                for (i, line) in n.to_string().lines().enumerate() {
                    out.push_str(if i == 0 { "# - " } else { "#   " });
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

fn write_settings(out: &mut String, settings: &[Setting]) {
    for s in settings {
        let line = format!("{} = {}", key(&s.key), s.value);
        if s.comment.is_empty() {
            out.push_str(&format!("{line}\n"));
        } else {
            out.push_str(&format!("{line:<40} # {}\n", s.comment.replace('\n', " ")));
        }
    }
}

/// A TOML key: bare when it can be, quoted otherwise.
pub fn key(k: &str) -> String {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

/// The header of a table under `databases` or `users` for a name.
pub fn sub_table(parent: &str, name: &str) -> String {
    format!("{parent}.{}", key(name))
}
