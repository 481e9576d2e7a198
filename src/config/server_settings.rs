//! `server_settings = { lock_timeout = "2s", ... }`: PostgreSQL settings pgvalve applies on
//! the server connections of an identity's clients (in `[admission]` for everyone, in an
//! `[[identity]]` rule for its identities; the rule's win per setting).
//!
//! Part of config: parsed (strings, numbers and booleans, all kept as PostgreSQL text) and
//! checked here; the client session applies them (see `client::params`).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

/// Setting name -> value, as PostgreSQL's `set_config` takes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerSettings(pub BTreeMap<String, String>);

impl<'de> Deserialize<'de> for ServerSettings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Value {
            Text(String),
            Int(i64),
            Float(f64),
            Bool(bool),
        }
        let raw = BTreeMap::<String, Value>::deserialize(d)?;
        Ok(ServerSettings(
            raw.into_iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Text(s) => s,
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) => f.to_string(),
                        Value::Bool(b) => if b { "on" } else { "off" }.to_string(),
                    };
                    (k, v)
                })
                .collect(),
        ))
    }
}

impl ServerSettings {
    /// Checks names (a PostgreSQL setting name: letters, digits, `_`, `.`) and values (no NUL).
    ///
    /// # Errors
    /// (field, reason) for the first bad entry.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (k, v) in &self.0 {
            let name_ok = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !name_ok {
                return Err((
                    "server_settings".into(),
                    format!("{k:?} is not a PostgreSQL setting name"),
                ));
            }
            if v.contains('\0') {
                return Err((format!("server_settings.{k}"), "must not contain a NUL byte".into()));
            }
        }
        Ok(())
    }

    /// `base` with `over`'s settings put over it.
    pub fn merged(base: &ServerSettings, over: Option<&ServerSettings>) -> Vec<(String, String)> {
        let mut m = base.0.clone();
        if let Some(o) = over {
            m.extend(o.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        m.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_of_any_toml_type_become_text_and_names_are_checked() {
        let s: ServerSettings =
            toml::from_str("lock_timeout = \"2s\"\nwork_mem = 4096\njit = false\n\"app.x\" = 1.5").unwrap();
        assert_eq!(s.0["lock_timeout"], "2s");
        assert_eq!(s.0["work_mem"], "4096");
        assert_eq!(s.0["jit"], "off");
        assert_eq!(s.0["app.x"], "1.5");
        assert!(s.validate().is_ok());
        let bad: ServerSettings = toml::from_str("\"x; DROP\" = 1").unwrap();
        assert!(bad.validate().is_err());
        let rule: ServerSettings = toml::from_str("lock_timeout = \"5s\"").unwrap();
        let m = ServerSettings::merged(&s, Some(&rule));
        assert!(m.contains(&("lock_timeout".into(), "5s".into())));
        assert_eq!(m.len(), 4);
    }
}
