//! The real `kms-tag-guard serve` binary as a child process, with its standard output and
//! standard error captured to files, for tests that need a separate process (file-descriptor
//! budgets, memory figures) or the process's real log output.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::proxy::TEST_POLICY;

/// How to run the child.
#[derive(Debug, Clone)]
pub struct ChildOptions {
    /// The upstream `endpoint` (a fake KMS's URL).
    pub endpoint: String,
    /// Body of `[limits]`.
    pub limits: String,
    /// `[audit].path`: `"-"` (standard output, the default) or a file.
    pub audit_path: String,
    /// `[policy]` and its rules.
    pub policy: String,
    /// Arguments before `serve` (e.g. `--log-format json`).
    pub global_args: Vec<String>,
    /// `RUST_LOG` for the child (unset: the binary's default, info).
    pub rust_log: Option<String>,
    /// Lines of `[audit]` beyond `path` (e.g. `stall_timeout_ms = 500`).
    pub audit: String,
    /// Serve the admin port (on an ephemeral port, read from the listening line).
    pub admin: bool,
    /// Raise the child's RLIMIT_NOFILE to this (through a `sh -c 'ulimit -n N; exec ...'`
    /// wrapper; if the hard limit forbids it, to the hard limit).
    pub nofile: Option<u64>,
}

impl ChildOptions {
    pub fn new(endpoint: &str) -> ChildOptions {
        ChildOptions {
            endpoint: endpoint.to_owned(),
            limits: String::new(),
            audit_path: "-".to_owned(),
            policy: TEST_POLICY.to_owned(),
            global_args: Vec::new(),
            rust_log: None,
            audit: String::new(),
            admin: false,
            nofile: None,
        }
    }
}

/// A running `kms-tag-guard serve`. Dropping it kills the process.
pub struct ChildProxy {
    child: Option<Child>,
    /// The process id of the proxy itself (the shell wrapper `exec`s it).
    pub pid: u32,
    pub addr: SocketAddr,
    /// The admin port, when [`ChildOptions::admin`] asked for one.
    pub admin_addr: Option<SocketAddr>,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Starts the binary and waits (up to 20 s) for its "listening" log line, which names the port.
pub fn spawn_proxy(opts: &ChildOptions) -> ChildProxy {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config_path = dir.path().join("kms-tag-guard.toml");
    let admin = if opts.admin { "127.0.0.1:0" } else { "" };
    let text = format!(
        "[listener]\naddress = \"127.0.0.1:0\"\n\n[admin]\naddress = \"{admin}\"\n\n\
         [shutdown]\ngrace_ms = 2000\n\n[upstream]\nendpoint = \"{}\"\n\n[limits]\n{}\n\n\
         [audit]\npath = \"{}\"\n{}\n\n{}\n",
        opts.endpoint, opts.limits, opts.audit_path, opts.audit, opts.policy
    );
    std::fs::write(&config_path, text).expect("write the config");
    let stdout_path = dir.path().join("stdout.log");
    let stderr_path = dir.path().join("stderr.log");
    let stdout = std::fs::File::create(&stdout_path).expect("stdout file");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");

    let bin = env!("CARGO_BIN_EXE_kms-tag-guard");
    let mut args: Vec<String> = opts.global_args.clone();
    args.push("serve".into());
    args.push("--config".into());
    args.push(config_path.display().to_string());
    let mut command = match opts.nofile {
        None => {
            let mut c = Command::new(bin);
            c.args(&args);
            c
        }
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!(
                    "ulimit -n {n} 2>/dev/null || ulimit -n \"$(ulimit -Hn)\"; exec \"$0\" \"$@\""
                ))
                .arg(bin)
                .args(&args);
            c
        }
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::from(stderr));
    match &opts.rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let mut child = command.spawn().expect("spawn kms-tag-guard serve");
    let pid = child.id();

    let deadline = Instant::now() + Duration::from_secs(20);
    let (addr, admin_addr) = loop {
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if let Some(addr) = listening_addr(&log) {
            break (addr, admin_addr(&log));
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("kms-tag-guard serve exited early ({status}); stderr:\n{log}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kms-tag-guard serve did not log its listening address in 20 s; stderr:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ChildProxy {
        child: Some(child),
        pid,
        addr,
        admin_addr,
        stdout_path,
        stderr_path,
        config_path,
        _dir: dir,
    }
}

/// The `local_addr` of the "kms-tag-guard listening" line, in the text or the JSON log format.
fn listening_addr(log: &str) -> Option<SocketAddr> {
    field_addr(log, "local_addr")
}

/// The `admin` address of the "kms-tag-guard listening" line.
fn admin_addr(log: &str) -> Option<SocketAddr> {
    field_addr(log, "admin")
}

fn field_addr(log: &str, field: &str) -> Option<SocketAddr> {
    let line = log
        .lines()
        .find(|l| l.contains("kms-tag-guard listening"))?;
    let after = &line[line.find(field)? + field.len()..];
    let start = after.find(|c: char| c.is_ascii_digit())?;
    let rest = &after[start..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl ChildProxy {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// `VmRSS` of the proxy process, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmRSS:")
    }

    /// `VmHWM` (peak RSS) of the proxy process, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        proc_status_kib(self.pid, "VmHWM:")
    }

    /// How many file descriptors the proxy process has open.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The soft `Max open files` limit of the proxy process.
    pub fn nofile_limit(&self) -> Option<u64> {
        nofile_limits(self.pid).map(|(soft, _)| soft)
    }

    /// Sends SIGTERM and waits (up to 15 s) for the process to exit; kills it after that.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildProxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn read_lossy(path: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
}

/// A `kB` figure from `/proc/<pid>/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].split_whitespace().next()?.parse().ok()
}

/// `(soft, hard)` `Max open files` of a process, from `/proc/<pid>/limits` (`u64::MAX` for
/// unlimited).
pub fn nofile_limits(pid: u32) -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let parse = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    Some((parse(fields.next()?)?, parse(fields.next()?)?))
}

/// Raises this process's soft RLIMIT_NOFILE to at least `wanted` (with `prlimit`, as far as
/// the hard limit allows, or beyond it where the process may raise it). Returns the new soft
/// limit.
pub fn raise_own_nofile(wanted: u64) -> u64 {
    let pid = std::process::id();
    let (soft, hard) = nofile_limits(pid).unwrap_or((0, 0));
    if soft >= wanted {
        return soft;
    }
    let _ = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={wanted}:{wanted}"),
        ])
        .stderr(Stdio::null())
        .status();
    if nofile_limits(pid).is_some_and(|(s, _)| s >= wanted) {
        return wanted;
    }
    let _ = Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={hard}:{hard}"),
        ])
        .stderr(Stdio::null())
        .status();
    nofile_limits(pid).map_or(soft, |(s, _)| s)
}
