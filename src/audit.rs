//! The audit log: one JSON line per decision and per outcome of every tag-bearing request.
//!
//! A `decision` record is written and flushed before the request is forwarded or answered; with
//! `fail_closed`, a record that cannot be written stops the request (a tag change that cannot be
//! audited does not happen). Each record is one `write` of a whole line under a lock, so
//! concurrent requests never interleave.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::config::{AuditConfig, AuditPath};
use crate::inspect::Judgement;
use crate::kms::Tag;
use crate::metrics::Metrics;
use crate::policy::Violation;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log {path}: {source}; check that the directory exists and is writable")]
    Open { path: String, source: io::Error },
    #[error("cannot write the audit log: {0}")]
    Write(#[source] io::Error),
}

pub struct AuditLog {
    sink: Mutex<Sink>,
    path: AuditPath,
    fsync: bool,
    pub fail_closed: bool,
    metrics: Arc<Metrics>,
}

enum Sink {
    Stdout,
    File(File),
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("fsync", &self.fsync)
            .field("fail_closed", &self.fail_closed)
            .finish()
    }
}

impl AuditLog {
    pub fn open(config: &AuditConfig, metrics: Arc<Metrics>) -> Result<AuditLog, AuditError> {
        Ok(AuditLog {
            sink: Mutex::new(open_sink(&config.path)?),
            path: config.path.clone(),
            fsync: config.fsync,
            fail_closed: config.fail_closed,
            metrics,
        })
    }

    /// Opens the audit file again, for log rotation (`mv` then SIGHUP): records written after
    /// this go to a file at the configured path. If it cannot be opened, the old file stays in use.
    pub fn reopen(&self) -> Result<(), AuditError> {
        let sink = open_sink(&self.path)?;
        *self.lock() = sink;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sink> {
        self.sink
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes one record as one line. With `fsync`, the write happens on the blocking pool so a
    /// slow disk does not stall the connections sharing this worker thread.
    pub async fn write(self: &Arc<Self>, record: &impl Serialize) -> Result<(), AuditError> {
        // Sized for a typical record: growing from empty costs half a dozen reallocations.
        let mut line = Vec::with_capacity(1024);
        serde_json::to_writer(&mut line, record).expect("audit records serialise");
        line.push(b'\n');
        let result = if self.fsync {
            let log = Arc::clone(self);
            tokio::task::spawn_blocking(move || log.write_line(&line))
                .await
                .map_err(|e| AuditError::Write(io::Error::other(e)))
                .and_then(|written| written)
        } else {
            self.write_line(&line)
        };
        if result.is_err() {
            self.metrics.audit_write_failure();
        }
        result
    }

    fn write_line(&self, line: &[u8]) -> Result<(), AuditError> {
        let mut sink = self.lock();
        let result =
            match &mut *sink {
                Sink::Stdout => {
                    let mut out = io::stdout().lock();
                    out.write_all(line).and_then(|()| out.flush())
                }
                Sink::File(file) => file.write_all(line).and_then(|()| {
                    if self.fsync {
                        file.sync_data()
                    } else {
                        Ok(())
                    }
                }),
            };
        result.map_err(AuditError::Write)
    }
}

fn open_sink(path: &AuditPath) -> Result<Sink, AuditError> {
    match path {
        AuditPath::Stdout => Ok(Sink::Stdout),
        AuditPath::File(path) => OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map(Sink::File)
            .map_err(|source| AuditError::Open {
                path: path.display().to_string(),
                source,
            }),
    }
}

/// The time as the audit log writes it: RFC 3339, UTC, milliseconds.
pub fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The record written before a tag-bearing request is forwarded or answered.
#[derive(Debug, Serialize)]
pub struct DecisionRecord<'a> {
    pub ts: String,
    pub event: &'static str,
    pub request_id: &'a str,
    pub operation: &'a str,
    pub key_id: Option<&'a str>,
    pub region: Option<&'a str>,
    pub access_key_id: Option<&'a str>,
    pub source: Option<SocketAddr>,
    pub set: &'a [Tag],
    pub remove: &'a [String],
    pub decision: &'static str,
    pub violations: &'a [Violation],
    pub dry_run_violations: &'a [Violation],
}

impl<'a> DecisionRecord<'a> {
    pub fn new(
        request_id: &'a str,
        operation: &'a str,
        source: Option<SocketAddr>,
        judgement: &'a Judgement,
    ) -> DecisionRecord<'a> {
        let change = judgement.change.as_ref();
        let credential = judgement.credential.as_ref();
        DecisionRecord {
            ts: timestamp(),
            event: "decision",
            request_id,
            operation,
            key_id: change.and_then(|c| c.key_id.as_deref()),
            region: credential.and_then(|c| c.region.as_deref()),
            access_key_id: credential.map(|c| c.access_key_id.as_str()),
            source,
            set: change.map_or(&[], |c| &c.set),
            remove: change.map_or(&[], |c| &c.remove),
            decision: if judgement.decision.allowed() {
                "allow"
            } else {
                "deny"
            },
            violations: &judgement.decision.violations,
            dry_run_violations: &judgement.decision.dry_run_violations,
        }
    }
}

/// The record written when the upstream answered a forwarded request, or failed to.
#[derive(Debug, Serialize)]
pub struct OutcomeRecord<'a> {
    pub ts: String,
    pub event: &'static str,
    pub request_id: &'a str,
    pub upstream_status: Option<u16>,
    pub aws_request_id: Option<&'a str>,
    /// The KMS error type (`__type`) of an error answer; for a failed forward, the error the proxy
    /// answered with (`BadGateway`, `GatewayTimeout`).
    pub aws_error: Option<&'a str>,
    pub duration_ms: f64,
    /// Why the forward failed, when it did.
    pub error: Option<&'a str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AuditConfig;

    #[tokio::test]
    async fn writes_whole_lines_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let log = Arc::new(
            AuditLog::open(
                &AuditConfig {
                    path: AuditPath::File(path.clone()),
                    fsync: true,
                    fail_closed: true,
                },
                Arc::default(),
            )
            .unwrap(),
        );
        log.write(&serde_json::json!({"a": 1})).await.unwrap();
        log.write(&serde_json::json!({"b": "x\ny"})).await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "{\"a\":1}\n{\"b\":\"x\\ny\"}\n");

        let full = Arc::new(
            AuditLog::open(
                &AuditConfig {
                    path: AuditPath::File("/dev/full".into()),
                    fsync: false,
                    fail_closed: true,
                },
                Arc::default(),
            )
            .unwrap(),
        );
        assert!(full.write(&serde_json::json!({})).await.is_err());
        assert!(AuditLog::open(
            &AuditConfig {
                path: AuditPath::File(dir.path().join("missing/dir/audit.log")),
                fsync: false,
                fail_closed: true,
            },
            Arc::default()
        )
        .is_err());
    }

    #[test]
    fn timestamps_are_rfc3339_millis_utc() {
        let ts = timestamp();
        assert_eq!(ts.len(), "2026-11-28T15:00:00.123Z".len(), "{ts}");
        assert!(ts.ends_with('Z'));
    }
}
