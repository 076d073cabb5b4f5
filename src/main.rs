//! The `kms-tag-guard` command line: parses arguments, maps outcomes to exit codes.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use kms_tag_guard::config::ConfigErrors;
use kms_tag_guard::{cases, Config};

/// Exit code for an invalid configuration or case file, or a file the configuration names that
/// `serve` would refuse (EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

/// The exit codes, as `--help` lists them.
const EXIT_CODES: &str = "\
Exit codes:
  0   success (serve: stopped by SIGTERM or SIGINT; test: every case passed; explain: allowed;
      replay: nothing would have been denied; audit verify: the chain is whole)
  1   failure (test: a case failed; explain: denied; replay: a change would have been denied or
      an input could not be read; audit verify: not whole; serve: a port in use, no threads, ...)
  2   usage: an unknown command or option, a missing argument
  78  configuration: the configuration, a case file or a file the configuration names is invalid";

/// The version, with the commit it was built from where known (build.rs).
const VERSION: &str = env!("KMS_TAG_GUARD_VERSION");

#[derive(Parser)]
#[command(
    name = "kms-tag-guard",
    version = VERSION,
    about = "A policy-enforcing reverse proxy for the AWS KMS API",
    after_help = EXIT_CODES,
    subcommand_required = true,
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReportFormat {
    /// Failures (with -v: every case) and the counts
    Text,
    /// One JSON object: the configuration, the counts, every case
    Json,
    /// JUnit XML, which CI systems read
    Junit,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ReplayFormat {
    /// The summary tables, then one line per change that would have been denied
    Text,
    /// One JSON object: the counts, every denial, every problem with the inputs
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (without --config: the configuration compiled into the binary).
    #[command(after_help = EXIT_CODES)]
    Serve {
        /// The configuration file (TOML; docs/configuration.md). Without it: the built-in
        /// config/kms-tag-guard.toml.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Log format on standard error: "text" for terminals, "json" (one object per line) for
        /// log pipelines. RUST_LOG filters (default "info").
        #[arg(long, value_enum, default_value_t = LogFormat::Text)]
        log_format: LogFormat,
    },
    /// Check a configuration as `serve` would, without listening: the settings, the policy and
    /// every file they name (certificates, keys, the CA file, the audit file's directory, the
    /// audit signing key).
    #[command(after_help = EXIT_CODES)]
    Check {
        /// The configuration file to check. Without it: the built-in configuration.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Check the settings and the policy only, not the files they name: for a configuration
        /// checked away from the machine it runs on (CI). serve may still refuse it.
        #[arg(long)]
        no_files: bool,
        /// After the check, print the effective configuration (defaults filled in) as TOML
        /// instead of the list of rules.
        #[arg(long)]
        print: bool,
    },
    /// Judge past tag and alias changes from CloudTrail by a policy: what it would have denied.
    /// Reads CloudTrail log files as delivered to S3 (gzip or plain), `aws cloudtrail
    /// lookup-events` output and JSON lines of events; directories are walked.
    #[command(after_help = EXIT_CODES)]
    Replay {
        /// The configuration whose policy judges. Without it: the built-in configuration.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The report's format.
        #[arg(long, value_enum, default_value_t = ReplayFormat::Text)]
        format: ReplayFormat,
        /// CloudTrail files or directories of them.
        #[arg(required = true, value_name = "INPUT")]
        inputs: Vec<PathBuf>,
    },
    /// Interception CA for HTTPS_PROXY clients.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// The audit log's chain: prove it is whole; make the key that signs its checkpoints.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run policy test cases against a configuration (docs/policy-tests.md).
    #[command(after_help = EXIT_CODES)]
    Test {
        /// The configuration whose policy the cases test. Without it: the built-in
        /// configuration.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Show the cases that pass too (text format).
        #[arg(short, long)]
        verbose: bool,
        /// The report's format.
        #[arg(long, value_enum, default_value_t = ReportFormat::Text)]
        format: ReportFormat,
        /// Case files (TOML with [[case]] tables).
        #[arg(required = true, value_name = "CASES")]
        cases: Vec<PathBuf>,
    },
    /// Judge one request: each rule's verdict and the decision (exit 0 allowed, 1 denied).
    #[command(after_help = EXIT_CODES)]
    Explain {
        /// The configuration whose policy judges. Without it: the built-in configuration.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// The KMS operation, e.g. TagResource, CreateKey, CreateAlias.
        #[arg(long, value_name = "NAME")]
        operation: String,
        /// The request's JSON body, as the SDK sends it; "-" reads it from standard input.
        #[arg(long, value_name = "JSON")]
        body: String,
        /// The caller's access key id, for rules limited by key_ids or exempt_principals.
        #[arg(long, value_name = "AKID")]
        access_key_id: Option<String>,
        /// The caller's workload identity (the SPIFFE ID or DNS name of its client certificate),
        /// for rules limited by callers or exempt_callers, and caller-value rules.
        #[arg(long, value_name = "ID")]
        caller: Option<String>,
    },
    /// Print a shell completion script (bash, zsh, fish, ...) to standard output.
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) to standard output, e.g. `kms-tag-guard man | man -l -`.
    Man,
    /// Print the JSON Schema of the configuration file (docs/config.schema.json), made from the
    /// configuration reader's keys and types.
    Schema,
}

#[derive(Subcommand)]
enum CaCommand {
    /// Write a new CA (ca.pem, ca.key with mode 0600) whose name constraints permit only the KMS
    /// host names (no IP address).
    #[command(after_help = EXIT_CODES)]
    Init {
        /// The directory to write ca.pem and ca.key into (created if absent; neither file may
        /// exist yet).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Write a new Ed25519 key for [audit].signing_key: the private key to FILE (mode 0600) and
    /// the public key to FILE.pub (neither may exist yet).
    Keygen {
        /// The private key file to write.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Check that audit files are whole: every line chained to the one before it, every
    /// checkpoint signed (exit 0 whole, 1 not whole or unreadable).
    Verify {
        /// The public key (FILE.pub from `audit keygen`) that checks the checkpoints' signatures.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// A checkpoint line kept elsewhere (a file holding it): the log must reach it and hold it
        /// unchanged, which shows lines removed from its end.
        #[arg(long, value_name = "FILE")]
        anchor: Vec<PathBuf>,
        /// The first FILE is the first the proxy wrote: the chain must begin there, at genesis
        /// (shows lines removed from its beginning).
        #[arg(long)]
        from_genesis: bool,
        /// The report's format.
        #[arg(long, value_enum, default_value_t = VerifyFormat::Text)]
        format: VerifyFormat,
        /// The audit files, oldest first (rotated ones before the current one; gzip'd or not).
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum VerifyFormat {
    /// A line per file and per problem, then the counts
    Text,
    /// One JSON object
    Json,
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
        Command::Serve { config, log_format } => serve(config.as_deref(), log_format),
        Command::Check {
            config,
            no_files,
            print,
        } => check(config.as_deref(), no_files, print),
        Command::Test {
            config,
            verbose,
            format,
            cases,
        } => test(config.as_deref(), &cases, verbose, format),
        Command::Explain {
            config,
            operation,
            body,
            access_key_id,
            caller,
        } => explain(
            config.as_deref(),
            &operation,
            &body,
            access_key_id.as_deref(),
            caller.as_deref(),
        ),
        Command::Replay {
            config,
            format,
            inputs,
        } => replay(config.as_deref(), &inputs, format),
        Command::Ca {
            command: CaCommand::Init { out },
        } => ca_init(&out),
        Command::Audit {
            command: AuditCommand::Keygen { out },
        } => audit_keygen(&out),
        Command::Audit {
            command:
                AuditCommand::Verify {
                    public_key,
                    anchor,
                    from_genesis,
                    format,
                    files,
                },
        } => {
            let options = |key| kms_tag_guard::integrity::verify::Options {
                key,
                anchors: anchor,
                from_genesis,
            };
            audit_verify(public_key.as_deref(), options, format, &files)
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "kms-tag-guard", &mut script);
            write_stdout(&script, "the completion script")
        }
        Command::Schema => write_stdout(
            kms_tag_guard::schema::schema_text().as_bytes(),
            "the schema",
        ),
        Command::Man => {
            let mut page = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut page) {
                Ok(()) => write_stdout(&page, "the manual page"),
                Err(error) => {
                    eprintln!("kms-tag-guard: cannot make the manual page: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Writes generated text to standard output; a reader that stopped early (`| head`) is no error.
fn write_stdout(bytes: &[u8], what: &str) -> ExitCode {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kms-tag-guard: cannot write {what}: {error}");
            ExitCode::FAILURE
        }
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

/// `serve` up to the point where it would listen: the configuration, then every file it names
/// (`kms_tag_guard::prepare`, the step `serve` runs first).
fn check(path: Option<&Path>, no_files: bool, print: bool) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(errors) => return config_failure(&errors),
    };
    let runtime = match current_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    let prepared = if no_files {
        Ok(())
    } else {
        let _inside = runtime.enter();
        kms_tag_guard::prepare(&config).map(drop)
    };
    if let Err(error) = prepared {
        eprintln!("{}: serve would not start: {error}", config.source);
        return ExitCode::from(if error.is_config() { EXIT_CONFIG } else { 1 });
    }
    let count = config.policy.rule_count();
    if print {
        // The text read a moment ago: the [policy] section is printed as written.
        let text = match path {
            Some(path) => std::fs::read_to_string(path).unwrap_or_default(),
            None => kms_tag_guard::config::DEFAULT_CONFIG.to_owned(),
        };
        print!(
            "{}",
            kms_tag_guard::effective::effective_toml(&config, &text)
        );
    } else {
        println!("ok: {count} rules");
    }
    if count == 0 {
        eprintln!(
            "warning: {} has no rules: the proxy would enforce nothing beyond its request checks; add [[policy.rule]] tables (docs/configuration.md)",
            config.source
        );
    } else if config.policy.enforces_no_rule() {
        eprintln!(
            "warning: {}: every rule is in dry-run: the proxy would deny no tag change",
            config.source
        );
    }
    if !print {
        for rule in config.policy.rule_summaries() {
            println!("  {rule}");
        }
    }
    ExitCode::SUCCESS
}

fn test(config: Option<&Path>, files: &[PathBuf], verbose: bool, format: ReportFormat) -> ExitCode {
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
    let source = config.source.to_string();
    let report = cases::run(&config, all);
    match format {
        ReportFormat::Text => {
            println!(
                "config: {source} ({} rules, sha256 {})",
                config.policy.rule_count(),
                &config.sha256[..12]
            );
            print!("{}", report.text(verbose));
        }
        ReportFormat::Json => print!("{}", report.json(&source)),
        ReportFormat::Junit => print!("{}", report.junit(&source)),
    }
    if report.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn explain(
    config: Option<&Path>,
    operation: &str,
    body: &str,
    access_key_id: Option<&str>,
    caller: Option<&str>,
) -> ExitCode {
    let config = match load(config) {
        Ok(config) => config,
        Err(errors) => return config_failure(&errors),
    };
    if operation.is_empty() || !operation.bytes().all(|b| b.is_ascii_alphanumeric()) {
        eprintln!(
            "kms-tag-guard: --operation {operation:?}: give an operation's name, e.g. TagResource"
        );
        return ExitCode::from(2);
    }
    if let Some(akid) = access_key_id {
        if akid.is_empty() || !akid.bytes().all(|b| b.is_ascii_alphanumeric()) {
            eprintln!("kms-tag-guard: --access-key-id {akid:?}: give an access key id such as AKIAIOSFODNN7EXAMPLE");
            return ExitCode::from(2);
        }
    }
    let body = if body == "-" {
        let mut bytes = Vec::new();
        if let Err(error) = std::io::stdin().read_to_end(&mut bytes) {
            eprintln!("kms-tag-guard: cannot read the body from standard input: {error}");
            return ExitCode::FAILURE;
        }
        bytes
    } else {
        body.as_bytes().to_vec()
    };
    let case = match cases::request(operation, body, access_key_id, caller) {
        Ok(case) => case,
        Err(error) => {
            eprintln!("kms-tag-guard: {error}");
            return ExitCode::from(2);
        }
    };
    let decision = cases::decide(&config, &case);
    println!(
        "config: {} ({} rules)",
        config.source,
        config.policy.rule_count()
    );
    println!("request: {operation}");
    if let Some(caller) = caller {
        println!("caller: {caller}");
    }
    let named = |violations: &[kms_tag_guard::policy::Violation], id: &str| {
        violations
            .iter()
            .filter(|v| &*v.rule == id)
            .map(|v| v.message.clone())
            .collect::<Vec<_>>()
    };
    let summaries = config.policy.rule_summaries();
    for rule in &summaries {
        let enforced = named(&decision.violations, &rule.id);
        let dry = named(&decision.dry_run_violations, &rule.id);
        if !enforced.is_empty() {
            println!("  {:<24} deny: {}", rule.id, enforced.join("; "));
        } else if !dry.is_empty() {
            println!("  {:<24} dry-run, would deny: {}", rule.id, dry.join("; "));
        } else {
            println!("  {:<24} pass", rule.id);
        }
    }
    // The proxy's own checks (the request's shape, max_tags) are not rules of the file.
    for v in &decision.violations {
        if !summaries.iter().any(|r| *r.id == *v.rule) {
            println!("  {:<24} deny: {}", v.rule, v.message);
        }
    }
    if decision.allowed() {
        println!("decision: allow");
        ExitCode::SUCCESS
    } else {
        println!("decision: deny");
        ExitCode::FAILURE
    }
}

fn replay(config: Option<&Path>, inputs: &[PathBuf], format: ReplayFormat) -> ExitCode {
    use kms_tag_guard::replay;
    use std::io::{IsTerminal, Write};
    let config = match load(config) {
        Ok(config) => config,
        Err(errors) => return config_failure(&errors),
    };
    let mut found = replay::run(&config, inputs, std::io::stderr().is_terminal());
    let format = match format {
        ReplayFormat::Text => replay::Format::Text,
        ReplayFormat::Json => replay::Format::Json,
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let written = found
        .write(&config, format, &mut out, &mut std::io::stderr().lock())
        .and_then(|()| out.flush());
    match written {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(error) => {
            eprintln!("kms-tag-guard: cannot write the report: {error}");
            return ExitCode::FAILURE;
        }
    }
    if found.clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn ca_init(out: &Path) -> ExitCode {
    match kms_tag_guard::tls::ca_init_described(out) {
        Ok(ca) => {
            let date = |t: std::time::SystemTime| humantime::format_rfc3339_seconds(t).to_string();
            println!(
                "wrote {} and {} (keep the key secret; give clients the certificate)",
                ca.cert.display(),
                ca.key.display()
            );
            println!(
                "valid from {} until {}",
                date(ca.not_before),
                date(ca.not_after)
            );
            println!("SHA-256 fingerprint: {}", ca.sha256);
            println!();
            println!("Add to the configuration:");
            println!("[intercept]");
            println!("ca_cert = {:?}", absolute(&ca.cert).display().to_string());
            println!("ca_key = {:?}", absolute(&ca.key).display().to_string());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kms-tag-guard: {error}");
            ExitCode::FAILURE
        }
    }
}

fn audit_keygen(out: &Path) -> ExitCode {
    match kms_tag_guard::integrity::keys::keygen(out) {
        Ok(made) => {
            println!(
                "wrote {} (mode 0600; keep it secret) and {}",
                made.private.display(),
                made.public.display()
            );
            println!("key id: {}", made.key.id());
            print!("{}", made.key.pem());
            println!();
            println!("Add to the configuration:");
            println!("[audit]");
            println!(
                "signing_key = {:?}",
                absolute(&made.private).display().to_string()
            );
            println!();
            println!(
                "Check the log with: kms-tag-guard audit verify --public-key {} FILE...",
                made.public.display()
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("kms-tag-guard: {error}");
            ExitCode::FAILURE
        }
    }
}

fn audit_verify(
    public_key: Option<&Path>,
    options: impl FnOnce(
        Option<kms_tag_guard::integrity::keys::PublicKey>,
    ) -> kms_tag_guard::integrity::verify::Options,
    format: VerifyFormat,
    files: &[PathBuf],
) -> ExitCode {
    use kms_tag_guard::integrity::{keys, verify};
    let key = match public_key.map(keys::load_public_key).transpose() {
        Ok(key) => key,
        Err(error) => {
            eprintln!("kms-tag-guard: {error}");
            return ExitCode::FAILURE;
        }
    };
    let report = match verify::verify(files, &options(key)) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("kms-tag-guard: {error}");
            return ExitCode::FAILURE;
        }
    };
    let text = match format {
        VerifyFormat::Text => report.text(),
        VerifyFormat::Json => report.json(),
    };
    let written = write_stdout(text.as_bytes(), "the report");
    if report.valid {
        written
    } else {
        ExitCode::FAILURE
    }
}

/// The path from the root, so that the lines printed work from any directory.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
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
    let runtime = match current_thread_runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
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
                return ExitCode::from(if error.is_config() { EXIT_CONFIG } else { 1 });
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

/// The single-threaded runtime `serve` accepts on (and `check` prepares on).
fn current_thread_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| {
            eprintln!("kms-tag-guard: cannot start the async runtime: {error}");
            ExitCode::FAILURE
        })
}
