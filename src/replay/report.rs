//! A replay's report: a summary, then one line per change the policy would have denied; as
//! text for people or one JSON object for programs. Problems with the inputs go to standard
//! error in the text report, into `problems` in the JSON one.

use std::io::{self, Write};

use serde_json::json;

use super::{Count, Denial, Problem, Replay};
use crate::config::Config;

/// The report's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Replay {
    /// Writes the report; problems with the inputs go to `problems_out` (text format).
    pub fn write(
        &mut self,
        config: &Config,
        format: Format,
        out: &mut dyn Write,
        problems_out: &mut dyn Write,
    ) -> io::Result<()> {
        if let Some(warning) = &self.denials.spill_error {
            writeln!(problems_out, "warning: {warning}")?;
        }
        match format {
            Format::Text => {
                self.text(config, out)?;
                for problem in &self.problems {
                    writeln!(problems_out, "{}", self.describe(problem))?;
                }
                if self.problems_omitted > 0 {
                    writeln!(
                        problems_out,
                        "... and {} more unreadable records",
                        self.problems_omitted
                    )?;
                }
                Ok(())
            }
            Format::Json => self.json(config, out),
        }
    }

    /// A problem as one line: the file, the record and byte, what is wrong.
    fn describe(&self, problem: &Problem) -> String {
        let file = problem
            .file
            .and_then(|i| self.files.get(i))
            .map(|p| format!("{}: ", p.display()))
            .unwrap_or_default();
        match problem.at {
            Some(at) => format!(
                "{file}record {} (byte {}): {}",
                at.record, at.offset, problem.message
            ),
            None => format!("{file}{}", problem.message),
        }
    }

    fn text(&mut self, config: &Config, out: &mut dyn Write) -> io::Result<()> {
        writeln!(
            out,
            "config: {} ({} rules, sha256 {})",
            config.source,
            config.policy.rule_count(),
            &config.sha256[..12.min(config.sha256.len())]
        )?;
        writeln!(
            out,
            "read: {} file{}, {} events",
            self.files.len(),
            if self.files.len() == 1 { "" } else { "s" },
            thousands(self.events)
        )?;
        table(
            out,
            &[],
            &[
                row("  tag and alias changes judged", [self.judged]),
                row(
                    "  failed in KMS (errorCode), not judged",
                    [self.failed_in_kms],
                ),
                row(
                    "  duplicates (an eventID seen before), skipped",
                    [self.duplicates],
                ),
                row("  would be denied", [self.denied]),
                row("  unreadable records", [self.unreadable]),
            ],
        )?;
        if self.not_deduplicated > 0 {
            writeln!(
                out,
                "  ({} changes came after {} event IDs were remembered: not checked for duplicates)",
                thousands(self.not_deduplicated),
                thousands(super::seen::MAX_REMEMBERED as u64)
            )?;
        }
        let counts = |count: &Count| [count.judged, count.denied, count.failed_in_kms];
        if !self.by_operation.is_empty() {
            writeln!(out)?;
            let rows: Vec<_> = self
                .by_operation
                .iter()
                .map(|(op, count)| row(op, counts(count)))
                .collect();
            table(
                out,
                &["operation", "judged", "denied", "failed in KMS"],
                &rows,
            )?;
        }
        if !self.by_rule.is_empty() || !self.dry_run_by_rule.is_empty() {
            writeln!(out)?;
            let mut rows: Vec<_> = self
                .by_rule
                .iter()
                .map(|(rule, n)| row(rule, [*n]))
                .collect();
            rows.extend(
                self.dry_run_by_rule
                    .iter()
                    .map(|(rule, n)| row(&format!("{rule} (dry-run)"), [*n])),
            );
            table(out, &["rule", "would deny"], &rows)?;
        }
        if !self.by_principal.is_empty() {
            writeln!(out)?;
            let rows: Vec<_> = self
                .by_principal
                .iter()
                .map(|(principal, count)| row(principal, counts(count)))
                .collect();
            table(
                out,
                &["principal", "judged", "denied", "failed in KMS"],
                &rows,
            )?;
        }
        if self.denied > 0 {
            writeln!(out)?;
            writeln!(out, "would be denied ({}):", thousands(self.denied))?;
            let mut denials = self.denials.sorted();
            for denial in denials.by_ref() {
                writeln!(out, "{}", denial_line(&denial))?;
            }
            if let Some(error) = denials.error {
                return Err(error);
            }
        }
        Ok(())
    }

    /// One JSON object; the denials are written one by one, as they come from the merge.
    fn json(&mut self, config: &Config, out: &mut dyn Write) -> io::Result<()> {
        let problems: Vec<_> = self
            .problems
            .iter()
            .map(|p| {
                json!({
                    "file": p.file.and_then(|i| self.files.get(i)),
                    "record": p.at.map(|at| at.record),
                    "offset": p.at.map(|at| at.offset),
                    "message": p.message,
                })
            })
            .collect();
        let summary = json!({
            "config": config.source.to_string(),
            "policy_sha256": config.sha256,
            "files": self.files.len(),
            "events": self.events,
            "judged": self.judged,
            "failed_in_kms": self.failed_in_kms,
            "duplicates": self.duplicates,
            "not_deduplicated": self.not_deduplicated,
            "would_be_denied": self.denied,
            "unreadable": self.unreadable,
            "by_operation": self.by_operation,
            "by_rule": self.by_rule,
            "dry_run_by_rule": self.dry_run_by_rule,
            "by_principal": self.by_principal,
            "problems": problems,
            "problems_omitted": self.problems_omitted,
        });
        let summary = serde_json::to_string_pretty(&summary)?;
        // The summary's members, then "denials" as the last member, one denial per line.
        let open = summary.strip_suffix("\n}").unwrap_or(&summary);
        write!(out, "{open},\n  \"denials\": [")?;
        let mut denials = self.denials.sorted();
        let mut first = true;
        for denial in denials.by_ref() {
            let mut value = serde_json::to_value(&denial)?;
            value["file"] = json!(self.files.get(denial.file));
            value["record"] = json!(denial.at.record);
            value["offset"] = json!(denial.at.offset);
            if let Some(map) = value.as_object_mut() {
                map.remove("at");
            }
            write!(out, "{}\n    ", if first { "" } else { "," })?;
            serde_json::to_writer(&mut *out, &value)?;
            first = false;
        }
        if let Some(error) = denials.error {
            return Err(error);
        }
        writeln!(out, "{}]\n}}", if first { "" } else { "\n  " })
    }
}

/// One denial on one line: time, principal, operation, key (and alias), every violation.
fn denial_line(d: &Denial) -> String {
    let mut target = d.key.clone().unwrap_or_else(|| "-".into());
    if let Some(alias) = &d.alias {
        target = format!("{alias} -> {target}");
    }
    let mut violations: Vec<String> = d
        .violations
        .iter()
        .map(|v| format!("{}: {}", v.rule, v.message))
        .collect();
    if d.violations_omitted > 0 {
        violations.push(format!("and {} more", d.violations_omitted));
    }
    format!(
        "{}  {}  {}  {}  {}",
        d.time.as_deref().unwrap_or("-"),
        d.principal,
        d.operation,
        target,
        violations.join("; ")
    )
}

fn row<const N: usize>(name: &str, numbers: [u64; N]) -> Vec<String> {
    std::iter::once(name.to_owned())
        .chain(numbers.iter().map(|n| thousands(*n)))
        .collect()
}

/// A table: the first column left-aligned, the others right-aligned.
fn table(out: &mut dyn Write, header: &[&str], rows: &[Vec<String>]) -> io::Result<()> {
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let all: Vec<&Vec<String>> = (!header.is_empty())
        .then_some(&header)
        .into_iter()
        .chain(rows)
        .collect();
    let columns = all.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            all.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in all {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            let pad = widths[c] - cell.chars().count();
            if c == 0 {
                line.push_str(cell);
                line.push_str(&" ".repeat(pad));
            } else {
                line.push_str("  ");
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// 1234567 as "1,234,567".
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_are_grouped() {
        assert_eq!(super::thousands(0), "0");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1000), "1,000");
        assert_eq!(super::thousands(1234567), "1,234,567");
    }
}
