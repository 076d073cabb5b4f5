//! Live policy reload: a poll of the config file every 5 s (following symlinks, so a Kubernetes
//! ConfigMap update that swaps the `..data` link is seen), and SIGHUP.
//!
//! Only `[policy]` reloads from the config file. A new file is validated whole before its policy
//! replaces the one in force; an invalid one is logged and counted, and the last good policy
//! stays. The listener's certificate and the interception CA are reloaded from their files on
//! the same poll and signal, with the checks made at start; a pair that fails them is logged and
//! counted, and the previous one stays; so does the client CA bundle (`[listener] client_ca`),
//! whose change gives new connections a new TLS configuration. SIGHUP also reopens the audit file for log rotation.
//!
//! The files are stat'ed, read and parsed on the blocking pool, never on the runtime that accepts
//! connections and serves the admin port; they are opened without blocking and only regular files
//! under a size cap are read (`crate::files`), and a file whose stamp has not changed since it
//! was last read is not read again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::audit::AuditLog;
use crate::config::{sha256_hex, Config, ConfigErrors, ConfigSource};
use crate::files::{self, Stamp};
use crate::metrics::Metrics;
use crate::metrics::{Certificate, ReloadResult, Reloaded};
use crate::mtls::ListenerTls;
use crate::policy::Policy;
use crate::tls::{LeafMinter, TlsError};

/// How often the config file is read for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

/// What a reload changes: the policy in force, the audit file (reopened), and the metrics that
/// report both.
pub(crate) struct Live {
    pub policy: Arc<ArcSwap<Policy>>,
    pub audit: Arc<AuditLog>,
    pub metrics: Arc<Metrics>,
}

pub(crate) struct Reloader {
    shared: Live,
    path: Option<PathBuf>,
    /// What the last read found: the file's hash, or why it could not be read. A poll acts only
    /// when this changes, so a bad file is reported once, not every 5 s.
    last_seen: String,
    /// The stamp of the file when it was last read whole: while the file keeps it, a poll does
    /// not read it again.
    last_read: Option<Stamp>,
    restart_sections: toml::Table,
    /// The listener's certificate and client CA bundle.
    listener_tls: Option<Arc<ListenerTls>>,
    /// The tag policy file the policy in force imports (`[policy].org_tag_policy`), and its
    /// stamp when last read: a change to it reads the config file again too.
    org_file: Option<PathBuf>,
    last_org_read: Option<Stamp>,
    /// The interception CA, reloaded like the listener's certificate.
    minter: Option<Arc<LeafMinter>>,
}

/// What a look at the config file found.
enum Polled {
    /// Same stamp as when last read: not read again.
    Unchanged,
    /// Changed while being read: the next poll (or signal) looks again.
    Changing,
    /// Unreadable, refused, or empty: why.
    Failed(String, Option<Stamp>),
    /// Read and settled; parsed into a configuration or the errors in it.
    Read {
        stamp: Stamp,
        sha256: String,
        parsed: Box<Result<Config, ConfigErrors>>,
        /// The tag policy file it names, valid or not: watched from now on.
        org_file: Option<PathBuf>,
    },
}

impl Reloader {
    pub(crate) fn new(
        shared: Live,
        config: &Config,
        listener_tls: Option<Arc<ListenerTls>>,
        minter: Option<Arc<LeafMinter>>,
    ) -> Reloader {
        let reloader = Reloader {
            shared,
            path: match &config.source {
                ConfigSource::File(path) => Some(path.clone()),
                ConfigSource::BuiltIn => None,
            },
            last_seen: config.policy_key(),
            // Unknown: the first poll reads the file once (and finds the hash it started with).
            last_read: None,
            restart_sections: config.restart_sections.clone(),
            listener_tls,
            org_file: config.org_tag_policy.as_ref().map(|f| f.path.clone()),
            last_org_read: None,
            minter,
        };
        reloader.report_expiry();
        reloader
    }

    /// Sets `kms_tag_guard_certificate_expiry_seconds` to the notAfter of the certificates in
    /// use: at start, and after every look at their files (a failed reload keeps the old one).
    fn report_expiry(&self) {
        let metrics = &self.shared.metrics;
        if let Some(tls) = &self.listener_tls {
            metrics.certificate_expiry(Certificate::listener_cert, tls.cert().not_after());
            if let Some(not_after) = tls.client_ca_not_after() {
                metrics.certificate_expiry(Certificate::client_ca, not_after);
            }
        }
        if let Some(minter) = &self.minter {
            metrics.certificate_expiry(Certificate::ca, minter.not_after());
        }
    }

    /// Runs until `stopped` fires: polls, and on `trigger` (SIGHUP) reopens the audit file and
    /// reloads at once.
    pub(crate) async fn run(mut self, trigger: Arc<Notify>, mut stopped: watch::Receiver<bool>) {
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        poll.tick().await;
        loop {
            tokio::select! {
                _ = poll.tick() => {
                    self.reload_certificates(false).await;
                    self.reload(false).await;
                }
                _ = trigger.notified() => {
                    self.reload_certificates(true).await;
                    if let Err(error) = self.shared.audit.reopen().await {
                        error!(%error, "audit log not reopened; records still go to the old file");
                    }
                    self.reload(true).await;
                }
                _ = stopped.changed() => return,
            }
        }
    }

    /// Picks up a listener certificate or an interception CA replaced on disk (read on the
    /// blocking pool). A pair that fails the start checks, or is not valid now, is refused,
    /// logged and counted, and the previous one stays in use.
    async fn reload_certificates(&self, forced: bool) {
        if let Some(tls) = self.listener_tls.clone() {
            let cert = Arc::clone(tls.cert());
            let done = tokio::task::spawn_blocking(move || cert.reload_if_changed(forced)).await;
            self.report(Reloaded::listener_cert, "listener certificate", done);
            if tls.client_auth().is_some() {
                let done =
                    tokio::task::spawn_blocking(move || tls.reload_client_ca_if_changed(forced))
                        .await;
                self.report(Reloaded::client_ca, "client CA bundle", done);
            }
        }
        if let Some(minter) = self.minter.clone() {
            let done = tokio::task::spawn_blocking(move || minter.reload_if_changed(forced)).await;
            self.report(Reloaded::ca, "interception CA", done);
        }
        self.report_expiry();
    }

    fn report(
        &self,
        what: Reloaded,
        name: &'static str,
        done: Result<Result<bool, TlsError>, tokio::task::JoinError>,
    ) {
        let metrics = &self.shared.metrics;
        match done {
            Ok(Ok(true)) => {
                metrics.reloaded(what, ReloadResult::success);
                info!(what = name, "{name} reloaded");
            }
            Ok(Ok(false)) => {}
            Ok(Err(error)) => {
                metrics.reloaded(what, ReloadResult::error);
                warn!(what = name, %error, "{name} not reloaded; the previous one stays in use");
            }
            Err(error) => {
                metrics.reloaded(what, ReloadResult::error);
                warn!(what = name, %error, "{name} reload did not finish; the previous one stays in use");
            }
        }
    }

    /// Reads the config file; when it changed (or `forced`), validates it and swaps the policy.
    pub(crate) async fn reload(&mut self, forced: bool) {
        let Some(path) = self.path.clone() else {
            if forced {
                info!("running on the built-in configuration: there is no file to reload");
            }
            return;
        };
        let metrics = Arc::clone(&self.shared.metrics);
        let last_read = if forced { None } else { self.last_read.clone() };
        let last_org_read = if forced {
            None
        } else {
            self.last_org_read.clone()
        };
        let polled = {
            let path = path.clone();
            let org_file = self.org_file.clone();
            tokio::task::spawn_blocking(move || {
                // A changed tag policy file is read through the config file, read again.
                let org_stamp = org_file.as_deref().and_then(|p| files::stamp(p).ok());
                let org_unchanged =
                    org_file.is_none() || (org_stamp.is_some() && org_stamp == last_org_read);
                let last_read = last_read.filter(|_| org_unchanged);
                let polled = poll_file(&path, last_read.as_ref());
                // Read while it was being written: the next poll looks again.
                let org_moved = org_file
                    .as_deref()
                    .is_some_and(|p| files::stamp(p).ok() != org_stamp);
                if matches!(polled, Polled::Read { .. }) && org_moved {
                    return (Polled::Changing, org_stamp);
                }
                (polled, org_stamp)
            })
            .await
        };
        let (polled, org_stamp) =
            polled.unwrap_or_else(|e| (Polled::Failed(e.to_string(), None), None));
        let (stamp, sha256, parsed) = match polled {
            Polled::Unchanged | Polled::Changing => return,
            Polled::Failed(reason, stamp) => {
                self.last_read = stamp;
                if forced || reason != self.last_seen {
                    warn!(path = %path.display(), %reason, "config file not reloaded; the policy in force stays");
                    metrics.reload(ReloadResult::error);
                    self.last_seen = reason;
                }
                return;
            }
            Polled::Read {
                stamp,
                sha256,
                parsed,
                org_file,
            } => {
                // A newly named file has no stamp yet: the next poll reads it again.
                if org_file != self.org_file {
                    self.org_file = org_file;
                    self.last_org_read = None;
                } else {
                    self.last_org_read = org_stamp;
                }
                (stamp, sha256, parsed)
            }
        };
        self.last_read = Some(stamp);
        let key = match &*parsed {
            Ok(config) => config.policy_key(),
            Err(errors) => format!("{sha256}: {errors}"),
        };
        if !forced && key == self.last_seen {
            return;
        }
        self.last_seen = key;
        match *parsed {
            Ok(config) => {
                let changed: Vec<String> =
                    changed_sections(&self.restart_sections, &config.restart_sections);
                if !changed.is_empty() {
                    warn!(
                        sections = %changed.join(", "),
                        "the config file changes sections that only take effect after a restart; the new [policy] is applied now"
                    );
                }
                self.shared.policy.store(Arc::clone(&config.policy));
                metrics.policy_in_force(&config.sha256);
                metrics.reload(ReloadResult::success);
                info!(rules = config.policy.rule_count(), sha256 = %config.sha256, "policy reloaded");
            }
            Err(errors) => {
                metrics.reload(ReloadResult::error);
                error!("policy not reloaded; the previous policy stays in force.\n{errors}");
            }
        }
    }
}

/// How long a changed config file must stay the same before it is read as finished.
const SETTLE: Duration = Duration::from_millis(200);

/// Looks at the config file (blocking: run it on the blocking pool). A file with the stamp it had
/// when last read is not read again. Otherwise it is read once it has stopped changing: an editor
/// or `>` rewriting it in place leaves it empty or half-written for a moment, and a policy read
/// then would drop rules; so its stamp must be the same `SETTLE` after the read, and an empty
/// file is refused outright.
fn poll_file(path: &Path, last_read: Option<&Stamp>) -> Polled {
    match files::stamp(path) {
        Ok(stamp) if Some(&stamp) == last_read => return Polled::Unchanged,
        Ok(_) => {}
        Err(error) => return Polled::Failed(format!("cannot read the file: {error}"), None),
    }
    let (stamp, text) = match files::read(path, files::MAX_CONFIG_BYTES) {
        Ok((bytes, stamp)) => match String::from_utf8(bytes) {
            Ok(text) => (stamp, text),
            Err(e) => {
                return Polled::Failed(format!("the file is not UTF-8 text: {e}"), Some(stamp))
            }
        },
        Err(error) => return Polled::Failed(format!("cannot read the file: {error}"), None),
    };
    std::thread::sleep(SETTLE);
    if files::stamp(path).ok().as_ref() != Some(&stamp) {
        return Polled::Changing;
    }
    if text.trim().is_empty() {
        return Polled::Failed(
            "the file is empty (an empty file on reload is taken as one caught mid-write)".into(),
            Some(stamp),
        );
    }
    let sha256 = sha256_hex(&text);
    let source = ConfigSource::File(path.to_owned());
    let org_file = crate::config::org_tag_policy_named(&text, &source);
    let parsed = Box::new(Config::parse(&text, source));
    Polled::Read {
        stamp,
        sha256,
        parsed,
        org_file,
    }
}

/// The top-level sections that differ between two configurations, as `[name]`.
fn changed_sections(old: &toml::Table, new: &toml::Table) -> Vec<String> {
    let mut names: Vec<&String> = old.keys().chain(new.keys()).collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|name| old.get(*name) != new.get(*name))
        .map(|name| format!("[{name}]"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes this thread has read through read(2) and friends so far.
    fn bytes_read_by_this_thread() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    #[test]
    fn an_unchanged_config_file_is_not_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kms-tag-guard.toml");
        let mut text = crate::config::DEFAULT_CONFIG.to_owned();
        text.push_str(&"# padding to half a MiB\n".repeat(20_000));
        std::fs::write(&path, &text).unwrap();
        let Polled::Read { stamp, parsed, .. } = poll_file(&path, None) else {
            panic!("the file is read the first time");
        };
        assert!(parsed.is_ok());

        let before = bytes_read_by_this_thread();
        for _ in 0..20 {
            assert!(matches!(poll_file(&path, Some(&stamp)), Polled::Unchanged));
        }
        let read = bytes_read_by_this_thread() - before;
        assert!(
            read < 16 * 1024,
            "20 polls of an unchanged file read {read} bytes"
        );

        // The control: a rewrite (same size, same text) is read again.
        std::fs::write(&path, &text).unwrap();
        let before = bytes_read_by_this_thread();
        assert!(matches!(
            poll_file(&path, Some(&stamp)),
            Polled::Read { .. }
        ));
        let read = bytes_read_by_this_thread() - before;
        assert!(
            read >= text.len() as u64,
            "a changed file is read: {read} bytes"
        );
    }

    #[test]
    fn reports_the_sections_that_need_a_restart() {
        let old: toml::Table = "[listener]\naddress = \"127.0.0.1:1\"\n[audit]\npath = \"-\"\n"
            .parse()
            .unwrap();
        let new: toml::Table = "[listener]\naddress = \"127.0.0.1:2\"\n[audit]\npath = \"-\"\n[limits]\nmax_body_bytes = 5\n"
            .parse()
            .unwrap();
        assert_eq!(changed_sections(&old, &new), ["[limits]", "[listener]"]);
        assert!(changed_sections(&old, &old).is_empty());
    }
}
