//! Reading a TOML table by hand, so that one run reports every mistake (serde stops at the first)
//! and each mistake names where it stands, e.g. `policy.rule[2].pattern: invalid regex …`.
//! Used by `config` for the settings and by `policy::compile` for the rules.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use toml::{Table, Value};

/// One mistake in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where it stands, e.g. `policy.rule[2].pattern`.
    pub path: String,
    pub message: String,
    /// The line and column (1-based) the mistake stands at in the text, where known.
    pub at: Option<(usize, usize)>,
    /// The id of the `[[policy.rule]]` the mistake is in, where it has one.
    pub rule: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.at, &self.rule) {
            (Some((line, column)), Some(rule)) => {
                write!(f, "line {line}, column {column}, rule {rule:?}: ")?
            }
            (Some((line, column)), None) => write!(f, "line {line}, column {column}: ")?,
            (None, Some(rule)) => write!(f, "rule {rule:?}: ")?,
            (None, None) => {}
        }
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
        if self.origin.is_empty() {
            // The file could not be read: the one error says which and why.
            for e in &self.errors {
                writeln!(f, "{e}")?;
            }
            return Ok(());
        }
        writeln!(
            f,
            "{}: {} error(s) in the configuration",
            self.origin,
            self.errors.len()
        )?;
        for e in &self.errors {
            // A message of several lines (a regex error's caret layout) stays one block.
            let text = e.to_string();
            let mut lines = text.lines();
            writeln!(f, "  {}", lines.next().unwrap_or(""))?;
            for line in lines {
                writeln!(f, "      {line}")?;
            }
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
            at: None,
            rule: None,
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

thread_local! {
    /// While [`keys_asked`] runs: every key a reader asks for, with the type it expects.
    static KEYS_ASKED: std::cell::RefCell<Option<Vec<(String, &'static str)>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `read` and returns every key path its readers asked for, with the type each expects
/// ("a string", "an integer", "true or false", "a list of strings", "a table"): the keys the
/// reader knows, for the configuration's JSON Schema (`crate::schema`).
pub fn keys_asked(read: impl FnOnce()) -> Vec<(String, &'static str)> {
    KEYS_ASKED.with(|log| *log.borrow_mut() = Some(Vec::new()));
    read();
    KEYS_ASKED.with(|log| log.borrow_mut().take().unwrap_or_default())
}

/// Reads the keys of one table, remembering which were read so the rest can be reported.
pub struct Reader<'t> {
    table: &'t Table,
    path: String,
    read: Vec<&'t str>,
    /// Every key asked for, present or not: the known keys an unknown one is compared with.
    asked: Vec<String>,
}

impl<'t> Reader<'t> {
    pub fn new(table: &'t Table, path: &str) -> Reader<'t> {
        Reader {
            table,
            path: path.to_owned(),
            read: Vec::new(),
            asked: Vec::new(),
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
        if !self.asked.iter().any(|k| k == key) {
            self.asked.push(key.to_owned());
        }
        let (k, v) = self.table.get_key_value(key)?;
        self.read.push(k.as_str());
        Some(v)
    }

    pub fn typed<T>(
        &mut self,
        key: &str,
        errors: &mut Errors,
        expected: &'static str,
        convert: impl FnOnce(&'t Value) -> Option<T>,
    ) -> Option<T> {
        KEYS_ASKED.with(|log| {
            if let Some(log) = log.borrow_mut().as_mut() {
                log.push((self.key_path(key), expected));
            }
        });
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
                let hint = match nearest(key, self.asked.iter().map(String::as_str)) {
                    Some(known) => format!("unknown key; did you mean `{known}`?"),
                    None => {
                        "unknown key; see docs/configuration.md for the keys this section takes"
                            .to_owned()
                    }
                };
                errors.push(&self.key_path(key), hint);
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

/// The candidate nearest to `word` (by edit distance, case ignored) when it is near enough to be
/// a misspelling of it: at most a third of its length away, and at least one edit.
pub fn nearest<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let word = word.to_lowercase();
    candidates
        .into_iter()
        .map(|c| (edit_distance(&word, &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= (c.chars().count() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, counting an adjacent swap as one edit.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

/// Where the keys of a TOML text stand: the line and column of each key path (`listener.address`,
/// `policy.rule[1].pattern`; an array's items by their value, a `[[table]]` by its header), for
/// the errors to point at.
#[derive(Debug, Default)]
pub struct Places {
    at: HashMap<String, (usize, usize)>,
}

impl Places {
    /// The places of a text's keys; none when the text does not parse.
    pub fn of(text: &str) -> Places {
        let mut places = Places::default();
        if let Ok(doc) = toml_edit::ImDocument::parse(text) {
            places.table(text, doc.as_table(), "");
        }
        places
    }

    fn put(&mut self, text: &str, path: &str, span: Option<std::ops::Range<usize>>) {
        if let Some(span) = span {
            self.at
                .entry(path.to_owned())
                .or_insert_with(|| line_column(text, span.start));
        }
    }

    fn table(&mut self, text: &str, table: &dyn toml_edit::TableLike, path: &str) {
        for (key, item) in table.iter() {
            let key_path = if path.is_empty() {
                key.to_owned()
            } else {
                format!("{path}.{key}")
            };
            self.put(
                text,
                &key_path,
                table.key(key).and_then(toml_edit::Key::span),
            );
            self.item(text, item, &key_path);
        }
    }

    fn item(&mut self, text: &str, item: &toml_edit::Item, path: &str) {
        match item {
            toml_edit::Item::ArrayOfTables(tables) => {
                for (i, table) in tables.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    self.put(text, &item_path, table.span());
                    self.table(text, table, &item_path);
                }
            }
            toml_edit::Item::Value(value) => self.value(text, value, path),
            other => {
                if let Some(table) = other.as_table_like() {
                    self.table(text, table, path);
                }
            }
        }
    }

    fn value(&mut self, text: &str, value: &toml_edit::Value, path: &str) {
        match value {
            toml_edit::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    self.put(text, &item_path, item.span());
                    self.value(text, item, &item_path);
                }
            }
            toml_edit::Value::InlineTable(table) => self.table(text, table, path),
            _ => {}
        }
    }

    /// The place of `path`, or of the nearest enclosing key that has one (a missing key is
    /// shown at its table).
    pub fn find(&self, path: &str) -> Option<(usize, usize)> {
        let mut path = path;
        loop {
            if let Some(at) = self.at.get(path) {
                return Some(*at);
            }
            let cut = path.rfind(['.', '['])?;
            path = &path[..cut];
        }
    }

    /// Gives each error the place of its path.
    pub fn mark(&self, errors: &mut [ConfigError]) {
        for e in errors {
            if e.at.is_none() && !e.path.is_empty() {
                e.at = self.find(&e.path);
            }
        }
    }
}

/// The 1-based line and column (in characters) of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (
        before.matches('\n').count() + 1,
        before[line_start..].chars().count() + 1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_name_lines_and_columns() {
        let text = "[listener]\n  address = 1\n[[policy.rule]]\nid = \"a\"\n[[policy.rule]]\nid = \"b\"\npattern = \"x\"\n";
        let places = Places::of(text);
        assert_eq!(places.find("listener.address"), Some((2, 3)));
        assert_eq!(places.find("policy.rule[1].pattern"), Some((7, 1)));
        assert_eq!(
            places.find("policy.rule[1].type"),
            places.find("policy.rule[1]")
        );
        assert!(places.find("policy.rule[1]").is_some());
    }

    #[test]
    fn nearest_suggests_misspellings_only() {
        assert_eq!(nearest("adress", ["address", "tls_cert"]), Some("address"));
        assert_eq!(
            nearest("reqiured-prefix", ["required-prefix", "forbidden-key"]),
            Some("required-prefix")
        );
        assert_eq!(nearest("colour", ["address", "tls_cert"]), None);
    }
}
