//! Reading a TOML table by hand, so that one run reports every mistake (serde stops at the first)
//! and each mistake names where it stands, e.g. `policy.rule[2].pattern: invalid regex …`.
//! Used by `config` for the settings and by `policy::compile` for the rules.

use std::fmt;
use std::time::Duration;

use toml::{Table, Value};

/// One mistake in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where it stands, e.g. `policy.rule[2].pattern`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every mistake found in one configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors {
    /// The file (or the built-in configuration) the errors are in.
    pub origin: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {} error(s) in the configuration",
            self.origin,
            self.errors.len()
        )?;
        for e in &self.errors {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// The mistakes found so far.
#[derive(Default)]
pub struct Errors(pub Vec<ConfigError>);

impl Errors {
    pub fn push(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(ConfigError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    /// The mistakes, as the errors of the configuration from `origin`.
    pub fn into_result(self, origin: impl fmt::Display) -> ConfigErrors {
        ConfigErrors {
            origin: origin.to_string(),
            errors: self.0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads the keys of one table, remembering which were read so the rest can be reported.
pub struct Reader<'t> {
    table: &'t Table,
    path: String,
    read: Vec<&'t str>,
}

impl<'t> Reader<'t> {
    pub fn new(table: &'t Table, path: &str) -> Reader<'t> {
        Reader {
            table,
            path: path.to_owned(),
            read: Vec::new(),
        }
    }

    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    pub fn get(&mut self, key: &str) -> Option<&'t Value> {
        let (k, v) = self.table.get_key_value(key)?;
        self.read.push(k.as_str());
        Some(v)
    }

    pub fn typed<T>(
        &mut self,
        key: &str,
        errors: &mut Errors,
        expected: &str,
        convert: impl FnOnce(&'t Value) -> Option<T>,
    ) -> Option<T> {
        let value = self.get(key)?;
        let converted = convert(value);
        if converted.is_none() {
            errors.push(
                &self.key_path(key),
                format!("expected {expected}, found {}", value.type_str()),
            );
        }
        converted
    }

    pub fn string(&mut self, key: &str, errors: &mut Errors) -> Option<&'t str> {
        self.typed(key, errors, "a string", Value::as_str)
    }

    pub fn boolean(&mut self, key: &str, errors: &mut Errors) -> Option<bool> {
        self.typed(key, errors, "true or false", Value::as_bool)
    }

    pub fn integer(&mut self, key: &str, errors: &mut Errors, min: i64) -> Option<u64> {
        let path = self.key_path(key);
        let n = self.typed(key, errors, "an integer", Value::as_integer)?;
        if n < min {
            errors.push(&path, format!("must be at least {min}, found {n}"));
            return None;
        }
        Some(n as u64)
    }

    pub fn millis(&mut self, key: &str, errors: &mut Errors, default: u64) -> Duration {
        Duration::from_millis(self.integer(key, errors, 1).unwrap_or(default))
    }

    pub fn strings(&mut self, key: &str, errors: &mut Errors) -> Option<Vec<&'t str>> {
        let path = self.key_path(key);
        let array = self.typed(key, errors, "a list of strings", Value::as_array)?;
        let mut out = Vec::with_capacity(array.len());
        for (i, item) in array.iter().enumerate() {
            match item.as_str() {
                Some(s) => out.push(s),
                None => errors.push(
                    &format!("{path}[{i}]"),
                    format!("expected a string, found {}", item.type_str()),
                ),
            }
        }
        Some(out)
    }

    pub fn table(&mut self, key: &str, errors: &mut Errors) -> Option<Reader<'t>> {
        let path = self.key_path(key);
        let table = self.typed(key, errors, "a table", Value::as_table)?;
        Some(Reader::new(table, &path))
    }

    /// Whether the table has this key (read or not).
    pub fn has(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    /// Reports every key that no reader asked for.
    pub fn finish(self, errors: &mut Errors) {
        for key in self.table.keys() {
            if !self.read.contains(&key.as_str()) {
                errors.push(
                    &self.key_path(key),
                    "unknown key; see docs/configuration.md for the keys this section takes",
                );
            }
        }
    }
}

/// Reads an optional section: an absent one reads as an empty table.
pub fn section<'t>(
    root: &mut Reader<'t>,
    key: &str,
    errors: &mut Errors,
    empty: &'t Table,
) -> Reader<'t> {
    root.table(key, errors)
        .unwrap_or_else(|| Reader::new(empty, key))
}
