//! Live policy reload: a poll of the config file every 5 s (following symlinks, so a Kubernetes
//! ConfigMap update that swaps the `..data` link is seen), and SIGHUP.
//!
//! Only `[policy]` reloads. A new file is validated whole before its policy replaces the one in
//! force; an invalid one is logged and counted, and the last good policy stays. SIGHUP also
//! reopens the audit file for log rotation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tracing::{error, info, warn};

use crate::config::{sha256_hex, Config, ConfigSource};
use crate::metrics::ReloadResult;
use crate::proxy::Shared;
use crate::tls::ListenerCert;

/// How often the config file is read for changes.
pub const POLL_INTERVAL: Duration = Duration::from_secs(5);

pub(crate) struct Reloader {
    shared: Arc<Shared>,
    path: Option<PathBuf>,
    /// What the last read found: the file's hash, or why it could not be read. A poll acts only
    /// when this changes, so a bad file is reported once, not every 5 s.
    last_seen: String,
    restart_sections: toml::Table,
    listener_cert: Option<Arc<ListenerCert>>,
}

impl Reloader {
    pub(crate) fn new(
        shared: Arc<Shared>,
        config: &Config,
        listener_cert: Option<Arc<ListenerCert>>,
    ) -> Reloader {
        Reloader {
            shared,
            path: match &config.source {
                ConfigSource::File(path) => Some(path.clone()),
                ConfigSource::BuiltIn => None,
            },
            last_seen: config.sha256.clone(),
            restart_sections: config.restart_sections.clone(),
            listener_cert,
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
                    self.reload_certificate();
                    self.reload(false).await;
                }
                _ = trigger.notified() => {
                    self.reload_certificate();
                    if let Err(error) = self.shared.audit.reopen().await {
                        error!(%error, "audit log not reopened; records still go to the old file");
                    }
                    self.reload(true).await;
                }
                _ = stopped.changed() => return,
            }
        }
    }

    /// Picks up a listener certificate replaced on disk.
    fn reload_certificate(&self) {
        let Some(cert) = &self.listener_cert else {
            return;
        };
        match cert.reload_if_changed() {
            Ok(true) => info!("listener certificate reloaded"),
            Ok(false) => {}
            Err(error) => {
                warn!(%error, "listener certificate not reloaded; the previous one stays in use")
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
        let text = match read_settled(&path).await {
            Ok(Some(text)) => text,
            // Still being written: the next poll (or signal) looks again.
            Ok(None) => return,
            Err(reason) => {
                if forced || reason != self.last_seen {
                    warn!(path = %path.display(), %reason, "config file not reloaded; the policy in force stays");
                    metrics.reload(ReloadResult::error);
                    self.last_seen = reason;
                }
                return;
            }
        };
        let sha256 = sha256_hex(&text);
        if !forced && sha256 == self.last_seen {
            return;
        }
        self.last_seen = sha256;
        match Config::parse(&text, ConfigSource::File(path.clone())) {
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
                info!(rules = config.policy.rules.len(), sha256 = %config.sha256, "policy reloaded");
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

/// Reads the config file once it has stopped changing. An editor or `>` rewriting it in place
/// leaves it empty or half-written for a moment, and a policy read then would drop rules; so the
/// file is read twice, `SETTLE` apart, and an empty file is refused outright. `Ok(None)`: still
/// changing.
async fn read_settled(path: &std::path::Path) -> Result<Option<String>, String> {
    let read = || std::fs::read_to_string(path).map_err(|e| format!("cannot read the file: {e}"));
    let first = read()?;
    tokio::time::sleep(SETTLE).await;
    if read()? != first {
        return Ok(None);
    }
    if first.trim().is_empty() {
        return Err(
            "the file is empty (an empty file on reload is taken as one caught mid-write)".into(),
        );
    }
    Ok(Some(first))
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
