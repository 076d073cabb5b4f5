//! The clients Debian packages, and the JavaScript v2 SDK: the AWS SDK for Go v1
//! (`golang-github-aws-aws-sdk-go-dev`) and v2 (`golang-github-aws-aws-sdk-go-v2-dev`, with
//! `golang-go`), the AWS SDK for Ruby (`ruby-aws-sdk-kms`), the AWS CLI v2 (`awscli`), and the AWS
//! SDK for JavaScript v2 (`aws-sdk` from npm, pinned by tests/js-v2/package-lock.json, installed
//! like tests/js), through the proxy to the fake KMS, which verifies every signature: mode A (the
//! endpoint URL to the proxy's plain listener), mode B (an `https://` endpoint URL to the proxy's
//! TLS listener, its CA trusted through `AWS_CA_BUNDLE`, or `NODE_EXTRA_CA_CERTS` for Node) and
//! mode C (no endpoint, the proxy as an HTTP proxy that intercepts KMS names with a CA the client
//! trusts). deploy/README.md's client matrix says how each is set up; these tests set them up
//! that way, and show the traps it names (Ruby and `HTTPS_PROXY`, JavaScript v2's
//! `httpOptions.proxy`).
//!
//! Each client makes the same six calls (tests/go/README.md): Encrypt, Decrypt, an allowed and
//! a denied TagResource, CreateKey with and without the required tag. A client whose Debian
//! package is missing is skipped with a message naming the package (`.ci/run` installs them);
//! JavaScript v2 needs node and npm, as tests/node_sdk.rs does. The Go
//! programs are built once, in GOPATH mode against /usr/share/gocode (no module proxy needed),
//! under `<target>/other-sdks/`, and rebuilt only when their source or the Go toolchain changes.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::fake_kms::{base64_decode, base64_encode};
use common::ops::scrape;
use common::*;
use serde_json::{json, Value};

const KEY_ID: &str = "1234abcd-12ab-34cd-56ef-1234567890ab";
/// The name the clients sign when they are given no endpoint (region us-east-1): mode C.
const KMS_HOST: &str = "kms.us-east-1.amazonaws.com";
/// The longest one client run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
const CALLS: [&str; 6] = [
    "encrypt",
    "decrypt",
    "tag-allowed",
    "tag-denied",
    "create-tagged",
    "create-untagged",
];

// ------------------------------------------------------------------------ the clients

#[derive(Clone, Copy, Debug, PartialEq)]
enum Client {
    GoV1,
    GoV2,
    Ruby,
    AwsCli,
    JsV2,
}

impl Client {
    /// The variable that makes the client trust a CA (a bundle of roots plus the CA in
    /// production; the CA alone here).
    fn ca_variable(self) -> &'static str {
        match self {
            Client::JsV2 => "NODE_EXTRA_CA_CERTS",
            _ => "AWS_CA_BUNDLE",
        }
    }
}

/// What runs a client's six calls: a program and its arguments.
struct Runner {
    client: Client,
    program: PathBuf,
    args: Vec<String>,
}

fn skip(client: Client, why: &str) -> Option<Runner> {
    eprintln!("SKIPPED {client:?}: {why}");
    None
}

/// The client's runner, or `None` (after saying why) when its package is not installed.
fn runner(client: Client) -> Option<Runner> {
    match client {
        Client::GoV1 => go_program(
            client,
            "v1",
            "github.com/aws/aws-sdk-go/service/kms",
            "golang-github-aws-aws-sdk-go-dev",
        ),
        Client::GoV2 => go_program(
            client,
            "v2",
            "github.com/aws/aws-sdk-go-v2/service/kms",
            "golang-github-aws-aws-sdk-go-v2-dev",
        ),
        Client::Ruby => {
            let probe = Command::new("ruby")
                .args(["-e", "require 'aws-sdk-kms'"])
                .stdin(Stdio::null())
                .output();
            match probe {
                Ok(out) if out.status.success() => Some(Runner {
                    client,
                    program: "ruby".into(),
                    args: vec![repo_path("tests/ruby/kms_driver.rb")],
                }),
                _ => skip(client, "ruby with aws-sdk-kms is not installed (Debian: apt-get install ruby-aws-sdk-kms)"),
            }
        }
        Client::JsV2 => {
            // Like tests/node_sdk.rs: node and npm are required, not optional.
            let dir = common::deps::node_modules_of("tests/js-v2", "js-v2-sdk");
            Some(Runner {
                client,
                program: "node".into(),
                args: vec![
                    repo_path("tests/js-v2/kms-driver.cjs"),
                    dir.to_string_lossy().into_owned(),
                ],
            })
        }
        Client::AwsCli => {
            // Debian's awscli is the CLI v2; a `pip install awscli` earlier on the PATH is v1,
            // which reads HTTPS_PROXY and AWS_CA_BUNDLE too but is not what this tests.
            let program = std::env::var_os("KMS_TAG_GUARD_AWS_CLI_V2")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/usr/bin/aws"));
            let version = Command::new(&program)
                .arg("--version")
                .stdin(Stdio::null())
                .output();
            match version {
                Ok(out) if String::from_utf8_lossy(&out.stdout).starts_with("aws-cli/2.") => {
                    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
                    Some(Runner { client, program, args: vec![] })
                }
                _ => skip(client, &format!("{} is not the AWS CLI v2 (Debian: apt-get install awscli; or set KMS_TAG_GUARD_AWS_CLI_V2)", program.display())),
            }
        }
    }
}

fn repo_path(relative: &str) -> String {
    common::deps::repo_root()
        .join(relative)
        .to_string_lossy()
        .into_owned()
}

/// The Go program `tests/go/<which>/main.go`, built once under `<target>/other-sdks/go-<which>`
/// in GOPATH mode against Debian's /usr/share/gocode.
fn go_program(client: Client, which: &str, package: &str, debian: &str) -> Option<Runner> {
    const GOPATH: &str = "/usr/share/gocode";
    let version = match Command::new("go")
        .arg("version")
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) if out.status.success() => out.stdout,
        _ => {
            return skip(
                client,
                &format!("go is not installed (Debian: apt-get install golang-go {debian})"),
            )
        }
    };
    if !Path::new(GOPATH).join("src").join(package).is_dir() {
        return skip(
            client,
            &format!("{package} is not under {GOPATH} (Debian: apt-get install {debian})"),
        );
    }
    let source = common::deps::repo_root().join(format!("tests/go/{which}/main.go"));
    let mut stamp = std::fs::read(&source).expect("the Go driver's source");
    stamp.extend_from_slice(&version);
    let dir = common::deps::target_dir().join(format!("other-sdks/go-{which}"));
    let dir = common::deps::ensure_installed(&dir, &stamp, |dir| {
        let started = Instant::now();
        common::deps::run(
            Command::new("go")
                .arg("build")
                .arg("-o")
                .arg(dir.join("driver"))
                .arg(&source)
                .env("GOPATH", GOPATH)
                .env("GO111MODULE", "off")
                .env("GOFLAGS", "")
                .env("GOPROXY", "off")
                .env("GOCACHE", dir.join("cache")),
        )?;
        let _ = std::fs::remove_dir_all(dir.join("cache"));
        eprintln!("built the Go {which} driver in {:?}", started.elapsed());
        Ok(())
    });
    Some(Runner {
        client,
        program: dir.join("driver"),
        args: vec![],
    })
}

// ------------------------------------------------------------------------ running them

/// How a run reaches the proxy.
struct Setup<'a> {
    /// The endpoint URL (mode A), or none: the client's own `https://kms.us-east-1.amazonaws.com`.
    endpoint: Option<&'a str>,
    /// Extra environment variables (the proxy variables, the CA bundle).
    env: Vec<(&'a str, String)>,
}

/// A command for `program` with none of this process's AWS, proxy or SSL variables, no shared
/// config files and a HOME of its own, the test credentials and these variables.
fn clean_command(program: &Path, home: &Path, env: &[(&str, String)]) -> Command {
    let mut command = Command::new(program);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().into_owned();
        let upper = name.to_ascii_uppercase();
        if upper.starts_with("AWS_")
            || upper.starts_with("NODE_")
            || upper.starts_with("SSL_CERT")
            || matches!(
                upper.as_str(),
                "HTTP_PROXY" | "HTTPS_PROXY" | "NO_PROXY" | "ALL_PROXY"
            )
        {
            command.env_remove(&name);
        }
    }
    let nowhere = home.join("no-such-file");
    command
        .env("HOME", home)
        .env("AWS_CONFIG_FILE", &nowhere)
        .env("AWS_SHARED_CREDENTIALS_FILE", &nowhere)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_REGION", REGION)
        .env("AWS_DEFAULT_REGION", REGION)
        .env("AWS_SDK_JS_SUPPRESS_MAINTENANCE_MODE_MESSAGE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    command
}

/// Runs `command` to its end (off the runtime: the fake KMS and the proxy run on it), within
/// [`RUN_TIMEOUT`]; its exit status, stdout and stderr.
async fn run(mut command: Command) -> (std::process::ExitStatus, String, String) {
    let shown = format!("{command:?}");
    tokio::task::spawn_blocking(move || {
        let child = command.spawn().unwrap_or_else(|e| panic!("{shown}: {e}"));
        let pid = child.id();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watchdog = {
            let done = done.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + RUN_TIMEOUT;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    if Instant::now() > deadline {
                        // SAFETY: our own child, not yet reaped (we have not returned).
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                        return true;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                false
            })
        };
        let out = child.wait_with_output().expect("wait for the client");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let killed = watchdog.join().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !killed,
            "{shown} did not finish within {RUN_TIMEOUT:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
        (out.status, stdout, stderr)
    })
    .await
    .unwrap()
}

/// The six calls through `runner`, one JSON object each (`id`, `ok`, and for an error `code`,
/// `message`, `status`, `request_id` where the client reports them, `typed` where the SDK has a
/// modeled `TagException` type).
async fn run_calls(runner: &Runner, setup: &Setup<'_>) -> Vec<Value> {
    let home = tempfile::tempdir().unwrap();
    if runner.client == Client::AwsCli {
        return run_cli(runner, setup, home.path()).await;
    }
    let go = matches!(runner.client, Client::GoV1 | Client::GoV2);
    let tls = setup.endpoint.is_none_or(|e| e.starts_with("https://"));
    let mut env = setup.env.clone();
    env.push(("KMS_DRIVER_KEY_ID", KEY_ID.into()));
    if let Some(endpoint) = setup.endpoint {
        env.push(("KMS_DRIVER_ENDPOINT", endpoint.into()));
    }
    if go {
        // Go's HTTP/2 transport says what it does on stderr.
        env.push(("GODEBUG", "http2debug=1".into()));
    }
    let mut command = clean_command(&runner.program, home.path(), &env);
    command.args(&runner.args);
    let (status, stdout, stderr) = run(command).await;
    let shown = format!(
        "{:?}: {status}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        runner.client
    );
    assert!(status.success(), "{shown}");
    let results: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}\n{shown}")))
        .collect();
    let ids: Vec<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, CALLS, "{shown}");
    if go {
        // Both Go SDKs' transports set ForceAttemptHTTP2: over TLS (modes B and C) they speak
        // h2 to the proxy, in plain text (mode A) HTTP/1.1.
        assert_eq!(
            stderr.contains("http2: Transport"),
            tls,
            "{:?} speaks h2 exactly over TLS\n{shown}",
            runner.client
        );
    }
    results
}

/// The six calls as `aws kms ...` commands, one process each; the CLI's error line read as
/// `An error occurred (CODE) when calling the OP operation (reached max retries: 0): MESSAGE`
/// (one line).
async fn run_cli(runner: &Runner, setup: &Setup<'_>, home: &Path) -> Vec<Value> {
    let mut env = setup.env.clone();
    env.push(("AWS_MAX_ATTEMPTS", "1".into()));
    env.push(("AWS_PAGER", String::new()));
    let plaintext_path = home.join("plaintext");
    std::fs::write(&plaintext_path, "hello from the aws cli").unwrap();
    let ciphertext_path = home.join("ciphertext");
    let tag_args = |pairs: &[(&str, &str)]| -> Vec<String> {
        pairs
            .iter()
            .map(|(k, v)| format!("TagKey={k},TagValue={v}"))
            .collect()
    };
    let mut results = Vec::new();
    for id in CALLS {
        let mut args: Vec<String> = vec!["kms".into()];
        match id {
            "encrypt" => args.extend([
                "encrypt".into(),
                "--key-id".into(),
                KEY_ID.into(),
                "--plaintext".into(),
                format!("fileb://{}", plaintext_path.display()),
            ]),
            "decrypt" => args.extend([
                "decrypt".into(),
                "--ciphertext-blob".into(),
                format!("fileb://{}", ciphertext_path.display()),
            ]),
            "tag-allowed" | "tag-denied" => {
                args.extend([
                    "tag-resource".into(),
                    "--key-id".into(),
                    KEY_ID.into(),
                    "--tags".into(),
                ]);
                args.extend(tag_args(if id == "tag-allowed" {
                    &[("team:app", "ledger"), ("cost:center", "4711")]
                } else {
                    &[("Project", "apollo")]
                }));
            }
            "create-tagged" => {
                args.extend(["create-key".into(), "--tags".into()]);
                args.extend(tag_args(&[("team:owner", "payments")]));
            }
            _ => args.push("create-key".into()),
        }
        if let Some(endpoint) = setup.endpoint {
            args.extend(["--endpoint-url".into(), endpoint.into()]);
        }
        args.extend(["--output".into(), "json".into()]);
        let mut command = clean_command(&runner.program, home, &env);
        command.args(&args);
        let (status, stdout, stderr) = run(command).await;
        let mut line = json!({"id": id, "ok": status.success()});
        if status.success() {
            // TagResource prints nothing.
            let output: Value = if stdout.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&stdout)
                    .unwrap_or_else(|e| panic!("aws {args:?}: {e}\n{stdout}\n{stderr}"))
            };
            match id {
                "encrypt" => {
                    let blob = output["CiphertextBlob"].as_str().expect("CiphertextBlob");
                    std::fs::write(&ciphertext_path, base64_decode(blob).unwrap()).unwrap();
                }
                "decrypt" => {
                    let plaintext = base64_decode(output["Plaintext"].as_str().unwrap()).unwrap();
                    assert_eq!(plaintext, b"hello from the aws cli");
                }
                _ => {}
            }
        } else {
            // One line: `An error occurred (TagException) when calling the TagResource
            // operation: kms-tag-guard denied the request: ...`
            let error = stderr
                .lines()
                .find(|l| l.starts_with("An error occurred ("))
                .unwrap_or_else(|| {
                    panic!("aws {args:?} failed ({status}) without an error line:\n{stderr}")
                });
            let code = error["An error occurred (".len()..]
                .split(')')
                .next()
                .unwrap();
            // `... operation: MESSAGE`, or with retries configured
            // `... operation (reached max retries: 0): MESSAGE`.
            let rest = error.split_once(" operation").map(|(_, r)| r).unwrap_or("");
            let rest = match rest.strip_prefix(" (") {
                Some(r) => r.split_once(')').map(|(_, r)| r).unwrap_or(""),
                None => rest,
            };
            let message = rest.strip_prefix(": ").unwrap_or("");
            line["code"] = json!(code);
            line["message"] = json!(message);
            line["exit"] = json!(status.code());
        }
        results.push(line);
    }
    results
}

// ------------------------------------------------------------------------ the checks

#[track_caller]
fn assert_ok(results: &[Value], id: &str) {
    let r = &results[CALLS.iter().position(|c| *c == id).unwrap()];
    assert_eq!(r["ok"], true, "{id}: {r:#}");
}

/// A denial as the client sees it: the error code `TagException`, the rule in the message, a
/// 400 and the SDK's modeled error type where the client reports them.
#[track_caller]
fn assert_denied(results: &[Value], id: &str, rule: &str) {
    let r = &results[CALLS.iter().position(|c| *c == id).unwrap()];
    assert_eq!(r["ok"], false, "{id}: {r:#}");
    assert_eq!(r["code"], "TagException", "{id}: {r:#}");
    let message = r["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("kms-tag-guard denied the request: "),
        "{id}: {r:#}"
    );
    assert!(message.contains(&format!("rule {rule}")), "{id}: {r:#}");
    if let Some(status) = r.get("status") {
        assert_eq!(status, 400, "{id}: {r:#}");
    }
    if let Some(typed) = r.get("typed") {
        assert_eq!(typed, true, "{id}: the SDK's modeled TagException: {r:#}");
    }
    if let Some(exit) = r.get("exit") {
        assert_eq!(exit, 254, "the CLI's exit code for a service error: {r:#}");
    }
}

/// Everything the six calls must show: the allowed calls succeed, the denied ones are typed
/// TagExceptions naming the rule, only the allowed ones reached KMS, each signed for `host`
/// and verified there, and the audit log holds the decisions (and the request ids the SDK
/// reported for the denials).
async fn check(results: &[Value], fake: &FakeKms, proxy: &TestProxy, host: &str) {
    for id in ["encrypt", "decrypt", "tag-allowed", "create-tagged"] {
        assert_ok(results, id);
    }
    assert_denied(results, "tag-denied", "abac-keys");
    assert_denied(results, "create-untagged", "owner-on-create");

    let requests = fake.requests();
    let ops: Vec<&str> = requests.iter().map(|r| r.operation().unwrap()).collect();
    assert_eq!(
        ops,
        ["Encrypt", "Decrypt", "TagResource", "CreateKey"],
        "the denied requests must not reach KMS"
    );
    for r in &requests {
        let credential = r.verified();
        assert_eq!(credential.access_key_id, ACCESS_KEY_ID);
        assert_eq!(credential.region, REGION);
        assert!(credential.signs("host"), "{:?}", credential.signed_headers);
        assert_eq!(r.header("host"), Some(host), "request {}", r.seq);
        assert!(!String::from_utf8_lossy(&r.body).contains("Project"));
    }

    let audit = proxy.settled_audit().await;
    let decisions: Vec<&Value> = audit.iter().filter(|r| r["event"] == "decision").collect();
    let verdicts: Vec<(&str, &str)> = decisions
        .iter()
        .map(|r| {
            (
                r["operation"].as_str().unwrap(),
                r["decision"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        verdicts,
        [
            ("TagResource", "allow"),
            ("TagResource", "deny"),
            ("CreateKey", "allow"),
            ("CreateKey", "deny")
        ],
        "{audit:#?}"
    );
    assert_eq!(
        audit.len(),
        6,
        "two outcomes, for the allowed changes: {audit:#?}"
    );
    for (id, decision) in [
        ("tag-denied", decisions[1]),
        ("create-untagged", decisions[3]),
    ] {
        let r = &results[CALLS.iter().position(|c| *c == id).unwrap()];
        if let Some(request_id) = r.get("request_id").and_then(Value::as_str) {
            assert_eq!(
                request_id, decision["request_id"],
                "{id}: the SDK's request id is the audit's"
            );
        }
    }
}

/// Mode A: the endpoint URL to the proxy's plain listener (in a pod
/// `http://kms.<region>.amazonaws.com` resolved to the sidecar; here the proxy's address, which
/// is then the signed Host).
async fn mode_a(client: Client) {
    let Some(runner) = runner(client) else { return };
    let fake = FakeKms::start().await;
    let proxy = start_proxy(&fake).await;
    let url = proxy.url();
    let results = run_calls(
        &runner,
        &Setup {
            endpoint: Some(&url),
            env: vec![],
        },
    )
    .await;
    check(&results, &fake, &proxy, &proxy.addr.to_string()).await;
}

/// Mode B: the proxy's TLS listener, with a certificate for `localhost` from a test CA that the
/// client trusts through `AWS_CA_BUNDLE` (in a pod: `https://kms.<region>.amazonaws.com`
/// resolved to the sidecar, with a certificate for that name).
async fn mode_b(client: Client) {
    let Some(runner) = runner(client) else { return };
    let dir = tempfile::tempdir().unwrap();
    let (ca, listener) = listener_pki(dir.path());
    let fake = FakeKms::start().await;
    let proxy = start_proxy_with(
        &fake,
        ProxyConfig {
            listener,
            ..ProxyConfig::default()
        },
    )
    .await;
    let host = format!("localhost:{}", proxy.addr.port());
    let url = format!("https://{host}");
    let setup = Setup {
        endpoint: Some(&url),
        env: vec![(client.ca_variable(), ca.to_string_lossy().into_owned())],
    };
    let results = run_calls(&runner, &setup).await;
    check(&results, &fake, &proxy, &host).await;
}

/// A test CA and a `localhost` leaf it issued, in `dir`: the CA's path and the `[listener]`
/// lines for a TLS listener with the leaf.
fn listener_pki(dir: &Path) -> (PathBuf, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "other_sdks test CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    leaf.distinguished_name
        .push(DnType::CommonName, "localhost");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let (ca_path, cert_path, key_path) =
        (dir.join("ca.pem"), dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&ca_path, ca_pem).unwrap();
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let listener = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"",
        cert_path.display(),
        key_path.display()
    );
    (ca_path, listener)
}

/// A mode C gateway in front of `fake` that intercepts KMS names with a CA that `kms-tag-guard
/// ca init` writes in `dir`; the gateway and the CA certificate's path (what clients trust).
async fn gateway(fake: &FakeKms, dir: &Path) -> (TestProxy, PathBuf) {
    let (cert, key) = kms_tag_guard::tls::ca_init(&dir.join("ca")).unwrap();
    let intercept = format!(
        "ca_cert = \"{}\"\nca_key = \"{}\"\ntunnel_hosts = []",
        cert.display(),
        key.display()
    );
    let proxy = start_proxy_with(
        fake,
        ProxyConfig {
            intercept,
            admin: true,
            ..ProxyConfig::default()
        },
    )
    .await;
    (proxy, cert)
}

/// The gateway's count of CONNECT requests it intercepted.
async fn intercepted(proxy: &TestProxy) -> f64 {
    scrape(proxy.admin_addr.unwrap()).await.count(
        "kms_tag_guard_requests_total",
        &[("operation", "CONNECT"), ("decision", "pass")],
    )
}

/// Mode C: no endpoint, the gateway in `proxy_variable` (and, for Ruby, nothing else works:
/// see [`ruby_mode_c_http_proxy`]), the interception CA in `AWS_CA_BUNDLE`.
async fn mode_c(client: Client, proxy_variable: &str) {
    let Some(runner) = runner(client) else { return };
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeKms::start().await;
    let (proxy, ca) = gateway(&fake, dir.path()).await;
    let setup = Setup {
        endpoint: None,
        env: vec![
            (proxy_variable, proxy.url()),
            (client.ca_variable(), ca.to_string_lossy().into_owned()),
        ],
    };
    let results = run_calls(&runner, &setup).await;
    check(&results, &fake, &proxy, KMS_HOST).await;
    let tunnels = intercepted(&proxy).await;
    assert!(
        tunnels >= 1.0,
        "the calls went through intercepted CONNECTs"
    );
    eprintln!("{client:?} mode C: 6 calls through {tunnels} intercepted CONNECT(s)");
}

// ======================================================================== the tests

#[tokio::test]
async fn go_v1_mode_a_endpoint() {
    mode_a(Client::GoV1).await;
}

#[tokio::test]
async fn go_v1_mode_b_tls_listener_and_ca_bundle() {
    mode_b(Client::GoV1).await;
}

#[tokio::test]
async fn go_v1_mode_c_https_proxy_and_ca_bundle() {
    mode_c(Client::GoV1, "HTTPS_PROXY").await;
}

#[tokio::test]
async fn go_v2_mode_a_endpoint_resolver_from_url() {
    mode_a(Client::GoV2).await;
}

#[tokio::test]
async fn go_v2_mode_b_tls_listener_and_ca_bundle() {
    mode_b(Client::GoV2).await;
}

#[tokio::test]
async fn go_v2_mode_c_https_proxy_and_ca_bundle() {
    mode_c(Client::GoV2, "HTTPS_PROXY").await;
}

#[tokio::test]
async fn ruby_mode_a_endpoint() {
    mode_a(Client::Ruby).await;
}

/// Ruby's Net::HTTP takes its proxy from `http_proxy`/`HTTP_PROXY` even for https:// (it asks
/// an `http://` URI of the target for its proxy), so that is the variable for mode C.
#[tokio::test]
async fn ruby_mode_b_tls_listener_and_ca_bundle() {
    mode_b(Client::Ruby).await;
}

#[tokio::test]
async fn ruby_mode_c_http_proxy() {
    mode_c(Client::Ruby, "HTTP_PROXY").await;
}

/// The client option `http_proxy:` (the driver passes `KMS_DRIVER_HTTP_PROXY_OPTION` to
/// `Aws::KMS::Client.new`): a proxy for this client only, no environment variable.
#[tokio::test]
async fn ruby_mode_c_http_proxy_option() {
    mode_c(Client::Ruby, "KMS_DRIVER_HTTP_PROXY_OPTION").await;
}

/// The trap: `HTTPS_PROXY` alone leaves Ruby without a proxy (it would call KMS directly, past
/// the gateway), while `HTTP_PROXY` gives it one. Asked of the Net::HTTP session the SDK opens
/// (`Net::HTTP.new(host, port)`, proxy from the environment), without connecting anywhere.
#[tokio::test]
async fn ruby_ignores_https_proxy() {
    if runner(Client::Ruby).is_none() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let script = "require 'net/http'; h = Net::HTTP.new('kms.us-east-1.amazonaws.com', 443); \
                  print h.proxy? ? h.proxy_uri.to_s : 'none'";
    let proxied = |variable: &'static str| {
        let mut command = clean_command(
            Path::new("ruby"),
            home.path(),
            &[(variable, "http://127.0.0.1:9".into())],
        );
        command.args(["-e", script]);
        // Resolving the KMS name is part of Ruby's check; without DNS it fails quietly.
        run(command)
    };
    let (_, https, _) = proxied("HTTPS_PROXY").await;
    assert_eq!(https, "none", "Ruby ignores HTTPS_PROXY");
    let (_, http, _) = proxied("HTTP_PROXY").await;
    assert_eq!(http, "http://127.0.0.1:9", "Ruby reads HTTP_PROXY");
}

#[tokio::test]
async fn aws_cli_v2_mode_a_endpoint_url() {
    mode_a(Client::AwsCli).await;
}

#[tokio::test]
async fn aws_cli_v2_mode_b_tls_listener_and_ca_bundle() {
    mode_b(Client::AwsCli).await;
}

#[tokio::test]
async fn aws_cli_v2_mode_c_https_proxy_and_ca_bundle() {
    mode_c(Client::AwsCli, "HTTPS_PROXY").await;
}

#[tokio::test]
async fn js_v2_mode_a_endpoint() {
    mode_a(Client::JsV2).await;
}

#[tokio::test]
async fn js_v2_mode_b_tls_listener_and_node_extra_ca_certs() {
    mode_b(Client::JsV2).await;
}

/// An `hpagent` HttpsProxyAgent as `httpOptions.agent`: CONNECT, then TLS inside the tunnel.
#[tokio::test]
async fn js_v2_mode_c_hpagent_agent() {
    mode_c(Client::JsV2, "KMS_DRIVER_PROXY").await;
}

/// The trap: the JavaScript v2 SDK's own `httpOptions.proxy` sends the request to the proxy in
/// clear text (`POST https://kms.us-east-1.amazonaws.com/`, no CONNECT), Encrypt's plaintext
/// included. A listener on loopback stands in for the proxy and reads what arrives.
#[tokio::test]
async fn js_v2_http_options_proxy_sends_clear_text() {
    let runner = runner(Client::JsV2).expect("node");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy = format!("http://{}", listener.local_addr().unwrap());
    // The first request, then close: the SDK fails that call and the next ones alike.
    let seen = std::thread::spawn(move || {
        use std::io::Read;
        let (mut socket, _) = listener.accept().unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut bytes = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = socket.read(&mut buf) {
            if n == 0 {
                break;
            }
            bytes.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&bytes);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse::<usize>().unwrap())
                    })
                    .unwrap_or(0);
                if body.len() >= length {
                    break;
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    });
    let home = tempfile::tempdir().unwrap();
    let mut command = clean_command(
        &runner.program,
        home.path(),
        &[
            ("KMS_DRIVER_HTTP_OPTIONS_PROXY", proxy),
            ("KMS_DRIVER_KEY_ID", KEY_ID.into()),
        ],
    );
    command.args(&runner.args);
    let (_, stdout, _) = run(command).await;
    let request = seen.join().unwrap();
    assert!(
        request.starts_with("POST https://kms.us-east-1.amazonaws.com/ HTTP/1.1\r\n"),
        "{request}\n{stdout}"
    );
    let plaintext = base64_encode(b"hello from js v2");
    assert!(
        request.contains(&format!("\"Plaintext\":\"{plaintext}\"")),
        "Encrypt's plaintext crossed in clear text: {request}"
    );
    assert!(
        request.contains("\r\nAuthorization: AWS4-HMAC-SHA256 "),
        "{request}"
    );
}
