//! The `kms-tag-guard` command line: parses arguments, maps outcomes to exit codes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kms_tag_guard::config::ConfigErrors;
use kms_tag_guard::{cases, Config};

/// Exit code for an invalid configuration or case file (EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

#[derive(Parser)]
#[command(
    name = "kms-tag-guard",
    version,
    about = "A policy-enforcing reverse proxy for the AWS KMS API"
)]
struct Cli {
    /// Log format on standard error: "text" for terminals, "json" (one object per line) for log
    /// pipelines. RUST_LOG filters (default "info").
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (without --config: the configuration compiled into the binary).
    Serve {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration and its policy; print every error with its key path.
    Check {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Interception CA for HTTPS_PROXY clients.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Run policy test cases against a configuration.
    Test {
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Case files (TOML with [[case]] tables).
        #[arg(required = true, value_name = "CASES")]
        cases: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new CA (ca.pem, ca.key with mode 0600) whose name constraints permit only the KMS
    /// host names (no IP address).
    Init {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    // First of all: SIGHUP's default action ends the process, and `serve` installs its handler
    // only once the configuration is loaded (100 ms for a large policy). Until then a SIGHUP is
    // ignored: the configuration is read after it anyway, so no reload is lost.
    ignore_hangup();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve { .. }) {
        // The other commands end as a terminal's commands do when it hangs up.
        default_hangup();
    }
    match cli.command {
        Command::Serve { config } => serve(config.as_deref(), cli.log_format),
        Command::Check { config } => match load(config.as_deref()) {
            Ok(config) => {
                println!("ok: {} rules", config.policy.rule_count());
                for rule in config.policy.rule_summaries() {
                    println!("  {rule}");
                }
                ExitCode::SUCCESS
            }
            Err(errors) => config_failure(&errors),
        },
        Command::Test { config, cases } => test(config.as_deref(), &cases),
        Command::Ca {
            command: CaCommand::Init { out },
        } => match kms_tag_guard::tls::ca_init(&out) {
            Ok((cert, key)) => {
                println!(
                    "wrote {} and {} (keep the key secret; give clients the certificate)",
                    cert.display(),
                    key.display()
                );
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("kms-tag-guard: {error}");
                ExitCode::FAILURE
            }
        },
    }
}

fn load(path: Option<&Path>) -> Result<Config, ConfigErrors> {
    match path {
        Some(path) => Config::load(path),
        None => Config::built_in(),
    }
}

fn config_failure(errors: &ConfigErrors) -> ExitCode {
    eprint!("{errors}");
    ExitCode::from(EXIT_CONFIG)
}

fn test(config: Option<&Path>, files: &[PathBuf]) -> ExitCode {
    let config = match load(config) {
        Ok(config) => config,
        Err(errors) => return config_failure(&errors),
    };
    let mut all = Vec::new();
    for file in files {
        match cases::load_cases(file) {
            Ok(cases) => all.extend(cases),
            Err(error) => {
                eprintln!("{error}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let report = cases::run(&config, all);
    print!("{report}");
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn serve(path: Option<&Path>, log_format: LogFormat) -> ExitCode {
    // Validate before anything else: a bad config never binds a port.
    let config = match load(path) {
        Ok(config) => config,
        Err(errors) => return config_failure(&errors),
    };
    let Some(logs) = init_logging(log_format) else {
        return ExitCode::FAILURE;
    };
    let finish_logs = logs.finisher();
    // Large buffers (tag changes' bodies) go back to the system when freed (docs/security.md).
    kms_tag_guard::heap::return_large_buffers();
    // Many systems start services with a soft limit of 1,024 descriptors and a far higher hard
    // limit; the proxy needs two per connection.
    match kms_tag_guard::fds::raise_nofile() {
        Ok((before, soft, hard)) => tracing::info!(
            soft_before = before,
            soft,
            hard,
            "file descriptor limit (RLIMIT_NOFILE): the soft limit is now the hard limit"
        ),
        Err(error) => {
            tracing::warn!(%error, "cannot read or raise the file descriptor limit (RLIMIT_NOFILE)")
        }
    }
    // Connections are served on the proxy's own connection threads; this runtime only accepts
    // them and runs the admin port, reloads and signals.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("kms-tag-guard: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = runtime.block_on(async {
        // Registered once, before serving, so no signal is missed between two waits.
        let mut signals = match Signals::register() {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("kms-tag-guard: cannot install signal handlers: {error}");
                return ExitCode::FAILURE;
            }
        };
        let proxy = match kms_tag_guard::start(config).await {
            Ok(proxy) => proxy,
            Err(error) => {
                eprintln!("kms-tag-guard: {error}");
                return ExitCode::FAILURE;
            }
        };
        let signal = loop {
            tokio::select! {
                _ = signals.hangup.recv() => {
                    tracing::info!("SIGHUP: reopening the audit log and reloading the policy");
                    proxy.reload();
                }
                _ = signals.terminate.recv() => break "SIGTERM",
                _ = signals.interrupt.recv() => break "SIGINT",
            }
        };
        tracing::info!(signal, "shutting down; a second signal exits at once");
        tokio::spawn(async move {
            let signal = signals.stop().await;
            tracing::warn!(signal, "second signal: exiting without draining");
            finish_logs.finish();
            std::process::exit(1);
        });
        proxy.shutdown();
        proxy.wait().await;
        ExitCode::SUCCESS
    });
    // A file read still running on the blocking pool (a stalled network file system) must not
    // hold the exit back.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    drop(logs);
    code
}

/// The signals `serve` answers to.
struct Signals {
    hangup: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Signals {
    fn register() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for SIGTERM or SIGINT and says which arrived.
    async fn stop(&mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}

fn ignore_hangup() {
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler code; nothing else
    // runs yet.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_IGN) };
}

fn default_hangup() {
    // SAFETY: as above, the default disposition, before any other thread exists.
    unsafe { libc::signal(libc::SIGHUP, libc::SIG_DFL) };
}

/// Logs to standard error through the non-blocking queue (`kms_tag_guard::logs`): a slow reader
/// of standard error loses lines (counted), never stalls traffic. The guard flushes at exit.
fn init_logging(format: LogFormat) -> Option<kms_tag_guard::logs::LogGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = match kms_tag_guard::logs::non_blocking(std::io::stderr()) {
        Ok(queue) => queue,
        Err(error) => {
            eprintln!("kms-tag-guard: cannot start the log writer thread: {error}");
            return None;
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().with_current_span(false).init(),
    }
    Some(guard)
}
