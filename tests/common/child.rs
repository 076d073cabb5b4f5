//! The real `kms-tag-guard serve` binary as a child process, with its standard output and
//! standard error captured to files: the one launcher for tests that need a separate process
//! (signals, file-descriptor budgets, memory figures) or the process's real log output. Its
//! configuration file is rendered by [`ProxyConfig`], like the in-process proxy's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::proxy::ProxyConfig;

/// How to run the child.
#[derive(Debug, Clone)]
pub struct ChildOptions {
    /// The configuration file; `audit_path` unset means standard output (`"-"`). The listener
    /// and admin addresses are read from the child's "listening" log line, so ephemeral ports
    /// (the default) work.
    pub config: ProxyConfig,
    /// More arguments of `serve`, after `serve --config FILE` (e.g. `--log-format json`, an
    /// option of `serve` only).
    pub global_args: Vec<String>,
    /// `RUST_LOG` for the child (unset: the binary's default, info).
    pub rust_log: Option<String>,
    /// Raise the child's RLIMIT_NOFILE to this (through a `sh -c 'ulimit -n N; exec ...'`
    /// wrapper; if the hard limit forbids it, to the hard limit).
    pub nofile: Option<u64>,
    /// Set only the child's soft RLIMIT_NOFILE to this (`ulimit -S -n N`).
    pub soft_nofile: Option<u64>,
    /// Standard error to a pipe instead of a file: read up to the "listening" line (copied to
    /// `stderr_path`), then left unread in [`ChildProxy::stderr_pipe`], as a stalled log
    /// collector leaves it.
    pub stderr_pipe: bool,
    /// A cgroup's `cgroup.procs`: the child joins that cgroup before the proxy starts (through
    /// the shell wrapper), so that all of its memory is charged there.
    pub cgroup_procs: Option<PathBuf>,
}

impl ChildOptions {
    /// The test policy in front of `endpoint`, audit records on standard output, no admin port,
    /// `grace_ms = 2000`.
    pub fn new(endpoint: &str) -> ChildOptions {
        ChildOptions::with_config(ProxyConfig {
            endpoint: Some(endpoint.to_owned()),
            shutdown: "grace_ms = 2000".to_owned(),
            ..ProxyConfig::default()
        })
    }

    /// The child runs on this configuration, with its default environment.
    pub fn with_config(config: ProxyConfig) -> ChildOptions {
        ChildOptions {
            config,
            global_args: Vec::new(),
            rust_log: None,
            nofile: None,
            soft_nofile: None,
            stderr_pipe: false,
            cgroup_procs: None,
        }
    }
}

/// A running `kms-tag-guard serve`. Dropping it kills the process.
pub struct ChildProxy {
    child: Option<Child>,
    /// The process id of the proxy itself (the shell wrapper `exec`s it).
    pub pid: u32,
    pub addr: SocketAddr,
    /// The admin port, when [`ProxyConfig::admin`] asked for one.
    pub admin_addr: Option<SocketAddr>,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    /// The configuration file the child was started with (a test may rewrite it, then signal).
    pub config_path: PathBuf,
    /// With [`ChildOptions::stderr_pipe`]: the rest of standard error, unread.
    pub stderr_pipe: Option<std::io::BufReader<std::process::ChildStderr>>,
    _dir: tempfile::TempDir,
}

/// Starts the binary and waits (up to 20 s) for its "listening" log line, which names the port;
/// panics if it exits first.
pub fn spawn_proxy(opts: &ChildOptions) -> ChildProxy {
    try_spawn_proxy(opts).unwrap_or_else(|(status, stderr)| {
        panic!("kms-tag-guard serve exited early ({status}); stderr:\n{stderr}")
    })
}

/// [`spawn_proxy`] off the async runtime (the fake KMS of the calling test runs on it).
pub async fn start_child(opts: ChildOptions) -> ChildProxy {
    tokio::task::spawn_blocking(move || spawn_proxy(&opts))
        .await
        .expect("spawn_proxy")
}

/// Like [`spawn_proxy`], but a child that exits before it listens (e.g. it refuses its
/// configuration) is an `Err` with its exit status and standard error.
pub fn try_spawn_proxy(opts: &ChildOptions) -> Result<ChildProxy, (ExitStatus, String)> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let config_path = dir.path().join("kms-tag-guard.toml");
    std::fs::write(&config_path, opts.config.render()).expect("write the config");
    let stdout_path = dir.path().join("stdout.log");
    let stderr_path = dir.path().join("stderr.log");
    let stdout = std::fs::File::create(&stdout_path).expect("stdout file");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");

    // `KMS_TAG_GUARD_BIN` runs another build (e.g. target/release/kms-tag-guard, to measure).
    let bin = std::env::var("KMS_TAG_GUARD_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_kms-tag-guard").to_owned());
    let bin = bin.as_str();
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--config".into(),
        config_path.display().to_string(),
    ];
    args.extend(opts.global_args.iter().cloned());
    let ulimit = match (opts.nofile, opts.soft_nofile) {
        (None, None) => None,
        (Some(n), None) => Some(format!(
            "ulimit -n {n} 2>/dev/null || ulimit -n \"$(ulimit -Hn)\""
        )),
        (None, Some(n)) => Some(format!("ulimit -S -n {n}")),
        (Some(_), Some(_)) => panic!("set nofile or soft_nofile, not both"),
    };
    let ulimit = match (&opts.cgroup_procs, ulimit) {
        (None, ulimit) => ulimit,
        (Some(procs), ulimit) => Some(format!(
            "echo $$ > '{}' && {}",
            procs.display(),
            ulimit.unwrap_or_else(|| "true".to_owned())
        )),
    };
    let mut command = match ulimit {
        None => {
            let mut c = Command::new(bin);
            c.args(&args);
            c
        }
        Some(ulimit) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("{ulimit} && exec \"$0\" \"$@\""))
                .arg(bin)
                .args(&args);
            c
        }
    };
    command
        .stdin(Stdio::null())
        .stdout(Stdio::from(stdout))
        .stderr(if opts.stderr_pipe {
            Stdio::piped()
        } else {
            Stdio::from(stderr)
        });
    match &opts.rust_log {
        Some(filter) => command.env("RUST_LOG", filter),
        None => command.env_remove("RUST_LOG"),
    };
    let mut child = command.spawn().expect("spawn kms-tag-guard serve");
    let pid = child.id();
    let stderr_pipe = if opts.stderr_pipe {
        Some(read_pipe_until_listening(&mut child, &stderr_path))
    } else {
        None
    };

    let deadline = Instant::now() + Duration::from_secs(20);
    let (addr, admin_addr) = loop {
        let log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if let Some(addr) = listening_addr(&log) {
            break (addr, admin_addr(&log));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err((status, read_lossy(&stderr_path)));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kms-tag-guard serve did not log its listening address in 20 s; stderr:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(ChildProxy {
        child: Some(child),
        pid,
        addr,
        admin_addr,
        stdout_path,
        stderr_path,
        config_path,
        stderr_pipe,
        _dir: dir,
    })
}

/// Reads the child's piped standard error line by line, copying it to `copy`, up to and
/// including the "listening" line (or its end); returns the reader with the rest unread.
fn read_pipe_until_listening(
    child: &mut Child,
    copy: &Path,
) -> std::io::BufReader<std::process::ChildStderr> {
    use std::io::{BufRead, Write};
    let mut reader = std::io::BufReader::new(child.stderr.take().expect("piped stderr"));
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(copy)
        .expect("stderr copy");
    let mut line = String::new();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return reader,
            Ok(_) => {
                file.write_all(line.as_bytes()).expect("copy stderr");
                if line.contains("kms-tag-guard listening") {
                    return reader;
                }
            }
        }
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

    /// The admin port (panics if [`ProxyConfig::admin`] did not ask for one).
    pub fn admin(&self) -> SocketAddr {
        self.admin_addr.expect("the config enables the admin port")
    }

    /// Sends a signal (`"TERM"`, `"HUP"`, `"INT"`) to the proxy.
    pub fn signal(&self, signal: &str) {
        send_signal(self.pid, signal);
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().expect("wait for the child").is_some(),
            None => true,
        }
    }

    /// Waits up to `timeout` for the process to exit: its status and how long that took.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some((status, started.elapsed()));
            }
            if started.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGTERM and waits (up to 15 s) for the process to exit; kills it after that.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        self.signal("TERM");
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

/// Sends a signal (`"TERM"`, `"HUP"`, `"INT"`) with kill(1).
pub fn send_signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
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
